"""The editor tiers leave nothing mounted: not while they run, not after, not when killed.

An older version mounted proc, sys and a bind of the host's /dev into each chroot and never
unmounted them; a later ``rm -rf ~/.cache`` then deleted the host's device nodes. These
tests drive tests/editors/jail.sh and the setup scripts the way the tiers do.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tests.editor_jail import EDITORS, cache_root, editor_root, jail, mounts_below

pytestmark = [pytest.mark.editor]
REPO = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                                reason="mounting needs root on Linux")


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def test_a_jailed_command_sees_its_own_dev_and_the_host_sees_no_mount():
    root = editor_root("setup_gimp.sh")
    marker = f"cc-jail-{uuid.uuid4().hex[:8]}"
    probe = subprocess.Popen(jail(root, "sh", "-c", textwrap.dedent(f"""\
        grep -E ' / | /dev | /proc ' /proc/self/mountinfo
        ls /dev
        echo written > /dev/null && echo devnull-ok
        exec sleep 30 # {marker}""")), stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any("devnull-ok" in line for line in lines):
            line = probe.stdout.readline()
            assert line, "the jailed shell ended early: " + "".join(lines)
            lines.append(line)
        inside = "".join(lines)
        # While it runs the host sees nothing mounted in the chroot, or anywhere in the cache.
        assert mounts_below(cache_root()) == []
        assert processes_with(marker), "the jailed command is not running"
    finally:
        probe.kill()
        probe.wait(10)
    dev_listing = set(inside.split())
    assert {"null", "zero", "urandom", "random", "tty", "pts", "shm"} <= dev_listing
    # bubblewrap's own small /dev, never the host's (which holds disks and consoles)
    host_only = {p.name for p in Path("/dev").iterdir()} - {
        "null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "ptmx", "fd",
        "stdin", "stdout", "stderr", "core", "console", "mqueue", "hugepages"}
    assert host_only and not host_only & dev_listing, host_only & dev_listing
    assert " /dev " in inside and "devtmpfs" not in inside
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(marker) == [], "the sandbox outlived the command"


def test_a_tier_killed_mid_run_leaves_no_mount_and_no_process(tmp_path):
    """SIGKILL to the test process while GIMP runs inside the jail: GIMP goes with it and
    nothing stays mounted (there is no cleanup code that a kill could skip)."""
    root = editor_root("setup_gimp.sh")
    env = {**os.environ, "CONTROLCANVAS_REQUIRE_EDITORS": "1"}
    tier = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_gimp_real.py::test_settings_finds_the_token_file_and_saves_the_address[trixie]"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # the batch run itself (setup's own `gimp-console-3 --version` checks come first)
        while not processes_with("gimp_batch.py") and time.monotonic() < deadline:
            assert tier.poll() is None, "the tier ended before GIMP started"
            time.sleep(0.05)
        assert processes_with("gimp_batch.py"), "GIMP never started"
        time.sleep(1)  # well inside the run: plug-ins queried, the server talking
        assert mounts_below(root) == []
        os.kill(tier.pid, signal.SIGKILL)  # the test process only, not its group
        tier.wait(10)
        deadline = time.monotonic() + 15
        while processes_with("gimp-console-3") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_with("gimp-console-3") == [], "GIMP outlived the killed tier"
        assert mounts_below(cache_root()) == []
    finally:
        if tier.poll() is None:
            os.killpg(tier.pid, signal.SIGKILL)
            tier.wait(10)


@needs_root
def test_setup_takes_down_what_an_older_version_left_mounted_before_removing(tmp_path):
    """A root built by an older version still has the host's /dev bind-mounted; --rebuild
    must unmount it before it removes the root, so the bound folder's files survive."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "device-node-stand-in").write_text("keep me")
    root = tmp_path / "cache" / "gimp-trixie"
    (root / "dev").mkdir(parents=True)
    (root / ".controlcanvas-gimp-building").touch()  # a root the script made
    subprocess.run(["mount", "--bind", str(precious), str(root / "dev")], check=True)
    try:
        assert mounts_below(tmp_path / "cache") == [str(root / "dev")]
        done = subprocess.run(["bash", str(EDITORS / "setup_gimp.sh"), "--rebuild", str(root)],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "CC_DEBIAN_MIRROR": "http://127.0.0.1:9/debian"})
        assert "unmounting" in done.stderr
        assert mounts_below(tmp_path / "cache") == []
        assert (precious / "device-node-stand-in").read_text() == "keep me"
        assert done.returncode != 0  # no mirror there: the build itself fails, typed
        assert "debootstrap failed" in done.stderr
    finally:
        subprocess.run(["umount", "-R", str(root / "dev")], capture_output=True)


@needs_root
def test_umount_option_clears_leftovers_and_jail_lists_mounts(tmp_path):
    root = tmp_path / "krita-bookworm"
    (root / "proc").mkdir(parents=True)
    (root / "dev" / "shm").mkdir(parents=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "shm", str(root / "dev" / "shm")], check=True)
    try:
        listed = subprocess.run(["bash", str(EDITORS / "jail.sh"), "--mounts", str(root)],
                                capture_output=True, text=True)
        assert listed.returncode == 1
        assert listed.stdout.splitlines() == [str(root / "proc"), str(root / "dev" / "shm")]
        done = subprocess.run(["bash", str(EDITORS / "setup_krita.sh"), "--umount", str(root)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert mounts_below(root) == []
    finally:
        subprocess.run(["umount", "-R", str(root / "proc")], capture_output=True)
        subprocess.run(["umount", "-R", str(root / "dev" / "shm")], capture_output=True)


def test_no_editor_script_mounts_or_chroots_by_itself():
    """One way in: jail.sh. A plain chroot or mount in a tier script is the old defect."""
    shell = re.compile(r"(^|[;&|({]|\bthen|\bdo|\bsetsid|\bexec|\btimeout)\s*(chroot|mount)\s")
    python = re.compile(r"[\[(,]\s*[\"'](chroot|mount)[\"']")
    offenders = []
    for path in [*EDITORS.rglob("*.sh"), *(REPO / "tests").rglob("*.py"),
                 *(REPO / "tests" / "gimp_support").glob("*.sh"), REPO / "dev.sh"]:
        if path.name in ("jail.sh", "test_editor_isolation.py"):
            continue
        pattern = python if path.suffix == ".py" else shell
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#", 1)[0].strip()):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []
