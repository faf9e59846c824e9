#!/usr/bin/env bash
# The floor tier: the engine tests on the lowest diffusers release pyproject.toml allows
# (backend/engines/requirements.py: DIFFUSERS_FLOOR).  diffusers is pure Python, so the
# floor release (with httpx, which releases before 0.42 import) is installed into a
# folder of its own and laid over the main .venv with PYTHONPATH; the main .venv is never
# touched.  (The torch floor is not installed here: a second torch build is gigabytes;
# requirements.py says where it comes from.)
#
# Usage (from anywhere; CI calls it as is):
#   tests/floor_env.sh [ARGS]     fetch the floor release once, then run the engine tests
#                                 (pytest ARGS appended)
# Environment: CONTROLCANVAS_VENV (the main venv, default .venv), FLOOR_DIR (where the
# floor release goes, default <venv>/floor-diffusers-<version>), FLOOR_TESTS (the test
# files, default: the engine's).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CONTROLCANVAS_VENV:-.venv}
PYBIN="$VENV/bin/python"
FLOOR=$("$PYBIN" -c 'from backend.engines.requirements import DIFFUSERS_FLOOR as f
print("%d.%d.0" % f)')
DIR=${FLOOR_DIR:-$VENV/floor-diffusers-$FLOOR}
if [ ! -f "$DIR/.complete" ]; then
    rm -rf "$DIR"
    "$PYBIN" -m pip install -q --no-deps --target "$DIR" "diffusers==$FLOOR"
    "$PYBIN" -m pip install -q --target "$DIR" "httpx<1"
    touch "$DIR/.complete"
fi
export PYTHONPATH="$DIR${PYTHONPATH:+:$PYTHONPATH}"
"$PYBIN" -c "import diffusers, sys
assert diffusers.__version__ == '$FLOOR', diffusers.__version__
print('floor tier: diffusers', diffusers.__version__, 'from', diffusers.__file__)"
# the engine's tests, every family's, edit mode's and the adapters' (all run on the floor)
ENGINE_TESTS="tests/test_engine_diffusers.py tests/test_engine_families.py tests/test_models.py
tests/test_gpu_fastpath.py tests/test_lora.py tests/test_live_engine.py tests/test_family_flux.py
tests/test_family_zimage.py tests/test_family_qwen.py tests/test_family_klein.py
tests/test_edit_mode.py tests/test_edit_qwen.py tests/test_t2i_adapter.py tests/test_ipadapter.py
tests/test_ipadapter_flux.py tests/test_gguf.py tests/test_fit.py"
read -r -d '' -a TESTS <<< "${FLOOR_TESTS:-$ENGINE_TESTS}" || true
HF_HUB_OFFLINE=1 exec "$PYBIN" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@"
