"""Per-system folders (issue 19, friction 10): the ControlCanvas config folder and token
file (shared/paths.py, used by the server and both plug-ins) and the editors' plug-in
folders (backend/cli/install.py, used by `controlcanvas install-plugin` and `doctor`), for
win32, darwin and linux, checked against the tables in docs/platforms.md.

This machine is Linux: Windows paths are compared as PureWindowsPath (separators and
case do not matter there); install.py reads sys.platform and os.environ, so those are
patched around each call."""

import os
import re
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from backend.cli import install
from backend.server.config import build_config
from shared import paths

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "platforms.md"
SYSTEMS = {"Windows": "win32", "macOS": "darwin", "Linux": "linux"}

# homes with spaces and non-ASCII letters, as real user names have
HOMES = {"win32": "C:\\Users\\Zoë Dœ-Ünal", "darwin": "/Users/Zoë Dœ-Ünal",
         "linux": "/home/Zoë Dœ-Ünal"}
APPDATA = "D:\\Profiles\\Zoë Dœ\\AppData\\Roaming"  # not under the home: seen when used
LOCALAPPDATA = "D:\\Profiles\\Zoë Dœ\\AppData\\Local"
XDG_CONFIG = "/srv/conf igs/ünal"
XDG_DATA = "/srv/da ta/ünal"
XDG_CACHE = "/srv/ca che/ünal"
VARIABLES = ("HOME", "USERPROFILE", "APPDATA", "LOCALAPPDATA", "XDG_CONFIG_HOME",
             "XDG_DATA_HOME", "XDG_CACHE_HOME", "CONTROLCANVAS_CONFIG_DIR",
             "CONTROLCANVAS_DATA_DIR", "CONTROLCANVAS_CACHE_DIR", "CONTROLCANVAS_STORE_DIR",
             "FLATPAK_ID", "HOST_XDG_CONFIG_HOME")


def pure(platform, path):
    return (PureWindowsPath if platform == "win32" else PurePosixPath)(str(path))


def base_env(platform, **extra):
    env = {"HOME": HOMES[platform]}
    if platform == "win32":
        env.update(USERPROFILE=HOMES["win32"], APPDATA=APPDATA, LOCALAPPDATA=LOCALAPPDATA)
        env["HOME"] = "C:\\Users\\not-this-one"  # Path.home() on Windows reads USERPROFILE
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def on(platform, env, monkeypatch, call):
    """``call()`` with sys.platform and os.environ as on ``platform`` with ``env``."""
    with monkeypatch.context() as patch:
        for name in VARIABLES:
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        if platform == "win32":  # Path.home() here is posixpath's: reads HOME
            patch.setenv("HOME", env["USERPROFILE"])
        patch.setattr(sys, "platform", platform)
        return call()


def computed(what, platform, env, monkeypatch):
    """Every folder the code may use for ``what`` (the first is the default one)."""
    if what == "ControlCanvas config folder":
        return [paths.config_dir(env, platform)]
    if what == "token file":
        return [paths.token_file(env, platform)]
    if what == "ControlCanvas data folder":
        return [paths.data_dir(env, platform)]
    if what == "ControlCanvas cache folder":
        return [paths.cache_dir(env, platform)]
    if what == "job store":  # as `controlcanvas serve` reads its settings
        return [on(platform, env, monkeypatch, lambda: build_config(
            {}, Path("/nonexistent/config.toml")).store_dir)]
    if what == "Krita plug-ins":
        return [d / "pykrita" for d in on(platform, env, monkeypatch,
                                          install.krita_resource_dirs)]
    match = re.fullmatch(r"GIMP (3\.\d) plug-ins", what)
    assert match, f"docs/platforms.md: unknown row {what!r}"
    dirs = on(platform, env, monkeypatch, install.gimp_config_dirs)
    return [d / "plug-ins" for d in dirs if d.name == match.group(1)]


def expand(platform, documented, env):
    text = documented
    for name, value in env.items():
        text = text.replace(f"%{name}%", value).replace(f"${name}", value)
    if text.startswith("~"):
        text = (env["USERPROFILE"] if platform == "win32" else env["HOME"]) + text[1:]
    assert "%" not in text and "$" not in text, f"unexpanded variable in {documented!r}"
    return pure(platform, text)


def doc_tables():
    """The markdown tables of docs/platforms.md: a list of tables of rows of cells."""
    tables, current = [], None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                tables.append(current)
            if not set("".join(cells)) <= set("-: "):
                current.append(cells)
        else:
            current = None
    return tables


def doc_table(header):
    """The table of the doc with this header row (the doc has other tables too)."""
    (table,) = [t for t in doc_tables() if t[0] == header]
    return table


def code_span(cell):
    (span,) = re.findall(r"`([^`]+)`", cell)
    return span


def default_rows():
    header, *rows = doc_table(["what", "Windows", "macOS", "Linux"])
    for row in rows:
        for system, cell in zip(header[1:], row[1:]):
            yield pytest.param(row[0], SYSTEMS[system], code_span(cell),
                               id=f"{SYSTEMS[system]}-{row[0]}")


def variant_rows():
    header, *rows = doc_table(["system", "what", "when", "folder"])
    for system, what, when, folder in rows:
        for platform in (SYSTEMS.values() if system == "any" else [SYSTEMS[system]]):
            yield pytest.param(platform, what, when, code_span(folder),
                               id=f"{platform}-{what}-{when}")


def test_the_doc_has_every_row():
    rows = [row[0] for row in doc_table(["what", "Windows", "macOS", "Linux"])[1:]]
    assert rows == ["ControlCanvas config folder", "token file", "ControlCanvas data folder",
                    "Krita plug-ins", "GIMP 3.0 plug-ins", "GIMP 3.2 plug-ins",
                    "ControlCanvas cache folder", "job store"]
    assert len(list(variant_rows())) >= 10


@pytest.mark.parametrize("what, platform, documented", list(default_rows()))
def test_default_folders_agree_with_the_doc(what, platform, documented, monkeypatch):
    """Variables unset (APPDATA set on Windows, as it always is there)."""
    env = base_env(platform)
    first = computed(what, platform, env, monkeypatch)[0]
    assert pure(platform, first) == expand(platform, documented, env)


def _variant_env(platform, when):
    if when == "`CONTROLCANVAS_CONFIG_DIR` set":
        return base_env(platform, CONTROLCANVAS_CONFIG_DIR=(
            "E:\\Kunst Ordner\\cc" if platform == "win32" else "/srv/Kunst Ordner/cc"))
    if when == "`APPDATA` not set":
        return base_env(platform, APPDATA=None)
    if when == "`LOCALAPPDATA` not set":
        return base_env(platform, LOCALAPPDATA=None)
    if when == "`CONTROLCANVAS_DATA_DIR` set":
        return base_env(platform, CONTROLCANVAS_DATA_DIR=(
            "E:\\Kunst Ordner\\data" if platform == "win32" else "/srv/Kunst Ordner/data"))
    if when == "`XDG_CACHE_HOME` set":
        return base_env(platform, XDG_CACHE_HOME=XDG_CACHE)
    if when in ("`CONTROLCANVAS_CACHE_DIR` set", "`CONTROLCANVAS_STORE_DIR` set"):
        name = when.strip("`").split("`")[0]
        return base_env(platform, **{name: "E:\\Cache Ordner\\cc" if platform == "win32"
                                     else "/srv/Cache Ordner/cc"})
    if when == "`XDG_CONFIG_HOME` set":
        return base_env(platform, XDG_CONFIG_HOME=XDG_CONFIG)
    if when == "`XDG_DATA_HOME` set":
        return base_env(platform, XDG_DATA_HOME=XDG_DATA)
    if when == "inside a Flatpak editor (`FLATPAK_ID` set)":
        # what Flatpak sets inside the sandbox
        return base_env(platform, FLATPAK_ID="org.kde.krita", XDG_CONFIG_HOME=(
            HOMES["linux"] + "/.var/app/org.kde.krita/config"))
    if when in ("Krita from Flathub", "GIMP from Flathub"):
        return base_env(platform)
    raise AssertionError(f"docs/platforms.md: unknown condition {when!r}")


@pytest.mark.parametrize("platform, what, when, documented", list(variant_rows()))
def test_variant_folders_agree_with_the_doc(platform, what, when, documented, monkeypatch):
    env = _variant_env(platform, when)
    found = [pure(platform, p) for p in computed(what, platform, env, monkeypatch)]
    expected = expand(platform, documented, env)
    if "Flathub" in when:
        assert expected in found[1:], found  # a candidate install-plugin and doctor look at
    else:
        assert found[0] == expected


# -- the same, spelled out: the table is not the only source of truth --------------------

@pytest.mark.parametrize("platform, env, expected", [
    ("win32", {"APPDATA": APPDATA, "HOME": "/x"}, APPDATA + "\\controlcanvas"),
    ("win32", {"USERPROFILE": HOMES["win32"]},
     HOMES["win32"] + "\\AppData\\Roaming\\controlcanvas"),
    ("win32", {"HOME": HOMES["win32"]}, HOMES["win32"] + "\\AppData\\Roaming\\controlcanvas"),
    ("darwin", {"HOME": HOMES["darwin"], "XDG_CONFIG_HOME": XDG_CONFIG},
     HOMES["darwin"] + "/Library/Application Support/controlcanvas"),
    ("linux", {"HOME": HOMES["linux"]}, HOMES["linux"] + "/.config/controlcanvas"),
    ("linux", {"HOME": HOMES["linux"], "XDG_CONFIG_HOME": ""},
     HOMES["linux"] + "/.config/controlcanvas"),
    ("linux", {"HOME": HOMES["linux"], "XDG_CONFIG_HOME": XDG_CONFIG},
     XDG_CONFIG + "/controlcanvas"),
    # Flatpak: XDG_CONFIG_HOME is the app's own folder; the server wrote to the host's
    ("linux", {"HOME": HOMES["linux"], "FLATPAK_ID": "org.gimp.GIMP",
               "XDG_CONFIG_HOME": HOMES["linux"] + "/.var/app/org.gimp.GIMP/config"},
     HOMES["linux"] + "/.config/controlcanvas"),
    ("linux", {"HOME": HOMES["linux"], "FLATPAK_ID": "org.gimp.GIMP",
               "XDG_CONFIG_HOME": HOMES["linux"] + "/.var/app/org.gimp.GIMP/config",
               "HOST_XDG_CONFIG_HOME": XDG_CONFIG}, XDG_CONFIG + "/controlcanvas"),
    ("linux", {"HOME": HOMES["linux"], "CONTROLCANVAS_CONFIG_DIR": "/srv/cc dir"},
     "/srv/cc dir"),
])
def test_config_dir_and_token_file(platform, env, expected):
    assert pure(platform, paths.config_dir(env, platform)) == pure(platform, expected)
    assert pure(platform, paths.token_file(env, platform)) == \
        pure(platform, expected) / "token"


def test_flatpak_plugin_finds_the_token_the_server_wrote(tmp_path):
    """The server (outside the sandbox) writes the token; the plug-in inside a Flatpak
    Krita, with Flatpak's XDG_CONFIG_HOME, reads the same file."""
    home = tmp_path / "Zoë Dœ"
    server_env = {"HOME": str(home)}
    token = paths.token_file(server_env, "linux")
    token.parent.mkdir(parents=True)
    token.write_text("s3cret\n", encoding="utf-8")
    sandbox_env = {"HOME": str(home), "FLATPAK_ID": "org.kde.krita",
                   "XDG_CONFIG_HOME": str(home / ".var/app/org.kde.krita/config")}
    assert paths.read_token(paths.token_file(sandbox_env, "linux")) == "s3cret"


@pytest.mark.parametrize("platform, env, krita, gimp30", [
    ("win32", {"APPDATA": APPDATA}, APPDATA + "\\krita\\pykrita",
     APPDATA + "\\GIMP\\3.0\\plug-ins"),
    ("win32", {}, HOMES["win32"] + "\\AppData\\Roaming\\krita\\pykrita",
     HOMES["win32"] + "\\AppData\\Roaming\\GIMP\\3.0\\plug-ins"),
    ("darwin", {"XDG_CONFIG_HOME": XDG_CONFIG, "XDG_DATA_HOME": XDG_DATA},
     HOMES["darwin"] + "/Library/Application Support/krita/pykrita",
     HOMES["darwin"] + "/Library/Application Support/GIMP/3.0/plug-ins"),
    ("linux", {}, HOMES["linux"] + "/.local/share/krita/pykrita",
     HOMES["linux"] + "/.config/GIMP/3.0/plug-ins"),
    ("linux", {"XDG_CONFIG_HOME": XDG_CONFIG, "XDG_DATA_HOME": XDG_DATA},
     XDG_DATA + "/krita/pykrita", XDG_CONFIG + "/GIMP/3.0/plug-ins"),
])
def test_plugin_folders(platform, env, krita, gimp30, monkeypatch):
    home = HOMES[platform]
    env = dict(env, HOME=home, **({"USERPROFILE": home} if platform == "win32" else {}))
    assert pure(platform, computed("Krita plug-ins", platform, env, monkeypatch)[0]) == \
        pure(platform, krita)
    gimp = computed("GIMP 3.0 plug-ins", platform, env, monkeypatch)
    assert pure(platform, gimp[0]) == pure(platform, gimp30)
    gimp32 = computed("GIMP 3.2 plug-ins", platform, env, monkeypatch)
    assert pure(platform, gimp32[0]) == pure(platform, gimp30.replace("3.0", "3.2"))


@pytest.mark.parametrize("platform", ["darwin", "linux"])
def test_install_plugin_writes_where_the_doc_says(platform, tmp_path, monkeypatch):
    """A real install (Krita and GIMP bundles) into a home with spaces and accents lands
    in the documented default folders."""
    home = tmp_path / "Zoë Dœ-Ünal"
    home.mkdir()
    env = {"HOME": str(home)}
    krita = tmp_path / "kbundle"
    (krita / "controlcanvas").mkdir(parents=True)
    (krita / "controlcanvas" / "__init__.py").write_text("X = 1\n")
    (krita / "controlcanvas.desktop").write_text("[Desktop Entry]\n")
    gimp = tmp_path / "gbundle" / "controlcanvas"
    gimp.mkdir(parents=True)
    (gimp / "controlcanvas.py").write_text("#!/usr/bin/env python3\n")
    rows = {row[0]: row for row in doc_table(["what", "Windows", "macOS", "Linux"])[1:]}
    column = {"darwin": 2, "linux": 3}[platform]
    pykrita = Path(str(expand(platform, code_span(rows["Krita plug-ins"][column]), env)))
    plugins = Path(str(expand(platform, code_span(rows["GIMP 3.0 plug-ins"][column]), env)))
    for root in (pykrita.parent, plugins.parent):  # both editors have run once
        root.mkdir(parents=True)
    on(platform, env, monkeypatch, lambda: install.install_krita(krita))
    on(platform, env, monkeypatch, lambda: install.install_gimp(gimp))
    assert (pykrita / "controlcanvas.desktop").is_file()
    assert (pykrita / "controlcanvas" / "__init__.py").is_file()
    assert os.access(plugins / "controlcanvas" / "controlcanvas.py", os.X_OK)
    found = on(platform, env, monkeypatch, install.installed_plugins)
    assert {(f.editor, f.path) for f in found} == {
        ("krita", pykrita / "controlcanvas"), ("gimp", plugins / "controlcanvas")}


def test_platforms_page_is_linked_for_artists():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    artists = readme.split("## For artists", 1)[1].split("\n## ", 1)[0]
    assert "(docs/platforms.md)" in artists
    assert "(platforms.md)" in (ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8")
    assert "(../docs/platforms.md)" in (ROOT / "packaging" / "README.md").read_text(
        encoding="utf-8")


@pytest.mark.parametrize("folder", [paths.config_dir, paths.cache_dir, paths.data_dir])
def test_every_folder_on_windows_takes_the_given_home_alike(folder):
    """Without USERPROFILE or the folder's own variable, all three per-user folders sit
    under the HOME of the environment given (data_dir once used the process' home)."""
    got = folder({"HOME": "/given"}, "win32")
    assert PurePosixPath(got.as_posix()).parts[:2] == ("/", "given"), got
