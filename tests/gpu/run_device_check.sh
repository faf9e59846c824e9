#!/usr/bin/env bash
# The GPU device check of issue 17, in one bounded run (under 8 minutes):
#
#   1. env:      python, torch, CUDA, GPU and the versions that will run (into summary.json)
#   2. install:  the carried wheels (diffusers, websockets) into a private --target folder
#   3. pytest:   the CUDA-only tests (pytest -m gpu: tests/test_gpu_fastpath.py and the CUDA
#                tests of tests/test_engine_diffusers.py and tests/test_lora.py)
#   4. bench:    controlcanvas bench gpu --groups klein,sd15,sdxl  -> OUTDIR/bench-gpu.json
#                (klein: Flux.2 Klein 4B's transformer at 1024², 4 steps, random weights built
#                on the GPU, a small text encoder; about 30 s, so it goes first; issue 23)
#   5. compiled: controlcanvas bench gpu --groups compiled   -> OUTDIR/bench-gpu-compiled.json
#
# Each step has its own timeout, taken from what is left of CC_CHECK_BUDGET (default 450 s),
# so a slow step cannot push the run past 8 minutes; a step with too little time left is
# recorded as skipped.  OUTDIR gets at most 8 files (what the device tool brings back):
# summary.json (steps, exit codes, seconds, versions), one .log per step, the two JSONs.
#
# Usage
#   tests/gpu/run_device_check.sh OUTDIR            on the GPU machine (python3 there holds torch)
#   tests/gpu/run_device_check.sh --dry-run OUTDIR  here, on the CPU: no install, the Python in
#                                                   $PYTHON (e.g. .venv/bin/python), bench gpu
#                                                   --dry-run with the tiny models (tested by
#                                                   tests/test_gpu_fastpath.py)
#
# Carrying the wheels (the GPU machine has no internet; its image has torch, transformers,
# accelerate, safetensors, huggingface_hub, numpy, pillow, opencv and pytest, not diffusers
# websockets or peft).  Here, in the repository root, for the device's Python (3.12 when last
# seen; `python3 -V` there says), into .wheels/ (ignored by git):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .wheels diffusers==0.42.1 websockets==17.4 \
#       peft==0.21.2
#
# (about 7 MB; keep one version of each).  Then call the device tool's run with
#   carry: [".wheels"]     command: bash tests/gpu/run_device_check.sh "$OUT"
# and a timeout_s of about 540.  The files come back under the reply's files_at.

set -u

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    shift
fi
OUT="${1:?usage: tests/gpu/run_device_check.sh [--dry-run] OUTDIR}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${CC_CHECK_BUDGET:-450}"
SITE="${CC_SITE:-/tmp/controlcanvas-device-site}"
START=$SECONDS

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.tsv"
: > "$STEPS"

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export CONTROLCANVAS_CACHE_DIR="$WORK/cache" CONTROLCANVAS_CONFIG_DIR="$WORK/config"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# step NAME MAX_SECONDS LOGFILE COMMAND...: run with a timeout that fits the budget.
step() {
    local name=$1 max=$2 log=$3
    shift 3
    local left=$(( BUDGET - (SECONDS - START) - 5 ))
    local limit=$(( left < max ? left : max ))
    if [ "$limit" -lt 15 ]; then
        printf '%s\tskipped\t0\t%s\n' "$name" "$log" >> "$STEPS"
        echo "== $name: skipped (no time left)"
        return
    fi
    echo "== $name (at most ${limit}s)"
    local t0=$SECONDS
    (cd "$ROOT" && timeout -k 5 "$limit" "$@") > "$OUT/$log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" "$log" >> "$STEPS"
    echo "   rc $rc in $(( SECONDS - t0 ))s"
}

if [ "$DRY" = 0 ]; then
    shopt -s nullglob
    wheels=("$ROOT"/.wheels/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "no wheels in .wheels/: see the top of this script for how to carry them" \
            > "$OUT/install.log"
        printf 'install\tno-wheels\t0\tinstall.log\n' >> "$STEPS"
    else
        step install 90 install.log "$PY" -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
        export PYTHONPATH="$SITE:$PYTHONPATH"
    fi
fi

step env 30 env.log "$PY" -c '
import json, platform, sys
info = {"python": platform.python_version()}
for name in ("torch", "diffusers", "transformers", "accelerate", "websockets", "peft",
             "triton"):
    try:
        module = __import__(name)
        info[name] = getattr(module, "__version__", "?")
    except Exception as err:
        info[name] = f"missing: {err}"
import torch
info["cuda"] = torch.cuda.is_available()
info["gpu"] = torch.cuda.get_device_name(0) if info["cuda"] else None
print(json.dumps(info))'

step pytest 150 pytest.log "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs \
    tests/test_gpu_fastpath.py tests/test_engine_diffusers.py tests/test_lora.py

BENCH=("$PY" -m backend.cli.main bench gpu)
if [ "$DRY" = 1 ]; then
    BENCH+=(--dry-run)
fi
BENCH+=(--work-dir "$WORK/models")  # the compiled group reuses the SD1.5 models built first
step bench 270 bench.log "${BENCH[@]}" --groups klein,sd15,sdxl --deadline 230 \
    --out "$OUT/bench-gpu.json"
step compiled 200 compiled.log "${BENCH[@]}" --groups compiled --deadline 30 \
    --out "$OUT/bench-gpu-compiled.json"

"$PY" - "$STEPS" "$OUT" "$DRY" "$(( SECONDS - START ))" <<'PY'
import json, sys
from pathlib import Path

steps_file, out, dry, seconds = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
steps = []
for line in Path(steps_file).read_text().splitlines():
    name, rc, took, log = line.split("\t")
    steps.append({"name": name, "rc": int(rc) if rc.lstrip("-").isdigit() else rc,
                  "seconds": int(took), "log": log})
env = {}
env_log = out / "env.log"
if env_log.is_file():
    lines = [l for l in env_log.read_text().splitlines() if l.startswith("{")]
    env = json.loads(lines[-1]) if lines else {}
summary = {"dry_run": dry, "seconds": int(seconds), "env": env, "steps": steps,
           "ok": all(s["rc"] in (0, "skipped") for s in steps)}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
sys.exit(0 if summary["ok"] else 1)
PY
