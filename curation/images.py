"""Raw bytes in, a clean RGB image (or a rejection reason) out: the one decoder every stage uses."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Pillow's own bomb guard (Image.MAX_IMAGE_PIXELS) stays on for the whole process: other code that
# opens images (training loaders, FiftyOne) keeps it. The manifest's `images.max_pixels` is checked
# explicitly on the header below; Pillow's hard limit (twice its MAX_IMAGE_PIXELS) still applies on top.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Formats we store as they are when nothing needs fixing; anything else is re-encoded.
_PASSTHROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class Rejected:
    """Why an input cannot be used (a short code for `reason`, plus a human detail)."""

    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Normalised:
    """An image ready for the store: bytes that any browser/loader reads the same way."""

    data: bytes
    ext: str
    width: int
    height: int
    format: str  # the format as it arrived (JPEG, PNG, GIF, ...)
    reencoded: bool
    note: str = ""  # what normalisation did, e.g. "exif-rotated,cmyk->rgb"


def sniff(data: bytes) -> str | None:
    """What a byte string really is, from its first bytes (extensions and Content-Type lie)."""
    head = data[:512]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    text = head.lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "SVG"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--")):
        return "HTML"
    return None


def _check_header(data: bytes, *, min_side: int, max_pixels: int) -> tuple[Image.Image, str] | Rejected:
    if not data:
        return Rejected("empty_file", "zero bytes")
    kind = sniff(data)
    if kind == "HTML":
        return Rejected("not_an_image", "HTML page")
    if kind == "SVG":
        return Rejected("unsupported_format", "SVG (vector) image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Rejected("not_an_image", "unrecognised bytes")
    except Image.DecompressionBombError as exc:
        # Above Pillow's hard limit, whatever the manifest allows: still a property of this file.
        return Rejected("decompression_bomb", str(exc).split(", could be")[0] + " (Pillow's hard limit)")
    except Exception as exc:  # noqa: BLE001 - any parser failure is a property of this file
        return Rejected("corrupt", f"{type(exc).__name__}: {exc}")
    w, h = im.size
    # Header-only check: a 30000x30000 PNG is refused before a single pixel is decoded.
    if w * h > max_pixels:
        return Rejected("decompression_bomb", f"{w}x{h} exceeds {max_pixels} pixels")
    if min(w, h) < min_side:
        return Rejected("too_small", f"{w}x{h} below {min_side}px")
    return im, (im.format or kind or "UNKNOWN")


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB for palette/alpha/CMYK/16-bit/grey inputs; alpha is composited on white, not dropped to black."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() or 1.0
        scale = 65535.0 if hi > 255 else 255.0
        arr8 = np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype("uint8")
        return Image.fromarray(arr8, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def normalise(data: bytes, *, min_side: int = 32, max_pixels: int = 80_000_000) -> Normalised | Rejected:
    """Validate and normalise raw bytes for the store.

    Clean JPEG/PNG/WEBP inputs (8-bit RGB or greyscale, upright, single frame) are kept byte for
    byte; everything else (EXIF-rotated, CMYK, 16-bit, palette, alpha, GIF/BMP/TIFF, animated)
    is decoded, fixed and re-encoded (PNG if the input was lossless, JPEG q95 otherwise).
    """
    checked = _check_header(data, min_side=min_side, max_pixels=max_pixels)
    if isinstance(checked, Rejected):
        return checked
    im, fmt = checked
    notes: list[str] = []
    try:
        n_frames = getattr(im, "n_frames", 1)
        if n_frames > 1:
            notes.append(f"animated:{n_frames}-frames->first")
            im.seek(0)
        orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
        mode = im.mode
        width, height = im.size
        clean = fmt in _PASSTHROUGH and mode in ("RGB", "L") and orientation in (1, None) and n_frames == 1
        if clean and fmt == "JPEG":
            # A JPEG kept as it is only needs validating: decoding at 1/8 scale still reads every
            # entropy-coded byte (truncation is caught) but skips most of the IDCT, ~4x faster.
            im.draft(mode, (max(1, width // 8), max(1, height // 8)))
        im.load()  # a decode of the whole stream: truncated files fail here
    except Exception as exc:  # noqa: BLE001
        msg = str(exc)
        reason = "truncated" if "truncated" in msg or "broken data stream" in msg else "corrupt"
        return Rejected(reason, f"{type(exc).__name__}: {msg}")

    if clean:
        return Normalised(data, _PASSTHROUGH[fmt], width, height, fmt, reencoded=False)

    if orientation not in (1, None):
        notes.append(f"exif-orientation:{orientation}")
    if mode != "RGB":
        notes.append(f"{mode.lower()}->rgb")
    try:
        fixed = _to_rgb(ImageOps.exif_transpose(im) if orientation not in (1, None) else im)
    except Exception as exc:  # noqa: BLE001
        return Rejected("corrupt", f"{type(exc).__name__}: {exc}")
    if min(fixed.size) < min_side:
        return Rejected("too_small", f"{fixed.width}x{fixed.height} below {min_side}px")
    buf = io.BytesIO()
    lossless = fmt in ("PNG", "GIF", "BMP", "TIFF") or (fmt == "WEBP" and im.info.get("lossless"))
    if lossless:
        fixed.save(buf, "PNG", optimize=False)
        ext = "png"
    else:
        fixed.save(buf, "JPEG", quality=95)
        ext = "jpg"
    return Normalised(buf.getvalue(), ext, fixed.width, fixed.height, fmt, reencoded=True, note=",".join(notes))


def open_rgb(path: str | Path, *, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open a stored image as upright RGB for a model or a hash.

    ``draft`` lets Pillow decode JPEGs at a reduced scale (1/2, 1/4, 1/8) no smaller than the
    given size: several times faster when only a small image is needed (hashing, CLIP).
    """
    return _to_rgb(_upright(path, draft, "RGB"))


def open_grey(path: str | Path, *, draft: tuple[int, int] | None = None) -> Image.Image:
    """`open_rgb` then grey ("L"), for hashes and keypoints. With ``draft``, a colour JPEG decodes
    its luma channel only (JFIF's Y is the same weighted sum as convert("L"), to rounding): no
    chroma upsampling or colour conversion (measured: ~40% less decode time at 480 px, ~5% at 1/8)."""
    im = _upright(path, draft, "L")
    return im if im.mode == "L" and "transparency" not in im.info else _to_rgb(im).convert("L")


def _upright(path: str | Path, draft: tuple[int, int] | None, mode: str) -> Image.Image:
    """The image at ``path``, EXIF-upright; a JPEG decoded in ``mode`` at a reduced scale no
    smaller than ``draft`` when given."""
    im = Image.open(path)
    if draft is not None and im.format == "JPEG":
        im.draft(mode, draft)
    return ImageOps.exif_transpose(im)
