#!/usr/bin/env bash
# Build (once) a Debian bookworm chroot with the real Krita 5 (5.1.5) for
# headless tests, and mount proc/sys/dev in it.
#
# Usage (as root):
#   bash tests/editors/setup_krita.sh [--rebuild] [ROOT]   build if needed, mount, print run command
#   bash tests/editors/setup_krita.sh --umount [ROOT]      unmount proc/sys/dev from ROOT
#   bash tests/editors/setup_krita.sh --print-root         print the default ROOT and exit
#
# ROOT defaults to
#   ${CC_EDITOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/controlcanvas-editors}/krita-bookworm
#
# Idempotent: a complete root carries the marker file ROOT/.controlcanvas-ready;
# a root without it (interrupted build) is unmounted, deleted and rebuilt.
# Cold build ~65-80 s and ~930 MB (measured); a warm run only checks mounts (<0.1 s).
#
# Run Python code with the real `krita` module afterwards (module MOD.py with
# function FUNC, in a directory DIR visible inside the chroot, e.g. ROOT/tmp/x):
#   chroot ROOT env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
#       QT_QPA_PLATFORM=offscreen PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/x \
#       kritarunner -s MOD -f FUNC
set -euo pipefail

SUITE=bookworm
MARKER_NAME=.controlcanvas-ready
MARKER_VERSION=1
# kritarunner needs only krita + PyQt5 (QT_QPA_PLATFORM=offscreen works for it).
# xvfb + xauth (~11 MB) are for the full `krita` GUI, which forces the xcb
# platform (ignores QT_QPA_PLATFORM and -platform): run it under `xvfb-run -a`.
PACKAGES=(krita python3-pyqt5 python3-pyqt5.sip xvfb xauth)

die() { echo "setup_krita.sh: ERROR: $*" >&2; exit 1; }
log() { echo "setup_krita.sh: $*" >&2; }

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

default_root() {
    local cache="${CC_EDITOR_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/controlcanvas-editors}"
    echo "$cache/krita-$SUITE"
}

MODE=setup
REBUILD=0
ROOT=""
while [ $# -gt 0 ]; do
    case "$1" in
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
[ -n "$ROOT" ] || ROOT="$(default_root)"

if [ "$MODE" = print-root ]; then echo "$ROOT"; exit 0; fi

# Normalise ROOT to an absolute path without trailing slash; refuse dangerous ones.
case "$ROOT" in /*) ;; *) ROOT="$PWD/$ROOT" ;; esac
ROOT="${ROOT%/}"
case "$ROOT" in
    ""|/|/bin|/boot|/dev|/etc|/home|/lib|/lib64|/opt|/proc|/root|/run|/sbin|/srv|/sys|/tmp|/usr|/var)
        die "refusing to use '$ROOT' as chroot root" ;;
esac

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, mount and chroot need it)"

# ---------------------------------------------------------------- mounts
MOUNTS=(proc sys dev dev/pts dev/shm)   # mounted in this order, unmounted in reverse

is_mounted() { mountpoint -q "$1" 2>/dev/null; }

mount_all() {
    local m
    for m in "${MOUNTS[@]}"; do
        mkdir -p "$ROOT/$m"
        is_mounted "$ROOT/$m" && continue
        case "$m" in
            proc)    mount -t proc proc "$ROOT/proc" ;;
            sys)     mount -t sysfs sysfs "$ROOT/sys" 2>/dev/null || mount --bind /sys "$ROOT/sys" ;;
            dev)     mount --bind /dev "$ROOT/dev" ;;
            dev/pts) mount -t devpts -o newinstance,ptmxmode=0666 devpts "$ROOT/dev/pts" 2>/dev/null \
                         || mount --bind /dev/pts "$ROOT/dev/pts" ;;
            dev/shm) mount -t tmpfs -o mode=1777 shm "$ROOT/dev/shm" ;;
        esac || die "could not mount $ROOT/$m"
    done
}

umount_all() {
    local i m
    for (( i=${#MOUNTS[@]}-1; i>=0; i-- )); do
        m="${MOUNTS[$i]}"
        if is_mounted "$ROOT/$m"; then
            umount "$ROOT/$m" 2>/dev/null || umount -l "$ROOT/$m" || die "could not unmount $ROOT/$m"
        fi
    done
    # anything else still mounted below ROOT (e.g. left by an interrupted debootstrap)
    if [ -r /proc/self/mountinfo ]; then
        local mp
        while read -r mp; do
            [ -n "$mp" ] && { umount "$mp" 2>/dev/null || umount -l "$mp" || true; }
        done < <(awk -v r="$ROOT/" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r)
    fi
}

if [ "$MODE" = umount ]; then
    [ -d "$ROOT" ] || { log "$ROOT does not exist; nothing to unmount"; exit 0; }
    umount_all
    log "unmounted proc/sys/dev under $ROOT"
    exit 0
fi

# ---------------------------------------------------------------- helpers
mirror_from_host() {
    local uri=""
    if [ -r /etc/apt/sources.list.d/debian.sources ]; then
        # first URIs line that is not the security archive
        uri="$(awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
               /etc/apt/sources.list.d/debian.sources)"
    fi
    if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
        uri="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|ftp|file):/) { if ($i !~ /security/) { print $i; exit } else break } }' \
               /etc/apt/sources.list)"
    fi
    [ -n "$uri" ] || uri="http://deb.debian.org/debian"
    echo "${uri%/}"
}

ensure_debootstrap() {
    command -v debootstrap >/dev/null 2>&1 && return 0
    log "installing debootstrap on the host"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends debootstrap >/dev/null 2>&1; then
        apt-get update -q || die "apt-get update failed on the host"
        apt-get install -y --no-install-recommends debootstrap \
            || die "could not install debootstrap on the host"
    fi
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap still not found after install"
}

in_chroot() {
    chroot "$ROOT" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}

base_ok() {   # a finished build (any package set)
    [ -f "$ROOT/$MARKER_NAME" ] && grep -qx "version=$MARKER_VERSION" "$ROOT/$MARKER_NAME" \
        && [ -x "$ROOT/usr/bin/kritarunner" ]
}
packages_ok() { grep -qx "packages=${PACKAGES[*]}" "$ROOT/$MARKER_NAME"; }

install_packages() {
    in_chroot apt-get update -q || { umount_all; die "apt-get update failed inside the chroot"; }
    in_chroot apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" \
        || { umount_all; die "apt-get install ${PACKAGES[*]} failed inside the chroot"; }
    in_chroot apt-get clean
}

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
    out="$(in_chroot env QT_QPA_PLATFORM=offscreen PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/cc_setup_check \
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
  chroot '$ROOT' env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \\
      QT_QPA_PLATFORM=offscreen PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/cc \\
      kritarunner -s MODULE -f FUNCTION [ARGS...]
(kritarunner exits 0 even if Python raises: print markers and grep them. HOME=/root is
pre-warmed; a fresh HOME costs ~8 s and 87 MB of resources on its first run.)
Full GUI krita (plug-ins from \$HOME/.local/share/krita/pykrita, enabled in \$HOME/.config/kritarc):
  chroot '$ROOT' env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \\
      xvfb-run -a -s '-screen 0 1280x800x24' krita --nosplash
Unmount with: bash $0 --umount '$ROOT'
EOF
}

# ---------------------------------------------------------------- main
mkdir -p "$(dirname "$ROOT")"
# One builder at a time per ROOT.
exec 9>"$ROOT.lock"
flock -w 1800 9 || die "another setup_krita.sh holds $ROOT.lock"

START=$SECONDS
if [ "$REBUILD" = 0 ] && base_ok; then
    mount_all
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
    umount_all
    rm -rf --one-file-system "$ROOT" || die "could not remove $ROOT"
fi

ensure_debootstrap
MIRROR="$(mirror_from_host)"
log "debootstrap --variant=minbase $SUITE $ROOT $MIRROR"
DEBOOTSTRAP_LOG="$(mktemp)"
if ! debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" >"$DEBOOTSTRAP_LOG" 2>&1; then
    tail -n 30 "$DEBOOTSTRAP_LOG" >&2
    [ -f "$ROOT/debootstrap/debootstrap.log" ] && tail -n 30 "$ROOT/debootstrap/debootstrap.log" >&2
    rm -f "$DEBOOTSTRAP_LOG"
    umount_all
    die "debootstrap failed (mirror $MIRROR); the partial root at $ROOT will be rebuilt next run"
fi
rm -f "$DEBOOTSTRAP_LOG"
log "debootstrap done after $((SECONDS - START)) s"

# apt inside the chroot: same mirror, no services, no expiry surprises.
cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
EOF
cat >"$ROOT/etc/apt/apt.conf.d/90controlcanvas" <<'EOF'
Acquire::Check-Valid-Until "false";
Acquire::Retries "3";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
cat >"$ROOT/usr/sbin/policy-rc.d" <<'EOF'
#!/bin/sh
exit 101
EOF
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true

mount_all
install_packages
check_krita
write_marker
log "built in $((SECONDS - START)) s; size $(du -sxh "$ROOT" 2>/dev/null | cut -f1)"
print_run_hint
