"""Free-text licences (API fields, URLs, Flickr ids) in, one short code and its terms out.

Codes: cc0, pd, cc-by, cc-by-sa, cc-by-nd, cc-by-nc, cc-by-nc-sa, cc-by-nc-nd, gfdl,
all-rights-reserved, unknown. Every Creative Commons licence, CC0, public domain and the GFDL
allow sharing verbatim copies (``redistributable``); what a publisher must also know is in
``terms(code)``: commercial use, derivatives (a re-encoded image is one), share-alike and
attribution. "unknown" and "all-rights-reserved" allow nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REDISTRIBUTABLE = frozenset(
    {"cc0", "pd", "cc-by", "cc-by-sa", "cc-by-nd", "cc-by-nc", "cc-by-nc-sa", "cc-by-nc-nd", "gfdl"}
)
CODES = REDISTRIBUTABLE | {"all-rights-reserved", "unknown"}

# Flickr's numeric licence ids (flickr.photos.licenses.getInfo).
FLICKR = {
    "0": "all-rights-reserved", "1": "cc-by-nc-sa", "2": "cc-by-nc", "3": "cc-by-nc-nd", "4": "cc-by",
    "5": "cc-by-sa", "6": "cc-by-nd", "7": "pd", "8": "pd", "9": "cc0", "10": "pd",
}


def normalise_license(text: str | None) -> str:
    """A licence code for a name ("CC BY-SA 4.0"), a code ("cc-by-nc"), or a URL (creativecommons.org/...)."""
    if text is None:
        return "unknown"
    t = str(text).strip().lower()
    if not t:
        return "unknown"
    if t in CODES:
        return t
    # GBIF's enum spelling (CC_BY_4_0, CC0_1_0) and URL paths (/licenses/by-sa/4.0/) to words.
    t = re.sub(r"[_/]+", " ", t)
    if "publicdomain zero" in t or re.search(r"\bcc ?0\b", t) or "cc-zero" in t:
        return "cc0"
    if "public domain" in t or "publicdomain" in t or re.search(r"\bpd\b", t) or "no known copyright" in t:
        return "pd"
    if "gfdl" in t or "gnu free documentation" in t:
        return "gfdl"
    if "copyrighted free use" in t:  # a Commons tag: the holder allows any use
        return "pd"
    for long, short in (("non-commercial", "nc"), ("noncommercial", "nc"), ("share-alike", "sa"), ("sharealike", "sa"),
                        ("noderivatives", "nd"), ("noderivs", "nd"), ("no-derivatives", "nd"), ("attribution", "by")):
        t = t.replace(long, short)
    words = set(re.findall(r"[a-z0-9]+", t))
    if "creativecommons" in t or "creative commons" in t or "cc" in words or ("by" in words and "license" in words):
        if "by" not in words:
            return "unknown"
        code = "cc-by"
        if "nc" in words:
            code += "-nc"
        if "sa" in words:
            code += "-sa"
        elif "nd" in words:
            code += "-nd"
        return code
    if "all rights reserved" in t or "copyright" in t or t.startswith(("©", "(c)")):
        return "all-rights-reserved"
    return "unknown"


def redistributable(code: str | None) -> bool:
    return code in REDISTRIBUTABLE


@dataclass(frozen=True)
class Terms:
    """What a licence allows a dataset publisher to do with one image."""

    redistribute: bool  # share verbatim copies
    commercial_use: bool
    derivatives: bool  # adapt it; re-encoding the bytes is an adaptation
    share_alike: bool  # adaptations must carry the same licence
    attribution_required: bool


_NONE = Terms(False, False, False, False, False)


def terms(code: str | None) -> Terms:
    """The terms of a licence code (see ``normalise_license``); unknown codes allow nothing."""
    if code in ("cc0", "pd"):
        return Terms(True, True, True, False, False)
    if code == "gfdl":  # copyleft, attribution through the history/authors section
        return Terms(True, True, True, True, True)
    if code and code.startswith("cc-by"):
        parts = set(code.split("-")[2:])
        return Terms(True, "nc" not in parts, "nd" not in parts, "sa" in parts, True)
    return _NONE


def openness(code: str | None) -> int:
    """A rank for choosing between copies of one image: higher is freer to publish (0: not at all)."""
    t = terms(code)
    if not t.redistribute:
        return 0
    return 1 + 4 * t.commercial_use + 2 * t.derivatives + (not t.attribution_required) + (not t.share_alike)


def publish_refusal(code: str | None, *, allowed: set[str] | frozenset[str], non_commercial: bool, re_encoded: bool) -> str | None:
    """Why an image under licence ``code`` may not go into a published dataset, or None if it may.

    ``allowed``: the manifest's licence allow-list. ``non_commercial``: the dataset itself is
    declared non-commercial (then NC licences are acceptable). ``re_encoded``: the stored bytes
    are not the bytes as received (an adaptation, forbidden by ND licences)."""
    t = terms(code)
    if not t.redistribute:
        return f"license_not_redistributable:{code or 'unknown'}"
    if not t.commercial_use and not non_commercial:
        return f"license_non_commercial:{code}"
    if not t.derivatives and re_encoded:
        return f"license_no_derivatives_re_encoded:{code}"
    if code not in allowed:
        return f"license_not_allowed:{code}"
    return None
