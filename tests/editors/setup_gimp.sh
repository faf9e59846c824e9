#!/usr/bin/env bash
# Build (once) a Debian trixie chroot with real GIMP 3 for headless tests.
#
# Usage (as root):
#   bash tests/editors/setup_gimp.sh [ROOT]            build if needed, then mount proc/sys/dev
#   bash tests/editors/setup_gimp.sh --umount [ROOT]   unmount proc/sys/dev of ROOT
#   bash tests/editors/setup_gimp.sh --rebuild [ROOT]  wipe ROOT and build again
#   bash tests/editors/setup_gimp.sh --print-cmd [ROOT]  print the command prefix to run GIMP
#   bash tests/editors/setup_gimp.sh --print-root [ROOT] print the resolved ROOT
#
# ROOT defaults to ${CC_EDITOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/controlcanvas-editors}/gimp-trixie
# Environment: CC_DEBIAN_MIRROR overrides the mirror (default: URIs line of the host's apt sources).
#
# Idempotent: a root with the ready marker and a working gimp-console-3.0 is only (re)mounted.
# A root without the marker (interrupted build) is wiped and rebuilt. Concurrent runs are
# serialised with flock on ROOT.lock.
set -euo pipefail

SUITE=trixie
PACKAGES=(gimp python3-gi gir1.2-gimp-3.0 gir1.2-gegl-0.4 gir1.2-babl-0.1 ca-certificates)
READY_MARKER=.controlcanvas-gimp-ready
BUILDING_MARKER=.controlcanvas-gimp-building

die() { echo "setup_gimp.sh: ERROR: $*" >&2; exit 1; }
log() { echo "setup_gimp.sh: $*" >&2; }

ACTION=build
while [[ $# -gt 0 ]]; do
    case "$1" in
        --umount|--unmount) ACTION=umount; shift ;;
        --rebuild) ACTION=rebuild; shift ;;
        --print-cmd) ACTION=print; shift ;;
        --print-root) ACTION=printroot; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (try --help)" ;;
        *) break ;;
    esac
done
[[ $# -le 1 ]] || die "too many arguments (try --help)"

DEFAULT_ROOT="${CC_EDITOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/controlcanvas-editors}/gimp-trixie"
ROOT="${1:-$DEFAULT_ROOT}"
[[ -n "$ROOT" ]] || die "empty ROOT"
ROOT="$(realpath -m -- "$ROOT")"
case "$ROOT" in
    /|/bin|/boot|/dev|/etc|/home|/lib*|/proc|/root|/run|/sbin|/sys|/tmp|/usr|/usr/*|/var|/work) die "refusing ROOT=$ROOT" ;;
esac

# Command prefix that runs a program inside the chroot with a clean environment.
run_prefix() {
    printf 'chroot %q env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8' "$ROOT"
}
print_usage_cmd() {
    cat <<EOF
GIMP chroot ready: $ROOT
Run GIMP headless (batch, Python):
  $(run_prefix) gimp-console-3.0 -i --batch-interpreter=python-fu-eval -b "exec(open('/root/batch.py').read())" --quit
User plug-ins go in $ROOT/root/.config/GIMP/3.0/plug-ins/NAME/NAME.py (executable).
Unmount when done: bash $(printf %q "$0") --umount $(printf %q "$ROOT")
EOF
}

in_chroot() {  # in_chroot CMD...   (clean env, no prompts)
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"
}

is_mounted() { mountpoint -q -- "$1" 2>/dev/null; }

# Anything mounted at or below ROOT? (reads /proc/self/mountinfo; octal escapes ignored -> good enough)
mounts_below_root() {
    awk -v r="$ROOT" '$5 == r || index($5, r "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

do_mount() {
    [[ -d "$ROOT/proc" && -d "$ROOT/sys" && -d "$ROOT/dev" ]] || die "$ROOT is not a chroot (no proc/sys/dev)"
    local hint="(needs root with CAP_SYS_ADMIN, e.g. a privileged container)"
    is_mounted "$ROOT/proc" || mount -t proc proc "$ROOT/proc" || die "cannot mount $ROOT/proc $hint"
    is_mounted "$ROOT/sys" || mount -t sysfs sysfs "$ROOT/sys" 2>/dev/null \
        || mount --bind /sys "$ROOT/sys" || die "cannot mount $ROOT/sys $hint"
    if ! is_mounted "$ROOT/dev"; then
        mount --rbind /dev "$ROOT/dev" || die "cannot bind-mount /dev on $ROOT/dev $hint"
        mount --make-rslave "$ROOT/dev" 2>/dev/null || true
    fi
}

do_umount() {
    local m failed=0
    # Deepest first (sorted in reverse), so /dev/pts goes before /dev.
    while IFS= read -r m; do
        [[ -n "$m" && "$m" != "$ROOT" ]] || continue
        umount -- "$m" 2>/dev/null || umount -R -- "$m" 2>/dev/null || {
            log "umount $m busy; detaching lazily"; umount -l -- "$m" || failed=1; }
    done < <(mounts_below_root)
    [[ $failed -eq 0 ]] || die "could not unmount everything below $ROOT"
    [[ -z "$(mounts_below_root | grep -vx -- "$ROOT" || true)" ]] || die "mounts remain below $ROOT"
}

gimp_works() {
    [[ -f "$ROOT/$READY_MARKER" && -x "$ROOT/usr/bin/gimp-console-3.0" ]] || return 1
    in_chroot gimp-console-3.0 --version >/dev/null 2>&1
}

# Wipe ROOT, but only if it looks like something this script made (or is empty).
wipe_root() {
    [[ -e "$ROOT" ]] || return 0
    if [[ -n "$(ls -A -- "$ROOT" 2>/dev/null)" ]] && [[ ! -e "$ROOT/$BUILDING_MARKER" && ! -e "$ROOT/$READY_MARKER" && ! -d "$ROOT/debootstrap" ]]; then
        die "$ROOT exists, is not empty and was not built by this script; remove it or choose another ROOT"
    fi
    do_umount
    log "removing $ROOT"
    rm -rf --one-file-system -- "$ROOT"
}

find_mirror() {
    if [[ -n "${CC_DEBIAN_MIRROR:-}" ]]; then echo "$CC_DEBIAN_MIRROR"; return; fi
    local m=""
    if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
        # First URIs: line that is not a security/ports archive.
        m="$(awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
              /etc/apt/sources.list.d/debian.sources)"
    fi
    if [[ -z "$m" && -r /etc/apt/sources.list ]]; then
        m="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) { if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; continue }
                  if ($i ~ /^[a-z]+:\/\// && $i !~ /security/) { print $i; exit } } }' /etc/apt/sources.list)"
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

check_mirror() {  # best effort: fail early and clearly when the mirror is unreachable
    local url="${1%/}/dists/$SUITE/Release"
    if command -v curl >/dev/null; then
        curl -fsS --max-time 30 -o /dev/null "$url" || die "cannot reach the Debian mirror ($url); network needed for the first build"
    elif command -v wget >/dev/null; then
        wget -q -T 30 -O /dev/null "$url" || die "cannot reach the Debian mirror ($url); network needed for the first build"
    fi
}

ensure_debootstrap() {
    command -v debootstrap >/dev/null && return 0
    log "installing debootstrap on the host"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends debootstrap >/dev/null 2>&1; then
        apt-get update -qq || die "apt-get update failed (no network to the Debian mirror?)"
        apt-get install -y --no-install-recommends debootstrap >/dev/null || die "cannot install debootstrap"
    fi
    command -v debootstrap >/dev/null || die "debootstrap still missing"
}

build() {
    local t0=$SECONDS mirror
    mirror="$(find_mirror)"
    log "building $SUITE chroot in $ROOT from $mirror (first time only, ~1-2 min)"
    ensure_debootstrap
    check_mirror "$mirror"
    wipe_root
    mkdir -p -- "$ROOT"
    touch -- "$ROOT/$BUILDING_MARKER"

    local keyring_opt=()
    [[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]] && keyring_opt=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
    if ! debootstrap --variant=minbase "${keyring_opt[@]}" "$SUITE" "$ROOT" "$mirror" >"$ROOT.debootstrap.log" 2>&1; then
        tail -n 20 "$ROOT.debootstrap.log" >&2 || true
        [[ -f "$ROOT/debootstrap/debootstrap.log" ]] && tail -n 20 "$ROOT/debootstrap/debootstrap.log" >&2
        die "debootstrap failed (no network to $mirror? full log: $ROOT.debootstrap.log)"
    fi
    log "debootstrap done in $((SECONDS - t0)) s"

    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
    # Never start services inside the chroot.
    printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
    chmod 755 "$ROOT/usr/sbin/policy-rc.d"
    do_mount
    local t1=$SECONDS
    in_chroot apt-get update -qq || die "apt-get update in the chroot failed (network to $mirror?)"
    in_chroot apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >"$ROOT.apt.log" 2>&1 || {
        tail -n 30 "$ROOT.apt.log" >&2; die "apt-get install in the chroot failed (log: $ROOT.apt.log)"; }
    in_chroot apt-get clean
    log "packages installed in $((SECONDS - t1)) s"

    in_chroot gimp-console-3.0 --version >/dev/null 2>&1 || die "gimp-console-3.0 does not run in the chroot"
    # First start writes ~/.config/GIMP/3.0 and queries all plug-ins; do it now so tests start warm.
    in_chroot gimp-console-3.0 -i --batch-interpreter=python-fu-eval -b 'pass' --quit >"$ROOT.warmup.log" 2>&1 \
        || { tail -n 20 "$ROOT.warmup.log" >&2; die "GIMP batch mode with python-fu-eval does not work in the chroot"; }

    { in_chroot gimp-console-3.0 --version; date -u +%FT%TZ; echo "mirror=$mirror"; } >"$ROOT/$READY_MARKER"
    rm -f -- "$ROOT/$BUILDING_MARKER" "$ROOT.debootstrap.log" "$ROOT.apt.log"
    log "cold build took $((SECONDS - t0)) s; size $(du -sh --one-file-system -- "$ROOT" | cut -f1)"
}

[[ $EUID -eq 0 ]] || die "must run as root (debootstrap, chroot, mount)"

case "$ACTION" in
    umount)
        [[ -d "$ROOT" ]] || { log "$ROOT does not exist; nothing to unmount"; exit 0; }
        do_umount; log "unmounted everything below $ROOT"; exit 0 ;;
    print)
        run_prefix; echo; exit 0 ;;
    printroot)
        echo "$ROOT"; exit 0 ;;
esac

mkdir -p -- "$(dirname -- "$ROOT")"
exec 9>"$ROOT.lock"
flock 9 || die "cannot lock $ROOT.lock"

if [[ "$ACTION" == rebuild ]]; then
    wipe_root
fi

if [[ -d "$ROOT" && -f "$ROOT/$READY_MARKER" ]]; then
    do_mount
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
do_mount
gimp_works || die "build finished but gimp-console-3.0 does not work"
print_usage_cmd
