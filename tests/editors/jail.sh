#!/usr/bin/env bash
# The one way the editor tiers enter a chroot: bubblewrap, in a private mount namespace.
#
#   bash tests/editors/jail.sh [--admin] ROOT [VAR=VALUE...] CMD [ARGS...]
#       run CMD inside ROOT with a clean environment (PATH, HOME=/root, LANG=C.UTF-8 and
#       the VAR=VALUE given); --admin keeps root's capabilities (apt-get, dpkg), without it
#       the command runs with none
#   bash tests/editors/jail.sh --mounts DIR
#       list what is mounted at or below DIR (one line each); exit 1 when anything is
#   bash tests/editors/jail.sh --unmount DIR
#       unmount everything at or below DIR (leftovers of older versions that mounted
#       proc/sys/dev into the chroot); exit 1 when something stays mounted
#
# Why: the tiers used to mount proc, sys and a bind of the host's /dev into the chroot and
# leave them mounted; a later `rm -rf ~/.cache` walked into that /dev and deleted the host's
# device nodes. Here every command gets its own mount namespace (bwrap): a fresh /proc, a
# minimal /dev built by bwrap (null zero full random urandom tty, a new devpts, a tmpfs
# /dev/shm: never the host's), /sys read-only. Nothing is mounted in the host's namespace,
# so nothing can outlive the command, even when it is killed with SIGKILL (--die-with-parent
# and a pid namespace end every process of the sandbox with it). The network namespace is
# shared, so the editors reach a server on the host's 127.0.0.1. CC_JAIL_OWNER, when set,
# is passed in (and so shows in the sandbox's command line): the test session sets it to
# find what it started.
set -euo pipefail

die() { echo "jail.sh: ERROR: $*" >&2; exit 2; }

# mounts_below DIR: mount points at or below DIR, deepest first. mountinfo escapes
# spaces and other odd bytes as \ooo: decode them before comparing.
mounts_below() {
    local dir
    dir="$(realpath -m -- "$1")"
    awk -v r="$dir" '
        function unescape(s,   out, i, c) {
            out = ""
            for (i = 1; i <= length(s); i++) {
                c = substr(s, i, 1)
                if (c == "\\" && substr(s, i + 1, 3) ~ /^[0-7][0-7][0-7]$/) {
                    out = out sprintf("%c", (substr(s, i + 1, 1) * 64) + (substr(s, i + 2, 1) * 8) + substr(s, i + 3, 1))
                    i += 3
                } else out = out c
            }
            return out
        }
        { p = unescape($5); if (p == r || index(p, r "/") == 1) print p }
    ' /proc/self/mountinfo | sort -ru
}

case "${1:-}" in
    --mounts)
        [[ $# -eq 2 ]] || die "usage: jail.sh --mounts DIR"
        found="$(mounts_below "$2")"
        [[ -z "$found" ]] || { echo "$found"; exit 1; }
        exit 0 ;;
    --unmount)
        [[ $# -eq 2 ]] || die "usage: jail.sh --unmount DIR"
        while IFS= read -r m; do
            [[ -n "$m" ]] || continue
            echo "jail.sh: unmounting leftover $m" >&2
            umount -- "$m" 2>/dev/null || umount -R -- "$m" 2>/dev/null || umount -l -- "$m" || true
        done < <(mounts_below "$2")
        left="$(mounts_below "$2")"
        [[ -z "$left" ]] || { echo "jail.sh: still mounted below $2:" >&2; echo "$left" >&2; exit 1; }
        exit 0 ;;
    -h|--help|"")
        sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

CAPS=()
if [[ "$1" == --admin ]]; then CAPS=(--cap-add ALL); shift; fi
[[ $# -ge 2 ]] || die "usage: jail.sh [--admin] ROOT [VAR=VALUE...] CMD [ARGS...]"
ROOT="$(realpath -m -- "$1")"; shift
[[ -x "$ROOT/usr/bin/env" ]] || die "$ROOT is not a chroot (no usr/bin/env)"
command -v bwrap >/dev/null || die "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"

exec bwrap \
    --bind "$ROOT" / \
    --proc /proc \
    --dev /dev \
    --ro-bind /sys /sys \
    --unshare-pid --unshare-ipc --unshare-uts \
    --die-with-parent \
    "${CAPS[@]}" \
    -- /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
    ${CC_JAIL_OWNER:+CC_JAIL_OWNER="$CC_JAIL_OWNER"} "$@"
