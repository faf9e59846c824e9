#!/usr/bin/env bash
# Build (once) a Debian chroot with a real Krita for headless tests.
#
# Usage (as root):
#   bash tests/editors/setup_krita.sh [--suite S] [--rebuild] [ROOT]  build if needed, print run command
#   bash tests/editors/setup_krita.sh [--suite S] --umount [ROOT]     unmount what an OLDER version
#                                                                     of this script left mounted
#   bash tests/editors/setup_krita.sh [--suite S] --print-root        print the default ROOT and exit
#
# --suite (or CC_KRITA_SUITE): bookworm (Krita 5.1, the default), trixie (5.2), sid (5.3),
# experimental (Krita 6.0, PyQt6).
# ROOT defaults to
#   ${CC_EDITOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/controlcanvas-editors}/krita-SUITE
#
# Nothing is ever mounted: commands run in the root through tests/editors/jail.sh (bubblewrap,
# private mount namespace, its own minimal /dev). See tests/editors/README.md.
# Idempotent: a complete root carries the marker file ROOT/.controlcanvas-ready;
# a root without it (interrupted build) is deleted and rebuilt.
# Cold build ~65-80 s and ~930 MB for bookworm (measured); a warm run checks the marker only.
#
# Run Python code with the real `krita` module afterwards (module MOD.py with
# function FUNC, in a directory DIR visible inside the chroot, e.g. ROOT/tmp/x):
#   bash tests/editors/jail.sh ROOT QT_QPA_PLATFORM=offscreen PYTHONUNBUFFERED=1 \
#       PYTHONPATH=/tmp/x kritarunner -s MOD -f FUNC
set -euo pipefail

SUITE=${CC_KRITA_SUITE:-bookworm}
MARKER_NAME=.controlcanvas-ready
MARKER_VERSION=2

log() { echo "setup_krita.sh: $*" >&2; }
die() { echo "setup_krita.sh: ERROR: $*" >&2; exit 1; }
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }

MODE=setup
REBUILD=0
ROOT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --suite) SUITE="${2:?--suite needs a value}"; shift ;;
        --umount|--unmount) MODE=umount ;;
        --rebuild) REBUILD=1 ;;
        --print-root) MODE=print-root ;;
        -h|--help) usage; exit 0 ;;
        --) shift; [ $# -gt 0 ] && ROOT="$1"; break ;;
        -*) usage >&2; die "unknown option: $1" ;;
        *) [ -z "$ROOT" ] || die "more than one ROOT given"; ROOT="$1" ;;
    esac
    shift
done

# kritarunner needs only krita + its PyQt (QT_QPA_PLATFORM=offscreen works for it).
# xvfb + xauth (~11 MB) are for the full `krita` GUI, which forces the xcb platform
# (ignores QT_QPA_PLATFORM and -platform): run it under `xvfb-run -a`.
# Debian's Krita 6 does not pull qt6-svg-plugins: without it every icon is blank.
BASE_SUITE=$SUITE
APT_TARGET=()
case "$SUITE" in
    bookworm|trixie|sid) PACKAGES=(krita python3-pyqt5 python3-pyqt5.sip xvfb xauth) ;;
    experimental)
        BASE_SUITE=sid
        APT_TARGET=(-t experimental)
        PACKAGES=(krita python3-pyqt6 qt6-svg-plugins xvfb xauth) ;;
    *) die "unknown suite '$SUITE' (bookworm, trixie, sid or experimental)" ;;
esac
ROOT="$(normalise_root "${ROOT:-$(editor_cache)/krita-$SUITE}")"

if [ "$MODE" = print-root ]; then echo "$ROOT"; exit 0; fi
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap and bubblewrap need it)"

if [ "$MODE" = umount ]; then
    [ -d "$ROOT" ] || { log "$ROOT does not exist; nothing to unmount"; exit 0; }
    unmount_leftovers
    log "nothing is mounted below $ROOT"
    exit 0
fi

base_ok() {   # a finished build (any package set)
    [ -f "$ROOT/$MARKER_NAME" ] && grep -qx "version=$MARKER_VERSION" "$ROOT/$MARKER_NAME" \
        && [ -x "$ROOT/usr/bin/krita" ]
}
packages_ok() { grep -qx "packages=${PACKAGES[*]}" "$ROOT/$MARKER_NAME"; }

install_packages() { apt_install "$ROOT.apt.log" "${APT_TARGET[@]}" "${PACKAGES[@]}"; }

# Sanity check: kritarunner must import the real krita module headlessly. This
# also warms HOME=/root (first kritarunner start copies ~87 MB of resources, ~8 s).
check_krita() {
    local dir="$ROOT/tmp/cc_setup_check" out line
    rm -rf "$dir"; mkdir -p "$dir"
    cat >"$dir/cc_setup_check.py" <<'EOF'
import sys
import krita
def main(*args):
    k = krita.Krita.instance()
    print("CC_CHECK krita=%s python=%d.%d.%d" % ((k.version(),) + tuple(sys.version_info[:3])))
EOF
    out="$(in_chroot QT_QPA_PLATFORM=offscreen PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/cc_setup_check \
           timeout 300 kritarunner -s cc_setup_check -f main 2>&1 || true)"
    rm -rf "$dir"
    line="$(grep -m1 '^CC_CHECK ' <<<"$out" || true)"
    if [ -z "$line" ]; then
        echo "$out" | tail -n 30 >&2
        die "kritarunner could not run Python with the krita module in $ROOT"
    fi
    KRITA_VERSION="$(sed -n 's/.*krita=\([^ ]*\).*/\1/p' <<<"$line")"
    PY_VERSION="$(sed -n 's/.*python=\([^ ]*\).*/\1/p' <<<"$line")"
}

write_marker() {
    {
        echo "version=$MARKER_VERSION"
        echo "suite=$SUITE"
        echo "packages=${PACKAGES[*]}"
        echo "mirror=$MIRROR"
        echo "krita=$KRITA_VERSION"
        echo "python=$PY_VERSION"
        echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "build_seconds=$((SECONDS - START))"
    } >"$ROOT/$MARKER_NAME.tmp"
    mv "$ROOT/$MARKER_NAME.tmp" "$ROOT/$MARKER_NAME"
}

print_run_hint() {
    local kv pv
    kv="$(sed -n 's/^krita=//p' "$ROOT/$MARKER_NAME" 2>/dev/null || true)"
    pv="$(sed -n 's/^python=//p' "$ROOT/$MARKER_NAME" 2>/dev/null || true)"
    cat <<EOF
Krita chroot ready: $ROOT  (krita ${kv:-?}, python ${pv:-?})
Put your module in a directory under the root (e.g. $ROOT/tmp/cc) and run:
  bash $JAIL '$ROOT' QT_QPA_PLATFORM=offscreen PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/cc \\
      kritarunner -s MODULE -f FUNCTION [ARGS...]
(kritarunner exits 0 even if Python raises: print markers and grep them. HOME=/root is
pre-warmed; a fresh HOME costs ~8 s and 87 MB of resources on its first run.)
Full GUI krita (plug-ins from \$HOME/.local/share/krita/pykrita, enabled in \$HOME/.config/kritarc):
  bash $JAIL '$ROOT' xvfb-run -a -s '-screen 0 1280x800x24' krita --nosplash
Nothing is mounted; remove the root with: rm -rf --one-file-system '$ROOT'
EOF
}

# ---------------------------------------------------------------- main
mkdir -p "$(dirname "$ROOT")"
# One builder at a time per ROOT.
exec 9>"$ROOT.lock"
flock -w 1800 9 || die "another setup_krita.sh holds $ROOT.lock"
ensure_host_tools
unmount_leftovers

START=$SECONDS
if [ "$REBUILD" = 0 ] && base_ok; then
    if ! packages_ok; then   # older build with another package list: top up in place
        log "installing missing packages into the existing root: ${PACKAGES[*]}"
        MIRROR="$(sed -n 's/^mirror=//p' "$ROOT/$MARKER_NAME")"
        install_packages
        check_krita
        write_marker
    fi
    print_run_hint
    exit 0
fi

if [ -e "$ROOT" ]; then
    log "removing incomplete (or --rebuild) root $ROOT"
    remove_root
fi

MIRROR="$(find_mirror)"
bootstrap "$MIRROR" "$BASE_SUITE"
{
    echo "deb $MIRROR $BASE_SUITE main"
    case "$SUITE" in
        bookworm|trixie) echo "deb $MIRROR $SUITE-updates main" ;;
        experimental) echo "deb $MIRROR experimental main" ;;
    esac
} >"$ROOT/etc/apt/sources.list"
install_packages
check_krita
write_marker
log "built in $((SECONDS - START)) s; size $(du -sxh "$ROOT" 2>/dev/null | cut -f1)"
print_run_hint
