"""Test-wide guards: offline model hubs, and no socket may leave the loopback interface."""

from __future__ import annotations

import os

# Read at import time by huggingface_hub/open_clip/timm/datasets/fiftyone: set before anything imports them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import ipaddress
import socket

import pytest

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


class NetworkBlocked(RuntimeError):
    """A test tried to reach a non-loopback address."""


def _check(address) -> None:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return
    host = address[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        # A hostname: only names that are loopback by definition are allowed.
        if host in ("localhost",):
            return
        raise NetworkBlocked(f"tests may not connect to {host!r} (non-loopback)") from None
    if not ip.is_loopback and not ip.is_unspecified:
        raise NetworkBlocked(f"tests may not connect to {host} (non-loopback)")


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check(address)
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]


@pytest.fixture
def workspace(tmp_path):
    from curation.catalog import Workspace

    return Workspace(tmp_path / "ws").ensure()
