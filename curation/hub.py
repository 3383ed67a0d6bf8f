"""Model weights from the Hugging Face hub: one quick reachability probe instead of a minute of retries.

huggingface_hub retries a refused or timed-out connection five times with backoff (about 50 s of
warnings) before it even looks in the local cache. Weight loaders (open_clip, timm) probe the hub
once first; when it cannot be reached they load in offline mode, so cached weights still load at
once and missing ones fail at once with one sentence.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

PROBE_TIMEOUT_S = 3.0


def endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_mode() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it (at import time)."""
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached (one clause), or None when it answers (any HTTP status) or
    when offline mode is on anyway. One request, no retries, through huggingface_hub's own client
    so its proxy and TLS settings apply."""
    if offline_mode():
        return None
    from huggingface_hub.utils import get_session

    url = endpoint()
    try:
        get_session().head(url, timeout=timeout, follow_redirects=False)
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, timeout, TLS: all mean unreachable
        detail = str(exc).strip().splitlines()
        return f"the Hugging Face hub at {url} cannot be reached ({type(exc).__name__}: {detail[0] if detail else 'no answer'})"
    return None


@contextmanager
def offline() -> Iterator[None]:
    """huggingface_hub in offline mode for the duration: cache only, no request, no retry.

    The switch is process-wide: other threads' hub calls fail meanwhile too, which is only used
    while the hub is unreachable anyway."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextmanager
def fail_fast() -> Iterator[str | None]:
    """Probe the hub once; if it cannot be reached, run the block offline (cache only).

    Yields the reason it is unreachable (for the caller's error message) or None.
    """
    why = unreachable()
    if why is None:
        yield None
        return
    with offline():
        yield why
