"""Issue 18, findings 7 and 8 (command line): the token file is never read through a link,
a file others can read is reported (the server's own is fixed), a weak configured token
is refused; and every failure of a `controlcanvas` command is one typed line on stderr
with what to do and a non-zero exit, never a traceback (``-v`` keeps it)."""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from backend.cli import doctor
from backend.cli.main import main
from backend.server.config import (MIN_TOKEN_CHARS, build_config, load_or_create_token,
                                   server_token)
from shared.errors import ConfigError, TokenFileError, WeakToken
from shared.paths import load_token_file, read_token

ROOT = Path(__file__).resolve().parent.parent
STRONG = "Zq3-" + "x7Kp9_mW2vR8tY4n" * 2  # 36 characters, varied


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A config folder of our own (the default token file lives there)."""
    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.delenv("CONTROLCANVAS_TOKEN", raising=False)
    return tmp_path / "cfg"


def run_cli(*args, env=None, tmp_path=None):
    """`controlcanvas ARGS` in a real process; (exit code, stderr)."""
    environ = dict(os.environ, **(env or {}))
    if tmp_path is not None:
        environ.setdefault("CONTROLCANVAS_CONFIG_DIR", str(tmp_path / "cfg"))
    out = subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, env=environ,
                         capture_output=True, text=True, timeout=120)
    return out.returncode, out.stderr


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("controlcanvas: ")
    return lines[0]


# -----------------------------------------------------------------------------
# The token file
# -----------------------------------------------------------------------------

def test_a_symlinked_token_file_is_refused_not_followed(tmp_path):
    """The attack: a link's target became the token (say a world-readable system file)."""
    target = tmp_path / "guessable"
    target.write_text(STRONG + "\n")
    link = tmp_path / "token"
    link.symlink_to(target)
    for read in (load_token_file, lambda p: load_or_create_token(p)):
        with pytest.raises(TokenFileError, match="symbolic link") as info:
            read(link)
        assert str(link) in info.value.message and "Delete the link" in info.value.message
    assert read_token(link) == ""  # what the GIMP plug-in reads: nothing, not the target
    assert link.is_symlink() and target.read_text() == STRONG + "\n"  # nothing replaced
    assert doctor.check_token(link).status == doctor.FAIL
    code, stderr = run_cli("serve", "--engine", "fake", "--port", "0", "--token-file",
                           str(link), tmp_path=tmp_path)
    assert code == 1 and "symbolic link" in one_line(stderr) and "[token_file]" in stderr


def test_a_token_file_others_can_read_is_reported_and_the_servers_own_is_fixed(home, tmp_path,
                                                                              caplog):
    caplog.set_level(logging.WARNING)
    home.mkdir()
    own = home / "token"
    own.write_text(STRONG + "\n")
    own.chmod(0o644)
    assert doctor.check_token(own).status == doctor.FAIL
    token, created = server_token(build_config({}, tmp_path / "none.toml"))
    assert (token, created) == (STRONG, False)
    assert stat.S_IMODE(own.stat().st_mode) == 0o600
    assert any("readable by other users" in r.getMessage() and "set it to 600" in r.getMessage()
               for r in caplog.records)
    assert all(STRONG not in r.getMessage() for r in caplog.records)
    caplog.clear()
    chosen = tmp_path / "shared-token"  # one the user chose: maybe shared with a group
    chosen.write_text(STRONG + "\n")
    chosen.chmod(0o640)
    server_token(build_config({"token_file": chosen}, tmp_path / "none.toml"))
    assert stat.S_IMODE(chosen.stat().st_mode) == 0o640
    assert any("chmod 600" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("weak", ["short", "a" * 40, "correct horse battery staple ok yes",
                                  "x" * (MIN_TOKEN_CHARS - 1)])
def test_a_weak_configured_token_is_refused(home, tmp_path, monkeypatch, weak):
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\ntoken = "{weak}"\n')
    with pytest.raises(WeakToken) as info:
        server_token(build_config({}, config))
    message = info.value.message
    assert "token_urlsafe" in message and weak not in message
    monkeypatch.setenv("CONTROLCANVAS_TOKEN", weak)
    with pytest.raises(WeakToken):
        server_token(build_config({}, tmp_path / "none.toml"))
    home.mkdir(exist_ok=True)
    (home / "token").write_text(weak + "\n")  # written by hand into the token file
    monkeypatch.delenv("CONTROLCANVAS_TOKEN")
    with pytest.raises(WeakToken):
        server_token(build_config({}, tmp_path / "none.toml"))


def test_a_strong_configured_token_and_the_generated_one_pass(home, tmp_path, monkeypatch):
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\ntoken = "{STRONG}"\n')
    assert server_token(build_config({}, config)) == (STRONG, False)
    monkeypatch.setenv("CONTROLCANVAS_TOKEN", STRONG[::-1])
    assert server_token(build_config({}, tmp_path / "none.toml")) == (STRONG[::-1], False)
    monkeypatch.delenv("CONTROLCANVAS_TOKEN")
    token, created = server_token(build_config({}, tmp_path / "none.toml"))
    assert created and len(token) >= MIN_TOKEN_CHARS
    assert stat.S_IMODE((home / "token").stat().st_mode) == 0o600
    assert doctor.check_token(home / "token").status == doctor.OK


def test_serve_refuses_a_weak_token_in_one_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[server]\ntoken = "hunter2"\n')
    code, stderr = run_cli("serve", "--engine", "fake", "--port", "0", "--config", str(config),
                           tmp_path=tmp_path)
    line = one_line(stderr)
    assert code == 2 and "[weak_token]" in line and "hunter2" not in line


# -----------------------------------------------------------------------------
# Command-line failures: one typed line, a non-zero exit, no traceback
# -----------------------------------------------------------------------------

def test_token_path_that_is_a_folder(tmp_path):
    (tmp_path / "a-folder").mkdir()
    code, stderr = run_cli("serve", "--engine", "fake", "--port", "0", "--token-file",
                           str(tmp_path / "a-folder"), tmp_path=tmp_path)
    line = one_line(stderr)
    assert code == 1 and "is a folder" in line and "--token-file" in line


def test_token_file_of_the_wrong_type_in_toml(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[server]\ntoken_file = 5\n")
    code, stderr = run_cli("serve", "--config", str(config), tmp_path=tmp_path)
    line = one_line(stderr)
    assert code == 2 and "[server] token_file must be a path" in line and "[config]" in line


@pytest.mark.parametrize("text, words", [
    ("[server\nport = 1\n", "is not valid TOML"),
    ("server = 5\n", "server must be a table"),
    ("[server]\nmax_queue = \"many\"\n", "max_queue must be a whole number"),
    ("[server]\nallow_remote = \"perhaps\"\n", "allow_remote must be true or false"),
    ("[models]\nroots = \"D:/models\"\n", "roots must be a list"),
    (b"\xff\xfe[server]\n", "not UTF-8"),
])
def test_broken_config_files_are_one_line(home, tmp_path, capsys, text, words):
    config = tmp_path / "c.toml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    command = ["models", "--config", str(config)] if "models" in str(text) else \
        ["serve", "--engine", "fake", "--port", "0", "--config", str(config)]
    assert main(command) == 2
    line = one_line(capsys.readouterr().err)
    assert words in line and str(config) in line


def test_an_unwritable_config_folder_says_what_to_do(home, tmp_path, monkeypatch, capsys):
    """Simulated (the tests may run as root, who may write anywhere): opening the new
    token file fails with EACCES."""
    real_open = os.open

    def denied(path, *args, **kwargs):
        if str(path).startswith(str(home)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    code = main(["serve", "--engine", "fake", "--port", "0", "--config",
                 str(tmp_path / "none.toml")])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "[token_file]" in line and "writable" in line
    assert "CONTROLCANVAS_CONFIG_DIR" in line and not list(home.glob("*.tmp"))


def test_a_full_disk_says_so_and_leaves_no_half_written_file(home, tmp_path, monkeypatch,
                                                            capsys):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    code = main(["serve", "--engine", "fake", "--port", "0", "--config",
                 str(tmp_path / "none.toml")])
    monkeypatch.undo()
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "disk is full" in line and "[token_file]" in line
    assert list(home.iterdir()) == []  # no token, no temporary file


def test_a_client_command_without_a_token_file_is_one_line(home, capsys):
    assert main(["generate", "--url", "ws://127.0.0.1:9", "-o", "x.png"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "no token file" in line and "controlcanvas serve" in line


def test_os_errors_and_bugs_are_one_line_and_v_keeps_the_traceback(tmp_path, monkeypatch,
                                                                  capsys):
    import backend.cli.main as cli

    def broken(args):
        raise RuntimeError("a bug")

    def disk(args):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "f"))

    monkeypatch.setattr(cli, "cmd_models", broken)
    assert main(["models"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "RuntimeError: a bug" in line and "-v" in line
    monkeypatch.setattr(cli, "cmd_models", disk)
    assert main(["models"]) == 1
    assert str(tmp_path / "f") in one_line(capsys.readouterr().err)
    assert main(["-v", "models"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_config_errors_are_typed_and_still_value_errors(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[server]\nmax_queue = 2.5\n")
    with pytest.raises(ConfigError, match="max_queue must be a whole number"):
        build_config({}, config)
    with pytest.raises(ValueError):  # callers that catch bad values keep working
        build_config({}, config)
    assert build_config({"port": "8000"}, tmp_path / "none.toml").port == 8000


# the settings the other issue-18/17 branches added: known, and type-checked like the rest
NEW_SETTINGS = {"max_unauthenticated": 3, "hello_timeout": 2.5, "max_hello_bytes": 2048,
                "max_outbox_bytes": 1 << 20, "max_outbox_frames": 64, "max_jobs_per_client": 4,
                "max_job_pixels": 1 << 22, "retention_bytes_per_client": 1 << 20,
                "train_data_root": "/srv/d", "train_out_root": "/srv/o"}


def test_every_server_setting_is_known_and_type_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("CONTROLCANVAS_STORE_DIR", raising=False)  # (conftest's)
    config = tmp_path / "c.toml"
    lines = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in NEW_SETTINGS.items())
    config.write_text(f"[server]\n{lines}\nstore_dir = \"{tmp_path / 's'}\"\n")
    built = build_config({}, config)
    for key, value in NEW_SETTINGS.items():
        assert getattr(built, key) == (Path(value) if isinstance(value, str) else value)
    assert built.store_dir == tmp_path / "s"
    for key in NEW_SETTINGS:
        config.write_text(f"[server]\n{key} = [1]\n")
        with pytest.raises(ConfigError, match=f"\\[server\\] {key} must be"):
            build_config({}, config)
    config.write_text("[server]\nstore_dir = 5\n")
    with pytest.raises(ConfigError, match="store_dir must be a folder name"):
        build_config({}, config)
    config.write_text("[server]\nmax_outbox_byte = 5\n")
    with pytest.raises(ConfigError, match="unknown setting \\[server\\] max_outbox_byte"):
        build_config({}, config)


@pytest.mark.parametrize("text, words", [
    ("engine = 5\n", "engine must be a table"),
    ("[server]\nengine_options = 5\n", "[server] engine_options must be a table"),
    ("[engine]\nturbo = true\n", "unknown engine option 'turbo'"),
    ("[engine]\noffload = \"yes please\"\n", "[engine] offload must be \"auto\", true or false"),
    ("[engine]\ncpu_threads = 1.5\n", "[engine] cpu_threads must be a whole number"),
    ("[engine]\ncompile_mode = \"fastest\"\n", "[engine] compile_mode must be one of"),
])
def test_engine_options_are_known_and_type_checked(tmp_path, text, words):
    """[engine] (and [server] engine_options) merge option by option; a wrong name or type
    is a ConfigError when the engine is built: one line from `serve`, not a traceback."""
    from backend.engines.diffusers.engine import engine_options
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        options = build_config({}, config).engine_options
        options.pop("config_file", None)
        engine_options(options)
        from backend.engines.diffusers.acceleration import FastPath
        FastPath.from_options(engine_options(options).get("fast_options", {}), cuda=True)
    assert words in info.value.message


def test_engine_options_merge_option_by_option(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[engine]\ndtype = \"fp32\"\nsdpa = true\n"
                      "[server]\nengine_options = { sdpa = false, offload = true }\n")
    built = build_config({"engine_options": {"offload": False}}, config)
    assert built.engine_options == {"dtype": "fp32", "sdpa": False, "offload": False}


def test_a_new_token_never_starts_with_a_dash(monkeypatch):
    """A token such as '-x…' reads as an option after `--token` on a command line
    (`controlcanvas generate --url … --token -x…` fails): such draws are drawn again."""
    from backend.server import config as config_module
    draws = iter(["-" + "a" * 42, "-" + "b" * 42, "c" * 43])
    monkeypatch.setattr(config_module.secrets, "token_urlsafe", lambda n: next(draws))
    assert config_module.new_token() == "c" * 43
