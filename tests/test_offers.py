"""What a server offers per base model: the catalogue computes the conditions each base
serves (``ModelInfo.conditions``), ``shared.offers`` reads them for the plug-ins (with the
full list for a server that does not say), which LoRAs fit a base, and the LoRA text form
("name:0.8, other") GIMP's argument takes."""

from __future__ import annotations

import json

import pytest

from backend.engines.catalogue import (CONTROLNETS, DEFAULT_BASES, DEMO_BASE, DEMO_CONDITIONS,
                                       Catalogue, ModelConfig)
from shared.errors import FieldError, LoraMismatch, ModelMissing
from shared.messages import (CONDITIONS, SERVER_MESSAGES, LoraInfo, LoraRef, ModelInfo, Models,
                             from_json, to_dict, to_json)
from shared.offers import Offers, format_loras, parse_loras


def catalogue(tmp_path, **config) -> Catalogue:
    return Catalogue(ModelConfig(cache_dir=str(tmp_path / "hf"), tiny_root=str(tmp_path / "t"),
                                 **config))


def bases(models: Models):
    return {m.name: m for m in models.models if m.kind == "base"}


# -- the catalogue says it --------------------------------------------------------------------

def test_each_base_lists_the_conditions_its_family_has_controlnets_for(tmp_path):
    listed = bases(catalogue(tmp_path).models_message())
    assert listed[DEFAULT_BASES["sd15"]].conditions == CONDITIONS
    assert set(listed[DEFAULT_BASES["sdxl"]].conditions) == set(CONTROLNETS["sdxl"])
    assert listed[DEMO_BASE].conditions == tuple(c for c in CONDITIONS if c in DEMO_CONDITIONS)
    assert listed["tiny-sd15"].conditions == CONDITIONS
    nets = [m for m in catalogue(tmp_path).models_message().models if m.kind == "controlnet"]
    assert all(m.conditions == () for m in nets), "only bases carry the list"


def test_config_controlnets_add_conditions_and_an_unknown_family_says_nothing(tmp_path):
    c = catalogue(tmp_path, bases={"mine": ("someone/unknown-model", ""),
                                   "xl": ("someone/an-xl-model", "sdxl")},
                  controlnets={"*": {}, "sdxl": {"lineart": "me/xl-lineart"}})
    listed = bases(c.models_message())
    assert "lineart" in listed["xl"].conditions and "shuffle" not in listed["xl"].conditions
    assert c.served_conditions("someone/unknown-model", "") == ()
    # an alias of a built-in base serves what the built-in does
    aliased = catalogue(tmp_path, bases={"shapes": (DEMO_BASE, "")})
    assert aliased.served_conditions("shapes", "sd15") == \
        tuple(c for c in CONDITIONS if c in DEMO_CONDITIONS)


def test_the_server_sends_the_lists_to_a_client(make_server, tmp_path):
    from backend.engines.fake import FakeEngine
    from shared.client import Client

    class CatalogueEngine(FakeEngine):  # the diffusers engine's models(), without torch
        def models(self):
            return catalogue(tmp_path).models_message()

    server = make_server(CatalogueEngine())
    with Client.connect(server.url, server.token) as client:
        listed = bases(client.models())
    assert listed[DEMO_BASE].conditions == ("canny", "softedge", "scribble", "lineart")
    assert set(listed[DEFAULT_BASES["sdxl"]].conditions) == set(CONTROLNETS["sdxl"])


def test_conditions_are_optional_in_the_protocol():
    info = ModelInfo(name="xl", kind="base", family="sdxl", conditions=("canny", "depth"))
    message = Models(models=(info,))
    assert from_json(to_json(message), SERVER_MESSAGES) == message
    plain = to_dict(Models(models=(ModelInfo(name="old", kind="base"),)))
    assert "conditions" not in plain["models"][0], "what a server without the lists sent"
    assert from_json(json.dumps(plain), SERVER_MESSAGES).models[0].conditions == ()
    # a newer server's condition names are kept in the message and skipped by the plug-ins
    newer = ModelInfo(name="xl", kind="base", conditions=("canny", "ip_adapter"))
    assert Offers(Models(models=(newer,), default_base="xl")).conditions() == ("canny",)


# -- the plug-ins read it ------------------------------------------------------------------

MODELS = Models(models=(
    ModelInfo(name="v15", kind="base", family="sd15", present=True, conditions=CONDITIONS),
    ModelInfo(name="xl", kind="base", family="sdxl", present=True,
              conditions=("canny", "depth", "openpose")),
    ModelInfo(name="xl-later", kind="base", family="sdxl", present=False,
              conditions=("canny", "lineart")),
    ModelInfo(name="unsaid", kind="base", family="sd15")),
    default_base="xl",
    loras=(LoraInfo("ink", "sd15", 10), LoraInfo("xl_ink", "sdxl", 10),
           LoraInfo("odd", "unknown", 10)))


def test_conditions_per_base_with_the_full_list_when_not_said():
    offer = Offers(MODELS)
    assert offer.conditions() == ("canny", "depth", "openpose")  # the default base
    assert offer.conditions("v15") == CONDITIONS
    assert offer.conditions("unsaid") == CONDITIONS and not offer.says_conditions("unsaid")
    assert offer.conditions("typed/by-hand") == CONDITIONS
    assert Offers(None).conditions("xl") == CONDITIONS
    problem = offer.condition_problem("lineart", "xl")
    assert problem == ("The base model 'xl' (SDXL) has no ControlNet for line art (lineart); "
                       "bases that serve it: v15, xl-later. Pick another base model, or one of "
                       "the conditions it serves: Canny edges, Depth, Pose.")
    assert offer.condition_problem("lineart", "v15") == ""
    assert "no base model on this server serves it" in \
        Offers(Models(models=MODELS.models[1:2], default_base="xl")).condition_problem("tile")
    with pytest.raises(ModelMissing, match="has no ControlNet for shuffle") as info:
        offer.check_condition("shuffle", "", field="condition")
    assert info.value.field == "condition"


def test_loras_that_fit_the_base_and_those_that_do_not():
    offer = Offers(MODELS)
    assert [(i.name, bool(p)) for i, p in offer.lora_choices("v15")] == [
        ("ink", False), ("odd", False), ("xl_ink", True)]
    assert offer.lora_choices("xl")[2][1] == ("the LoRA 'ink' was made for SD1.5 base models, "
                                              "and 'xl' is SDXL")
    assert offer.describe_loras("v15") == "ink (SD1.5), odd"
    assert [p for _, p in offer.lora_choices("unsaid-family/x")] == ["", "", ""]
    offer.check_loras((LoraRef("xl_ink"), LoraRef("odd", -1)), "xl")
    with pytest.raises(LoraMismatch, match="Pick a LoRA made for it \\(odd, xl_ink \\(SDXL\\)\\)"):
        offer.check_loras((LoraRef("ink"),), "xl")
    with pytest.raises(ModelMissing, match="no LoRA named 'nope'. LoRAs for this base model: "
                                           "ink \\(SD1.5\\), odd") as info:
        offer.check_loras((LoraRef("nope"),), "v15", field="LoRAs")
    assert info.value.field == "LoRAs"
    with pytest.raises(ModelMissing, match="lists no LoRAs"):
        Offers(Models()).check_loras((LoraRef("ink"),))
    Offers(None).check_loras((LoraRef("anything"),))  # before the server answered


@pytest.mark.parametrize("text, refs", [
    ("", ()),
    (" , ;\n", ()),
    ("ink", (("ink", 1.0),)),
    ("ink:0.8, watercolour", (("ink", 0.8), ("watercolour", 1.0))),
    ("ink : -2 ;paper style:2\nthird:0", (("ink", -2.0), ("paper style", 2.0), ("third", 0.0))),
    ("ink.safetensors:0.5", (("ink", 0.5),)),
    ("ink:", (("ink", 1.0),)),  # nothing after ':' is the default strength
])
def test_the_lora_text_form(text, refs):
    parsed = parse_loras(text)
    assert [(r.name, r.strength) for r in parsed] == list(refs)
    assert parse_loras(format_loras(parsed)) == parsed


@pytest.mark.parametrize("text, says", [
    ("ink:lots", "must be a number from -2 to 2"),
    ("ink:nan", "must be a number from -2 to 2"),
    ("ink:2.5", "must be a number from -2 to 2"),
    (":0.5", "is empty"),
    ("C:/loras/ink", "must be a number"),
    ("../ink", "never by a path"),
    ("ink, ink.safetensors:0.3", "'ink' is named twice"),
    (", ".join(f"l{i}" for i in range(9)), "at most 8"),
])
def test_a_malformed_lora_text_says_what_is_wrong(text, says):
    with pytest.raises(FieldError) as info:
        parse_loras(text, field="LoRAs")
    assert says in info.value.message and info.value.field == "LoRAs"
    assert info.value.message.startswith("LoRAs: ")


def test_models_command_shows_what_each_base_serves_and_the_union(tmp_path, monkeypatch,
                                                                  capsys):
    from backend.cli.main import main

    monkeypatch.setenv("CONTROLCANVAS_CONFIG_DIR", str(tmp_path))
    (tmp_path / "config.toml").write_text(f'[models]\ncache_dir = "{tmp_path / "hf"}"\n')
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def below(name):
        return lines[next(i for i, line in enumerate(lines) if f" {name}  (" in line) + 1]

    assert below(DEFAULT_BASES["sd15"]).split() == ["controls:", "every", "condition"]
    assert below(DEMO_BASE).split(": ")[1] == "canny, softedge, scribble, lineart"
    union = CONTROLNETS["sdxl"]["canny"]
    assert any(line.split()[:4] == ["✗", "sdxl", "controlnet", "union"] and union in line
               for line in lines)
    missing = [c for c in CONDITIONS if c not in CONTROLNETS["sdxl"]]
    assert below(union).split(": ")[1] == f"every condition but {', '.join(missing)}"
    assert below(DEFAULT_BASES["sdxl"]).split(": ")[1] == below(union).split(": ")[1]
