"""The rules both plug-ins (and the backend) take from shared/: one owner each."""

import pytest

from shared import geometry, loopback, naming
from shared.errors import TokenNeeded


def test_result_layer_names():
    assert naming.layer_name("girl in a red coat", 7) == "girl in a red coat · seed 7"
    long = naming.layer_name("a " * 40, 3)
    assert long.endswith("… · seed 3") and len(long) < 60
    assert naming.layer_name("", 1) == "ControlCanvas · seed 1"
    assert naming.layer_name("  two\nlines ", None) == "two lines"
    assert naming.group_name("cat", [5, 6, 7]) == "cat · seeds 5–7"
    assert naming.group_name("cat", [None, None]) == "cat · 2 variants"


def test_inpaint_context_box_is_clipped_to_the_layer():
    assert geometry.context_box((100, 100, 10, 20), 1000, 1000) == (36, 36, 138, 148)
    assert geometry.context_box((5, 5, 10, 10), 40, 30) == (0, 0, 40, 30)
    assert geometry.context_box((5, 5, 10, 10), 100, 100, margin=2) == (3, 3, 14, 14)


def test_native_sides_and_the_engine_catalogue_agree():
    from backend.engines.catalogue import NATIVE_SIZE
    assert NATIVE_SIZE == geometry.NATIVE_SIDE == {"sd15": 512, "sdxl": 1024, "flux": 1024,
                                                   "sd3": 1024, "zimage": 1024, "qwen": 1328,
                                                   "klein": 1024}
    assert geometry.DEFAULT_NATIVE_SIDE == 512


# -- which servers get this computer's token (shared.loopback) -------------------------

LOOPBACK_URLS = [
    "ws://127.0.0.1:7351", "ws://127.0.0.1", "wss://127.0.0.1:7351/path?x=1",
    "ws://127.5.6.7:80", "ws://127.255.255.254:7351", "WS://127.0.0.1:7351",
    "ws://localhost:7351", "ws://LocalHost:7351", "ws://localhost.:7351", "ws://localhost",
    "ws://[::1]:7351", "ws://[::1]", "ws://[0:0:0:0:0:0:0:1]:7351",
    "ws://[::ffff:127.0.0.1]:7351", "ws://[::FFFF:7f00:1]:7351",
]
NOT_LOOPBACK_URLS = [
    # prefix look-alikes (the Krita plug-in's old check took the first one for local)
    "ws://127.attacker.example:7351", "ws://127.0.0.1.evil.example:7351",
    "ws://localhost.evil.example:7351", "ws://evil-localhost:7351", "ws://foo.localhost:7351",
    "ws://localhost..:7351", "ws://127.0.0.1.:7351",
    # user info: the host is after the @ (or is ambiguous)
    "ws://127.0.0.1@evil.example:7351", "ws://127.0.0.1:7351@evil.example",
    "ws://localhost:x@evil.example", "ws://user:pw@127.0.0.1:7351",
    "ws://127.0.0.1\\@evil.example", "ws://evil.example#@127.0.0.1",
    "ws://evil.example?@127.0.0.1", "ws://evil.example/@127.0.0.1",
    # integer, hex, octal and short forms: a resolver may take them for 127.0.0.1; we do not
    "ws://2130706433:7351", "ws://0x7f000001:7351", "ws://0177.0.0.1:7351",
    "ws://0x7f.0.0.1:7351", "ws://127.1:7351", "ws://127.0.1:7351", "ws://127.0.0.01:7351",
    # not loopback, or not said plainly
    "ws://0.0.0.0:7351", "ws://[::]:7351", "ws://[::127.0.0.1]:7351",
    "ws://[::ffff:10.0.0.1]:7351", "ws://[fe80::1]:7351", "ws://[::1%25lo]:7351",
    "ws://[::1]evil:7351", "ws://::1:7351", "ws://::1", "ws://10.0.0.5:7351", "ws://192.168.1.2:7351",
    "ws://gpu-box:7351", "ws://128.0.0.1:7351", "ws://126.255.255.255:7351",
    "ws://１２７.0.0.1:7351", "ws://127%2e0.0.1:7351", "ws://127.0.0.1%00.evil.example",
    "ws://127.0.0.1\t.evil.example", " ws://127.0.0.1:7351", "ws://127.0.0.1:7351\n",
    "ws://127.0.0.1:99999", "ws://127.0.0.1:x", "http://127.0.0.1:7351",
    "127.0.0.1:7351", "localhost:7351", "ws:///127.0.0.1", "ws://", "", "ws://[::1",
]


@pytest.mark.parametrize("url", LOOPBACK_URLS)
def test_loopback_urls_are_this_computer(url):
    assert loopback.is_loopback_url(url)


@pytest.mark.parametrize("url", NOT_LOOPBACK_URLS)
def test_tricky_urls_are_not_loopback(url):
    assert not loopback.is_loopback_url(url)


def test_the_servers_host_check_takes_the_same_rule():
    from backend.server.config import is_loopback_host
    for host in ("127.0.0.1", "127.0.0.1:7351", "localhost:7351", "LOCALHOST.", "::1",
                 "[::1]:7351", "[::ffff:127.0.0.1]:7351"):
        assert is_loopback_host(host), host
    for host in ("0.0.0.0", "127.attacker.example:7351", "127.0.0.1.evil.example", "[::1]x:1",
                 "127.0.0.1@evil.example", "2130706433", "[::]:7351", "", "gpu-box:7351"):
        assert not is_loopback_host(host), host


@pytest.fixture()
def local_token(tmp_path):
    (tmp_path / "token").write_text("LOCAL-SECRET\n")
    return {"CONTROLCANVAS_CONFIG_DIR": str(tmp_path)}


@pytest.mark.parametrize("url", ["ws://127.0.0.1:7351", "ws://localhost:7351", "ws://[::1]:1"])
def test_loopback_servers_get_the_token_file(url, local_token, tmp_path):
    choice = loopback.choose_token(url, "", environ=local_token)
    assert (choice.token, choice.needed) == ("LOCAL-SECRET", False)
    assert choice.token_or_raise() == "LOCAL-SECRET"
    assert str(tmp_path / "token") in choice.source and "Token read from" in choice.note
    assert "LOCAL-SECRET" not in repr(choice)


@pytest.mark.parametrize("url", ["ws://127.attacker.example:7351", "ws://gpu-box:7351",
                                 "ws://127.0.0.1@evil.example:7351", "ws://2130706433:7351"])
def test_other_servers_never_get_the_token_file(url, local_token):
    choice = loopback.choose_token(url, "  ", enter_it="enter its token in the Token field",
                                   environ=local_token)
    assert choice.token == "" and choice.needed
    assert f"The server at {url} is not on this computer" in choice.note
    assert "Enter its token in the Token field" in choice.note
    with pytest.raises(TokenNeeded) as info:
        choice.token_or_raise()
    assert info.value.code == "token_needed" and info.value.message == choice.note
    entered = loopback.choose_token(url, " theirs ", entered_source="the saved token",
                                    environ=local_token)
    assert (entered.token, entered.source, entered.needed) == ("theirs", "the saved token", False)


def test_an_entered_token_wins_locally_and_a_missing_file_is_named(tmp_path):
    env = {"CONTROLCANVAS_CONFIG_DIR": str(tmp_path)}
    assert loopback.choose_token("ws://127.0.0.1:7351", "mine", environ=env).token == "mine"
    missing = loopback.choose_token("ws://127.0.0.1:7351", "", enter_it="do X", environ=env)
    assert (missing.token, missing.needed) == ("", False)  # connect: the server says no
    assert f"no token file at {tmp_path / 'token'}" in missing.source
    assert missing.note.startswith(f"No token file at {tmp_path / 'token'}") and ", or do X." in \
        missing.note
    (tmp_path / "token").write_text("\n")
    empty = loopback.choose_token("ws://127.0.0.1:7351", "", environ=env)
    assert empty.token == "" and f"the token file {tmp_path / 'token'} is empty" in empty.source


def test_a_symlinked_token_file_is_refused_with_the_real_reason(tmp_path):
    """Issue 18: choose_token reads by shared.paths' rule: a link's target is never sent,
    and the user is told it is a link (not that the file is missing or empty)."""
    (tmp_path / "elsewhere").write_text("LOCAL-SECRET\n")
    (tmp_path / "token").symlink_to(tmp_path / "elsewhere")
    choice = loopback.choose_token("ws://127.0.0.1:7351", "", enter_it="do X",
                                   environ={"CONTROLCANVAS_CONFIG_DIR": str(tmp_path)})
    assert (choice.token, choice.needed) == ("", False)
    assert choice.source == f"no token (the token file {tmp_path / 'token'} is a symbolic link)"
    assert "symbolic link" in choice.note and choice.note.endswith("Or do X.")
