"""Image factories for tests: distinct textured images and every kind of bad input; a loopback HTTP handler base."""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance


def textured(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A distinct RGB image per seed (smooth blobs plus noise, so perceptual hashes differ)."""
    rng = np.random.default_rng(seed)
    w, h = size
    low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(low, "RGB").resize((w, h), Image.BICUBIC)
    arr = np.asarray(im).astype(np.int16) + rng.integers(-12, 12, size=(h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(seed: int, size=(160, 120), quality: int = 90) -> bytes:
    return encode(textured(seed, size), "JPEG", quality=quality)


def png(seed: int, size=(160, 120)) -> bytes:
    return encode(textured(seed, size), "PNG")


def planted_copies(im: Image.Image, *, crop: float = 0.02) -> dict[str, bytes]:
    """Near duplicates of one image as a scraper could find them: resized, low quality, cropped
    by ``crop`` per side, brightened, greyscale, and re-encoded as PNG."""
    w, h = im.size
    dx, dy = int(w * crop), int(h * crop)
    return {
        "resized": encode(im.resize((w // 2, h // 2), Image.BILINEAR), "JPEG", quality=90),
        "lowq": encode(im, "JPEG", quality=15),
        "cropped": encode(im.crop((dx, dy, w - dx, h - dy)), "JPEG", quality=90),
        "bright": encode(ImageEnhance.Brightness(im).enhance(1.2), "JPEG", quality=90),
        "grey": encode(im.convert("L"), "JPEG", quality=90),
        "png": encode(im, "PNG"),
    }


def cmyk_jpeg(seed: int = 1) -> bytes:
    return encode(textured(seed).convert("CMYK"), "JPEG", quality=90)


def png16(seed: int = 2) -> bytes:
    arr = np.asarray(textured(seed).convert("L")).astype(np.uint16) * 257
    return encode(Image.fromarray(arr), "PNG")  # uint16 -> mode I;16


def exif_rotated_jpeg(seed: int = 3, orientation: int = 6) -> bytes:
    im = textured(seed, (200, 100))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", quality=90, exif=exif.tobytes())


def animated_gif(seed: int = 4) -> bytes:
    frames = [textured(seed + i).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def rgba_png(seed: int = 5) -> bytes:
    im = textured(seed).convert("RGBA")
    im.putalpha(128)
    return encode(im, "PNG")


def palette_png(seed: int = 6) -> bytes:
    return encode(textured(seed).convert("P"), "PNG")


def truncated_jpeg(seed: int = 7) -> bytes:
    data = jpeg(seed, (400, 300))
    return data[: len(data) // 2]


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A small PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    row = b"\x00" + b"\x00" * width
    idat = zlib.compress(row * 8, 9)  # only a few rows: the header is the lie
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


HTML = b"<!DOCTYPE html><html><head><title>Not found</title></head><body>nope</body></html>"
SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><rect width="100" height="100"/></svg>'


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def bad_inputs() -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, expected rejection reason, or None if it must be normalised and kept)."""
    return {
        "zero.jpg": (b"", "empty_file"),
        "page.jpg": (HTML, "not_an_image"),
        "vector.svg": (SVG, "unsupported_format"),
        "noise.png": (b"this is not an image at all" * 10, "not_an_image"),
        "truncated.jpg": (truncated_jpeg(), "truncated"),
        "bomb.png": (bomb_png(), "decompression_bomb"),
        "tiny.png": (encode(textured(8, (10, 10)), "PNG"), "too_small"),
        "cmyk.jpg": (cmyk_jpeg(), None),
        "deep.png": (png16(), None),
        "rotated.jpg": (exif_rotated_jpeg(), None),
        "animated.gif": (animated_gif(), None),
        "alpha.png": (rgba_png(), None),
        "palette.png": (palette_png(), None),
    }


class QuietHandler(BaseHTTPRequestHandler):
    """Base of the tests' loopback servers: keep-alive like real services, no request log."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a):  # keep test output clean
        pass

    def send(self, code: int, body: bytes, ctype: str = "application/octet-stream", headers=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class LoopbackServer:
    """``handler`` served on 127.0.0.1 (a free port) from a daemon thread until ``close()``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.srv.daemon_threads = True
        self.port: int = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def record_fsyncs(monkeypatch) -> list[str]:
    """Paths the real os.fsync is called on from now on, in order (it still runs)."""
    seen: list[str] = []
    real = os.fsync

    def fsync(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen
