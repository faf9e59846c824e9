"""What the CUDA devices are and how much memory each has free (for several workers)."""

from __future__ import annotations

from typing import List, Optional


def cuda_devices() -> List[str]:
    """``cuda:0``, ``cuda:1``...: every GPU torch sees (none without CUDA)."""
    import torch
    if not torch.cuda.is_available():
        return []
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def available_ram() -> Optional[int]:
    """RAM the system can give without swapping (None when it cannot be read): where
    offloaded weights wait."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_bytes(device: str) -> Optional[int]:
    """Free memory on a CUDA device, as the driver counts it (other processes included);
    None when it cannot be read."""
    import torch
    try:
        free, _total = torch.cuda.mem_get_info(torch.device(device))
    except (RuntimeError, AssertionError, ValueError):
        return None
    return int(free)
