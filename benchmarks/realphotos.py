"""Real-photo dedup benchmark: Debian packages of photos in, a tune and a held-out split of planted
near duplicates out (``build``), and our dedup stage vs imagededup on either split (``eval``).

    .venv/bin/python benchmarks/realphotos.py build [--out /work/data/realphotos]
    .venv/bin/python benchmarks/realphotos.py build --fresh        # fresh + fresh-tune (other packages)
    .venv/bin/python benchmarks/realphotos.py build --tune-small 512  # tune512: tune's pictures at 512 px
    .venv/bin/python benchmarks/realphotos.py build --fresh2       # fresh2 (yet other packages; after the others)
    .venv/bin/python benchmarks/realphotos.py build --fresh3       # fresh3 (yet others; after fresh2)
    .venv/bin/python benchmarks/realphotos.py eval --split tune|heldout [--no-peer] [--cnn] [--json F]
    .venv/bin/python benchmarks/realphotos.py eval --split heldout --code DIR   # e.g. a baseline:
        mkdir /tmp/base && git archive HEAD curation | tar -x -C /tmp/base
    .venv/bin/python benchmarks/realphotos.py fixtures   # tests/assets/dedup/photos from the tune split
    .venv/bin/python benchmarks/realphotos.py login-probe   # login screens over smooth backgrounds

``eval`` runs our stage as a user does (a workspace with a folder source over the split: ingest,
then dedup; pairs = all pairs within one ``dup_group``, or one stored image) and imagededup's PHash
at its default and best threshold 10 through its batched encode_images + find_duplicates (pairs of
the connected components of its duplicate map, and its raw pair list); ``--cnn`` also tries its
CNN, whose weights cannot be downloaded offline. It prints pair precision/recall, recall of each
copy with its original per transform, and false pairs.

Originals come from Debian packages (downloaded with ``apt-get download``, unpacked with
``dpkg-deb -x``, nothing installed): the photos GCompris ships inside its Qt resource files
(animals, monuments, tools, fish, hands, planets: carved out of the .rcc files as WebP), KDE Plasma,
MATE, GNOME, UKUI, Lomiri and sway wallpapers, MyPaint's paper textures and Debian's login
backgrounds (low-texture: gradients, stripes, soft waves). Package variants are kept as real
duplicates: the same wallpaper shipped at several resolutions, and the light/dark recolourings of
one design. Originals are split by ORIGINAL (seed 13) into tune and heldout, so no picture has
copies in both. Thresholds may be tuned on ``tune`` only; report ``heldout``.

``fresh`` is a second held-out split from packages none of the above came from (Stellarium,
scikit-image, Krita, digiKam, Xfce, LXDE, GRUB: see FRESH_PACKAGES), built once ``heldout`` had
been looked at too often to stay unbiased; ``fresh-tune`` holds more pictures of its kinds (other
telescope photos, Stellarium's 3D-scenery textures), none a repeat of a fresh one, to tune on.
Report ``fresh``; tune on ``tune``, ``tune<SIDE>`` and ``fresh-tune``.

``fresh2`` is a third held-out split (Enlightenment, LXQt, FVWM-Crystal, XPlanet, Kanagram, Tux
Paint: see FRESH2_PACKAGES), built once ``fresh`` had been looked at four times; a picture that
repeats one of any other split is dropped. It has no tuning twin: report it, never tune on it.
``fresh3`` (Tux Paint's templates, OpenCV's sample photos, Palapeli, scikit-learn, Scribus: see
FRESH3_PACKAGES) followed once fresh2 had been looked at three times.

Layout written under OUT (default /work/data/realphotos, not committed):
  {tune,heldout}/<class>/<opaque name>.jpg   (class folders c0..c3, so a folder source ingests them)
  {tune,heldout}/truth.csv                   file (relative to the split), original_id, transform
  originals.csv                              original_id, split, package, source path, role
  README.md                                  this layout, the transforms and the licences
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import random
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = Path("/work/data/realphotos")
SEED = 13
CLASSES = ["c0", "c1", "c2", "c3"]
MAX_SIDE = 1280  # originals are downscaled to this long side (the wallpapers are up to 5120 px)

PACKAGES = [
    "gcompris-qt-data", "plasma-workspace-wallpapers", "mate-backgrounds", "gnome-backgrounds",
    "ukui-wallpapers", "lomiri-wallpapers", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04",
    "sway-backgrounds", "mypaint-data-extras", "desktop-base",
]
# GCompris activities whose images are photographs (lang, babyshapes, chronos: drawings;
# paintings: jigsaw pieces with holes).
GCOMPRIS_PHOTO_RCC = [
    "categorization", "explore_monuments", "erase", "details", "explore_world_animals",
    "explore_farm_animals", "explore_world_music", "leftright", "louis-braille", "solar_system", "clickgame",
]

# Synthetic transforms (a random subset per original); package variants add pkg_resolution and
# pkg_recolour, which are the packages' own files.
TRANSFORMS = [
    "resize_half", "resize_small", "jpeg_q25", "crop5_side", "crop5_all", "crop10_side", "crop10_all",
    "bright_1.3", "grey", "text", "hflip", "rotate", "pad", "hue", "border",
]
PACKAGE_TRANSFORMS = ["pkg_resolution", "pkg_recolour", "pkg_logo"]


@dataclass
class Original:
    oid: str  # stable id: package + path inside it (+ carve index)
    package: str
    path: str
    image: Image.Image
    variants: list[tuple[str, str, Image.Image]]  # (transform, path, image): package-shipped copies
    low_texture: bool = False


# ---------------------------------------------------------------- sources


def fetch_packages(cache: Path, packages: list[str] = PACKAGES) -> Path:
    """Download and unpack the packages (no install, no root needed); returns the unpack root."""
    debs, root = cache / "debs", cache / "x"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True, capture_output=True)
    for p in packages:
        dest = root / p
        if not dest.exists():
            (deb,) = debs.glob(f"{p}_*.deb")
            dest.mkdir(parents=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    return root


def _shrink(im: Image.Image, side: int = MAX_SIDE) -> Image.Image:
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert("RGB")
    if max(im.size) > side:
        im.thumbnail((side, side), Image.LANCZOS)
    return im


def _load(path: Path, side: int = MAX_SIDE) -> Image.Image:
    with Image.open(path) as im:
        im.draft("RGB", (side, side))
        return _shrink(im, side)


def rcc_names(b: bytes) -> dict[int, str]:
    """Qt resource file (.rcc) bytes -> {offset of a file's bytes: its path} (formats 1-3)."""
    if b[:4] != b"qres":
        return {}
    ver, tree, data, names = struct.unpack(">IIII", b[4:20])
    entry = 14 if ver == 1 else 22
    out: dict[int, str] = {}

    def name_at(off: int) -> str:
        n = struct.unpack(">H", b[names + off : names + off + 2])[0]
        return b[names + off + 6 : names + off + 6 + 2 * n].decode("utf-16-be")

    def walk(i: int, prefix: str) -> None:
        e = tree + i * entry
        noff, flags = struct.unpack(">IH", b[e : e + 6])
        name = name_at(noff) if i else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">II", b[e + 6 : e + 14])
            for c in range(first, first + count):
                walk(c, f"{prefix}{name}/" if i else "")
        else:
            out[data + struct.unpack(">I", b[e + 10 : e + 14])[0] + 4] = prefix + name  # after a 4-byte size

    walk(0, "")
    return out


def carve_webp(rcc: Path) -> list[tuple[str, Image.Image]]:
    """(path inside the resource, image) of the WebP files in a Qt resource (.rcc) file, in order."""
    b = rcc.read_bytes()
    names = rcc_names(b)
    out, i = [], b.find(b"RIFF")
    while i >= 0:
        if b[i + 8 : i + 12] == b"WEBP":
            size = struct.unpack("<I", b[i + 4 : i + 8])[0] + 8
            try:
                with Image.open(io.BytesIO(b[i : i + size])) as im:
                    out.append((names.get(i, f"{rcc.name}@{i}"), _shrink(im)))
            except Exception:  # noqa: BLE001 - a false RIFF match
                pass
        i = b.find(b"RIFF", i + 4)
    return out


def copyright_stanzas(path: Path) -> list[tuple[list[str], str, str]]:
    """(file patterns, copyright, licence) per stanza of a machine-readable debian/copyright."""
    out, cur, field = [], {}, None
    for line in path.read_text(errors="replace").splitlines() + [""]:
        if not line.strip():
            if "files" in cur and "license" in cur:
                out.append((cur["files"].split(), " ".join(cur.get("copyright", "").split()), cur["license"].splitlines()[0].strip()))
            cur, field = {}, None
        elif line[0] in " \t" and field:
            cur[field] += "\n" + line.strip()
        elif ":" in line:
            field, _, value = line.partition(":")
            field = field.strip().lower()
            cur[field] = value.strip()
    return out


def licence_of(stanzas: list[tuple[list[str], str, str]], path: str) -> str:
    """The last stanza matching ``path`` wins (DEP-5); the package ships WebP files converted
    from the upstream .jpg/.png/.svg the stanza names, so extensions are ignored."""
    import fnmatch

    stem = path.rsplit(".", 1)[0]
    found = "?"
    for patterns, holder, licence in stanzas:
        if any(fnmatch.fnmatch(stem, p.rsplit(".", 1)[0] if "." in p.rsplit("/", 1)[-1] else p) or fnmatch.fnmatch(path, p)
               for p in patterns):
            if patterns == ["*"]:
                holder = "no stanza of its own: the package's `Files: *`, the GCompris developers"
            found = f"{licence} ({holder[:100]})" if holder else licence
    return found


def _aspect(im: Image.Image) -> float:
    return im.size[0] / im.size[1]


def collect_originals(x: Path) -> list[Original]:
    out: list[Original] = []
    rcc_dir = x / "gcompris-qt-data/usr/share/gcompris-qt/rcc"
    for name in GCOMPRIS_PHOTO_RCC:
        for k, (path, im) in enumerate(carve_webp(rcc_dir / f"{name}.rcc")):  # k: n-th WebP in the file
            if min(im.size) < 200:
                continue
            out.append(Original(f"gcompris/{name}/{k:03d}", "gcompris-qt-data", f"rcc/{name}.rcc:{path}", im, []))

    # Plasma: one folder per wallpaper; images/ holds resolutions, images_dark/ a recolouring.
    pw = x / "plasma-workspace-wallpapers/usr/share/wallpapers"
    for d in sorted(pw.iterdir()):
        # most listed resolutions are symlinks to one file: only real files are distinct copies
        files = sorted((p for p in (d / "contents/images").glob("*.*") if not p.is_symlink()), key=lambda p: -_pixels(p))
        if not files:
            continue
        main = _load(files[0])
        variants = []
        # other resolutions of the same aspect (a different aspect is a different crop: left out),
        # scaled by the factor the main file was, so they keep the sizes relative to it they ship at
        same = [p for p in files[1:] if abs(_aspect(_load(p, 64)) - _aspect(main)) < 0.03]
        for p in _spread(same, 3):
            side = round(max(main.size) * _long(p) / _long(files[0]))
            variants.append(("pkg_resolution", str(p.relative_to(x)), _load(p, side)))
        dark = sorted((p for p in (d / "contents/images_dark").glob("*.*") if not p.is_symlink()), key=lambda p: -_pixels(p))
        if dark:
            variants.append(("pkg_recolour", str(dark[0].relative_to(x)), _load(dark[0])))
        out.append(Original(f"plasma/{d.name}", "plasma-workspace-wallpapers", str(files[0].relative_to(x)), main, variants))

    mate = x / "mate-backgrounds/usr/share/backgrounds/mate"
    groups = {
        "Elephants": ("pkg_resolution", ["abstract/Elephants_5640x3172.jpg", "abstract/Elephants_3840x2160.jpg", "abstract/Elephants.jpg"]),
        "Ubuntu-Mate": ("pkg_recolour", [f"desktop/Ubuntu-Mate-{c}-no-logo.png" for c in ("Warm", "Cold", "Dark", "Radioactive")]),
        "MATE-Stripes": ("pkg_recolour", ["desktop/MATE-Stripes-Light.png", "desktop/MATE-Stripes-Dark.png"]),
    }
    grouped = {f for _, fs in groups.values() for f in fs}
    for key, (kind, fs) in groups.items():
        main = _load(mate / fs[0])
        scaled = [round(max(main.size) * _long(mate / f) / _long(mate / fs[0])) for f in fs[1:]]
        out.append(Original(f"mate/{key}", "mate-backgrounds", fs[0], main,
                            [(kind, f, _load(mate / f, side)) for f, side in zip(fs[1:], scaled)]))
    for p in sorted(mate.rglob("*.*")):
        rel = str(p.relative_to(mate))
        if rel not in grouped and p.suffix.lower() in (".jpg", ".png"):
            low = rel.startswith("desktop/") or rel in ("abstract/Flow.png", "abstract/Silk.png", "abstract/Waves.png")
            out.append(Original(f"mate/{rel}", "mate-backgrounds", rel, _load(p), [], low_texture=low))

    gn = x / "gnome-backgrounds/usr/share/backgrounds/gnome"
    for p in sorted(gn.glob("*-l.webp")):
        dark = p.with_name(p.name.replace("-l.webp", "-d.webp"))
        out.append(Original(f"gnome/{p.stem[:-2]}", "gnome-backgrounds", p.name, _load(p),
                            [("pkg_recolour", dark.name, _load(dark))] if dark.exists() else []))

    sway = x / "sway-backgrounds/usr/share/backgrounds/sway"
    sizes = ["1920x1080", "1366x768", "1136x640"]  # the 16:9 ones (others are other crops)
    main = _load(sway / f"Sway_Wallpaper_Blue_{sizes[0]}.png")
    out.append(Original("sway/Blue", "sway-backgrounds", f"Sway_Wallpaper_Blue_{sizes[0]}.png", main,
                        [("pkg_resolution", f"Sway_Wallpaper_Blue_{s}.png",
                          _load(sway / f"Sway_Wallpaper_Blue_{s}.png", round(max(main.size) * int(s.split("x")[0]) / 1920)))
                         for s in sizes[1:]]))

    for pkg, sub in [("ukui-wallpapers", "usr/share/backgrounds"), ("lomiri-wallpapers", "usr/share/backgrounds"),
                     ("lomiri-wallpapers-16.04", "usr/share/backgrounds"), ("lomiri-wallpapers-20.04", "usr/share/backgrounds")]:
        for p in sorted((x / pkg / sub).glob("*.*")):
            if p.suffix.lower() in (".jpg", ".png"):
                out.append(Original(f"{pkg}/{p.name}", pkg, p.name, _load(p), []))

    # MyPaint ships some paper scans in two tints: recolourings of one texture.
    mp_dir = x / "mypaint-data-extras/usr/share/mypaint/backgrounds"
    tints = {"mrmamurk/mamurk_a_1.png": "mrmamurk/mamurk_a_2.png", "mrmamurk/mamurk_e_1.png": "mrmamurk/mamurk_e_2.png",
             "ramon/HR_SketchPaper.png": "ramon/HR_SketchPaper 02.png"}
    for p in sorted(mp_dir.rglob("*.png")):
        rel = str(p.relative_to(mp_dir))
        if rel in tints.values():
            continue
        variants = [("pkg_recolour", tints[rel], _load(mp_dir / tints[rel]))] if rel in tints else []
        out.append(Original(f"mypaint/{rel}", "mypaint-data-extras", rel, _load(p), variants, low_texture=True))
    db = x / "desktop-base/usr/share/desktop-base"
    logo = db / "lines-theme/login/sddm-preview.jpg"  # the same picture without the logo beside it
    out.append(Original("desktop-base/lines-theme", "desktop-base", "lines-theme/login/sddm-preview-nologo.jpg",
                        _load(db / "lines-theme/login/sddm-preview-nologo.jpg"),
                        [("pkg_logo", "lines-theme/login/sddm-preview.jpg", _load(logo))], low_texture=True))
    for p in sorted(db.glob("*-theme/login/*.*")):
        if p.suffix.lower() in (".png", ".jpg") and "lines-theme" not in str(p):
            out.append(Original(f"desktop-base/{p.parent.parent.name}/{p.name}", "desktop-base",
                                str(p.relative_to(x / "desktop-base")), _load(p), [], low_texture=True))
    return out


def _long(p: Path) -> int:
    with Image.open(p) as im:
        return max(im.size)


def _pixels(p: Path) -> int:
    with Image.open(p) as im:
        return im.size[0] * im.size[1]


def _spread(items: list, k: int) -> list:
    """Up to k items spread over the list (largest, middle, smallest resolutions)."""
    if len(items) <= k:
        return items
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def _thumb(im: Image.Image) -> np.ndarray:
    g = np.asarray(im.convert("L").resize((32, 32), Image.BOX), np.float32).ravel()
    g = g - g.mean()
    return g / max(float(np.linalg.norm(g)), 1e-6)


# Pairs the screen below flags that are different pictures (checked by eye): smooth gradients whose
# thumbnails correlate. Kept, as the low-texture images that tempt a dedup into false merges.
KNOWN_DISTINCT = {
    ("ukui-wallpapers/focal-ubuntukylin.png", "sway/Blue"),
    ("lomiri-wallpapers/lomiri-default-background.png", "sway/Blue"),
    ("lomiri-wallpapers/warty-final-ubuntu.png", "sway/Blue"),
    ("lomiri-wallpapers/lomiri-default-background.png", "ukui-wallpapers/focal-ubuntukylin.png"),
    ("lomiri-wallpapers/warty-final-ubuntu.png", "ukui-wallpapers/focal-ubuntukylin.png"),
    ("desktop-base/joy-theme/sddm-preview.jpg", "mate/desktop/Stripes.png"),
    ("desktop-base/joy-inksplat-theme/sddm-preview.jpg", "mate/desktop/Stripes.png"),
}


def drop_repeats(originals: list[Original]) -> tuple[list[Original], list[tuple[str, str]]]:
    """Keep one of each picture the packages ship twice (GCompris reuses photos across activities,
    sometimes re-cropped), also mirrored, so the "distinct" ground truth is not wrong; and drop
    blank ones (transparent overlays meant for a background colour).

    Same picture: 32x32 grey thumbnails correlating >= 0.8 and pHashes within 16 bits (smooth
    gradients correlate >= 0.9 while 20-38 bits apart: distinct pictures, kept).
    An ORB + RANSAC screen of all pairs (run once, 82 s) found no repeat beyond these.
    """
    import imagehash

    kept: list[Original] = []
    thumbs: list[np.ndarray] = []
    hashes: list = []
    dropped = []
    for o in originals:
        if float(np.asarray(o.image.convert("L"), np.float32).std()) < 3:
            dropped.append((o.oid, "(blank)"))
            continue
        t, tf = _thumb(o.image), _thumb(ImageOps.mirror(o.image))
        h, hf = imagehash.phash(o.image), imagehash.phash(ImageOps.mirror(o.image))
        if thumbs:
            m = np.stack(thumbs)
            c = np.maximum(m @ t, m @ tf)
            d = np.array([min(h - k, hf - k) for k in hashes])
            same = (c >= 0.8) & (d <= 16)
            same &= np.array([(o.oid, k.oid) not in KNOWN_DISTINCT for k in kept])
            if same.any():
                dropped.append((o.oid, kept[int(np.argmax(np.where(same, c, -1)))].oid))
                continue
        kept.append(o)
        thumbs.append(t)
        hashes.append(h)
    return kept, dropped


# ---------------------------------------------------------------- transforms

_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
_WORDS = ["SALE", "Photo by", "www.example.org", "Holiday 2019", "(c) stock", "FREE", "wallpaper", "HD 4K"]


def _font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans Bold: the system's, else the copy matplotlib (a dependency) ships, so drawn
    text has the same glyphs, hence the same keypoints, on every machine; else Pillow's font."""
    import importlib.util

    mpl = importlib.util.find_spec("matplotlib")
    bundled = [str(Path(d) / "mpl-data/fonts/ttf/DejaVuSans-Bold.ttf") for d in (mpl.submodule_search_locations or [])] if mpl else []
    for path in (_FONT, *bundled):
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def apply(kind: str, im: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    """(transformed image, parameters as text) for one synthetic transform."""
    w, h = im.size
    if kind == "resize_half":
        return im.resize((max(1, w // 2), max(1, h // 2)), Image.LANCZOS), "1/2"
    if kind == "resize_small":
        s = rng.choice([192, 256, 320])
        c = im.copy()
        c.thumbnail((s, s), Image.LANCZOS)
        return c, f"long side {s}"
    if kind == "jpeg_q25":
        return im, "q25"  # encoded at q25 by the writer
    if kind.startswith("crop"):
        f = (5 if kind.startswith("crop5") else 10) / 100
        if kind.endswith("_all"):  # f of the width and height from every side
            dx, dy = round(w * f), round(h * f)
            return im.crop((dx, dy, w - dx, h - dy)), f"{f:.0%} each side"
        side = rng.choice(["left", "right", "top", "bottom"])
        box = {"left": (round(w * f), 0, w, h), "right": (0, 0, w - round(w * f), h),
               "top": (0, round(h * f), w, h), "bottom": (0, 0, w, h - round(h * f))}[side]
        return im.crop(box), f"{f:.0%} from {side}"
    if kind == "bright_1.3":
        return ImageEnhance.Brightness(im).enhance(1.3), "x1.3"
    if kind == "grey":
        return im.convert("L").convert("RGB"), ""
    if kind == "text":
        c = im.copy()
        d = ImageDraw.Draw(c)
        size = max(12, h // rng.choice([8, 10, 14]))
        word = rng.choice(_WORDS)
        font = _font(size)
        x0, y0 = rng.randint(0, max(1, w // 3)), rng.choice([h // 20, h - size * 2])
        d.text((x0, y0), word, font=font, fill=rng.choice([(255, 255, 255), (255, 230, 0), (0, 0, 0)]),
               stroke_width=max(1, size // 15), stroke_fill=(0, 0, 0))
        return c, f"'{word}' {size}px"
    if kind == "hflip":
        return ImageOps.mirror(im), ""
    if kind == "rotate":
        a = rng.uniform(2, 5) * rng.choice([-1, 1])
        return im.rotate(a, resample=Image.BICUBIC, expand=False, fillcolor=(0, 0, 0)), f"{a:+.1f} deg, black corners"
    if kind == "pad":
        mode = rng.choice(["letterbox", "square", "margin"])
        colour = rng.choice([(0, 0, 0), (255, 255, 255)])
        if mode == "letterbox":  # onto a 16:9 or 9:16 canvas, bars on the short sides
            W, H = (max(w, round(h * 16 / 9)), h) if w / h < 16 / 9 else (w, max(h, round(w * 9 / 16)))
            if (W, H) == (w, h):
                W, H = w, round(h * 1.3)
        elif mode == "square":
            W = H = max(w, h)
        else:
            W, H = round(w * 1.15), round(h * 1.15)
        c = Image.new("RGB", (W, H), colour)
        c.paste(im, ((W - w) // 2, (H - h) // 2))
        return c, f"{mode} {'black' if colour == (0, 0, 0) else 'white'} to {W}x{H}"
    if kind == "hue":
        shift = rng.randint(60, 180)
        hsv = np.asarray(im.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift * 255 // 360) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB"), f"hue +{shift} deg"
    if kind == "border":  # a screenshot: window frame, title bar, desktop margin around the picture
        bar, edge, margin = max(14, h // 16), max(2, w // 200), rng.choice([0, max(8, w // 25)])
        W, H = w + 2 * edge + 2 * margin, h + bar + edge + 2 * margin
        desk = rng.choice([(40, 60, 90), (230, 230, 230), (20, 20, 20)])
        c = Image.new("RGB", (W, H), desk)
        d = ImageDraw.Draw(c)
        d.rectangle((margin, margin, W - margin - 1, H - margin - 1), fill=(60, 60, 60))
        d.rectangle((margin, margin, W - margin - 1, margin + bar), fill=(210, 210, 215))
        for k, col in enumerate([(237, 106, 94), (245, 191, 79), (98, 197, 84)]):
            cx, cy, r = margin + bar * (k + 1), margin + bar // 2, bar // 4
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=col)
        d.text((margin + bar * 5, margin + bar // 4), "image.jpg - Viewer", font=_font(max(9, bar // 2)), fill=(40, 40, 40))
        c.paste(im, (margin + edge, margin + bar))
        return c, f"title bar {bar}px, margin {margin}px"
    raise ValueError(f"unknown transform {kind}")


def login_overlay(im: Image.Image) -> Image.Image:
    """``im`` under a login screen (clock, date, three avatars, two fields, four buttons, a status
    line), drawn in proportion to the picture: two different pictures under it share all their
    keypoints and no content, like the login previews of two desktop themes (desktop-base's
    sddm-preview.jpg), a trap for keypoint-only verification."""
    im = im.convert("RGB").copy()
    w, h = im.size
    d = ImageDraw.Draw(im)
    big, small = _font(max(12, h // 14)), _font(max(8, h // 45))
    cx, r = w // 2, max(4, h // 26)
    d.text((cx, h * 0.27), "00:27", fill="white", font=big, anchor="mm")
    d.text((cx, h * 0.32), "mercredi 16 novembre 2016", fill="white", font=small, anchor="mm")
    for k in (-1, 0, 1):
        x = cx + k * int(2.4 * r)
        d.ellipse((x - r, h * 0.43 - r, x + r, h * 0.43 + r), outline="white", width=max(1, r // 6),
                  fill=(20, 20, 20) if k == 1 else (60, 60, 60))
    for y in (0.53, 0.56):
        d.rectangle((cx - w * 0.06, h * y, cx + w * 0.06, h * y + h * 0.022), fill=(235, 235, 235), outline=(120, 160, 220))
    for k, word in enumerate(("Suspend", "Restart", "Shutdown", "Different")):
        x = cx + int((k - 1.5) * w * 0.04)
        d.ellipse((x - r // 2, h * 0.68 - r // 2, x + r // 2, h * 0.68 + r // 2), outline="white", width=2)
        d.text((x, h * 0.71), word, fill="white", font=small, anchor="mm")
    d.text((8, h - 12), "Desktop Session: Plasma", fill="white", font=small, anchor="lm")
    d.text((w - 8, h - 12), "31%", fill="white", font=small, anchor="rm")
    return im


def _encode(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------- build


def write_split(d: Path, originals: list[Original], split: str, counts: dict[str, int], *,
                dup_share: float = 0.75, k_min: int = 3, k_max: int = 6) -> list[dict]:
    """Write one split: each original, its package variants and, for ``dup_share`` of the rest,
    3-6 synthetic copies, under random class folders, and ``truth.csv``; returns the originals' rows."""
    for c in CLASSES:
        (d / c).mkdir(parents=True, exist_ok=True)
        for old in (d / c).glob("*.jpg"):
            old.unlink()
    truth, rows = [], []
    srng = random.Random(f"{SEED}-{split}")
    for o in sorted(originals, key=lambda o: o.oid):
        # package variants always come with their copies; of the rest, dup_share get copies
        has_copies = bool(o.variants) or srng.random() < dup_share
        role = "with_copies" if has_copies else "distractor"
        rows.append({"original_id": o.oid, "split": split, "package": o.package, "path": o.path,
                     "role": role, "low_texture": o.low_texture, "width": o.image.size[0], "height": o.image.size[1]})
        items: list[tuple[str, str, bytes]] = [("orig", "", _encode(o.image, 92))]
        for kind, path, im in o.variants:
            items.append((kind, path, _encode(im, 92)))
        if has_copies:
            for kind in srng.sample(TRANSFORMS, srng.randint(k_min, k_max)):
                im, params = apply(kind, o.image, srng)
                items.append((kind, params, _encode(im, 25 if kind == "jpeg_q25" else 90)))
        seen: set[bytes] = set()
        for kind, params, data in items:
            if data in seen:  # e.g. resize_small of a small original equals resize_half
                continue
            seen.add(data)
            name = hashlib.sha1(f"{SEED}|{o.oid}|{kind}|{params}".encode()).hexdigest()[:12] + ".jpg"
            rel = f"{srng.choice(CLASSES)}/{name}"
            (d / rel).write_bytes(data)
            truth.append({"file": rel, "original_id": o.oid, "transform": kind, "params": params})
            counts[kind] = counts.get(kind, 0) + 1
    with open(d / "truth.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, ["file", "original_id", "transform", "params"])
        wr.writeheader()
        wr.writerows(truth)
    return rows


def build(out: Path, *, dup_share: float = 0.75, k_min: int = 3, k_max: int = 6) -> None:
    x = fetch_packages(out)
    originals = collect_originals(x)
    originals, dropped = drop_repeats(originals)
    rng = random.Random(SEED)
    order = sorted(originals, key=lambda o: o.oid)
    rng.shuffle(order)
    split_of = {o.oid: ("tune" if i % 2 == 0 else "heldout") for i, o in enumerate(order)}
    rows_orig = []
    counts: dict[str, dict[str, int]] = {"tune": {}, "heldout": {}}
    for split in ("tune", "heldout"):
        rows_orig += write_split(out / split, [o for o in originals if split_of[o.oid] == split], split,
                                 counts[split], dup_share=dup_share, k_min=k_min, k_max=k_max)
    with open(out / "originals.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, list(rows_orig[0]))
        wr.writeheader()
        wr.writerows(rows_orig)
    with open(out / "dropped_repeats.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["dropped", "same_picture_as"])
        wr.writerows(dropped)
    _write_readme(out, originals, dropped, counts, rows_orig)
    for split in ("tune", "heldout"):
        n = sum(counts[split].values())
        print(f"{split}: {n} files, " + ", ".join(f"{k} {v}" for k, v in sorted(counts[split].items())))
    print(f"{len(originals)} distinct originals ({len(dropped)} repeats dropped); written to {out}")


def _write_readme(out: Path, originals: list[Original], dropped: list, counts: dict, rows: list[dict]) -> None:
    by_pkg: dict[str, int] = {}
    for o in originals:
        by_pkg[o.package] = by_pkg.get(o.package, 0) + 1
    roles = {s: {r: sum(1 for x in rows if x["split"] == s and x["role"] == r) for r in ("with_copies", "distractor")} for s in ("tune", "heldout")}
    text = f"""# Real-photo dedup benchmark data (built by benchmarks/realphotos.py build; not committed)

Rebuild: `.venv/bin/python benchmarks/realphotos.py build` (deterministic, seed {SEED}; needs apt-get download).

## Layout
- `tune/`, `heldout/`: disjoint by ORIGINAL picture (every copy of a picture is in the same split).
  Tune thresholds on `tune` only; report `heldout`.
  - `<split>/<class>/<12 hex>.jpg`: class folders {", ".join(CLASSES)} (random per file, so some
    duplicate groups span classes, as the same picture found under two labels does). A folder
    source ingests `<split>/` directly.
  - `<split>/truth.csv`: `file` (relative to the split), `original_id`, `transform`, `params`.
    Files with the same `original_id` are duplicates of each other; all others are not.
- `originals.csv`: every original, its split, package, path in the package, role
  (`with_copies` or `distractor`: no copies, only there to be wrongly merged), `low_texture`.
- `dropped_repeats.csv`: pictures a package ships twice (GCompris reuses photos across
  activities), kept once (32x32 grey thumbnails correlating >= 0.8 and pHashes within 16 bits,
  also mirrored; pairs checked by eye as distinct are kept), and blank ones (transparent overlays).
- `debs/`, `x/`: the downloaded packages and their unpacked files.

## Originals ({len(originals)} distinct)
{chr(10).join(f"- {p}: {n}" for p, n in sorted(by_pkg.items()))}

Split roles: tune {roles['tune']}, heldout {roles['heldout']}.
Originals are downscaled to {MAX_SIDE} px long side and written as JPEG q92 (`orig`).
No large wallpaper was split into tiles.

## Transforms
Package-shipped copies (real): `pkg_resolution` (the same wallpaper at another resolution of the
same aspect, scaled by the factor its main file was; Plasma lists many resolutions but as symlinks
to one file, and its portrait files are other crops, left out, so only MATE's Elephants and sway's
Blue give these), `pkg_recolour` (the dark/light or colour variants of one design: Plasma
images_dark, GNOME -l/-d, Ubuntu-MATE colours, MyPaint paper tints), `pkg_logo` (desktop-base's
lines login screen with and without the logo).
Hard negatives kept on purpose: desktop-base's login-screen previews of different themes share the
same login widgets (clock, avatars, password box) on different backgrounds; GCompris has
photos of one set of toy blocks with different letters, planets on black, hands on white.
Synthetic, a random 3-6 per original with copies (JPEG q90 unless said):
`resize_half`, `resize_small` (long side 192/256/320), `jpeg_q25`, `crop5_side`/`crop10_side` (5%/10%
of the width or height from one random side), `crop5_all`/`crop10_all` (5%/10% from every side),
`bright_1.3`, `grey`, `text` (a caption, 1/8-1/14 of the height), `hflip`, `rotate` (2-5 degrees,
black corners, same size), `pad` (letterbox to 16:9, square, or a 15% margin, black or white),
`hue` (hue shift 60-180 degrees), `border` (screenshot: window frame with a title bar, sometimes a
desktop margin).

Files per transform: tune {dict(sorted(counts['tune'].items()))}; heldout {dict(sorted(counts['heldout'].items()))}.

## Licences (from each package's debian/copyright)
- gcompris-qt-data: per file (public domain, CC-BY-2.0/3.0, CC-BY-SA-2.0/3.0/4.0, GPL-3/GPL-3+);
  originals.csv gives each photo's path inside its .rcc, which debian/copyright names.
- plasma-workspace-wallpapers: GPL-2+ (KDE); mate-backgrounds: GPL-2+ (per-file authors);
  gnome-backgrounds: GPL-2+; ukui-wallpapers: CC-BY-SA-3.0; lomiri-wallpapers*: CC-BY-SA-3.0/4.0
  or CC-BY-4.0 per file; sway-backgrounds: Expat; mypaint-data-extras: GPL-2+; desktop-base: GPL-2 or GPL-2+ per theme.
  Full texts: x/<package>/usr/share/doc/<package>/copyright.
"""
    (out / "README.md").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download the packages and write the two splits")
    b.add_argument("--out", type=Path, default=DEFAULT_OUT)
    b.add_argument("--fresh", action="store_true", help="write only the fresh held-out split (other packages)")
    b.add_argument("--fresh2", action="store_true", help="write only the third held-out split (yet other packages)")
    b.add_argument("--fresh3", action="store_true", help="write only the fourth held-out split (yet other packages)")
    b.add_argument("--tune-small", type=int, metavar="SIDE", help="write only tune<SIDE>: the tune originals at SIDE px")
    f = sub.add_parser("fixtures", help="write the committed test fixtures (tune split) from a build")
    f.add_argument("--out", type=Path, default=DEFAULT_OUT)
    e = sub.add_parser("eval", help="our dedup stage vs imagededup on one split")
    e.add_argument("--out", type=Path, default=DEFAULT_OUT)
    e.add_argument("--split", required=True, help="tune, heldout, fresh, fresh2, fresh3 or tune<SIDE>")
    e.add_argument("--no-peer", action="store_true", help="skip imagededup")
    e.add_argument("--cnn", action="store_true", help="also try imagededup's CNN (needs its weights)")
    e.add_argument("--examples", type=int, default=10, help="false pairs to print")
    e.add_argument("--json", type=Path, help="also write the figures here")
    e.add_argument("--code", type=Path, help="import curation from this tree instead (e.g. an export of HEAD, for a baseline)")
    lp = sub.add_parser("login-probe", help="login screens over smooth backgrounds (tune side): what verification accepts")
    lp.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args()
    if a.cmd == "login-probe":
        for k, v in login_probe(a.out).items():
            print(f"{k:32s} {v}")
        return
    if a.cmd == "build":
        if a.tune_small:
            build_tune_small(a.out, a.tune_small)
        elif a.fresh2 or a.fresh3:
            build_held_out(a.out, "fresh3" if a.fresh3 else "fresh2")
        elif a.fresh:
            build_fresh(a.out)
        else:
            build(a.out)
        return
    if a.cmd == "fixtures":
        write_fixtures(a.out)
        return
    if not (a.out / a.split / "truth.csv").exists():
        sys.exit(f"error: no {a.out / a.split / 'truth.csv'}; run `benchmarks/realphotos.py build` first")
    if a.code:
        sys.path.insert(0, str(a.code.resolve()))
    evaluate(a.out, a.split, peer=not a.no_peer, cnn=a.cnn, examples=a.examples, json_out=a.json)


# ---------------------------------------------------------------- login-screen probe

# Login backgrounds of Debian themes whose login previews are NOT in the benchmark (the held-out
# split holds joy-inksplat's, lines', softwaves' and spacefun's), rendered from their SVGs, and two
# SDDM themes' backgrounds: smooth vignettes and gradients, where a login screen is most of the
# contrast.
PROBE_THEMES = ["emerald", "futureprototype", "homeworld", "moonlight"]
PROBE_PACKAGES = ["sddm-theme-maui", "sddm-theme-elarun", "librsvg2-bin", "librsvg2-2"]
PROBE_SDDM = {"sddm/maui": "sddm-theme-maui/usr/share/sddm/themes/maui/background.png",
              "sddm/elarun": "sddm-theme-elarun/usr/share/sddm/themes/elarun/images/background.png"}
PROBE_SAME = {frozenset({"sddm/elarun", "plasma/Elarun"})}  # the same picture, not a negative


def _render_svg(x: Path, svg: Path, out: Path, size: tuple[int, int]) -> Image.Image:
    lib = x / "librsvg2-2/usr/lib/x86_64-linux-gnu"
    subprocess.run([str(x / "librsvg2-bin/usr/bin/rsvg-convert"), "-w", str(size[0]), "-h", str(size[1]), str(svg), "-o", str(out)],
                   check=True, env={"LD_LIBRARY_PATH": str(lib)})
    return Image.open(out).convert("RGB")


def login_probe(out: Path) -> dict:
    """Login screens (`login_overlay`) over the probe backgrounds and the tune split's wallpapers
    and papers, each also cropped 5% on every side and greyed: every pair is verified by the stage's
    `Verifier`, as is, and with the cell check off (the whole-overlap correlation alone). Pairs of
    different backgrounds are the negatives, the three versions of one background the copies."""
    from curation import dedup

    x = fetch_packages(out, PACKAGES + PROBE_PACKAGES)
    work = out / "login_probe"
    work.mkdir(exist_ok=True)
    size = (900, 506)  # desktop-base's sddm-preview size
    bgs = [(f"desktop-base/{t}", _render_svg(x, x / f"desktop-base/usr/share/desktop-base/{t}-theme/login/background.svg",
                                             work / f"bg-{t}.png", size)) for t in PROBE_THEMES]
    bgs += [(name, _load(x / rel)) for name, rel in PROBE_SDDM.items()]
    truth = read_truth(out / "tune")
    files = {p.name: p for p in (out / "tune").glob("*/*.jpg")}
    bgs += [(oid, Image.open(files[f]).convert("RGB")) for f, (oid, kind) in sorted(truth.items(), key=lambda t: t[1])
            if kind == "orig" and not oid.startswith("gcompris")]
    paths, owner = [], []
    for k, (name, im) in enumerate(bgs):
        screen = login_overlay(im.resize(size))
        for kind in ("orig", "crop5_all", "grey"):
            c = screen if kind == "orig" else apply(kind, screen, random.Random(f"{SEED}-{name}-{kind}"))[0]
            p = work / f"{k:03d}_{kind}.jpg"
            p.write_bytes(_encode(c, 90))
            paths.append(p)
            owner.append(name)
    whole = dedup.Verifier(paths, 20, record=True, min_cells=0.0, doubt_cells=0.0)
    pairs = np.array(list(itertools.combinations(range(len(paths)), 2)))
    whole.verify(pairs, np.zeros(len(pairs), bool))
    stage = dedup.Verifier(paths, 20)
    kinds = {"negative": 0, "copy": 0}
    res = {f"{tool} accepts {kind}": 0 for tool in ("whole-overlap", "stage") for kind in kinds}
    for (i, j) in pairs:
        if frozenset({owner[i], owner[j]}) in PROBE_SAME:
            continue
        kind = "copy" if owner[i] == owner[j] else "negative"
        kinds[kind] += 1
        m = whole.matches[(int(i), int(j), False)]
        res[f"whole-overlap accepts {kind}"] += whole.accept(m)
        res[f"stage accepts {kind}"] += stage.accept(m)
    res.update({f"{k} pairs": v for k, v in kinds.items()}, backgrounds=len(bgs))
    return res


# ---------------------------------------------------------------- committed test fixtures

FIXTURES = ROOT / "tests/assets/dedup/photos"
# Photographs from the TUNE split only (held-out pictures never reach the tests), each planted
# with every transform by the test; and distinct low-texture or look-alike pictures that must
# stay apart (gradients, paper scans, two photos of pliers).
FIXTURE_PHOTOS = [
    "gcompris/categorization/002", "gcompris/categorization/010", "gcompris/categorization/076",
    "gcompris/erase/005", "gcompris/explore_monuments/001", "gcompris/explore_monuments/013",
    "gcompris/explore_world_animals/002", "gcompris/explore_world_animals/005",
    "gcompris/explore_farm_animals/003", "gcompris/explore_world_music/002", "gcompris/leftright/000",
    "lomiri-wallpapers-16.04/Bridge_by_Sander_Klootwijk.jpg", "mate/nature/LadyBird.jpg", "plasma/Kite",
]
FIXTURE_LOOKALIKES = [
    "sway/Blue", "ukui-wallpapers/focal-ubuntukylin.png", "mate/desktop/Stripes.png",
    "mate/desktop/GreenTraditional.jpg", "mypaint/ramon/HR_PastelPaper 01.png", "mypaint/ramon/HR_PastelPaper 02.png",
    "mypaint/ramon/HR_Cork.png", "mypaint/mrmamurk/mamurk_b_1.png", "gcompris/categorization/034",
    "gcompris/categorization/053",
]
FIXTURE_SIDE = 480


def write_fixtures(out: Path) -> None:
    """Downscale the chosen originals (tune split) into tests/assets/dedup/photos/, JPEG q85."""
    split = {r["original_id"]: r for r in csv.DictReader(open(out / "originals.csv", newline=""))}
    truth = {oid: f for f, (oid, t) in read_truth(out / "tune").items() if t == "orig"}
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for old in FIXTURES.glob("*.jpg"):
        old.unlink()
    lines = []
    for kind, ids in (("photo", FIXTURE_PHOTOS), ("lookalike", FIXTURE_LOOKALIKES)):
        for oid in ids:
            r = split[oid]
            assert r["split"] == "tune", f"{oid} is not in the tune split"
            hits = list((out / "tune").glob(f"*/{truth[oid]}"))
            im = _load(hits[0], FIXTURE_SIDE)
            name = f"{kind}_" + "".join(ch if ch.isalnum() else "_" for ch in oid.split("/", 1)[1].rsplit(".", 1)[0]).strip("_").lower() + ".jpg"
            im.save(FIXTURES / name, "JPEG", quality=85)
            lines.append(f"| {name} | {r['package']} | {r['path']} | {_licence(r['package'], r['path'], out / 'x')} |")
    (FIXTURES / "README.md").write_text(FIXTURE_README.format(side=FIXTURE_SIDE, rows="\n".join(lines)))
    total = sum(p.stat().st_size for p in FIXTURES.glob("*.jpg"))
    print(f"{len(lines)} fixtures, {total / 1e6:.2f} MB, in {FIXTURES}")


def _licence(package: str, path: str, x: Path) -> str:
    """Licence of one file, as the package's debian/copyright states it (Debian 12 versions)."""
    if package == "gcompris-qt-data":
        stanzas = copyright_stanzas(x / package / f"usr/share/doc/{package}/copyright")
        return licence_of(stanzas, path.split(":", 1)[1].removeprefix("gcompris/"))
    return {
        "lomiri-wallpapers-16.04": "CC-BY-SA-4.0 (Sander Klootwijk, 2018)" if "Bridge" in path else "CC-BY-4.0 / CC-BY-SA-4.0",
        "mate-backgrounds": "GPL-2+",
        "plasma-workspace-wallpapers": "GPL-2+ (KDE)",
        "ukui-wallpapers": "CC-BY-SA-3.0 (Ubuntu Kylin community)",
        "sway-backgrounds": "Expat (Drew DeVault)",
        "mypaint-data-extras": "GPL-2+ (MyPaint Development Team)",
    }[package]


FIXTURE_README = """# Real photographs for tests/curation/test_dedup_photos.py

Downscaled to {side} px on the long side, JPEG q85, from Debian 12 (bookworm) packages, by
`benchmarks/realphotos.py fixtures` (after `build`). Only pictures of the benchmark's TUNE split
are here: the held-out split it reports stays unseen by tests and tuning.
`photo_*`: planted with every transform by the test. `lookalike_*`: distinct pictures that look
alike at thumbnail scale (gradients, paper scans, two photos of pliers): must never be grouped.

GCompris photos are stored inside Qt resource files (`rcc/<activity>.rcc:<path in the resource>`);
their licences are those /usr/share/doc/gcompris-qt-data/copyright gives that file (the package
ships WebP conversions of the upstream .jpg/.png it names).

| file | Debian package | path in the package | licence |
| --- | --- | --- | --- |
{rows}
"""


# ---------------------------------------------------------------- fresh held-out split

# A second held-out split, from packages nothing was tuned or probed on (chosen 2026-12-03, after the
# first held-out split had been looked at too often to stay unbiased): Stellarium's telescope photos
# of nebulae and galaxies (dark, mostly black skies), its photo panoramas and planet maps,
# scikit-image's sample photographs, Krita's scanned paper and canvas textures, digiKam's about
# photo, and Xfce, LXDE and GRUB backgrounds (low texture; LXDE's three colours of one design are
# real recolourings). Built and evaluated like the others; report it, never tune on it.
FRESH_PACKAGES = ["stellarium-data", "python3-skimage", "krita-data", "digikam-data", "xfdesktop4-data",
                  "lxde-common", "grub-theme-starfield"]
FRESH_NEBULAE = 60  # a seeded sample of Stellarium's ~550 nebula photos, so they do not dominate
FRESH_SKIMAGE = ["astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "hubble_deep_field",
                 "moon", "motorcycle_left", "page", "retina", "rocket", "ihc", "cell", "microaneurysms"]
FRESH_PLANETS = ["earthmap", "jupiter", "mars", "moon_4k", "venus", "mercury", "io", "europa", "ganymede", "callisto",
                 "saturn", "neptune", "uranus", "titan", "triton", "pluto", "milkyway", "sun", "charon", "ceres"]
FRESH_LOW = {"xfdesktop4-data": ["xfce-blue.jpg", "xfce-teal.jpg", "xfce-stripes.png", "xfce-verticals.png"],
             "grub-theme-starfield": ["starfield.png"]}


def _original(oid: str, package: str, root: Path, p: Path, im: Image.Image | None = None, *,
              low: bool = False, variants: list | None = None) -> list[Original]:
    """[the Original of file ``p``], or [] for icons, sprites and thumbnails (under 300 px)."""
    if im is None:
        with Image.open(p) as f:
            if min(f.size) < 300:
                return []
        im = _load(p)
    return [Original(oid, package, str(p.relative_to(root)), im, variants or [], low_texture=low)]


def collect_fresh(x: Path) -> list[Original]:
    out: list[Original] = []
    st = x / "stellarium-data/usr/share/stellarium"
    nebulae = sorted((st / "nebulae/default").glob("*.png"))
    for p in sorted(random.Random(f"{SEED}-fresh-nebulae").sample(nebulae, FRESH_NEBULAE)):
        out += _original(f"stellarium/nebula/{p.stem}", "stellarium-data", st, p)
    for name in FRESH_PLANETS:
        p = next(iter(sorted((st / "textures").glob(f"{name}.*"))), None)
        if p is not None:
            out += _original(f"stellarium/texture/{name}", "stellarium-data", st, p)
    for d in sorted((st / "landscapes").iterdir()):  # one photo panorama strip per landscape
        pics = sorted(d.glob("*.png"), key=lambda q: -_pixels(q))
        if pics:
            out += _original(f"stellarium/landscape/{d.name}", "stellarium-data", st, pics[0])
    sk = x / "python3-skimage/usr/lib/python3/dist-packages/skimage/data"
    for name in FRESH_SKIMAGE:
        p = next(iter(sorted(sk.glob(f"{name}.*"))), None)
        if p is not None:
            out += _original(f"skimage/{name}", "python3-skimage", sk, p)
    kr = x / "krita-data/usr/share/krita/patterns"
    for p in sorted(kr.glob("*.png")):
        out += _original(f"krita/{p.stem}", "krita-data", kr, p, low=True)
    dk = x / "digikam-data/usr/share/digikam"
    out += _original("digikam/body-background", "digikam-data", dk, dk / "about/images/body-background.jpg")
    lx = x / "lxde-common/usr/share/lxde/wallpapers"
    out += _original("lxde/lxde", "lxde-common", lx, lx / "lxde_blue.jpg", low=True,
                     variants=[("pkg_recolour", f"lxde_{c}.jpg", _load(lx / f"lxde_{c}.jpg")) for c in ("green", "red")])
    for pkg, names in FRESH_LOW.items():
        for p in sorted((x / pkg).rglob("*")):
            if p.name in names:
                out += _original(f"{pkg}/{p.name}", pkg, x / pkg, p, low=True)
    return out


def collect_fresh_tune(x: Path) -> list[Original]:
    """Pictures of the fresh split's kinds that are not in it, to tune on: another sample of
    Stellarium's nebulae and its 3D scenery's photo textures."""
    st = x / "stellarium-data/usr/share/stellarium"
    nebulae = sorted((st / "nebulae/default").glob("*.png"))
    held = set(random.Random(f"{SEED}-fresh-nebulae").sample(nebulae, FRESH_NEBULAE))
    rest = [p for p in nebulae if p not in held]
    pics = sorted(random.Random(f"{SEED}-fresh-tune").sample(rest, 2 * FRESH_NEBULAE))
    pics += sorted(p for p in (st / "scenery3d").rglob("*.*") if p.suffix.lower() in (".png", ".jpg"))
    return [o for p in pics for o in _original(f"stellarium/{p.parent.name}/{p.stem}", "stellarium-data", st, p,
                                                low="scenery3d" in str(p))]


def build_fresh(out: Path) -> None:
    """The ``fresh`` split: every original of FRESH_PACKAGES, written like the others; and
    ``fresh-tune``: more of its kinds of picture (none a repeat of a fresh one), to tune on."""
    x = fetch_packages(out, FRESH_PACKAGES)
    fresh = collect_fresh(x)
    kept, dropped = drop_repeats(fresh + collect_fresh_tune(x))  # fresh first: it keeps what it had
    fresh_ids = {o.oid for o in fresh}
    for split, originals in (("fresh", [o for o in kept if o.oid in fresh_ids]),
                             ("fresh-tune", [o for o in kept if o.oid not in fresh_ids])):
        _write_own_split(out, split, originals)
    with open(out / "fresh" / "dropped_repeats.csv", "w", newline="") as f:
        csv.writer(f).writerows([["dropped", "same_picture_as"], *dropped])
    print(f"{len(dropped)} repeats dropped")


# ---------------------------------------------------------------- held-out splits fresh2 and fresh3

# ``fresh2``: built once ``fresh`` had been looked at four times, from packages no other split
# uses: Enlightenment's photo backgrounds (forests, flowers, mountains, lanterns; JPEGs inside its
# .edj files, the largest of the sizes each ships), LXQt's wallpapers (photos and drawn designs),
# FVWM-Crystal's wallpapers, XPlanet's Earth and Sun maps, Kanagram's background, and Tux Paint's
# photo stamps (fruit, animals, tools, cut out; on white, as product photos are). Pictures that
# repeat one of any other split are dropped. Nothing is tuned on it; evaluate it once.
FRESH2_PACKAGES = ["enlightenment-data", "lxqt-themes", "fvwm-crystal", "xplanet-images", "kanagram",
                   "tuxpaint-stamps-default"]


def carve_jpegs(path: Path) -> list[Image.Image]:
    """The JPEG images stored whole inside a container file (an Enlightenment .edj)."""
    import io

    b, out, i = path.read_bytes(), [], 0
    while (i := b.find(b"\xff\xd8\xff", i)) >= 0:
        try:
            with Image.open(io.BytesIO(b[i:])) as im:
                im.draft("RGB", (MAX_SIDE, MAX_SIDE))
                out.append(_shrink(im))
        except (OSError, SyntaxError):  # a marker inside compressed data, not an image
            pass
        i += 3
    return out


def collect_fresh2(x: Path) -> list[Original]:
    out: list[Original] = []
    en = x / "enlightenment-data/usr/share/enlightenment/data/backgrounds"
    for p in sorted(en.glob("*.edj")):
        ims = carve_jpegs(p)  # one picture in several sizes: the largest (already shrunk to MAX_SIDE)
        if ims:
            out += _original(f"enlightenment/{p.stem}", "enlightenment-data", x / "enlightenment-data", p,
                             max(ims, key=lambda im: im.size[0] * im.size[1]))
    for pkg, d in (("lxqt-themes", "usr/share/lxqt/wallpapers"), ("fvwm-crystal", "usr/share/fvwm-crystal/fvwm/wallpapers"),
                   ("xplanet-images", "usr/share/xplanet/images"), ("kanagram", "usr/share/kanagram/ui/images")):
        for p in sorted((x / pkg / d).glob("*")):
            if p.suffix.lower() in (".jpg", ".png") and p.name != "chalkboard.png":  # chalkboard: a blank frame
                out += _original(f"{pkg}/{p.stem}", pkg, x / pkg, p)
    tp = x / "tuxpaint-stamps-default/usr/share/tuxpaint/stamps"
    for p in sorted(tp.rglob("*.png")):
        rel = p.relative_to(tp)
        if "cartoon" not in rel.parts and rel.parts[0] != "symbols":  # drawings, not photos
            out += _original(f"tuxpaint/{rel.with_suffix('')}", "tuxpaint-stamps-default", x / "tuxpaint-stamps-default", p)
    return out


# ``fresh3``: a fourth held-out split, built once ``fresh2`` had been looked at three times, from
# packages no other split uses: Tux Paint's photo templates (a corn maze, redwoods, sheep, cliffs),
# OpenCV's sample photos (fruit, a baboon, Messi, aerial and street scenes; one of each stereo pair,
# video pair or viewpoint pair, no calibration boards or synthetic drawings), Palapeli's puzzle
# photos, scikit-learn's two photos, the Maldives SDDM theme, Scribus's template photos and
# Terminology's backgrounds. Evaluate it once.
FRESH3_PACKAGES = ["tuxpaint-data", "opencv-doc", "palapeli-data", "python3-sklearn", "sddm-theme-maldives",
                   "scribus-template", "terminology-data"]
FRESH3_OPENCV = ["HappyFish", "aero1", "aloeL", "apple", "baboon", "basketball1", "board", "box", "building",
                 "butterfly", "ela_original", "fruits", "graf1", "home", "leuvenA", "left", "licenseplate_motion",
                 "messi5", "orange", "pca_test1", "rubberwhale1", "smarties", "squirrel_cls", "starry_night",
                 "stuff", "sudoku"]


def collect_fresh3(x: Path) -> list[Original]:
    out: list[Original] = []
    dirs = {"tuxpaint-data": "usr/share/tuxpaint/templates", "palapeli-data": "usr/share/palapeli/collection",
            "python3-sklearn": "usr/lib/python3/dist-packages/sklearn/datasets/images",
            "sddm-theme-maldives": "usr/share/sddm/themes/maldives", "scribus-template": "usr/share/scribus/templates",
            "terminology-data": "usr/share/terminology/backgrounds"}
    for pkg, d in dirs.items():
        for p in sorted((x / pkg / d).rglob("*")):
            if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                out += _original(f"{pkg}/{p.relative_to(x / pkg / d).with_suffix('')}", pkg, x / pkg, p)
    cv = x / "opencv-doc/usr/share/doc/opencv-doc/examples/data"
    for name in FRESH3_OPENCV:
        for p in sorted(cv.glob(f"{name}.*")):
            out += _original(f"opencv/{name}", "opencv-doc", x / "opencv-doc", p)
    return out


def split_originals(split_dir: Path) -> list[Original]:
    """A written split's originals, read back from its files (for the repeat check across splits)."""
    with open(split_dir / "truth.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["transform"] == "orig"]
    return [Original(r["original_id"], "", r["file"], _load(split_dir / r["file"]), []) for r in rows]


def build_held_out(out: Path, split: str) -> None:
    """Write ``split`` (fresh2 or fresh3) from its packages, dropping pictures that repeat one of any
    split written before it (or of itself)."""
    packages, collect, before = {
        "fresh2": (FRESH2_PACKAGES, collect_fresh2, ["tune", "heldout", "fresh", "fresh-tune"]),
        "fresh3": (FRESH3_PACKAGES, collect_fresh3, ["tune", "heldout", "fresh", "fresh-tune", "fresh2"]),
    }[split]
    missing = [b for b in before if not (out / b / "truth.csv").exists()]
    if missing:  # the repeat check needs them, or the split would depend on what was built first
        sys.exit(f"error: {split} is checked for repeats of {', '.join(before)}; build {', '.join(missing)} first "
                 "(`build`, then `build --fresh`" + (", then `build --fresh2`)" if split == "fresh3" else ")"))
    x = fetch_packages(out, packages)
    new = collect(x)
    old = [o for b in before for o in split_originals(out / b)]
    kept, dropped = drop_repeats(old + new)  # the other splits first: a repeat is dropped from this one
    ids = {o.oid for o in new}
    ours = [d for d in dropped if d[0] in ids]
    _write_own_split(out, split, [o for o in kept if o.oid in ids], f"{len(ours)} repeats dropped")
    with open(out / split / "dropped_repeats.csv", "w", newline="") as f:
        csv.writer(f).writerows([["dropped", "same_picture_as"], *ours])


def _write_own_split(out: Path, split: str, originals: list[Original], note: str = "") -> None:
    """A split with its own originals.csv (the first two share one), and a line on what it holds."""
    counts: dict[str, int] = {}
    rows = write_split(out / split, originals, split, counts)
    with open(out / split / "originals.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    by_pkg: dict[str, int] = {}
    for o in originals:
        by_pkg[o.package] = by_pkg.get(o.package, 0) + 1
    print(f"{split}: {sum(counts.values())} files from {len(originals)} originals {by_pkg}"
          + (f" ({note})" if note else "") + "; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def build_tune_small(out: Path, side: int = 512) -> None:
    """``tune<side>``: the tune split's originals shrunk to ``side`` px, with new synthetic copies
    (the fresh split's pictures are mostly 512 px; this is where small pictures are tuned)."""
    x = fetch_packages(out)
    kept = {r["original_id"] for r in csv.DictReader(open(out / "originals.csv", newline="")) if r["split"] == "tune"}
    originals = [Original(o.oid, o.package, o.path, _shrink(o.image, side), [], o.low_texture)
                 for o in collect_originals(x) if o.oid in kept]
    counts: dict[str, int] = {}
    write_split(out / f"tune{side}", originals, f"tune{side}", counts)
    print(f"tune{side}: {sum(counts.values())} files from {len(originals)} originals")


# ---------------------------------------------------------------- eval


def read_truth(split_dir: Path) -> dict[str, tuple[str, str]]:
    """file name -> (original_id, transform)."""
    with open(split_dir / "truth.csv", newline="") as f:
        return {Path(r["file"]).name: (r["original_id"], r["transform"]) for r in csv.DictReader(f)}


def pairs_of_groups(groups: dict[str, list[str]]) -> set[tuple[str, str]]:
    """All unordered pairs within each group, as (a, b) with a < b: how a user sees groups."""
    return {(a, b) for fs in groups.values() for a, b in itertools.combinations(sorted(fs), 2)}


def components_of(files: list[str], pairs: set[tuple[str, str]]) -> dict[str, list[str]]:
    parent = {f: f for f in files}

    def find(f: str) -> str:
        while parent[f] != f:
            parent[f] = parent[parent[f]]
            f = parent[f]
        return f

    for a, b in pairs:
        parent[find(a)] = find(b)
    out: dict[str, list[str]] = {}
    for f in files:
        out.setdefault(find(f), []).append(f)
    return out


@dataclass
class Scores:
    precision: float
    recall: float
    predicted: int
    true_pairs: int
    per_transform: dict[str, float]  # recall of (copy, its original's "orig" file) pairs
    false_pairs: list[tuple[str, str]]


def score(pred: set[tuple[str, str]], truth: dict[str, tuple[str, str]]) -> Scores:
    by: dict[str, list[str]] = {}
    for f, (oid, _) in truth.items():
        by.setdefault(oid, []).append(f)
    true = pairs_of_groups(by)
    pred = {p for p in pred if p[0] in truth and p[1] in truth}
    tp = len(pred & true)
    orig_file = {oid: f for f, (oid, t) in truth.items() if t == "orig"}
    per: dict[str, list[bool]] = {}
    for f, (oid, t) in truth.items():
        if t != "orig":
            per.setdefault(t, []).append(tuple(sorted((f, orig_file[oid]))) in pred)
    return Scores(
        precision=tp / len(pred) if pred else 1.0,
        recall=tp / len(true) if true else 1.0,
        predicted=len(pred),
        true_pairs=len(true),
        per_transform={t: sum(v) / len(v) for t, v in sorted(per.items())},
        false_pairs=sorted(pred - true),
    )


def run_ours(split_dir: Path, work: Path) -> tuple[dict[str, list[str]], dict]:
    """Our stage as a user runs it: a folder source over the split, ingest, then dedup.
    Returns dup_group -> file names, and timings/summary."""
    import time

    import polars as pl

    from curation import catalog, dedup, ingest
    from curation.catalog import Workspace
    from curation.config import parse_manifest

    m = parse_manifest({
        "name": "realphotos",
        "classes": [{"name": c} for c in CLASSES],
        "sources": [{"type": "folder", "path": str(split_dir), "license": "cc-by"}],
    })
    ws = Workspace(work / "ws").ensure()
    t0 = time.perf_counter()
    ingest.run(m, ws, show_progress=False)
    t1 = time.perf_counter()
    summary = dedup.run(m, ws, show_progress=False)
    t2 = time.perf_counter()
    df = catalog.read(ws)
    # the same bytes found twice are one catalog row: map every sighting's file to its image
    files = pl.concat([
        df.select("image_id", "source_url"),
        catalog.read_sightings(ws).select("image_id", "source_url"),
    ], how="vertical_relaxed").unique()
    files = files.with_columns(pl.col("source_url").str.split("/").list.last().alias("file"))
    # files stored as one image (same bytes) are one group too, as the user sees one image
    grp = files.join(df.select("image_id", "dup_group"), on="image_id").select(
        pl.coalesce("dup_group", "image_id").alias("g"), "file").unique()
    groups: dict[str, list[str]] = {}
    for g, f in grp.iter_rows():
        groups.setdefault(g, []).append(f)
    groups = {g: fs for g, fs in groups.items() if len(fs) > 1}
    info = {"ingest_s": round(t1 - t0, 2), "dedup_s": round(t2 - t1, 2), "images": df.height,
            "summary": {k: v for k, v in vars(summary).items() if isinstance(v, (int, float))}}
    return groups, info


def imagededup_phash():
    """imagededup's PHash class. imagededup 0.3.3 builds its CNN (downloading MobileNet weights)
    when ``imagededup.methods`` is imported; offline that fails, so the hashing module is then
    loaded on its own, the same code."""
    try:
        from imagededup.methods import PHash
    except Exception:  # noqa: BLE001 - urllib's URLError, or torch's hub error
        import types

        import imagededup

        for name in [m for m in sys.modules if m.startswith("imagededup.methods")]:
            del sys.modules[name]
        pkg = types.ModuleType("imagededup.methods")
        pkg.__path__ = [str(Path(imagededup.__file__).parent / "methods")]
        sys.modules["imagededup.methods"] = pkg
        from imagededup.methods.hashing import PHash
    return PHash


def run_imagededup(split_dir: Path, method: str = "phash") -> tuple[set[tuple[str, str]], set[tuple[str, str]], float]:
    """imagededup on the same files, its batched API at its best configuration:
    (pairs of connected components, its raw pair list, seconds)."""
    import logging
    import time

    import warnings

    warnings.filterwarnings("ignore", module="imagededup")

    def quiet() -> None:  # its loggers print every step, and warn that truth.csv is no image
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("imagededup"):
                logging.getLogger(name).setLevel(logging.ERROR)

    quiet()
    t0 = time.perf_counter()
    if method == "phash":
        tool = imagededup_phash()(verbose=False)
        quiet()
        enc = tool.encode_images(image_dir=str(split_dir), recursive=True)
        dup = tool.find_duplicates(encoding_map=enc, max_distance_threshold=10)
    else:
        from imagededup.methods import CNN

        tool = CNN(verbose=False)
        quiet()
        enc = tool.encode_images(image_dir=str(split_dir), recursive=True)
        dup = tool.find_duplicates(encoding_map=enc, min_similarity_threshold=0.9)
    el = time.perf_counter() - t0
    raw = {tuple(sorted((Path(a).name, Path(b).name))) for a, bs in dup.items() for b in bs}
    files = sorted({Path(k).name for k in dup})
    comp = pairs_of_groups({k: v for k, v in components_of(files, raw).items() if len(v) > 1})
    return comp, raw, el


def evaluate(out: Path, split: str, *, peer: bool = True, cnn: bool = False, examples: int = 10,
             json_out: Path | None = None) -> dict:
    import json
    import tempfile

    split_dir = out / split
    truth = read_truth(split_dir)
    n_orig = len({o for o, _ in truth.values()})
    with tempfile.TemporaryDirectory() as tmp:
        groups, info = run_ours(split_dir, Path(tmp))
    results: dict[str, Scores] = {"jurassiclass (dup_group)": score(pairs_of_groups(groups), truth)}
    timings = {"jurassiclass ingest_s": info["ingest_s"], "jurassiclass dedup_s": info["dedup_s"]}
    notes = []
    if peer:
        comp, raw, el = run_imagededup(split_dir)
        results["imagededup PHash t=10 (components)"] = score(comp, truth)
        results["imagededup PHash t=10 (raw pairs)"] = score(raw, truth)
        timings["imagededup PHash s"] = round(el, 2)
        if cnn:
            try:
                comp, raw, el = run_imagededup(split_dir, "cnn")
                results["imagededup CNN 0.9 (components)"] = score(comp, truth)
                results["imagededup CNN 0.9 (raw pairs)"] = score(raw, truth)
                timings["imagededup CNN s"] = round(el, 2)
            except Exception as exc:  # noqa: BLE001 - offline: its weights cannot be downloaded
                notes.append(f"imagededup CNN did not run: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    print(f"split {split}: {len(truth)} files, {n_orig} originals, {info['images']} catalog rows; "
          f"timings {timings}")
    names = list(results)
    print(f"{'':44s} {'precision':>9s} {'recall':>7s} {'pred':>6s} {'true':>6s}")
    for k in names:
        r = results[k]
        print(f"{k:44s} {r.precision:9.4f} {r.recall:7.4f} {r.predicted:6d} {r.true_pairs:6d}")
    transforms = sorted({t for r in results.values() for t in r.per_transform})
    counts = {t: sum(1 for _, tt in truth.values() if tt == t) for t in transforms}
    print("recall of (copy, original) pairs per transform: " + " / ".join(names))
    for t in transforms:
        print(f"  {t:16s} n={counts[t]:3d}  " + "  ".join(f"{results[k].per_transform.get(t, float('nan')):.3f}" for k in names))
    for k in names[:2]:
        fp = results[k].false_pairs
        if fp:
            print(f"false pairs, {k}: {len(fp)}; examples (file: original_id/transform):")
            for a, b in fp[:examples]:
                print(f"  {a} {truth[a][0]}/{truth[a][1]}  ~  {b} {truth[b][0]}/{truth[b][1]}")
    for n in notes:
        print(n)
    doc = {"split": split, "files": len(truth), "originals": n_orig, "timings": timings, "ours": info["summary"],
           "results": {k: {"precision": r.precision, "recall": r.recall, "predicted": r.predicted,
                           "true_pairs": r.true_pairs, "per_transform": r.per_transform,
                           "false_pairs": [[a, truth[a][0], truth[a][1], b, truth[b][0], truth[b][1]] for a, b in r.false_pairs]}
                       for k, r in results.items()},
           "transform_counts": counts, "notes": notes}
    if json_out:
        json_out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":
    main()
