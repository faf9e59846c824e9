"""``controlcanvas setup annotators|pose`` (issue 19, friction 5): the dry runs print the exact
commands and create nothing, a CUDA torch is not swapped unasked, the pose pointer file is
what the detector reads, and doctor shows one line for each.  Nothing here installs."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from backend.cli import doctor
from backend.cli import setup as S
from backend.cli.main import main as cli_main
from backend.pose import detect as D

ROOT = Path(__file__).resolve().parents[1]
AUX = "controlnet-aux>=0.0.10,<0.0.11"


@pytest.fixture
def config(tmp_path, monkeypatch):
    folder = tmp_path / "cfg"
    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(folder))
    monkeypatch.delenv(D.MEDIAPIPE_ENV, raising=False)
    return folder


def commands(out: str):
    return [shlex.split(line) for line in out.splitlines() if line.startswith(sys.executable)
            or line.startswith("/")]


# -- annotators ------------------------------------------------------------------------------

def test_extra_spec_is_the_pyproject_extra():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'annotators = ["{S.ANNOTATORS_SPEC}"]' in text


@pytest.mark.parametrize("installed,cuda,refused", [
    (None, None, False),                # no torch yet
    ("2.13.0+cpu", None, False),        # a CPU torch may be replaced
    ("2.13.0", None, False),
    ("2.13.0", "12.8", True),           # PyPI's Linux CUDA wheel: no local label
    ("2.12.1+cu126", None, True),       # the label alone says CUDA
    ("2.12.0+rocm6.2", None, True),     # an AMD GPU build
    ("2.14.1+cu128", "12.8", False),    # already the right version: kept
    ("2.14.0", "12.8", True),           # another patch release (plan_annotators keeps it)
])
def test_cuda_torch_is_not_replaced_unasked(installed, cuda, refused):
    why = S.torch_refusal(installed, cuda)
    assert (why is not None) == refused
    if refused:
        assert installed in why and "--yes" in why and "pytorch.org" in why


def test_installed_torch_2_14_is_kept_and_gets_its_torchvision():
    assert S.matching_torchvision("2.14.1+cu128") == "0.29.1"
    assert S.matching_torchvision("2.14.0") == "0.29.0"
    assert S.matching_torchvision("2.13.0") is None  # 2.13 + 0.28 breaks controlnet-aux
    plan = S.plan_annotators("py", "2.14.0+cu126", "12.6")
    assert plan.refusal is None
    assert plan.commands == [["py", "-m", "pip", "install", "torch==2.14.0",
                              "torchvision==0.29.0", AUX]]
    cuda_old = S.plan_annotators("py", "2.12.0", "12.4")
    assert cuda_old.refusal and cuda_old.commands == [
        ["py", "-m", "pip", "install", "torch==2.14.1", "torchvision==0.29.1", AUX]]


def test_annotators_dry_run_prints_the_pip_command(capsys, monkeypatch):
    monkeypatch.setattr(S, "installed_torch", lambda: ("2.13.0+cpu", None))
    monkeypatch.setattr(S.subprocess, "run", lambda *a, **k: pytest.fail("ran something"))
    assert cli_main(["setup", "annotators", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert commands(out) == [[sys.executable, "-m", "pip", "install", "torch==2.14.1",
                              "torchvision==0.29.1", AUX]]
    assert "in place of torch 2.13.0+cpu" in out


def test_annotators_refuses_a_cuda_swap_without_yes(capsys, monkeypatch):
    monkeypatch.setattr(S, "installed_torch", lambda: ("2.12.0", "12.4"))
    ran = []
    monkeypatch.setattr(S.subprocess, "run", lambda cmd, **k: ran.append(cmd) or
                        type("Done", (), {"returncode": 0})())
    assert cli_main(["setup", "annotators"]) == 2
    assert not ran and "--yes" in capsys.readouterr().err
    assert cli_main(["setup", "annotators", "--yes"]) == 0
    assert ran == [[sys.executable, "-m", "pip", "install", "torch==2.14.1",
                    "torchvision==0.29.1", AUX]]


# -- pose ------------------------------------------------------------------------------------

def test_pose_dry_run_prints_the_commands_and_creates_nothing(tmp_path, config, capsys,
                                                               monkeypatch):
    monkeypatch.setattr(S.subprocess, "run", lambda *a, **k: pytest.fail("ran something"))
    venv = tmp_path / "mp"
    assert cli_main(["setup", "pose", "--dir", str(venv), "--dry-run"]) == 0
    out = capsys.readouterr().out
    inner = str(S.venv_python(venv))
    assert commands(out) == [
        [sys.executable, "-m", "venv", str(venv)],
        [inner, "-m", "pip", "install", "--upgrade", "pip"],
        [inner, "-m", "pip", "install", "mediapipe==0.10.21", "numpy<2"],
        [inner, "-c", "import mediapipe as mp; print(mp.__name__, mp.__version__)"]]
    assert f"{config / D.POINTER_NAME} -> {inner}" in out
    assert not venv.exists() and not config.exists()


def test_pose_setup_records_the_python_the_detector_then_uses(tmp_path, config, monkeypatch):
    venv = tmp_path / "mp"
    fake = S.venv_python(venv)

    def fake_run(cmd, **kwargs):  # "creates" the venv instead of running pip
        fake.parent.mkdir(parents=True, exist_ok=True)
        fake.write_text("#!/bin/sh\n")
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(S.subprocess, "run", fake_run)
    assert D.mediapipe_python() != str(fake)
    assert cli_main(["setup", "pose", "--dir", str(venv)]) == 0
    assert (config / D.POINTER_NAME).read_text(encoding="utf-8").strip() == str(fake)
    assert D.mediapipe_python() == str(fake)
    monkeypatch.setenv(D.MEDIAPIPE_ENV, sys.executable)   # the variable still wins
    assert D.mediapipe_python() == sys.executable


def test_pointer_to_a_missing_python_is_ignored(tmp_path, config):
    S.write_pointer(config / D.POINTER_NAME, tmp_path / "gone" / "python")
    assert D.read_pointer() is None
    assert D.mediapipe_python() != str(tmp_path / "gone" / "python")


def test_default_venv_is_in_the_per_user_data_folder():
    assert S.data_dir({"HOME": "/h"}, "linux") == Path("/h/.local/share/controlcanvas")
    assert S.data_dir({"HOME": "/h", "XDG_DATA_HOME": "/x"}, "linux") == Path("/x/controlcanvas")
    assert S.data_dir({"HOME": "/h"}, "darwin") == \
        Path("/h/Library/Application Support/controlcanvas")
    assert S.data_dir({"LOCALAPPDATA": "C:/L"}, "win32") == Path("C:/L/controlcanvas")
    assert S.venv_python(Path("v"), "win32") == Path("v/Scripts/python.exe")


# -- doctor ----------------------------------------------------------------------------------

def test_doctor_lines_for_missing_and_present(tmp_path, config, monkeypatch):
    from importlib import metadata
    monkeypatch.setattr(D, "mediapipe_python", lambda: None)
    real_version = metadata.version

    def no_aux(name):
        if name == "controlnet-aux":
            raise metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(metadata, "version", no_aux)
    aux, pose = doctor.check_annotators(), doctor.check_pose_helper()
    assert aux.status == pose.status == doctor.WARN
    assert "`controlcanvas setup annotators`" in aux.detail
    assert "`controlcanvas setup pose`" in pose.detail
    monkeypatch.setattr(metadata, "version", lambda name: "0.0.10")
    monkeypatch.setattr(D, "mediapipe_python", lambda: "/venvs/mp/bin/python")
    aux, pose = doctor.check_annotators(), doctor.check_pose_helper()
    assert (aux.status, aux.detail) == (doctor.OK, "controlnet-aux 0.0.10")
    assert pose.status == doctor.OK and "/venvs/mp/bin/python" in pose.detail
    names = [c.name for c in doctor.run_checks(config / "token", "127.0.0.1", 0)]
    assert names[-2:] == ["annotators", "pose helper"]
