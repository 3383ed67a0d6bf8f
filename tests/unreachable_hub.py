"""Load weights with HF_HUB_OFFLINE unset and the hub unreachable (a closed loopback port), in a fresh
process: huggingface_hub reads its settings at import, so the test process's offline mode would hide
the retries. Prints one JSON line: a list of {"seconds", "error", "message"}, one per load.

    python -m tests.unreachable_hub clip|timm HF_HOME
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def load_in_fresh_process(what: str, hf_home: Path) -> list[dict]:
    """Run main() in a subprocess (the caller is a test); returns its results."""
    out = subprocess.run([sys.executable, "-m", "tests.unreachable_hub", what, str(hf_home)],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def closed_port() -> socket.socket:
    """A bound, never listening socket: connections to its port are refused, and nobody else takes it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def main(what: str, hf_home: str) -> None:
    import tests.conftest  # noqa: F401 - its loopback-only socket guard, here too

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.pop(var, None)
    port = closed_port()
    os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{port.getsockname()[1]}"
    os.environ["HF_HOME"] = hf_home
    os.environ.pop("HF_HUB_CACHE", None)
    from curation.config import ClipSettings, ModelSpec

    if what == "clip":
        import open_clip  # noqa: F401 - imports are not what is timed
        from curation.clip_score import load_model

        loads = [lambda: load_model(ClipSettings(model="ViT-B-32", pretrained="laion2b_s34b_b79k", device="cpu"))]
    else:  # timm: one architecture the test put in the cache, one it did not
        import timm  # noqa: F401
        from models.factory import create

        loads = [lambda arch=arch: create(ModelSpec(name="m", arch=arch, pretrained=True), 3)
                 for arch in ("test_resnet", "test_efficientnet")]
    results = []
    for load in loads:
        t0 = time.perf_counter()
        out = {"error": None, "message": None}
        try:
            load()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out = {"error": type(exc).__name__, "message": str(exc)}
        out["seconds"] = time.perf_counter() - t0
        results.append(out)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
