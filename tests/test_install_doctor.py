"""install-plugin into fake profile folders; doctor on this CPU machine."""

import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from backend.cli import doctor, install

ROOT = Path(__file__).resolve().parent.parent


def gimp_bundle(tmp_path, version="1"):
    folder = tmp_path / f"bundle{version}" / "controlcanvas"
    folder.mkdir(parents=True)
    (folder / "controlcanvas.py").write_text(f"#!/usr/bin/env python3\nVERSION = {version}\n")
    (folder / "controlcanvas_gimp").mkdir()
    (folder / "controlcanvas_gimp" / "__init__.py").write_text("")
    return folder


def krita_bundle(tmp_path):
    root = tmp_path / "kbundle"
    (root / "controlcanvas").mkdir(parents=True)
    (root / "controlcanvas" / "__init__.py").write_text("X = 1\n")
    (root / "controlcanvas.desktop").write_text("[Desktop Entry]\nServiceTypes=Krita/PythonPlugin\n")
    return root


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "APPDATA"):
        monkeypatch.delenv(var, raising=False)
    return home


def test_gimp_install_sets_exec_bit_and_upgrades(tmp_path):
    profile = tmp_path / "GIMP" / "3.0"
    (done,) = install.install_gimp(gimp_bundle(tmp_path), profile)
    entry = profile / "plug-ins" / "controlcanvas" / "controlcanvas.py"
    assert done.path == entry.parent and "Filters" in done.next_steps
    assert entry.stat().st_mode & stat.S_IXUSR
    os.utime(entry, (0, 0))
    install.install_gimp(gimp_bundle(tmp_path, "2"), profile)
    assert "VERSION = 2" in entry.read_text()
    assert entry.stat().st_mtime > 1e9  # dated now: GIMP re-reads its procedures
    assert not (profile / "plug-ins" / "controlcanvas.old").exists()


def test_gimp_install_goes_into_every_gimp_version_found(home):
    for version in ("3.0", "3.2"):
        (home / ".config" / "GIMP" / version).mkdir(parents=True)
    done = install.install_gimp(gimp_bundle(home.parent))
    assert sorted(d.path.parent.parent.name for d in done) == ["3.0", "3.2"]
    found = install.installed_plugins()
    assert [f.editor for f in found] == ["gimp", "gimp"] and not found[0].next_steps


def test_gimp_install_from_zip_and_zip_slip_refused(tmp_path):
    folder = gimp_bundle(tmp_path)
    archive = tmp_path / "cc.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in folder.rglob("*"):
            z.write(path, path.relative_to(folder.parent))
    (done,) = install.install_gimp(archive, tmp_path / "prof")
    assert (done.path / "controlcanvas.py").is_file()
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../../escaped.py", "x")
    with pytest.raises(ValueError, match="unsafe"):
        install.install_gimp(evil, tmp_path / "prof2")
    assert not (tmp_path / "escaped.py").exists()


def test_wrong_bundle_is_refused(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="not a ControlCanvas GIMP bundle"):
        install.install_gimp(tmp_path / "junk", tmp_path / "p")
    with pytest.raises(ValueError, match="not a ControlCanvas Krita bundle"):
        install.install_krita(tmp_path / "junk", tmp_path / "p")


def test_krita_install_default_location(home):
    (home / ".local" / "share" / "krita").mkdir(parents=True)  # Krita has run once
    (done,) = install.install_krita(krita_bundle(home.parent))
    pykrita = home / ".local" / "share" / "krita" / "pykrita"
    assert (pykrita / "controlcanvas.desktop").is_file()
    assert (pykrita / "controlcanvas" / "__init__.py").is_file()
    assert "Python Plugin Manager" in done.next_steps
    assert install.installed_plugins()[0].editor == "krita"


def test_unexecutable_gimp_plugin_is_reported(home):
    profile = home / ".config" / "GIMP" / "3.0"
    install.install_gimp(gimp_bundle(home.parent), profile)
    entry = profile / "plug-ins" / "controlcanvas" / "controlcanvas.py"
    entry.chmod(0o644)
    check = doctor.check_plugins()
    assert check.status == doctor.FAIL and "not executable" in check.detail


def test_token_checks(tmp_path):
    token = tmp_path / "token"
    assert doctor.check_token(token).status == doctor.OK
    token.write_text("k" * 20 + "0123456789abcdefghijklmnop\n")
    token.chmod(0o644)
    bad = doctor.check_token(token)
    assert bad.status == doctor.FAIL and "chmod 600" in bad.detail
    token.chmod(0o600)
    assert doctor.check_token(token).status == doctor.OK


def test_port_check_sees_a_taken_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        check = doctor.check_port("127.0.0.1", sock.getsockname()[1])
    assert check.status == doctor.WARN and "in use" in check.detail


def run_doctor(config_dir, home):
    env = dict(os.environ, CONTROLCANVAS_CONFIG_DIR=str(config_dir), HOME=str(home))
    return subprocess.run([sys.executable, "-m", "backend", "doctor", "--port", "0"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_doctor_on_this_cpu_machine(tmp_path, home):
    out = run_doctor(tmp_path / "cfg", home)
    lines = out.stdout.splitlines()
    names = [line.split(":")[0][2:] for line in lines[:-1]]
    assert names[:4] == ["python", "torch", "cuda", "diffusers"]
    assert "CPU-only build" in out.stdout or "GPU" in out.stdout
    # no SD1.5 weights on this machine: that blocks, and says how to fix it
    assert out.returncode == 1 and "controlcanvas models download" in out.stdout
    assert lines[-1] == "1 blocking problem(s)"


def test_doctor_ready_with_the_embedded_model(tmp_path, home):
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.toml").write_text('[models]\nbase = "tiny-sd15"\n')
    out = run_doctor(cfg, home)
    assert out.returncode == 0, out.stdout
    assert out.stdout.splitlines()[-1] == "ready"


@pytest.mark.parametrize("editor", ["gimp", "krita"])
def test_install_plugin_builds_from_source_and_installs(tmp_path, editor):
    profile = tmp_path / "profile"
    out = subprocess.run([sys.executable, "-m", "backend", "install-plugin", editor,
                          "--profile-dir", str(profile)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "Installed the" in out.stdout and "Next:" in out.stdout
    if editor == "gimp":
        entry = profile / "plug-ins" / "controlcanvas" / "controlcanvas.py"
        assert os.access(entry, os.X_OK)
        assert (entry.parent / "websockets" / "__init__.py").is_file()
        assert (entry.parent / "shared" / "messages.py").is_file()
    else:
        pykrita = profile / "pykrita"
        assert (pykrita / "controlcanvas.desktop").is_file()
        assert (pykrita / "controlcanvas" / "_vendor" / "shared" / "client.py").is_file()
    assert not list(profile.rglob("*.so"))


def test_pyproject_floors_are_the_engines_floors():
    """pyproject.toml allows exactly the torch and diffusers releases the engine is tested
    on (the floor tier, tests/floor_env.sh, runs the engine tests on the diffusers floor)."""
    import re

    from backend.engines.requirements import DIFFUSERS_FLOOR, TORCH_FLOOR, floor_text

    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    floors = dict(re.findall(r'"(torch|diffusers)>=([0-9.]+)"', text))
    assert floors == {"torch": floor_text(TORCH_FLOOR), "diffusers": floor_text(DIFFUSERS_FLOOR)}


@pytest.mark.parametrize("module, version", [("diffusers", "0.38.2"), ("torch", "2.5.1+cu121")])
def test_doctor_blocks_on_a_release_below_the_floor(monkeypatch, module, version):
    imported = pytest.importorskip(module)
    monkeypatch.setattr(imported, "__version__", version)
    check = doctor.check_diffusers() if module == "diffusers" else doctor.check_torch()[0]
    assert check.status == doctor.FAIL and "too old" in check.detail
