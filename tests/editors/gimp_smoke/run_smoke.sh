#!/usr/bin/env bash
# End-to-end smoke test of real GIMP 3 in the chroot built by ../setup_gimp.sh:
# installs the cc_smoke plug-in, runs gimp-console-3 in batch mode (python-fu-eval),
# checks menu path, pixels read/written, new layer, undo group, host networking (127.0.0.1),
# error statuses, and the exit code of a failing batch command.
# Usage (as root): bash tests/editors/gimp_smoke/run_smoke.sh [ROOT]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
SETUP="$HERE/../setup_gimp.sh"
ROOT="$(bash "$SETUP" --print-root ${1:+"$1"})"
bash "$SETUP" ${1:+"$1"} >/dev/null   # build if needed
JAIL="$HERE/../jail.sh"               # bubblewrap: nothing is mounted on the host

PLUG="$ROOT/root/.config/GIMP/3.0/plug-ins/cc_smoke"
WORK="$ROOT/tmp/cc_smoke"
mkdir -p "$PLUG" "$WORK"
install -m 755 "$HERE/cc_smoke/cc_smoke.py" "$PLUG/cc_smoke.py"
install -m 644 "$HERE/batch.py" "$HERE/make_png.py" "$WORK/"
rm -f "$WORK/result.json" "$WORK/out.png"
bash "$JAIL" "$ROOT" python3 /tmp/cc_smoke/make_png.py /tmp/cc_smoke/in.png 8 6

# Host-side HTTP server on 127.0.0.1 (the chroot shares the host's network namespace).
PORTFILE="$(mktemp)"; rm -f "$PORTFILE"
python3 "$HERE/pixel_server.py" "$PORTFILE" 2>"$WORK/server.log" &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true; rm -f "$PORTFILE"' EXIT
for _ in $(seq 50); do [[ -s "$PORTFILE" ]] && break; sleep 0.1; done
PORT="$(cat "$PORTFILE")"

gimp_batch() {  # gimp_batch FINAL -> runs batch.py, returns gimp's exit code
    cat >"$WORK/params.json" <<JSON
{"input": "/tmp/cc_smoke/in.png", "output": "/tmp/cc_smoke/out.png",
 "cases": ["invert", "http://127.0.0.1:$PORT/pixels", "fail", "raise"], "final": "$1"}
JSON
    bash "$JAIL" "$ROOT" gimp-console-3 -i --batch-interpreter=python-fu-eval \
        -b "p='/tmp/cc_smoke/batch.py'; exec(compile(open(p).read(), p, 'exec'), {})" --quit
}

set +e
gimp_batch ok >"$WORK/gimp.out" 2>"$WORK/gimp.err"; RC_OK=$?
gimp_batch raise >/dev/null 2>"$WORK/gimp_raise.err"; RC_RAISE=$?
set -e

python3 - "$WORK" "$RC_OK" "$RC_RAISE" <<'PY'
import json, sys
work, rc_ok, rc_raise = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
err = open(work + '/gimp.err').read()
r = json.load(open(work + '/result.json'))
c = r['cases']
http = next(k for k in c if k.startswith('http://'))
checks = {
    'exit code 0 on success': rc_ok == 0,
    'exit code 64 when the batch command raises': rc_raise == 64,
    'procedure found': r['found'],
    'menu path': r['menu_paths'] == ['<Image>/Filters/ControlNet'],
    'arguments': r['arguments'] == ['run-mode', 'image', 'drawables', 'spec'],
    'invert: success': c['invert'].get('status') == 'success',
    'invert: new layer on top': c['invert'].get('n_layers_after') == 2 and c['invert'].get('top_name') == 'cc-smoke',
    'invert: pixels': c['invert'].get('pixels_ok') is True,
    'invert: source untouched': c['invert'].get('source_untouched') is True,
    'undo group start/end ok': c['invert'].get('info', {}).get('undo_group_end') is True,
    'undo enabled on loaded image': c['invert'].get('undo_enabled') is True,
    'http from plug-in to host 127.0.0.1': c[http].get('pixels_ok') is True,
    'no websockets in GIMP python': c['invert'].get('info', {}).get('websockets') is False,
    'fail -> execution-error + message': c['fail'].get('status') == 'execution-error'
        and c['fail'].get('pdb_last_error') == 'cc-smoke: asked to fail',
    'raise -> execution-error': c['raise'].get('status') == 'execution-error',
    'saved + reloaded': r.get('saved') is True and r.get('reloaded_top_pixels_equal') is True,
    'Gimp.message on stderr': 'CC Smoke Test-Warning: cc-smoke: spec=invert' in err,
}
for k, v in checks.items():
    print('%-45s %s' % (k, 'ok' if v else 'FAILED'))
print('GIMP python:', c['invert'].get('info', {}).get('python'))
sys.exit(0 if all(checks.values()) else 1)
PY
echo "gimp smoke test passed (logs in $WORK)"
