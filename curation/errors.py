"""The base class of every error a user can cause or fix (bad manifest, missing file, unreachable service).

Raised anywhere in `curation/` and `models/`; the CLI turns each into one line `error: <message>` and
exit code 2, so the message must say what is wrong and what to do, without a traceback.
"""

from __future__ import annotations


class JurassiclassError(Exception):
    """An expected failure with a user-facing message; anything else is a bug."""
