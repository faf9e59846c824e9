"""A tiny GGUF file of a tiny stack's transformer (the ``gguf`` package's writer): Q8_0
for every weight whose rows split into 32-value blocks, F32 for the rest, diffusers keys
(which ``from_single_file`` takes as they are).  For tests and ``bench memory``."""

from __future__ import annotations

from pathlib import Path


def write_gguf(model, path: Path, quant: str = "Q8_0") -> Path:
    """Write ``model``'s state dict (a torch module) as a GGUF file at ``path``."""
    import gguf
    import numpy as np

    kind = getattr(gguf.GGMLQuantizationType, quant)
    block = gguf.GGML_QUANT_SIZES[kind][0]
    writer = gguf.GGUFWriter(str(path), arch="controlcanvas-tiny")
    for name, tensor in model.state_dict().items():
        data = tensor.detach().float().cpu().numpy()
        if data.ndim == 2 and data.shape[-1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, kind),
                              raw_dtype=kind)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
