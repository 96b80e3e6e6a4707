"""Image folders: a manifest CSV naming one image file per row, beside the images.

The manifest's image cells are paths relative to the folder. Each image is decoded
as single-channel 8-bit pixels and must have exactly the schema's shape: an image
of another size or depth is refused, never resized or converted in silence.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
from numpy.typing import NDArray

MANIFEST = "manifest.csv"
"""The manifest's file name inside an image folder."""

IMAGE_ROOT = "fedcare.image_root"
"""Key of ``DataFrame.attrs`` holding the folder a manifest's image paths are relative to."""


class ImageError(ValueError):
    """An image cell that does not name a readable image of the schema's shape."""


def image_path(root: Path, cell: str) -> Path:
    """The file a manifest cell names; refuses absolute paths and paths leaving the folder."""
    relative = PurePosixPath(cell.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ImageError("not a path inside the image folder")
    return root.joinpath(*relative.parts)


def load_image(path: Path, shape: tuple[int, int]) -> NDArray[np.uint8]:
    """The image's pixels as a (height, width) uint8 array, or :class:`ImageError`."""
    # Pillow is imported here: only a site with image data pays for it.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mode, size = image.mode, image.size
            if mode != "L":
                raise ImageError(f"not a single-channel 8-bit image (mode {mode})")
            pixels = np.asarray(image, dtype=np.uint8)
    except FileNotFoundError as exc:
        raise ImageError("no such image file") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError("not a readable image") from exc
    if pixels.shape != shape:
        raise ImageError(
            f"is {size[1]}x{size[0]} pixels, the schema's shape is {shape[0]}x{shape[1]}"
        )
    return pixels


def save_image(path: Path, pixels: NDArray[np.uint8]) -> None:
    """Write a (height, width) uint8 array as a lossless grayscale PNG."""
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="L").save(
        path, format="PNG", optimize=False
    )
