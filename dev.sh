#!/usr/bin/env bash
# One entry point for a fresh machine (Python >= 3.10 and the package registries):
#   ./dev.sh demo          set up, then run the whole editor path on the embedded default model
#   ./dev.sh test          set up, then run the test suite (what CI runs)
#   ./dev.sh bench NAME    set up, then print one benchmark as JSON
#   ./dev.sh setup         only create/update the virtual environment (.venv)
# TORCH_SPEC overrides the torch requirement (default: the CPU build used for trials).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${CONTROLCANVAS_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 needed"'
        "$PY" -m venv "$VENV"
    fi
    local stamp
    stamp="$VENV/.installed-$(cat pyproject.toml dev.sh | sha1sum | cut -c1-12)"
    if [ ! -f "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        # torch first, so the project's "torch>=…" is already met by the chosen build
        "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
        # the scale extra (Ray Serve) too: its tests run against a local Ray; the quant
        # extra (gguf): the GGUF base tests
        "$VENV/bin/python" -m pip install -q -e ".[test,scale,quant]"
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
}

# Test-only system packages: headless Chromium for the hostile-web-page tests (the
# editor chroots install their own tools). Only as root with apt; else those tests skip.
system_test_packages() {
    if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
            && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            chromium >/dev/null || echo "dev.sh: could not install chromium" >&2
    fi
    if [ "${CI:-}" = true ]; then
        export CONTROLCANVAS_REQUIRE_BROWSER=1  # in CI a missing browser fails, not skips
        export CONTROLCANVAS_REQUIRE_EDITORS=1  # ... and so does a real-editor tier
        export CONTROLCANVAS_REQUIRE_RAY=1      # ... and the Ray Serve tests' extra
        export CONTROLCANVAS_REQUIRE_QUANT=1    # ... and the GGUF tests' (the quant extra)
    fi
}

cmd=${1:-}
shift || true
case "$cmd" in
    setup) setup ;;
    demo)
        setup
        HF_HUB_OFFLINE=1 "$VENV/bin/controlcanvas" demo "$@"
        ;;
    test)
        # 1. the main suite in .venv (pure logic, real sockets, tiny models, real GIMP and
        #    Krita in chroots); 2. the annotator tier in its own venvs (controlnet-aux needs
        #    another torch build, MediaPipe needs numpy<2): tests/annotators_env.sh;
        #    3. the floor tier: the engine tests on the diffusers floor (tests/floor_env.sh).
        # CC_SKIP_ANNOTATORS=1 / CC_SKIP_FLOOR=1 skip tier 2 / 3 (only for quick local runs;
        # CI runs all three).
        setup
        system_test_packages
        set +e
        HF_HUB_OFFLINE=1 QT_QPA_PLATFORM=offscreen "$VENV/bin/python" -m pytest "$@"
        rc=$?
        set -e
        if [ "$rc" -eq 5 ]; then
            echo "dev.sh: pytest collected no tests: that is a failure" >&2
            rc=1
        fi
        if [ "${CC_SKIP_ANNOTATORS:-0}" != 1 ]; then
            bash tests/annotators_env.sh || rc=$((rc ? rc : 1))
        fi
        # 3. the engine tests on the lowest diffusers release pyproject.toml allows
        if [ "${CC_SKIP_FLOOR:-0}" != 1 ]; then
            CONTROLCANVAS_VENV="$VENV" bash tests/floor_env.sh || rc=$((rc ? rc : 1))
        fi
        exit "$rc"
        ;;
    bench)
        setup
        HF_HUB_OFFLINE=1 "$VENV/bin/controlcanvas" bench "$@"
        ;;
    *)
        sed -n '2,8p' "$0" >&2
        exit 2
        ;;
esac
