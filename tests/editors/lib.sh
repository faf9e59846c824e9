# Shared by setup_gimp.sh and setup_krita.sh (sourced, not run). The caller sets SUITE,
# ROOT, and a function log; die is defined here unless the caller has one.
#
# Nothing here mounts anything in the host's mount namespace:
#   - debootstrap runs inside `unshare --mount --propagation private`, so the proc/sys/dev
#     mounts it makes in the target vanish with it (also when it is killed);
#   - every command inside the finished root goes through jail.sh (bubblewrap).

EDITORS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
JAIL="$EDITORS_DIR/jail.sh"

declare -F die >/dev/null || die() { echo "${0##*/}: ERROR: $*" >&2; exit 1; }

editor_cache() { echo "${CC_EDITOR_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/controlcanvas-editors}"; }

# Absolute, no trailing slash; refuse anything that is not a folder of its own.
normalise_root() {
    local r
    r="$(realpath -m -- "$1")"
    case "$r" in
        ""|/|/bin|/boot|/dev|/etc|/home|/lib|/lib32|/lib64|/libx32|/media|/mnt|/opt|/proc|/root|/run|/sbin|/srv|/sys|/tmp|/usr|/usr/*|/var|/work)
            die "refusing to use '$r' as a chroot root" ;;
    esac
    echo "$r"
}

in_chroot() { bash "$JAIL" --admin "$ROOT" "$@"; }  # apt-get, dpkg, checks: as root with caps

# Older versions of these scripts left proc/sys/dev mounted in the root: take them down
# before anything reads, writes or removes the root.
unmount_leftovers() {
    [[ -d "$ROOT" ]] || return 0
    bash "$JAIL" --mounts "$ROOT" >/dev/null && return 0
    log "unmounting what an older version left mounted in $ROOT"
    bash "$JAIL" --unmount "$ROOT" || die "mounts remain below $ROOT: unmount them (umount -R) before anything else"
}

# The only way a root is removed: nothing mounted below it, and rm stays on its filesystem.
remove_root() {
    [[ -e "$ROOT" ]] || return 0
    unmount_leftovers
    log "removing $ROOT"
    rm -rf --one-file-system -- "$ROOT" || die "could not remove $ROOT"
}

find_mirror() {
    if [[ -n "${CC_DEBIAN_MIRROR:-}" ]]; then echo "${CC_DEBIAN_MIRROR%/}"; return; fi
    local m=""
    if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
        # First URIs: line that is not a security archive.
        m="$(awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
              /etc/apt/sources.list.d/debian.sources)"
    fi
    if [[ -z "$m" && -r /etc/apt/sources.list ]]; then
        m="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) { if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; continue }
                  if ($i ~ /^[a-z]+:\/\// && $i !~ /security/) { print $i; exit } } }' /etc/apt/sources.list)"
    fi
    m="${m:-http://deb.debian.org/debian}"
    echo "${m%/}"
}

# debootstrap builds roots, bubblewrap enters them; both from the host's Debian packages.
ensure_host_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v bwrap >/dev/null || missing+=(bubblewrap)
    command -v unshare >/dev/null || missing+=(util-linux)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing ${missing[*]} on the host"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        apt-get update -qq || die "apt-get update failed (no network to the Debian mirror?)"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || die "cannot install ${missing[*]}"
    fi
    command -v debootstrap >/dev/null && command -v bwrap >/dev/null \
        || die "debootstrap or bwrap still missing after installing ${missing[*]}"
}

# bootstrap MIRROR [SUITE_FOR_DEBOOTSTRAP]: a minbase root, apt set up for MIRROR/SUITE.
bootstrap() {
    local mirror="$1" base="${2:-$SUITE}" t0=$SECONDS logf
    logf="$(mktemp)"
    local keyring_opt=()
    [[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]] \
        && keyring_opt=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
    log "debootstrap --variant=minbase $base $ROOT $mirror"
    if ! unshare --mount --propagation private --fork \
            debootstrap --variant=minbase "${keyring_opt[@]}" "$base" "$ROOT" "$mirror" >"$logf" 2>&1; then
        tail -n 30 "$logf" >&2
        [[ -f "$ROOT/debootstrap/debootstrap.log" ]] && tail -n 30 "$ROOT/debootstrap/debootstrap.log" >&2
        rm -f "$logf"
        die "debootstrap failed (mirror $mirror); the partial root at $ROOT is rebuilt next run"
    fi
    rm -f "$logf"
    log "debootstrap done in $((SECONDS - t0)) s"
    cat >"$ROOT/etc/apt/apt.conf.d/90controlcanvas" <<'EOF'
Acquire::Check-Valid-Until "false";
Acquire::Retries "3";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
    # Never start services inside the chroot.
    printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
    chmod 755 "$ROOT/usr/sbin/policy-rc.d"
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
}

# apt_install LOG PACKAGE...: update + install inside the root, quietly, log kept on failure.
apt_install() {
    local logf="$1"; shift
    in_chroot apt-get update -qq >"$logf" 2>&1 || { tail -n 30 "$logf" >&2; die "apt-get update in the chroot failed (log: $logf)"; }
    in_chroot apt-get install -y -qq --no-install-recommends "$@" >>"$logf" 2>&1 || {
        tail -n 30 "$logf" >&2; die "apt-get install $* in the chroot failed (log: $logf)"; }
    in_chroot apt-get clean
    rm -f "$logf"
}
