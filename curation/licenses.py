"""Free-text licences (API fields, URLs, Flickr ids) in, one short code and a redistributable flag out.

Codes: cc0, pd, cc-by, cc-by-sa, cc-by-nd, cc-by-nc, cc-by-nc-sa, cc-by-nc-nd, gfdl,
all-rights-reserved, unknown. Every Creative Commons licence, CC0, public domain and the GFDL
allow sharing copies (with attribution and their other terms); "unknown" and
"all-rights-reserved" do not, so a published dataset leaves them out by default.
"""

from __future__ import annotations

import re

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
