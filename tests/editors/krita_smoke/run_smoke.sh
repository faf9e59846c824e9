#!/usr/bin/env bash
# Run the Krita API smoke test with the real krita module in the chroot.
#   bash tests/editors/krita_smoke/run_smoke.sh [ROOT]
# Builds/mounts the chroot via ../setup_krita.sh, then runs
# kritarunner -s cc_krita_smoke -f main inside it with an isolated HOME, a
# host-side TCP server on 127.0.0.1 and two copies of a fixture plug-in.
# Exit 0 only if every CC_CHECK passed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SETUP="$HERE/../setup_krita.sh"
if [ $# -gt 0 ]; then ROOT="$1"; else ROOT="$(bash "$SETUP" --print-root)"; fi
bash "$SETUP" "$ROOT" >/dev/null

REL="tmp/cc_krita_smoke.$$"          # path inside the chroot, without leading /
WORK="$ROOT/$REL"
SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    [ "${CC_KEEP:-0}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT
rm -rf "$WORK"; mkdir -p "$WORK/mod" "$WORK/out" "$WORK/home"
cp "$HERE/cc_krita_smoke.py" "$WORK/mod/"

# Fixture plug-in in both candidate user pykrita dirs, under two names.
install_plugin() {  # DIR NAME
    mkdir -p "$1"
    cp -r "$HERE/pykrita/cc_smoke_plugin" "$1/$2"
    sed "s/^X-KDE-Library=.*/X-KDE-Library=$2/" "$HERE/pykrita/cc_smoke_plugin.desktop" >"$1/$2.desktop"
}
install_plugin "$WORK/home/.local/share/krita/pykrita" cc_smoke_plugin_krita
install_plugin "$WORK/home/.local/share/kritarunner/krita/pykrita" cc_smoke_plugin_runner

# Host-side TCP server (host python, host network namespace == chroot's).
python3 "$HERE/tcp_pong_server.py" "$WORK/port" &
SERVER_PID=$!
for _ in $(seq 50); do [ -s "$WORK/port" ] && break; sleep 0.1; done
PORT="$(cat "$WORK/port")"

krun() {  # extra env assignments..., then kritarunner args
    chroot "$ROOT" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="/$REL/home" LANG=C.UTF-8 \
        QT_QPA_PLATFORM=offscreen PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
        CC_SMOKE_PLUGIN_MARKER="/$REL/out/plugin_marker.txt" "$@"
}

START=$(date +%s.%N)
set +e
krun PYTHONPATH="/$REL/mod" timeout 300 kritarunner -s cc_krita_smoke -f main "/$REL/out" "$PORT" \
    >"$WORK/out/main.log" 2>&1
RC=$?
set -e
END=$(date +%s.%N)
grep -E '^CC_(CHECK|DONE)' "$WORK/out/main.log" || true
echo "main: kritarunner rc=$RC, $(python3 -c "print(round($END-$START,2))") s"

# Module resolution without PYTHONPATH: from the user pykrita dir of kritarunner.
set +e
krun timeout 60 kritarunner -s cc_smoke_plugin_runner -f hello x >"$WORK/out/hello_runner.log" 2>&1
echo "hello from ~/.local/share/kritarunner/krita/pykrita: rc=$? $(grep -c CC_PLUGIN_HELLO "$WORK/out/hello_runner.log") hello line(s)"
krun timeout 60 kritarunner -s cc_smoke_plugin_krita -f hello x >"$WORK/out/hello_krita.log" 2>&1
echo "hello from ~/.local/share/krita/pykrita: rc=$? $(grep -c CC_PLUGIN_HELLO "$WORK/out/hello_krita.log") hello line(s)"
# Exit status when the Python function raises / the module does not exist.
krun PYTHONPATH="/$REL/mod" timeout 60 kritarunner -s cc_krita_smoke -f fail >"$WORK/out/fail.log" 2>&1
echo "function raises: rc=$? traceback_lines=$(grep -c 'deliberate failure' "$WORK/out/fail.log")"
krun timeout 60 kritarunner -s no_such_module_cc -f main >"$WORK/out/missing.log" 2>&1
echo "missing module: rc=$? ($(grep -m1 -i -E 'error|no module' "$WORK/out/missing.log" || echo 'no message'))"
set -e
[ -f "$WORK/out/plugin_marker.txt" ] && sed 's/^/plugin marker: /' "$WORK/out/plugin_marker.txt"

if [ "${CC_KEEP:-0}" = 1 ]; then echo "kept outputs in $WORK/out"; fi
grep -q '^CC_DONE [0-9]* 0$' "$WORK/out/main.log" || { echo "SMOKE FAILED (log: $WORK/out/main.log)"; 
    [ "${CC_KEEP:-0}" = 1 ] || tail -n 60 "$WORK/out/main.log"; exit 1; }
echo "SMOKE OK"
