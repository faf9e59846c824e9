"""The editor interface the actions need: what ``canvas.GimpHost`` implements over GIMP.

Tests implement the same interface in memory, so every action runs without GIMP.
Handles (``LayerInfo.handle``, the values ``insert_layers`` returns) are opaque:
only the host looks inside them.  Every method is called on the main thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ContextManager, List, Optional, Protocol, Sequence, Tuple

from shared.images import Image


@dataclass(frozen=True)
class LayerInfo:
    name: str
    width: int
    height: int
    x: int  # offsets in the image
    y: int
    handle: Any = None


Box = Tuple[int, int, int, int]  # x, y, width, height, in the layer's own pixels


@dataclass(frozen=True)
class NewLayer:
    """A layer to add: ``image`` is scaled to width x height if its size differs.

    ``mask`` (one byte per pixel of width x height) becomes the new layer's layer mask:
    the layer shows only where it is not 0 (a regenerated selection).
    """

    name: str
    image: Image
    width: int
    height: int
    x: int
    y: int
    mask: Optional[bytes] = None


@dataclass(frozen=True)
class SkeletonPath:
    """A skeleton path found in the image: its strokes' points and stored metadata."""

    name: str
    strokes: Tuple[Tuple[float, ...], ...]
    meta: str
    handle: Any = None


class Host(Protocol):
    def active_layer(self) -> LayerInfo:
        """The one selected layer; raises UsageError when there is none or several."""

    def read_pixels(self, layer: LayerInfo, box: Optional[Box] = None) -> Image:
        """The layer's pixels as straight 8-bit RGBA: all of them, or those in ``box``."""

    def find_layer(self, name: str) -> Optional[LayerInfo]:
        """The image's layer called ``name`` (the first, top down), or None."""

    def read_scaled(self, layer: LayerInfo, max_side: int) -> Image:
        """The whole layer as straight 8-bit RGBA, scaled down (keeping its aspect) so that
        its longer side is at most ``max_side``."""

    def selection_bounds(self, layer: LayerInfo) -> Optional[Box]:
        """The bounding box of the selected part of the layer, or None when nothing of
        it is selected (no selection, or one elsewhere in the image)."""

    def read_selection(self, layer: LayerInfo, box: Box) -> bytes:
        """How selected each pixel of ``box`` is (0..255, one byte per pixel, rows top
        to bottom)."""

    def undo_group(self) -> ContextManager[None]:
        """Everything done inside is one undo step."""

    def insert_layers(self, anchor: LayerInfo, layers: Sequence[NewLayer], *, below: bool,
                      group: Optional[str] = None) -> List[Any]:
        """Add ``layers`` next to ``anchor`` (above it, or below it), in a new layer group
        called ``group`` when given; returns handles (the group's first when grouped)."""

    def find_skeleton(self) -> Optional[SkeletonPath]:
        """The image's skeleton path (the selected one first), or None."""

    def add_skeleton(self, name: str, strokes: Sequence[Sequence[float]], meta: str) -> Any:
        """Add a path with these strokes and metadata; returns its handle."""

    def progress(self, text: Optional[str] = None, fraction: Optional[float] = None) -> None:
        """Show progress on the editor's progress bar."""

    def message(self, text: str) -> None:
        """Show an informational message (not an error)."""

    def settings_path(self) -> Optional[str]:
        """Where Settings saves the address and token (None: nowhere)."""

    def client_name(self) -> str:
        """How the plug-in introduces itself to the server, e.g. 'gimp 3.0.4'."""

    def read_history(self) -> bytes:
        """The history record (shared.doc_history) kept in the image, b"" when none."""

    def write_history(self, data: bytes) -> None:
        """Keep the history record in the image (saved with the .xcf)."""
