"""Reading source images the way every data path needs them: grey uint8, any PNG flavour.

X-ray PNGs arrive as 8-bit grey, 16-bit grey (12-bit detector values), RGB/RGBA exports, or
palette images; all become ``(H, W)`` uint8. 16-bit images are windowed to their own
min..max (a detector's 12 bits rarely fill the 16-bit range). A file that cannot be decoded
raises :class:`ImageReadError` naming it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError

__all__ = ["IMAGE_SUFFIXES", "ImageReadError", "read_gray", "read_mask", "resize_gray", "resize_mask"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ImageReadError(UserError):
    """A missing or undecodable image (the message names the file)."""


def _open(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            im.load()  # decode now: truncated files fail here, not later
        return im
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def read_gray(path: str | Path) -> np.ndarray:
    """``(H, W)`` uint8 grey image from any PNG/JPEG/TIFF (8/16-bit grey, RGB(A), palette)."""
    path = Path(path)
    im = _open(path)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return np.round((a - lo) * scale).astype(np.uint8)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (0, 0, 0, 255))  # transparent pixels as black, as viewers show
        im = Image.alpha_composite(bg, im)
    if im.mode != "L":
        im = im.convert("L")
    return np.array(im, dtype=np.uint8)  # writable (torch.from_numpy warns on read-only arrays)


def read_mask(path: str | Path) -> np.ndarray:
    """``(H, W)`` uint8 mask in {0, 1} from 0/1, 0/255, 16-bit or RGB mask files.

    Foreground is above half the file's maximum, so JPEG ringing around a 0/255 mask stays out.
    """
    a = read_gray(path)
    top = int(a.max())
    return (a > top // 2).astype(np.uint8) if top > 1 else (a > 0).astype(np.uint8)


def resize_gray(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an ``(H, W)`` uint8 image to ``(size, size)`` with an antialiased filter."""
    if img.shape == (size, size):
        return img
    return np.array(Image.fromarray(img).resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize an ``(H, W)`` {0, 1} mask to ``(size, size)`` by area share ≥ 0.5."""
    if mask.shape == (size, size):
        return mask.astype(np.uint8)
    im = Image.fromarray((mask > 0).astype(np.uint8) * 255)
    return (np.asarray(im.resize((size, size), Image.Resampling.BOX)) >= 128).astype(np.uint8)
