"""Issue 18, finding 5: what a client names on the server's disk stays inside the folders
the server's owner set aside (backend.confine): a `train` message's dataset and output,
and model paths in a request. A path outside gets one error, worded the same whether it
exists, is a file or a folder, and no loader's own text reaches the client."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from backend.confine import confine
from backend.engines import tiny
from backend.engines.catalogue import Catalogue, ModelConfig
from shared.client import Client
from shared.errors import ModelMissing, PathRefused
from shared.messages import ControlUnit, GenerateRequest

from tiny_fixtures import RecordingContext, random_rgba, tiny_root, torch_threads  # noqa: F401


def refused():
    return PathRefused("refused")


def same_wording(errors, names):
    """The messages with each one's own echoed name taken out are one text."""
    texts = {err.message.replace(repr(name), "NAME") for err, name in zip(errors, names)}
    assert len(texts) == 1, texts
    assert {err.code for err in errors} == {"path_refused"}


# -----------------------------------------------------------------------------
# The rule
# -----------------------------------------------------------------------------

def test_confine_resolves_inside_and_refuses_every_way_out(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "out-link").symlink_to(tmp_path / "outside")
    (root / "in-link").symlink_to(root / "a")
    (root / "loop").symlink_to(root / "loop")
    assert confine("a/b", [root], refused) == (root / "a" / "b").resolve()
    assert confine(str(root / "a"), [root], refused) == (root / "a").resolve()
    assert confine("in-link/b", [root], refused) == (root / "a" / "b").resolve()
    assert confine("new-name", [root], refused) == (root / "new-name").resolve()
    assert confine(".", [root], refused) == root.resolve()
    for name in ["../outside", "a/../../outside", "a/../b", str(tmp_path / "outside"),
                 "/etc/passwd", "/etc", "/no/such/path", "out-link", "out-link/x", "",
                 "  ", "a\0b", "loop", "a\\..\\..\\outside"]:
        with pytest.raises(PathRefused):
            confine(name, [root], refused)
    with pytest.raises(PathRefused):
        confine(".", [root], refused, allow_root=False)
    # a relative name is looked up in each root; the first where it exists wins
    other = tmp_path / "other"
    (other / "only-here").mkdir(parents=True)
    assert confine("only-here", [root, other], refused) == (other / "only-here").resolve()


# -----------------------------------------------------------------------------
# train over the websocket
# -----------------------------------------------------------------------------

@pytest.fixture
def train_server(make_server, tmp_path):
    datasets, trained = tmp_path / "datasets", tmp_path / "trained"
    datasets.mkdir()
    trained.mkdir()
    server = make_server(train_data_root=datasets, train_out_root=trained)
    return server, datasets, trained


def train_error(server, **fields):
    fields.setdefault("base", "tiny-sd15")
    fields.setdefault("data", "shapes")
    fields.setdefault("out", "net")
    with Client.connect(server.url, server.token) as client:
        job = client.train(steps=1, resolution=64, **fields)
        with pytest.raises(Exception) as info:
            client.wait(job, timeout=120)
    return info.value


def test_train_data_outside_the_root_is_one_error_whether_it_exists_or_not(train_server,
                                                                          tmp_path):
    """The attack: `data=/etc` told which paths exist (a folder without source/ vs no
    folder). Now every way out is the same PathRefused."""
    server, datasets, _ = train_server
    (tmp_path / "secret" / "source").mkdir(parents=True)
    (datasets / "leak").symlink_to(tmp_path / "secret")
    names = ["/etc", "/no/such/folder", str(tmp_path / "secret"), "../secret", "leak",
             "/etc/passwd"]
    errors = [train_error(server, data=name) for name in names]
    same_wording(errors, names)
    assert all(err.field == "data" for err in errors)


def test_train_output_outside_the_root_is_refused_and_nothing_is_written(train_server,
                                                                        tmp_path):
    server, datasets, trained = train_server
    from backend.training import shapes
    shapes.write_dataset(datasets / "shapes", count=2, seed=1, size=64)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    (trained / "escape").symlink_to(victim)
    names = [str(victim), "../victim", "escape", "escape/sub", "/etc", ".", str(trained)]
    errors = [train_error(server, out=name) for name in names]
    same_wording(errors[:5], names[:5])
    assert all(err.code == "path_refused" and err.field == "out" for err in errors)
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]


def test_train_output_that_holds_other_files_is_refused_untouched(train_server):
    """The attack: `out` set to an existing folder overwrote files and deleted an old
    checkpoint. A folder the trainer did not make is refused before anything is written."""
    server, datasets, trained = train_server
    from backend.training import shapes
    shapes.write_dataset(datasets / "shapes", count=2, seed=1, size=64)
    folder = trained / "someone-elses"
    (folder / "checkpoints" / "step-000001").mkdir(parents=True)
    (folder / "checkpoints" / "step-000001" / "state.json").write_text("{}")
    (folder / "config.json").write_text("precious")
    before = sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    err = train_error(server, out="someone-elses")
    assert err.code == "bad_training" and "not empty" in err.message
    after = sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    assert before == after and (folder / "config.json").read_text() == "precious"


def test_train_base_must_be_a_model_the_server_offers(train_server, tmp_path):
    server, datasets, _ = train_server
    from backend.training import shapes
    shapes.write_dataset(datasets / "shapes", count=2, seed=1, size=64)
    base = tiny.ensure_tiny("sd15")  # a real model, outside every models folder
    names = [str(base), "/etc/passwd", "/etc", str(tmp_path / "missing")]
    errors = [train_error(server, base=name) for name in names]
    same_wording(errors, names)


# -----------------------------------------------------------------------------
# Model paths in requests
# -----------------------------------------------------------------------------

@pytest.fixture
def models_root(tmp_path, tiny_root):  # noqa: F811
    """A models folder holding a copy of the tiny outline ControlNet as ``lines``."""
    root = tmp_path / "models"
    shutil.copytree(tiny.tiny_dir("sd15", tiny_root) / "controlnets" / "lines", root / "lines")
    return root


def confined_catalogue(tiny_root, root, **config):  # noqa: F811
    return Catalogue(ModelConfig(tiny_root=str(tiny_root), roots=(str(root),),
                                 cache_dir=str(tiny_root / "empty-hf-cache"), **config))


def outside_names(tmp_path, tiny_root):  # noqa: F811
    """A system file, a system folder, a real model outside the roots, a missing path,
    and a link out of the models folder."""
    real = tiny.tiny_dir("sd15", tiny_root) / "controlnets" / "lines"
    return ["/etc/passwd", "/etc", str(real), str(tmp_path / "no-such-model"),
            "../models/../x"]


def test_request_model_paths_outside_the_models_folders_are_one_error(
        tmp_path, tiny_root, models_root, monkeypatch):  # noqa: F811
    catalogue = confined_catalogue(tiny_root, models_root)
    base = catalogue.resolve_base("tiny-sd15")
    (models_root / "escape").symlink_to(tiny.tiny_dir("sd15", tiny_root))
    names = outside_names(tmp_path, tiny_root) + ["escape", "escape/controlnets/lines"]
    errors = []
    for name in names:
        with pytest.raises(PathRefused) as info:
            catalogue.resolve_controlnet("lineart", base, name)
        errors.append(info.value)
    same_wording(errors, names)
    base_errors = []
    for name in names[:4]:
        with pytest.raises(PathRefused) as info:
            catalogue.resolve_base(name)
        base_errors.append(info.value)
    same_wording(base_errors, names[:4])
    # inside the models folder: relative and absolute names resolve
    assert catalogue.resolve_controlnet("lineart", base, "lines").source == "folder"
    assert catalogue.resolve_controlnet("lineart", base, str(models_root / "lines")).path == \
        str((models_root / "lines").resolve())
    # a hub-shaped name is looked up in the hub cache only, never on the disk at large
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "repo").mkdir(parents=True)
    with pytest.raises(ModelMissing, match="not downloaded"):
        catalogue.resolve_controlnet("lineart", base, "owner/repo")


def test_configured_models_resolve_wherever_they_are(tmp_path, tiny_root):  # noqa: F811
    """The owner's config.toml names are trusted: a ControlNet configured outside every
    models folder works by default and when a request names its path (the models list
    shows it so)."""
    lines = str(tiny.tiny_dir("sd15", tiny_root) / "controlnets" / "lines")
    catalogue = confined_catalogue(tiny_root, tmp_path / "models",
                                   controlnets={"*": {"lineart": lines}},
                                   bases={"mine": (str(tiny.tiny_dir("sd15", tiny_root)), "")})
    base = catalogue.resolve_base("mine")
    assert base.source == "folder"
    assert catalogue.resolve_controlnet("lineart", base).path == lines
    assert catalogue.resolve_controlnet("lineart", base, lines).path == lines
    with pytest.raises(PathRefused):  # the same folder for another condition is not offered
        catalogue.resolve_controlnet("canny", base, lines + "/")


def test_the_users_own_generate_may_name_any_path(tmp_path, tiny_root):  # noqa: F811
    """`controlcanvas generate` without --url: its in-process server serves only the user's
    command, so the engine it makes trusts request paths; `serve` does not."""
    from backend.engines.factory import create_engine

    folder = str(tiny.tiny_dir("sd15", tiny_root))
    config = tmp_path / "none.toml"
    trusting = create_engine("diffusers", device="cpu", config_file=config,
                             trust_request_paths=True)
    assert trusting.catalogue.resolve_base(folder).source == "folder"
    serving = create_engine("diffusers", device="cpu", config_file=config)
    with pytest.raises(PathRefused):
        serving.catalogue.resolve_base(folder)


def test_over_the_socket_no_path_or_loader_text_reaches_the_client(
        make_server, tmp_path, tiny_root, models_root, caplog):  # noqa: F811
    """A remote client naming /etc/passwd, a folder, a real model outside or a missing path
    gets one typed error; a damaged model inside the folder names the model, while the
    loader's own words (exception class, JSON error, paths) go to the server log only."""
    from backend.engines.diffusers.engine import DiffusersEngine

    broken = models_root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    engine = DiffusersEngine(confined_catalogue(tiny_root, models_root), device="cpu")
    server = make_server(engine)
    control = {0: random_rgba(64, 64)}

    def generate(model):
        request = GenerateRequest(width=64, height=64, seed=1, steps=2, base_model="tiny-sd15",
                                  controls=(ControlUnit(condition="lineart", image=0,
                                                        model=model),))
        with Client.connect(server.url, server.token) as client:
            return client.wait(client.submit(request, control), timeout=120)

    names = outside_names(tmp_path, tiny_root)
    errors = []
    for name in names:
        with pytest.raises(PathRefused) as info:
            generate(name)
        errors.append(info.value)
    same_wording(errors, names)
    assert generate("lines").images  # a model inside the folder works
    caplog.set_level(logging.WARNING)
    with pytest.raises(ModelMissing) as info:
        generate("broken")
    message = info.value.message
    assert "'broken'" in message and "server log" in message
    for leak in ("Error", "json", "Expecting", str(tmp_path), "line 1"):
        assert leak not in message, message
    assert any("broken" in r.getMessage() and "Error" in r.getMessage()
               for r in caplog.records)


def test_a_base_model_path_over_the_socket_is_refused_like_the_rest(
        make_server, tmp_path, tiny_root, models_root):  # noqa: F811
    from backend.engines.diffusers.engine import DiffusersEngine

    server = make_server(DiffusersEngine(confined_catalogue(tiny_root, models_root),
                                         device="cpu"))
    names = outside_names(tmp_path, tiny_root)[:4]
    errors = []
    for name in names:
        with Client.connect(server.url, server.token) as client:
            job = client.submit(GenerateRequest(width=64, height=64, steps=1,
                                                base_model=name), {})
            with pytest.raises(PathRefused) as info:
                client.wait(job, timeout=60)
        errors.append(info.value)
    same_wording(errors, names)


def test_default_models_folder_is_under_the_data_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("CONTROLCANVAS_DATA_DIR", str(tmp_path))
    from backend.server.config import ServerConfig

    assert ModelConfig().model_roots[0] == tmp_path / "models"
    config = ServerConfig()
    assert config.train_data_root == tmp_path / "datasets"
    # trained ControlNets land inside the models folder, so a client can use them at once
    assert Path(config.train_out_root).parent == ModelConfig().model_roots[0]
