"""What a result is called in the editor: one name format for both plug-ins.

A result layer is named after its prompt (one line, shortened) and the seed that made
it, ``"girl in a red coat · seed 7"``; the group of a batch, ``"... · seeds 7–9"``.
"""

from __future__ import annotations

from typing import Optional, Sequence

UNTITLED = "ControlCanvas"  # the name when the prompt is empty


def short_prompt(prompt: Optional[str], limit: int = 40) -> str:
    """``prompt`` on one line, at most ``limit`` characters (with an ellipsis); never empty."""
    one_line = " ".join((prompt or "").split())
    if len(one_line) > limit:
        one_line = one_line[:limit - 1].rstrip() + "…"
    return one_line or UNTITLED


def layer_name(prompt: Optional[str], seed: Optional[int]) -> str:
    """A result layer's name: the prompt and its seed, e.g. ``'red coat · seed 7'``."""
    head = short_prompt(prompt)
    return head if seed is None else f"{head} · seed {seed}"


def group_name(prompt: Optional[str], seeds: Sequence[Optional[int]]) -> str:
    """The name of the group holding a batch's layers: the prompt and its seed range."""
    known = [s for s in seeds if s is not None]
    head = short_prompt(prompt)
    if not known:
        return f"{head} · {len(seeds)} variants"
    return f"{head} · seeds {min(known)}–{max(known)}"
