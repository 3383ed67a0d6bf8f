import io

import pytest
from PIL import Image

from curation.images import Normalised, Rejected, normalise, open_grey, open_rgb, sniff
from tests import support


@pytest.mark.parametrize("name", sorted(support.bad_inputs()))
def test_every_bad_input_is_normalised_or_rejected_with_reason(name):
    data, expected = support.bad_inputs()[name]
    out = normalise(data, min_side=32, max_pixels=80_000_000)
    if expected is None:
        assert isinstance(out, Normalised), out
        im = Image.open(io.BytesIO(out.data))
        im.load()
        assert im.mode == "RGB"
        assert (im.width, im.height) == (out.width, out.height)
        assert out.reencoded
    else:
        assert isinstance(out, Rejected)
        assert out.reason == expected


def test_clean_jpeg_is_kept_byte_for_byte():
    data = support.jpeg(1)
    out = normalise(data)
    assert isinstance(out, Normalised) and not out.reencoded and out.data == data and out.ext == "jpg"


def test_exif_rotation_is_applied():
    out = normalise(support.exif_rotated_jpeg(orientation=6))  # stored 200x100, displayed 100x200
    assert isinstance(out, Normalised)
    assert (out.width, out.height) == (100, 200)
    assert "exif-orientation:6" in out.note


def test_alpha_is_composited_on_white_not_black():
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    out = normalise(support.encode(im, "PNG"))
    assert isinstance(out, Normalised)
    assert Image.open(io.BytesIO(out.data)).convert("RGB").getpixel((5, 5)) == (255, 255, 255)


def test_sixteen_bit_keeps_its_contrast():
    out = normalise(support.png16())
    px = Image.open(io.BytesIO(out.data)).convert("L")
    lo, hi = px.getextrema()
    assert hi - lo > 50  # not clipped to a white sheet


def test_bomb_is_refused_before_decoding():
    out = normalise(support.bomb_png(), max_pixels=80_000_000)
    # 900M pixels: over Pillow's hard limit too, which refuses it at open, from the header alone.
    assert isinstance(out, Rejected) and out.reason == "decompression_bomb" and "900000000 pixels" in out.detail
    out = normalise(support.bomb_png(9000, 9000), max_pixels=80_000_000)
    assert isinstance(out, Rejected) and out.reason == "decompression_bomb" and "9000x9000 exceeds 80000000" in out.detail


def test_sniff_ignores_names():
    assert sniff(support.HTML) == "HTML"
    assert sniff(support.jpeg(1)) == "JPEG"
    assert sniff(support.SVG) == "SVG"


def test_open_rgb_draft_decodes_small(tmp_path):
    p = support.write(tmp_path / "a.jpg", support.jpeg(3, (800, 600)))
    full = open_rgb(p)
    small = open_rgb(p, draft=(64, 64))
    assert full.size == (800, 600)
    assert small.mode == "RGB" and small.size[0] < 800 and small.size[0] >= 64


def test_open_grey_is_the_grey_of_open_rgb(tmp_path):
    """A colour JPEG decoded as luma only gives the grey convert("L") gives (JFIF's Y, to rounding),
    at the same draft size, to rounding and clipping; other inputs go through open_rgb (alpha on white, not black)."""
    import numpy as np

    p = support.write(tmp_path / "a.jpg", support.jpeg(5, (800, 600)))
    for draft in (None, (64, 64), (480, 480)):
        g, ref = open_grey(p, draft=draft), open_rgb(p, draft=draft).convert("L")
        assert g.mode == "L" and g.size == ref.size
        diff = np.abs(np.asarray(g, np.int16) - np.asarray(ref, np.int16))
        assert (diff <= 1).mean() >= 0.995 and diff.mean() < 0.05  # off by more only where RGB clips
    rgba = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    q = tmp_path / "t.png"
    rgba.save(q)
    assert np.asarray(open_grey(q)).min() == 255  # transparent is white, as in open_rgb


@pytest.mark.parametrize("frac", [0.3, 0.9, 0.995])
def test_truncated_jpeg_is_caught_at_any_cut(frac):
    # Clean JPEGs are validated with a reduced-scale decode; it must still read the whole stream.
    data = support.jpeg(3, (640, 480))
    out = normalise(data[: int(len(data) * frac)])
    assert isinstance(out, Rejected) and out.reason == "truncated"


def test_clean_jpeg_reports_full_size():
    out = normalise(support.jpeg(4, (640, 480)))
    assert isinstance(out, Normalised) and (out.width, out.height) == (640, 480) and not out.reencoded


def test_pillows_bomb_guard_stays_on_for_the_process():
    """Importing our decoder must not switch off Pillow's guard for every other image user."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import PIL.Image as I; d = I.MAX_IMAGE_PIXELS; import curation.images, curation.ingest; "
                               "print(I.MAX_IMAGE_PIXELS == d and d is not None)"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "True"


def test_manifest_pixel_limit_is_enforced_below_pillows():
    small = support.png(1, (120, 100))
    assert isinstance(normalise(small, max_pixels=12_000), Normalised)
    out = normalise(small, max_pixels=11_999)
    assert isinstance(out, Rejected) and out.reason == "decompression_bomb" and "120x100 exceeds 11999" in out.detail


def test_pillows_hard_limit_still_applies_above_a_generous_manifest_limit():
    # 200M pixels: under the manifest's 1G limit, over Pillow's hard limit (2 x 89.5M): refused, not decoded.
    out = normalise(support.bomb_png(20000, 10000), max_pixels=1_000_000_000)
    assert isinstance(out, Rejected) and out.reason == "decompression_bomb", out
    assert "Pillow's hard limit" in out.detail
