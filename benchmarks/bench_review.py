"""Review push/pull at real sizes, side by side with FiftyOne's batched public API and the private path.

Run: .venv/bin/python benchmarks/bench_review.py [--images 10000 50000]
For each size: `review.push` of new images (its kept private insert) vs `Dataset.add_samples` of the
same samples (FiftyOne's batched public API); a re-push with every score changed (public
`set_values` per field) vs the private per-sample `bulk_write` it replaced; pull; and the
calibration sweep, O(n log n), vs the O(n^2) loop it replaced. Starts its own mongod on a free
loopback port in a temp dir; push never opens the images, so paths need not exist.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mongod(tmp: Path) -> tuple[subprocess.Popen, str]:
    binary = Path(importlib.util.find_spec("fiftyone").submodule_search_locations[0]) / "db" / "bin" / "mongod"
    port = free_port()
    proc = subprocess.Popen([str(binary), "--dbpath", str(tmp), "--port", str(port), "--bind_ip", "127.0.0.1",
                             "--nounixsocket"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"mongodb://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("mongod did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, nargs="+", default=[10_000, 50_000])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "db").mkdir()
        proc, uri = start_mongod(tmp / "db")
        os.environ.update(FIFTYONE_DATABASE_URI=uri, FIFTYONE_DATABASE_VALIDATION="false", FIFTYONE_DO_NOT_TRACK="true")
        try:
            rows = [run(tmp, n) for n in args.images]
            print("\n| images | push, all new | insert: add_samples (public) | insert: private (kept) | ratio "
                  "| set n values: set_values (public, used) | bulk_write (private, dropped) | ratio | pull "
                  "| calibration sweep (new) | O(n^2) loop (old) | ratio |")
            print("|---" * 12 + "|")
            for r in rows:
                print(f"| {r['n']:,} | {r['push']:.2f} s | {r['add_samples']:.2f} s | {r['insert']:.2f} s "
                      f"| {r['add_samples'] / r['insert']:.1f}x "
                      f"| {r['repush']:.2f} s | {r['bulk_write']:.2f} s | {r['repush'] / r['bulk_write']:.2f}x "
                      f"| {r['pull']:.2f} s | {r['sweep']:.3f} s | {r['quadratic']:.2f} s ({r['quad_n']:,} reviewed) "
                      f"| {r['quadratic'] / r['sweep']:.0f}x |")
        finally:
            proc.terminate()
            proc.wait(30)


def _quadratic_best_threshold(scores: list[float], truth: list[bool]) -> tuple[float | None, float | None]:
    """The calibration sweep as it was before: every distinct score re-scans every image."""
    from curation.review import _prf

    best_t, best = None, -1.0
    for t in sorted(set(scores)):
        f1 = _prf([s >= t for s in scores], truth)["f1"] or 0.0
        if f1 >= best:
            best_t, best = t, f1
    return best_t, best


def run(tmp: Path, n: int) -> dict:
    import numpy as np
    import polars as pl

    from curation import catalog, fiftyone_bulk, review
    from curation.catalog import Workspace
    from curation.config import parse_manifest

    print(f"\n== {n:,} images")
    classes = [f"class{i}" for i in range(8)]
    name = f"bench{n}"
    m = parse_manifest({"name": name, "classes": [{"name": c} for c in classes]})
    ws = Workspace(tmp / f"ws{n}").ensure()
    rows = [{
        "image_id": f"{i:064x}", "label": classes[i % 8], "path": f"store/{i % 256:02x}/{i:064x}.jpg",
        "width": 640, "height": 480, "source": "bing", "license": "cc-by", "status": "candidate",
        "retrieved_at": catalog.utcnow(), "clip_margin": (i % 100) / 100 - 0.3, "clip_score": 0.25,
        "clip_top_label": classes[(i + (i % 13 == 0)) % 8], "clip_top_prob": 0.7, "clip_decision": "kept",
        "dup_group": f"{(i // 4) * 4:064x}" if i % 50 < 4 else None, "label_conflict": False,
    } for i in range(n)]
    catalog.write(ws, catalog.rows_frame(rows, {**catalog.SCHEMA, **review.UPSTREAM_COLUMNS}))
    out: dict = {"n": n}

    t = time.perf_counter()
    import fiftyone as fo
    print(f"import fiftyone: {time.perf_counter() - t:.2f} s")

    s = review.push(m, ws, show_progress=False)
    out["push"] = s.seconds
    print(f"push, {n} new images (insert + indexes + {len(s.views)} saved views): {s.seconds:.2f} s")

    # The insert alone, both ways, into fresh datasets with push's schema: FiftyOne's batched public
    # API vs the kept private path (curation/fiftyone_bulk.py), for the same samples and fields.
    ds = fo.load_dataset(name)
    skip = ("id", "filepath", "tags", "metadata", "created_at", "last_modified_at", "ground_truth")
    keep = [f for f in ds.get_field_schema() if f not in skip]
    plain = [dict(zip(["filepath", "tags", "ground_truth.label", *keep], vals))
             for vals in zip(*ds.values(["filepath", "tags", "ground_truth.label", *keep]))]
    schema = {f: type(ds.get_field(f))() for f in keep}
    both = {}
    for way in ("public", "private"):
        peer = fo.Dataset(f"{name}-{way}")
        fiftyone_bulk.declare_fields(peer, schema)
        peer.add_sample_field("ground_truth", fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)
        t = time.perf_counter()
        if way == "public":
            samples = [fo.Sample(filepath=d["filepath"], tags=d["tags"],
                                 ground_truth=fo.Classification(label=d["ground_truth.label"]),
                                 **{f: d[f] for f in keep if d[f] is not None}) for d in plain]
            peer.add_samples(samples, progress=False)
        else:
            docs = [fiftyone_bulk.sample_doc(peer, filepath=d["filepath"], tags=d["tags"], ground_truth=d["ground_truth.label"],
                                             fields={f: d[f] for f in keep}) for d in plain]
            for k in range(0, len(docs), 2000):  # push's batch size
                fiftyone_bulk.insert(peer, docs[k:k + 2000])
        both[way] = time.perf_counter() - t
        assert len(peer) == n
        samples = docs = None
        gc.collect()
        fo.delete_dataset(f"{name}-{way}")
    out["add_samples"], out["insert"] = both["public"], both["private"]
    # Declaring push's fields on a new dataset: add_sample_field one by one vs the kept one-merge path.
    decl = {}
    for way in ("public", "private"):
        peer = fo.Dataset(f"{name}-decl-{way}")
        t = time.perf_counter()
        if way == "public":
            for f, kind in schema.items():
                peer.add_sample_field(f, type(kind))
        else:
            fiftyone_bulk.declare_fields(peer, {f: type(kind)() for f, kind in schema.items()})
        decl[way] = time.perf_counter() - t
        fo.delete_dataset(f"{name}-decl-{way}")
    print(f"declare {len(schema)} fields: add_sample_field {decl['public']:.2f} s vs one merge {decl['private']:.2f} s "
          f"({decl['public'] / decl['private']:.0f}x)")
    print(f"insert {n} samples: add_samples (public, batched) {both['public']:.2f} s vs private insert "
          f"{both['private']:.2f} s ({both['public'] / both['private']:.1f}x)")

    s2 = review.push(m, ws, show_progress=False)
    print(f"re-push, nothing changed: {s2.seconds:.2f} s ({s2.unchanged} unchanged)")
    catalog.write(ws, catalog.read(ws).with_columns((pl.col("clip_margin") + 0.01).alias("clip_margin")))
    s3 = review.push(m, ws, show_progress=False)
    print(f"re-push, every CLIP margin changed (public set_values): {s3.seconds:.2f} s ({s3.updated} updated)")

    # The private path it replaced: one UpdateOne per sample in one bulk_write (same values, +0.01 again).
    from pymongo import UpdateOne

    # Both start from the values in hand (read before the clock starts), as push has them.
    ds.reload()
    oids, image_ids, margins = ds.values(["_id", "image_id", "clip_margin"])
    now = catalog.utcnow().replace(tzinfo=None)
    t = time.perf_counter()
    ops = [UpdateOne({"_id": i}, {"$set": {"clip_margin": v + 0.01, "last_modified_at": now}}) for i, v in zip(oids, margins)]
    ds._sample_collection.bulk_write(ops, ordered=False)
    ds.reload()
    t_private = time.perf_counter() - t
    values = {k: v + 0.02 for k, v in zip(image_ids, margins)}
    t = time.perf_counter()
    ds.set_values("clip_margin", values, key_field="image_id")
    t_public = time.perf_counter() - t
    out["repush"], out["bulk_write"] = t_public, t_private
    print(f"set {n} values: public set_values(key_field='image_id') {t_public:.2f} s vs private bulk_write {t_private:.2f} s "
          f"({t_public / t_private:.2f}x)")

    k = n // 10
    ds.take(k, seed=0).tag_samples("accept")
    ds.take(k // 4, seed=1).tag_samples("reject")
    t = time.perf_counter()
    p = review.pull(m, ws, calibrate_after=True)
    out["pull"] = time.perf_counter() - t
    print(f"pull with calibration, {n} samples with {p.reviewed} decisions: {out['pull']:.2f} s ({p.changed} rows written)")
    t = time.perf_counter()
    p2 = review.pull(m, ws, calibrate_after=False)
    print(f"pull again (idempotent, {p2.changed} rows written): {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    st = review.status(m, ws)
    print(f"status over {int(st['samples'].sum())} samples: {time.perf_counter() - t:.2f} s")

    # Calibration sweep on the reviewed images' scores: ours on all, the old loop on at most 4,000.
    df = catalog.read(ws).filter(pl.col("review_decision").is_not_null())
    scores = np.round(df["clip_margin"].to_numpy() + np.random.default_rng(0).normal(0, 0.05, df.height), 4)
    truth = df["review_decision"].to_numpy() == "accept"
    t = time.perf_counter()
    ours = review._best_threshold(scores, truth)
    out["sweep"] = time.perf_counter() - t
    q = min(len(scores), 4000)
    t = time.perf_counter()
    old = _quadratic_best_threshold(scores[:q].tolist(), truth[:q].tolist())
    out["quadratic"], out["quad_n"] = time.perf_counter() - t, q
    assert review._best_threshold(scores[:q], truth[:q]) == old
    print(f"calibration sweep, {len(scores)} reviewed: {out['sweep']:.3f} s (best {ours[0]:.4g}); "
          f"O(n^2) loop on {q}: {out['quadratic']:.2f} s")
    fo.delete_dataset(name)
    return out


if __name__ == "__main__":
    main()
