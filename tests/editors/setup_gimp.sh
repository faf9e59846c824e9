#!/usr/bin/env bash
# Build (once) a Debian chroot with real GIMP 3 for headless tests.
#
# Usage (as root):
#   bash tests/editors/setup_gimp.sh [--suite S] [ROOT]              build if needed, check GIMP runs
#   bash tests/editors/setup_gimp.sh [--suite S] --rebuild [ROOT]    remove ROOT and build again
#   bash tests/editors/setup_gimp.sh [--suite S] --umount [ROOT]     unmount what an OLDER version
#                                                                    of this script left mounted
#   bash tests/editors/setup_gimp.sh [--suite S] --print-cmd [ROOT]  the command prefix to run GIMP
#   bash tests/editors/setup_gimp.sh [--suite S] --print-root [ROOT] print the resolved ROOT
#
# --suite: trixie (GIMP 3.0, the default) or sid (GIMP 3.2); also CC_GIMP_SUITE.
# ROOT defaults to ${CC_EDITOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/controlcanvas-editors}/gimp-SUITE
# Environment: CC_DEBIAN_MIRROR overrides the mirror (default: URIs line of the host's apt sources).
#
# Nothing is ever mounted: commands run in the root through tests/editors/jail.sh (bubblewrap,
# private mount namespace, its own minimal /dev). See tests/editors/README.md.
# Idempotent: a root with the ready marker and a working gimp-console is reused as is.
# A root without the marker (interrupted build) is removed and rebuilt. Concurrent runs are
# serialised with flock on ROOT.lock.
set -euo pipefail

SUITE=${CC_GIMP_SUITE:-trixie}
PACKAGES=(gimp python3-gi gir1.2-gimp-3.0 gir1.2-gegl-0.4 gir1.2-babl-0.1 ca-certificates)
READY_MARKER=.controlcanvas-gimp-ready
BUILDING_MARKER=.controlcanvas-gimp-building

log() { echo "setup_gimp.sh: $*" >&2; }
die() { echo "setup_gimp.sh: ERROR: $*" >&2; exit 1; }
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

ACTION=build
while [[ $# -gt 0 ]]; do
    case "$1" in
        --suite) SUITE="${2:?--suite needs a value}"; shift 2 ;;
        --umount|--unmount) ACTION=umount; shift ;;
        --rebuild) ACTION=rebuild; shift ;;
        --print-cmd) ACTION=print; shift ;;
        --print-root) ACTION=printroot; shift ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (try --help)" ;;
        *) break ;;
    esac
done
[[ $# -le 1 ]] || die "too many arguments (try --help)"
case "$SUITE" in
    trixie|sid) ;;
    *) die "unknown suite '$SUITE' (trixie: GIMP 3.0, sid: GIMP 3.2)" ;;
esac
ROOT="$(normalise_root "${1:-$(editor_cache)/gimp-$SUITE}")"
# GIMP 3.0 and 3.2 both install gimp-console-3 (gimp-console-3.0 exists only in 3.0).
CONSOLE=gimp-console-3

print_usage_cmd() {
    cat <<EOF
GIMP chroot ready: $ROOT ($(head -n1 "$ROOT/$READY_MARKER" 2>/dev/null))
Run GIMP headless (batch, Python):
  bash $(printf %q "$JAIL") $(printf %q "$ROOT") $CONSOLE -i --batch-interpreter=python-fu-eval -b "exec(open('/root/batch.py').read())" --quit
User plug-ins go in $ROOT/root/.config/GIMP/3.x/plug-ins/NAME/NAME.py (executable).
Nothing is mounted; remove the root with: rm -rf --one-file-system $(printf %q "$ROOT")
EOF
}

gimp_works() {
    [[ -f "$ROOT/$READY_MARKER" ]] || return 1
    in_chroot sh -c "command -v $CONSOLE" >/dev/null 2>&1 || return 1
    in_chroot "$CONSOLE" --version >/dev/null 2>&1
}

# Remove ROOT, but only if it looks like something this script made (or is empty).
wipe_root() {
    [[ -e "$ROOT" ]] || return 0
    if [[ -n "$(ls -A -- "$ROOT" 2>/dev/null)" ]] && [[ ! -e "$ROOT/$BUILDING_MARKER" && ! -e "$ROOT/$READY_MARKER" && ! -d "$ROOT/debootstrap" ]]; then
        die "$ROOT exists, is not empty and was not built by this script; remove it or choose another ROOT"
    fi
    remove_root
}

build() {
    local t0=$SECONDS mirror
    mirror="$(find_mirror)"
    log "building $SUITE chroot in $ROOT from $mirror (first time only, ~1-2 min)"
    wipe_root
    mkdir -p -- "$ROOT"
    touch -- "$ROOT/$BUILDING_MARKER"
    bootstrap "$mirror"
    local t1=$SECONDS
    apt_install "$ROOT.apt.log" "${PACKAGES[@]}"
    log "packages installed in $((SECONDS - t1)) s"

    in_chroot "$CONSOLE" --version >/dev/null 2>&1 || die "$CONSOLE does not run in the chroot"
    # First start writes ~/.config/GIMP/3.x and queries all plug-ins; do it now so tests start warm.
    in_chroot "$CONSOLE" -i --batch-interpreter=python-fu-eval -b 'pass' --quit >"$ROOT.warmup.log" 2>&1 \
        || { tail -n 20 "$ROOT.warmup.log" >&2; die "GIMP batch mode with python-fu-eval does not work in the chroot"; }

    { in_chroot "$CONSOLE" --version; date -u +%FT%TZ; echo "mirror=$mirror"; echo "suite=$SUITE"; } >"$ROOT/$READY_MARKER"
    rm -f -- "$ROOT/$BUILDING_MARKER" "$ROOT.warmup.log"
    log "cold build took $((SECONDS - t0)) s; size $(du -sh --one-file-system -- "$ROOT" | cut -f1)"
}

case "$ACTION" in
    printroot) echo "$ROOT"; exit 0 ;;
    print) printf 'bash %q %q\n' "$JAIL" "$ROOT"; exit 0 ;;
esac
[[ $EUID -eq 0 ]] || die "must run as root (debootstrap, bubblewrap)"
if [[ "$ACTION" == umount ]]; then
    [[ -d "$ROOT" ]] || { log "$ROOT does not exist; nothing to unmount"; exit 0; }
    unmount_leftovers; log "nothing is mounted below $ROOT"; exit 0
fi

mkdir -p -- "$(dirname -- "$ROOT")"
exec 9>"$ROOT.lock"
flock 9 || die "cannot lock $ROOT.lock"
ensure_host_tools
unmount_leftovers

if [[ "$ACTION" == rebuild ]]; then wipe_root; fi

if [[ -d "$ROOT" && -f "$ROOT/$READY_MARKER" ]]; then
    if gimp_works; then
        log "cached root OK ($(head -n1 "$ROOT/$READY_MARKER"))"
        print_usage_cmd
        exit 0
    fi
    log "cached root is broken; rebuilding"
    rm -f -- "$ROOT/$READY_MARKER"
    touch -- "$ROOT/$BUILDING_MARKER"
fi

build
gimp_works || die "build finished but $CONSOLE does not work"
print_usage_cmd
