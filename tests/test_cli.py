"""The command line as a user runs it: `controlcanvas serve` in a subprocess."""

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.client import Client
from shared.messages import ControlUnit, GenerateRequest
from shared.images import Image

ROOT = Path(__file__).resolve().parent.parent


def start_serve(tmp_path, *extra):
    env = dict(os.environ, CONTROLCANVAS_CONFIG_DIR=str(tmp_path / "cfg"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--port", "0",
                             "--engine", "fake", "--step-seconds", "0.02", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Token file:"):
            break
    return proc, lines


def stop(proc):
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_prints_url_and_token_once_and_serves(tmp_path):
    proc, lines = start_serve(tmp_path)
    try:
        url = re.search(r"listening on (ws://\S+)", lines[0]).group(1)
        token_file = tmp_path / "cfg" / "token"
        assert f"Token file: {token_file}" in lines[1]
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        printed = next(proc.stdout)
        assert token in printed  # the first start shows the new token
        canvas = Image.filled(64, 64, (255, 255, 255, 255))
        request = GenerateRequest(width=64, height=64, steps=3,
                                  controls=(ControlUnit(condition="scribble", image=0),))
        with Client.connect(url, token) as client:
            assert client.wait(client.submit(request, {0: canvas}), timeout=30).images
    finally:
        assert stop(proc) == 0
    # second start: same token, not printed again
    proc, lines = start_serve(tmp_path)
    try:
        assert token_file.read_text().strip() == token
    finally:
        stop(proc)
        rest = proc.stdout.read()
        assert token not in "".join(lines) + rest


def test_serve_refuses_a_taken_port(tmp_path):
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        env = dict(os.environ, CONTROLCANVAS_CONFIG_DIR=str(tmp_path))
        out = subprocess.run([sys.executable, "-m", "backend", "serve", "--port", str(port)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "Choose another --port" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_config_file_is_a_clear_error(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[server]\nprot = 1\n")
    out = subprocess.run([sys.executable, "-m", "backend", "serve", "--config", str(config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, CONTROLCANVAS_CONFIG_DIR=str(tmp_path)))
    assert out.returncode == 2 and "unknown setting [server] prot" in out.stderr


def test_demo_puts_the_shape_where_it_was_drawn(tmp_path):
    """The embedded trained model, through a real server: a red disc inside the outline."""
    out = subprocess.run([sys.executable, "-m", "backend", "demo", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    from PIL import Image as PILImage

    from backend.cli.demo import drawn_disc, shape_agreement
    canvas = PILImage.open(tmp_path / "canvas.png")
    result = PILImage.open(tmp_path / "result.png")
    assert result.size == canvas.size == (500, 500)
    iou, red = shape_agreement(result)
    assert f"IoU {iou:.2f}" in out.stdout
    assert iou > 0.6 and red > 0.6, out.stdout
    # and the agreement measure itself: the drawn disc scores 1, an empty picture 0
    disc = np.where(drawn_disc()[..., None], (220, 30, 30), 255).astype(np.uint8)
    assert shape_agreement(PILImage.fromarray(disc)) == (1.0, 1.0)
    assert shape_agreement(PILImage.new("RGB", (500, 500), "white"))[0] == 0.0


def test_example_roundtrip_script(tmp_path):
    proc, lines = start_serve(tmp_path)
    try:
        url = re.search(r"listening on (ws://\S+)", lines[0]).group(1)
        token = (tmp_path / "cfg" / "token").read_text().strip()
        out = subprocess.run([sys.executable, "examples/roundtrip.py", "--url", url,
                              "--token", token, "--side", "2048"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        stop(proc)
    assert out.returncode == 0, out.stderr
    assert "result 2048x2048" in out.stdout and "step 10/10" in out.stdout
    assert "cancelled" in out.stdout


@pytest.mark.slow
def test_bench_transport_prints_json_with_ratio():
    import json
    out = subprocess.run([sys.executable, "-m", "backend", "bench", "transport", "--repeats",
                          "3", "--side", "512"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert figures["ratio"] > 0 and figures["frame_bytes"] == 512 * 512 * 4


def _line_art(path, size=(70, 45)):
    from PIL import Image as PILImage, ImageDraw
    layer = PILImage.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).ellipse((10, 5, 50, 40), outline=(0, 0, 0, 255), width=2)
    layer.save(path)
    return path


def test_generate_on_the_embedded_model(tmp_path):
    sketch = _line_art(tmp_path / "sketch.png")
    out = subprocess.run([sys.executable, "-m", "backend", "generate", "--engine", "tiny",
                          "--prompt", "a red ball", "--seed", "5", "--steps", "2", "--batch", "2",
                          "--control", f"lineart={sketch}:0.8@lineart_from_drawing",
                          "-o", str(tmp_path / "out.png")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr
    assert "out-1.png seed 5 (70x45)" in out.stdout and "out-2.png seed 6" in out.stdout
    from PIL import Image as PILImage
    assert PILImage.open(tmp_path / "out-1.png").size == (70, 45)


def test_generate_against_a_running_server(tmp_path):
    sketch = _line_art(tmp_path / "sketch.png")
    proc, lines = start_serve(tmp_path)
    try:
        url = re.search(r"listening on (ws://\S+)", lines[0]).group(1)
        env = dict(os.environ, CONTROLCANVAS_CONFIG_DIR=str(tmp_path / "cfg"))
        out = subprocess.run([sys.executable, "-m", "backend", "generate", "--url", url,
                              "--control", f"scribble={sketch}", "--steps", "3", "--seed", "9",
                              "-o", str(tmp_path / "r.png")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    finally:
        stop(proc)
    assert out.returncode == 0, out.stderr
    assert "r.png seed 9 (70x45)" in out.stdout


@pytest.mark.parametrize("args, words", [
    (["--control", "lineart"], "CONDITION=FILE"),
    (["--control", "lasers=missing.png"], "missing.png"),
    (["--steps", "0"], "steps must be at least 1"),
])
def test_generate_bad_input_is_one_clear_line(tmp_path, args, words):
    out = subprocess.run([sys.executable, "-m", "backend", "generate", "--engine", "fake",
                          *args, "-o", str(tmp_path / "x.png")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert words in out.stderr and "Traceback" not in out.stderr


def test_models_list_offline(tmp_path):
    out = subprocess.run([sys.executable, "-m", "backend", "models"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, HF_HUB_OFFLINE="1",
                                  CONTROLCANVAS_CONFIG_DIR=str(tmp_path)))
    assert out.returncode == 0
    assert "tiny-sd15" in out.stdout and "controlcanvas models download" in out.stdout
    lines = out.stdout.splitlines()

    def entry(name):  # the model's line and the lines below it (up to the next model)
        i = next(k for k, line in enumerate(lines) if f" {name}  (" in line)
        return [lines[i]] + [line for line in lines[i + 1:i + 3] if line.startswith(" ")]

    kontext = entry("black-forest-labs/FLUX.1-Kontext-dev")
    assert "base (edit)" in kontext[0] and not any("controls:" in x for x in kontext)
    klein = entry("black-forest-labs/FLUX.2-klein-4B")  # generates (control emulated), edits
    assert "base (edit)" in klein[0] and any("controls:" in x for x in klein)
    # a ControlNet serving several conditions is not called a union model unless it is one
    sd3_canny = entry("stabilityai/stable-diffusion-3.5-large-controlnet-canny")
    assert "union" not in sd3_canny[0] and "serves:" in sd3_canny[1]


def test_models_download_offline_says_so(tmp_path):
    out = subprocess.run([sys.executable, "-m", "backend", "models", "download", "lineart"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, HF_HUB_OFFLINE="1",
                                  CONTROLCANVAS_CONFIG_DIR=str(tmp_path),
                                  HF_HOME=str(tmp_path / "hf")))
    assert out.returncode == 1 and "offline" in out.stderr.lower()
    assert "Traceback" not in out.stderr


def test_cpu_threads_option_reaches_torch(tmp_path):
    import torch

    from backend.cli.main import _positive_int
    from backend.engines.factory import create_engine
    before = torch.get_num_threads()
    try:
        create_engine("demo", cpu_threads=1, config_file=tmp_path / "none.toml")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(Exception, match="not a positive whole number"):
        _positive_int("0")
    out = subprocess.run([sys.executable, "-m", "backend", "serve", "--cpu-threads", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--cpu-threads: 0 is not a positive whole number" in out.stderr


def test_serve_demo_calls_the_engine_demo_and_skips_the_sd15_cpu_warning(tmp_path):
    proc, lines = start_serve(tmp_path, "--engine", "demo")
    try:
        assert "(engine: demo)" in lines[0], lines
        url = re.search(r"listening on (ws://\S+)", lines[0]).group(1)
        token = (tmp_path / "cfg" / "token").read_text().strip()
        with Client.connect(url, token) as client:
            assert client.welcome.engine == "demo"  # what the plug-ins show
    finally:
        stop(proc)
    err = proc.stderr.read()
    assert "No CUDA GPU" not in err and "SD1.5" not in err, err


def _generate_to(tmp_path, output):
    return subprocess.run([sys.executable, "-m", "backend", "generate", "--engine", "fake",
                           "--prompt", "a red ball", "--seed", "3", "--steps", "1",
                           "-o", str(output)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_generate_into_a_folder_writes_a_named_file_there(tmp_path):
    out = _generate_to(tmp_path, tmp_path)
    assert out.returncode == 0, out.stderr
    written = tmp_path / "generated-seed3.png"
    assert written.is_file() and str(written) in out.stdout
    assert "Traceback" not in out.stderr


def test_generate_that_cannot_write_keeps_the_result_in_a_temp_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = _generate_to(tmp_path, blocker / "x.png")  # parent is a file: cannot be written
    assert out.returncode == 0, out.stderr
    saved = Path(re.search(r"the result is in (\S+\.png)", out.stderr).group(1))
    try:
        assert saved.is_file() and str(saved) in out.stdout
        from PIL import Image as PILImage
        assert PILImage.open(saved).size == (512, 512)
    finally:
        saved.unlink(missing_ok=True)
    assert "Traceback" not in out.stderr


def test_preprocess_into_a_folder_writes_a_named_file_there(tmp_path):
    sketch = _line_art(tmp_path / "sketch.png")
    folder = tmp_path / "out"
    folder.mkdir()
    out = subprocess.run([sys.executable, "-m", "backend", "preprocess", "invert", str(sketch),
                          "-o", str(folder)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    written = folder / "sketch-invert.png"
    assert written.is_file() and str(written) in out.stdout


def test_generate_url_of_a_server_elsewhere_needs_its_own_token(tmp_path, monkeypatch):
    # A real server reached at 127.1: the OS takes it for 127.0.0.1; as written it is not a
    # loopback address, so the command treats it like a server on another computer.
    from backend.cli.main import build_parser
    from backend.engines.fake import FakeEngine
    from backend.server.config import ServerConfig
    from backend.server.local import ServerThread
    from shared.errors import TokenNeeded
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "token").write_text("SERVER-TOKEN\n")  # what the server would take
    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path / "cfg"))
    out = tmp_path / "r.png"
    config = ServerConfig(port=0, allow_remote=True)
    with ServerThread(FakeEngine(), config, token="SERVER-TOKEN") as server:
        remote = server.url.replace("127.0.0.1", "127.1")
        command = ["generate", "--url", remote, "--size", "64x48", "--steps", "1",
                   "--seed", "3", "-o", str(out)]
        args = build_parser().parse_args(command)
        with pytest.raises(TokenNeeded) as info:
            args.func(args)
        assert f"The server at {remote} is not on this computer" in info.value.message
        assert "pass its token with --token" in info.value.message.lower()
        assert not out.exists()
        args = build_parser().parse_args(command + ["--token", "SERVER-TOKEN"])
        assert args.func(args) == 0 and out.exists()
        local = build_parser().parse_args(["generate", "--url", server.url, "--size", "64x48",
                                           "--steps", "1", "-o", str(tmp_path / "l.png")])
        assert local.func(local) == 0, "this computer's server: the token file, as before"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly_on_sigint_and_sigterm_even_when_started_with_sigint_ignored(
        tmp_path, sig):
    """A server started from a script's background (`controlcanvas serve &`) inherits SIGINT
    ignored, and a service manager stops it with SIGTERM: either signal closes it properly
    (exit 0) instead of being ignored or killed."""
    env = dict(os.environ, CONTROLCANVAS_CONFIG_DIR=str(tmp_path / "cfg"), PYTHONUNBUFFERED="1",
               CONTROLCANVAS_STORE_DIR=str(tmp_path / "store"))
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--port", "0",
                             "--engine", "fake", "--step-seconds", "0.02"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        for line in proc.stdout:
            if line.startswith("Token file:"):
                break
        proc.send_signal(sig)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
