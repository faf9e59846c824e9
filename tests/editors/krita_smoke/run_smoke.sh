#!/usr/bin/env bash
# Smoke test of Krita 5's Python API with the real krita module, in the chroot.
#   bash tests/editors/krita_smoke/run_smoke.sh [ROOT]        (as root)
#   CC_KEEP=1 ... keeps the outputs (logs, results*.json, PNG/KRA) under ROOT/tmp
#   CC_SKIP_GUI=1 ... skips phase 2
# Phase 1: kritarunner -s cc_krita_smoke -f main (offscreen, no window).
# Phase 2: full `krita` under xvfb-run with the fixture plug-in enabled in kritarc;
#          the plug-in runs the same checks with a window + view (undo, addShapesFromSvg).
# Both phases: a host-side TCP server on 127.0.0.1 and fixture plug-ins in the user
# pykrita dirs. Exit 0 only if every CC_CHECK passed in both phases.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SETUP="$HERE/../setup_krita.sh"
if [ $# -gt 0 ]; then ROOT="$1"; else ROOT="$(bash "$SETUP" --print-root)"; fi
bash "$SETUP" "$ROOT" >/dev/null

# Persistent HOME inside the chroot (a fresh HOME costs ~8 s + 87 MB on first start).
SHOME_REL="var/lib/cc-krita-smoke-home"
SHOME="$ROOT/$SHOME_REL"
REL="tmp/cc_krita_smoke.$$"          # per-run dir, path inside the chroot without leading /
WORK="$ROOT/$REL"
PLUG_KRITA="$SHOME/.local/share/krita/pykrita"               # what krita (GUI) scans
PLUG_RUNNER="$SHOME/.local/share/kritarunner/krita/pykrita"   # what kritarunner puts on sys.path
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$PLUG_KRITA"/cc_smoke_plugin_* "$PLUG_RUNNER"/cc_smoke_plugin_*
    if [ "${CC_KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
rm -rf "$WORK"; mkdir -p "$WORK/mod" "$WORK/out" "$WORK/out_gui" "$SHOME/.config"
cp "$HERE/cc_krita_smoke.py" "$WORK/mod/"

install_plugin() {  # DIR NAME
    mkdir -p "$1"
    rm -rf "${1:?}/$2"
    cp -r "$HERE/pykrita/cc_smoke_plugin" "$1/$2"
    sed "s/^X-KDE-Library=.*/X-KDE-Library=$2/" "$HERE/pykrita/cc_smoke_plugin.desktop" >"$1/$2.desktop"
}
install_plugin "$PLUG_KRITA" cc_smoke_plugin_krita
install_plugin "$PLUG_RUNNER" cc_smoke_plugin_runner
# GUI krita loads a pykrita plug-in only when enabled in kritarc.
cat >"$SHOME/.config/kritarc" <<'EOF'
[python]
enable_cc_smoke_plugin_krita=true
EOF

# Host-side TCP server (host python; the chroot shares the host network namespace).
python3 "$HERE/tcp_pong_server.py" "$WORK/port" &
SERVER_PID=$!
for _ in $(seq 50); do [ -s "$WORK/port" ] && break; sleep 0.1; done
[ -s "$WORK/port" ] || { echo "TCP server did not start"; exit 1; }
PORT="$(cat "$WORK/port")"

krun() {  # [VAR=value...] command...   (inside the chroot, clean environment)
    bash "$HERE/../jail.sh" "$ROOT" HOME="/$SHOME_REL" \
        PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
        CC_SMOKE_PLUGIN_MARKER="/$REL/out/plugin_marker.txt" "$@"
}
secs() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$@"; }

echo "== phase 1: kritarunner (offscreen)"
T0=$(date +%s.%N)
set +e
krun QT_QPA_PLATFORM=offscreen PYTHONPATH="/$REL/mod" \
    timeout 300 kritarunner -s cc_krita_smoke -f main "/$REL/out" "$PORT" >"$WORK/out/main.log" 2>&1
RC=$?
set -e
echo "kritarunner rc=$RC, $(secs "$T0" "$(date +%s.%N)") s"
grep -E '^CC_(CHECK|DONE)' "$WORK/out/main.log" | cut -c1-"${CC_WIDTH:-400}" || true

set +e
krun QT_QPA_PLATFORM=offscreen timeout 60 kritarunner -s cc_smoke_plugin_runner -f hello x \
    >"$WORK/out/hello_runner.log" 2>&1
echo "-s module from ~/.local/share/kritarunner/krita/pykrita (no PYTHONPATH): rc=$?," \
     "$(grep -c CC_PLUGIN_HELLO "$WORK/out/hello_runner.log") hello line(s)"
krun QT_QPA_PLATFORM=offscreen timeout 60 kritarunner -s cc_smoke_plugin_krita -f hello x \
    >"$WORK/out/hello_krita.log" 2>&1
echo "-s module from ~/.local/share/krita/pykrita (no PYTHONPATH): rc=$?," \
     "$(grep -c CC_PLUGIN_HELLO "$WORK/out/hello_krita.log") hello line(s)"
krun QT_QPA_PLATFORM=offscreen PYTHONPATH="/$REL/mod" timeout 60 kritarunner -s cc_krita_smoke -f fail \
    >"$WORK/out/fail.log" 2>&1
echo "function raises: rc=$?, traceback in output: $(grep -c 'deliberate failure' "$WORK/out/fail.log")"
krun QT_QPA_PLATFORM=offscreen timeout 60 kritarunner -s no_such_module_cc -f main \
    >"$WORK/out/missing.log" 2>&1
echo "missing module: rc=$? ($(grep -m1 'ModuleNotFoundError' "$WORK/out/missing.log" || echo 'no message'))"
set -e

GUI_OK=1
if [ "${CC_SKIP_GUI:-0}" != 1 ]; then
    echo "== phase 2: full krita under xvfb-run, fixture plug-in enabled in kritarc"
    T0=$(date +%s.%N)
    set +e
    krun CC_SMOKE_GUI_OUT="/$REL/out_gui" CC_SMOKE_MODDIR="/$REL/mod" CC_SMOKE_PORT="$PORT" \
        timeout 300 xvfb-run -a -s '-screen 0 1280x800x24' krita --nosplash \
        >"$WORK/out_gui/gui.log" 2>&1
    RC=$?
    set -e
    echo "krita rc=$RC, $(secs "$T0" "$(date +%s.%N)") s"
    grep -E '^CC_(CHECK|DONE)' "$WORK/out_gui/gui.log" | cut -c1-"${CC_WIDTH:-400}" || true
    grep -q '^CC_DONE [0-9]* 0$' "$WORK/out_gui/gui.log" || GUI_OK=0
fi
if [ -f "$WORK/out/plugin_marker.txt" ]; then sed 's/^/plugin marker: /' "$WORK/out/plugin_marker.txt"; fi

if [ "${CC_KEEP:-0}" = 1 ]; then echo "kept outputs in $WORK"; fi
if ! grep -q '^CC_DONE [0-9]* 0$' "$WORK/out/main.log"; then
    echo "SMOKE FAILED in phase 1"; tail -n 40 "$WORK/out/main.log"; exit 1
fi
if [ "$GUI_OK" != 1 ]; then
    echo "SMOKE FAILED in phase 2"; tail -n 40 "$WORK/out_gui/gui.log"; exit 1
fi
echo "SMOKE OK"
