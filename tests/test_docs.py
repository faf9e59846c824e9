"""The docs keep up with the code: every error code is explained."""

from pathlib import Path

from shared.errors import ERROR_CLASSES

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_error_code_is_in_troubleshooting():
    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    missing = [code for code in ERROR_CLASSES if f"`{code}`" not in text]
    assert not missing, f"document these codes in docs/troubleshooting.md: {missing}"


def test_error_codes_are_unique_and_have_advice():
    codes = [cls.code for cls in ERROR_CLASSES.values()]
    assert len(codes) == len(set(codes))
    for cls in ERROR_CLASSES.values():
        assert cls.default_message.endswith("."), cls
