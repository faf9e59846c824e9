#!/usr/bin/env bash
# The second test environment: controlnet-aux (the `annotators` extra) needs a
# torch/torchvision pair that differs from the main .venv's CPU torch, and
# MediaPipe 0.10.21 (the last wheel that ships its pose model) pins numpy<2.
# So each lives in a venv of its own and the main .venv is never touched:
#
#   .venv-annotators  torch==2.14.1 torchvision==0.29.1 + `pip install -e .[test,annotators]`
#   .venv-mediapipe   mediapipe==0.10.21 only; backend.pose.detect calls it in a subprocess
#
# Usage (from anywhere; CI calls it as is):
#   tests/annotators_env.sh               create/update both venvs, then run the tests
#   tests/annotators_env.sh setup         only create/update the venvs
#   tests/annotators_env.sh test [ARGS]   only run the tests (pytest ARGS appended)
# Environment: PYTHON (default python3), ANNOTATORS_VENV, MEDIAPIPE_VENV (folders),
# SKIP_MEDIAPIPE=1 to leave MediaPipe out.
# Updating is cheap: each venv keeps a stamp of the inputs it was built from.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
AUX_VENV=${ANNOTATORS_VENV:-.venv-annotators}
MP_VENV=${MEDIAPIPE_VENV:-.venv-mediapipe}
TORCH_PAIR=(torch==2.14.1 torchvision==0.29.1)
MEDIAPIPE_SPEC=mediapipe==0.10.21

stamp_of() { cat pyproject.toml tests/annotators_env.sh | sha1sum | cut -c1-12; }

make_venv() {  # folder
    if [ ! -x "$1/bin/python" ]; then
        "$PY" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 needed"'
        "$PY" -m venv "$1"
    fi
}

setup_annotators() {
    make_venv "$AUX_VENV"
    local stamp="$AUX_VENV/.installed-$(stamp_of)"
    [ -f "$stamp" ] && return 0
    "$AUX_VENV/bin/python" -m pip install -q --upgrade pip
    # the pair first, so controlnet-aux's "torch"/"torchvision" are met by it
    "$AUX_VENV/bin/python" -m pip install -q "${TORCH_PAIR[@]}"
    "$AUX_VENV/bin/python" -m pip install -q -e ".[test,annotators]" "${TORCH_PAIR[@]}"
    "$AUX_VENV/bin/python" -c 'import controlnet_aux, cv2, torch, torchvision;
print("annotators venv:", "torch", torch.__version__, "torchvision", torchvision.__version__,
      "cv2", cv2.__version__)'
    rm -f "$AUX_VENV"/.installed-*
    touch "$stamp"
}

setup_mediapipe() {
    [ "${SKIP_MEDIAPIPE:-0}" = 1 ] && return 0
    make_venv "$MP_VENV"
    local stamp="$MP_VENV/.installed-$(stamp_of)"
    [ -f "$stamp" ] && return 0
    "$MP_VENV/bin/python" -m pip install -q --upgrade pip
    "$MP_VENV/bin/python" -m pip install -q "$MEDIAPIPE_SPEC"
    "$MP_VENV/bin/python" -c 'import mediapipe; print("mediapipe venv:", mediapipe.__version__)'
    rm -f "$MP_VENV"/.installed-*
    touch "$stamp"
}

run_tests() {
    local rc=0
    if [ "${SKIP_MEDIAPIPE:-0}" != 1 ]; then
        export CONTROLCANVAS_MEDIAPIPE_PYTHON="$PWD/$MP_VENV/bin/python"
        export CONTROLCANVAS_REQUIRE_MEDIAPIPE=1  # here a missing MediaPipe fails, not skips
    fi
    HF_HUB_OFFLINE=1 QT_QPA_PLATFORM=offscreen CONTROLCANVAS_REQUIRE_ANNOTATORS=1 \
        "$AUX_VENV/bin/python" -m pytest -q -p no:cacheprovider \
        tests/test_annotators_aux.py tests/test_preprocess.py tests/test_pose.py "$@" || rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "annotators_env.sh: pytest collected no tests: that is a failure" >&2
        return 1
    fi
    return "$rc"
}

cmd=${1:-all}
shift || true
case "$cmd" in
    setup) setup_annotators; setup_mediapipe ;;
    test) run_tests "$@" ;;
    all) setup_annotators; setup_mediapipe; run_tests "$@" ;;
    *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
