"""The rules both plug-ins (and the backend) take from shared/: one owner each."""

from shared import geometry, naming


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
    assert NATIVE_SIZE == geometry.NATIVE_SIDE == {"sd15": 512, "sdxl": 1024}
    assert geometry.DEFAULT_NATIVE_SIDE == 512
