#!/usr/bin/env bash
# The GUI GIMP under Xvfb, in the chroot of tests/editors/setup_gimp.sh: opens an image,
# calls Filters > ControlNet > Generate from layer INTERACTIVELY (a hidden "reference photo"
# layer below as its style reference), screenshots GIMP's own dialog
# (GimpUi.ProcedureDialog), presses OK, screenshots the image window while the job runs
# (progress text) and the result, presses Ctrl+Z in the image window and checks that one
# undo removed exactly the new layer.
#
# Usage (as root, from the checkout):
#   bash tests/gimp_support/gui_dialog.sh [OUT_DIR]     (default OUT_DIR: docs/img)
# Writes OUT_DIR/gimp-dialog.png, gimp-progress.png (when the job was caught running) and
# gimp-result.png; exit 0 when every check passed,
# 3 when the X tools cannot be installed into the chroot.
# Installs xvfb, xdotool and imagemagick into the chroot the first time (~20 s). Uses its
# own GIMP profile (GIMP3_DIRECTORY=/var/lib/controlcanvas-gimp-gui in the chroot, kept
# between runs: a fresh profile costs ~15 s of plug-in queries), so the batch tier's
# profile is not touched; runs are serialised with flock on that profile.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="$(realpath -m "${1:-$REPO/docs/img}")"
PY="${PYTHON:-$REPO/.venv/bin/python}"
SETUP="$REPO/tests/editors/setup_gimp.sh"
cd "$REPO"
bash "$SETUP" >/dev/null
ROOT="$(bash "$SETUP" --print-root)"

JAIL="$REPO/tests/editors/jail.sh"  # bubblewrap: nothing is mounted on the host
in_chroot() { bash "$JAIL" "$ROOT" "$@"; }
if ! in_chroot sh -c "command -v Xvfb && command -v xdotool && command -v import" >/dev/null; then
    echo "gui_dialog.sh: installing xvfb, xdotool, imagemagick into the chroot" >&2
    bash "$JAIL" --admin "$ROOT" apt-get install -y -qq --no-install-recommends xvfb xdotool imagemagick >/dev/null \
        || { echo "gui_dialog.sh: cannot install xvfb/xdotool/imagemagick in the chroot" >&2; exit 3; }
fi

REL="tmp/cc_gui.$$"
W="$ROOT/$REL"
PROFILE_REL="var/lib/controlcanvas-gimp-gui"
PROFILE="$ROOT/$PROFILE_REL"
mkdir -p "$W/config" "$PROFILE/plug-ins" "$OUT"
# One run at a time per profile.  Background processes get fd 9 closed (9>&-), so a
# leftover could never hold the lock; and every one runs in its own process group
# (setsid), which cleanup kills as a whole (GIMP's plug-in processes included).
exec 9>"$PROFILE.run-lock"
flock -w 600 9 || { echo "gui_dialog.sh: another GUI run holds $PROFILE.run-lock" >&2; exit 1; }
GROUPS_STARTED=()
cleanup() {
    local g
    for g in "${GROUPS_STARTED[@]}"; do kill -- "-$g" 2>/dev/null || true; done
    sleep 0.5
    for g in "${GROUPS_STARTED[@]}"; do kill -9 -- "-$g" 2>/dev/null || true; done
    rm -rf "$W" "$PROFILE/controlcanvas.json"
}
trap cleanup EXIT
# bg_chroot VAR=VALUE... CMD...: run CMD in the chroot, in the background, in its own group
bg_chroot() {
    setsid bash "$JAIL" "$ROOT" "$@" 9>&- &
    GROUPS_STARTED+=($!)
}

"$PY" "$REPO/packaging/build.py" --out "$W/dist" >/dev/null
rm -rf "$PROFILE/plug-ins/controlcanvas"
cp -a "$W/dist/controlcanvas" "$PROFILE/plug-ins/"
rm -f "$PROFILE/controlcanvas.json"
# GIMP fills an interactive run's dialog with the procedure's last-used values, over the
# arguments the script gives: forget them, so the dialog shows params.json's.
LAST="$PROFILE/plug-in-settings/GimpProcedureConfigRun-python-fu-controlcanvas-generate.last"
rm -f "$LAST"

# The picture: an OpenPose skeleton drawn by the plug-ins' renderer (shared.pose); a server
# with the fake engine (0.15 s per step, so the progress bar is visible) and its token file.
"$PY" - "$W" <<'PY'
import sys
sys.path[:0] = ["plugin_gimp", "."]
from shared import pose
from PIL import Image
img = pose.render_people((pose.default_person(320, 400),), 320, 400)
Image.frombytes("RGBA", img.size, img.data).save(sys.argv[1] + "/pose.png")
from pathlib import Path
from tests import artist_stack  # a painting as the reference layer (IP-Adapter), in style mode
artist_stack.reference_png(Path(sys.argv[1]) / "reference.png")
PY
setsid "$PY" - "$W" 9>&- <<'PY' &
import sys, time
sys.path.insert(0, ".")
from backend.server.config import ServerConfig
from backend.engines.fake import FakeEngine
from backend.server.local import ServerThread
work = sys.argv[1]
token = "gui-test-token"
open(work + "/config/token", "w").write(token + "\n")
with ServerThread(FakeEngine(step_seconds=0.15), ServerConfig(port=0), token=token) as s:
    open(work + "/url.tmp", "w").write(s.url)
    import os; os.replace(work + "/url.tmp", work + "/url")
    while True:
        time.sleep(1)
PY
GROUPS_STARTED+=($!)
for _ in $(seq 100); do [[ -s "$W/url" ]] && break; sleep 0.1; done
URL="$(cat "$W/url")"

# Where Settings / connection test would have saved the address (the dialog has no address
# field; the token comes from the token file as with `controlcanvas serve`).
printf '{"server-url": "%s"}\n' "$URL" >"$PROFILE/controlcanvas.json"
cat >"$W/params.json" <<JSON
{"work": "/$REL", "input": "/$REL/pose.png",
 "reference": "/$REL/reference.png",
 "args": {"prompt": "knight in armour, full body", "seed": 1234,
          "condition": "openpose", "annotate": false, "steps": 12,
          "reference-layer": "reference photo", "reference-mode": "style",
          "reference-weight": 0.9}}
JSON

cp "$HERE/gui_batch.py" "$W/gimp_support_gui_batch.py"
DISPLAY_NUM=""
for n in $(seq 100 199); do  # a display number nobody uses in the chroot
    [[ -e "$ROOT/tmp/.X$n-lock" || -e "$ROOT/tmp/.X11-unix/X$n" ]] || { DISPLAY_NUM=":$n"; break; }
done
[[ -n "$DISPLAY_NUM" ]] || { echo "gui_dialog.sh: no free X display number" >&2; exit 1; }
bg_chroot Xvfb "$DISPLAY_NUM" -screen 0 1400x1000x24 -nolisten tcp >/dev/null 2>&1
sleep 1
X() { in_chroot DISPLAY="$DISPLAY_NUM" "$@"; }
bg_chroot DISPLAY="$DISPLAY_NUM" GIMP3_DIRECTORY="/$PROFILE_REL" \
    CONTROLCANVAS_CONFIG_DIR="/$REL/config" gimp-3 --no-splash \
    --batch-interpreter=python-fu-eval \
    -b "p='/$REL/gimp_support_gui_batch.py'; exec(compile(open(p).read(), p, 'exec'), {'PARAMS': '/$REL/params.json'})" \
    >"$W/gimp.log" 2>&1

wait_file() { for _ in $(seq "$2"); do [[ -e "$W/$1" ]] && return 0; sleep 0.5; done
              echo "gui_dialog.sh: timed out waiting for $1; GIMP log:" >&2; tail -30 "$W/gimp.log" >&2; exit 1; }
window() { X xdotool search --onlyvisible --name "$1" 2>/dev/null | head -n1 || true; }

wait_file dialog-requested 240
DIALOG=""
for _ in $(seq 60); do DIALOG="$(window 'ControlNet: Generate from layer')"; [[ -n "$DIALOG" ]] && break; sleep 0.5; done
[[ -n "$DIALOG" ]] || { echo "gui_dialog.sh: the dialog did not appear" >&2; tail -30 "$W/gimp.log" >&2; exit 1; }
sleep 1.5  # let it draw
X import -window "$DIALOG" "/$REL/dialog.png"
cp "$W/dialog.png" "$OUT/gimp-dialog.png"
RUNNING="$(window 'RGB color.* – GIMP')"  # wide enough for the status bar's progress text
[[ -z "$RUNNING" ]] || X xdotool windowsize --sync "$RUNNING" 1100 720
X xdotool windowfocus --sync "$DIALOG" key Return
sleep 1.2  # mid-job (12 steps of 0.15 s): GIMP's progress bar says "step N/M"
if [[ -n "$RUNNING" && ! -e "$W/generated" ]]; then
    X import -window "$RUNNING" "/$REL/progress.png" && cp "$W/progress.png" "$OUT/gimp-progress.png"
fi

wait_file generated 120
sleep 1
WELCOME="$(window 'Welcome to GIMP')"  # a fresh profile greets once
[[ -z "$WELCOME" ]] || X xdotool windowunmap --sync "$WELCOME"
IMAGE_WIN="$(window 'RGB color.* – GIMP')"
[[ -n "$IMAGE_WIN" ]] || { echo "gui_dialog.sh: no image window" >&2; exit 1; }
X xdotool windowsize --sync "$IMAGE_WIN" 1100 720
sleep 1.5
X import -window "$IMAGE_WIN" "/$REL/result.png"
cp "$W/result.png" "$OUT/gimp-result.png"
X xdotool windowfocus --sync "$IMAGE_WIN" key ctrl+z
sleep 1
touch "$W/undone"
wait_file finished 60

if "$PY" - "$W/gui_results.json" "$LAST" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
last = open(sys.argv[2]).read()  # what the dialog ran with, as GIMP keeps it
checks = {
    "the dialog ran with the reference layer": '(reference-layer "reference photo")' in last
        and '(reference-mode "style")' in last,
    "dialog OK -> success": r.get("status") == "success",
    "one new layer above the source": len(r["after"]) == len(r["before"]) + 1
        and r["after"][1:] == r["before"] and "seed 1234" in r["after"][0],
    "one Ctrl+Z removes exactly the new layer": r.get("after_undo") == r["before"],
}
for name, ok in checks.items():
    print("%-45s %s" % (name, "ok" if ok else "FAILED"))
print("layers:", r)
sys.exit(0 if all(checks.values()) else 1)
PY
then :; else echo "gui_dialog.sh: GIMP log:" >&2; tail -30 "$W/gimp.log" >&2; exit 1; fi
echo "screenshots: $OUT/gimp-dialog.png $OUT/gimp-result.png"
