"""Picture files, without torch: which names are pictures, the class folders of a root,
a file read as upright RGB, whether it decodes. (split_dataset.py needs no more, and so
starts in a fraction of a second instead of the seconds torch takes to import.)

- `is_image_name()`, `find_classes()`: what a folder of photos holds.
- `load_rgb()` opens any PIL-readable picture as upright 8-bit RGB (EXIF orientation
  applied; greyscale, palette, CMYK, 16-bit and transparent images converted) and
  refuses decompression bombs; `check_image()` says why one cannot be read.
- `inspect_image()`: that reason, or the picture's perceptual hash (`picture_hash()`), from
  one decoding (the split keeps near-duplicates in one part with it).
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from compress.cli import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The largest picture accepted: 2**27 pixels (e.g. 16384 x 8192), about 400 MB decoded.
# Larger ones are refused before decoding, so a decompression bomb cannot exhaust memory.
MAX_IMAGE_PIXELS = 2 ** 27
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL's own guard, at the same limit


def load_rgb(path: str, draft_size: int | None = None) -> Image.Image:
    """Open `path` as an upright RGB PIL image; raises OSError/ValueError if unreadable.

    `draft_size` lets JPEGs decode at a reduced scale (still reading every byte).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as error:
            raise ValueError(str(error)) from None
        with image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{image.width}x{image.height} pixels is too large "
                                 f"(at most {MAX_IMAGE_PIXELS // 1_000_000}M pixels)")
            if draft_size:
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def check_image(path: str) -> str | None:
    """None if `path` decodes completely, else a short reason (for the split's report)."""
    return inspect_image(path)[0]


def inspect_image(path: str) -> tuple[str | None, bytes | None]:
    """(None, the picture's `picture_hash()`) if `path` decodes completely, else (a short
    reason, None): the split's one decoding of each file."""
    if os.path.getsize(path) == 0:
        return "empty file", None
    try:
        image = load_rgb(path, draft_size=256)
    except Exception as error:  # PIL raises many types for broken files
        return f"cannot be decoded ({str(error) or type(error).__name__})", None
    return None, picture_hash(image)


HASH_SIDE = 16  # the picture shrunk to 17 x 16 grey pixels: 16 x 16 neighbours compared
HASH_MARGIN = 2  # grey levels (of 255): a step smaller than this counts as flat


def picture_hash(image: Image.Image) -> bytes:
    """A perceptual hash of `image` (a difference hash of 512 bits): the picture in grey,
    shrunk to 17 x 16 pixels, and for each pixel against its left neighbour a bit for
    "brighter" and one for "darker", by more than HASH_MARGIN (flat areas, where JPEG noise
    would flip a plain comparison, stay 0). A resized, re-encoded or recoloured copy lands
    a few bits away; measured on the flowers photos in docs/data.md."""
    grey = image.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.BOX)
    pixels = np.asarray(grey, dtype=np.int16)
    steps = pixels[:, 1:] - pixels[:, :-1]
    return np.packbits(np.concatenate([(steps > HASH_MARGIN).ravel(),
                                       (steps < -HASH_MARGIN).ravel()])).tobytes()


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB (16-bit and float greyscale scaled, transparency on white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or float greyscale: scale the real range into 0..255
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        image = Image.fromarray(array.astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def is_image_name(name: str) -> bool:
    """Whether a file name is that of a picture (by extension; hidden files are not)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def find_classes(root: str) -> list[str]:
    """Sorted class names: the sub-folders of `root` (hidden ones left out)."""
    if not os.path.isdir(root):
        raise UserError(f"{root}: folder not found (expected {root}/<class>/<images>; "
                        "run split_dataset.py first)")
    return sorted(entry.name for entry in os.scandir(root)
                  if entry.is_dir() and not entry.name.startswith("."))
