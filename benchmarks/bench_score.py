"""CLIP scoring throughput: the model alone vs this stage from JPEG files, same images, same model.

    .venv/bin/python benchmarks/bench_score.py [--images 200] [--model ViT-B-32] [--device auto]
                                               [--workers N] [--threads N] [--batch-size N] [--repeats 3]

Random weights (pretrained=None: timing only, no download). Prints:
  model-only   pre-decoded, preprocessed tensors already in memory, straight into encode_image
  end-to-end   clip_score.encode_images on the stored JPEG files: DataLoader workers decoding
               (JPEG draft mode) + the model's preprocessing + the same batched inference
  ratio        end-to-end / model-only (goal >= 0.90)
  stage        clip_score.score_workspace on a workspace of the same images, whole stage wall time,
               with its fixed costs (text prompts, catalog, report) shown apart.
Model-only and end-to-end passes alternate (order flipped each time) so both see the same load on a
shared machine; each figure is its images over its summed time. `cpu/image` (process + decode workers'
CPU seconds per image) is the steadier figure when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def make_jpegs(folder: Path, n: int, classes: list[str]) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        im = Image.fromarray(low, "RGB").resize((640, 480), Image.BICUBIC)
        arr = np.asarray(im).astype(np.int16) + rng.integers(-20, 20, size=(480, 640, 3))
        d = folder / classes[i % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None, help="default: the stage's default for the device")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="passes over the images per side")
    ap.add_argument("--chunk", type=int, default=None,
                    help="images per alternating measurement (default: all, one DataLoader per pass as in the stage)")
    ap.add_argument("--compare-workers", type=lambda t: [int(x) for x in t.split(",") if x], default=[],
                    help="also time end-to-end with these worker counts, e.g. 0,2")
    ap.add_argument("--no-stage", action="store_true", help="skip the whole-stage timing")
    args = ap.parse_args()

    import open_clip
    import torch

    from curation import catalog, clip_score, ingest
    from curation.catalog import Workspace
    from curation.config import ClipPrecision, parse_manifest
    from curation.images import open_rgb

    device = clip_score.resolve_device(args.device)
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=None)
    clip = clip_score.ClipModel.wrap(
        model, preprocess, open_clip.get_tokenizer(args.model), model_id=f"{args.model}/random",
        identity=f"{args.model}|random|{time.time_ns()}", device=device, precision=ClipPrecision.auto,
    )
    on_cuda = clip.device.type == "cuda"
    batch = args.batch_size or (256 if on_cuda else 32)
    workers = clip_score.default_workers(clip.device.type) if args.workers is None else args.workers
    threads = args.threads or clip_score._cores()

    tmp = Path(tempfile.mkdtemp(prefix="bench_score_"))
    classes = ["alpha", "beta"]
    make_jpegs(tmp / "tree", args.images, classes)
    m = parse_manifest({
        "name": "bench", "classes": [{"name": c} for c in classes],
        "sources": [{"type": "folder", "path": str(tmp / "tree")}],
        "clip": {"workers": workers, "threads": threads, "batch_size": batch, "plots": True},
    })
    ws = Workspace(tmp / "ws").ensure()
    ingest.run(m, ws, show_progress=False)
    paths = [str(ws.abspath(p)) for p in catalog.read(ws)["path"].to_list()]
    n = len(paths)

    # Pre-decoded inputs for model-only: decoded and preprocessed once, outside the clock.
    size = clip.image_size
    pre = torch.stack([preprocess(open_rgb(p, draft=(max(size), max(size)))) for p in paths])
    if on_cuda:
        pre = pre.to(clip.device)

    def cpu_s() -> float:
        # This process plus reaped children (the DataLoader's decode workers are joined at the end of a pass).
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def model_only(sel: slice) -> tuple[int, float, float]:
        if not on_cuda:
            torch.set_num_threads(threads)
        c0, t0 = cpu_s(), time.perf_counter()
        x_all = pre[sel]
        with torch.inference_mode():
            for s in range(0, len(x_all), batch):
                with torch.autocast(clip.device.type, dtype=clip.autocast_dtype, enabled=clip.autocast_dtype is not None):
                    f = clip.model.encode_image(x_all[s : s + batch])
                torch.nn.functional.normalize(f.float(), dim=-1).cpu()
        if on_cuda:
            torch.cuda.synchronize()
        return len(x_all), time.perf_counter() - t0, cpu_s() - c0

    def end_to_end(sel: slice, w: int) -> tuple[int, float, float]:
        c0, t0 = cpu_s(), time.perf_counter()
        _, errs = clip_score.encode_images(clip, paths[sel], batch_size=batch, workers=w, threads=threads)
        if on_cuda:
            torch.cuda.synchronize()
        assert not any(errs)
        return len(paths[sel]), time.perf_counter() - t0, cpu_s() - c0

    # Warm-up (first-call allocations, worker fork), not timed.
    clip_score.encode_images(clip, paths[:batch], batch_size=batch, workers=workers, threads=threads)
    # The machine is shared: measurements alternate chunk by chunk (order flipped each time), so
    # both sides see the same load; each side's figure is its images over its summed time.
    variants = [workers] + [w for w in args.compare_workers if w != workers]
    chunk = args.chunk or n
    totals: dict[str, list[float]] = {"model": [0, 0.0, 0.0], **{f"e2e{w}": [0, 0.0, 0.0] for w in variants}}
    step = 0
    for _ in range(args.repeats):
        for c0 in range(0, n, chunk):
            sel = slice(c0, min(n, c0 + chunk))
            jobs = [("model", lambda: model_only(sel))] + [(f"e2e{w}", lambda w=w: end_to_end(sel, w)) for w in variants]
            for name, job in (jobs if step % 2 == 0 else jobs[::-1]):
                for i, v in enumerate(job()):
                    totals[name][i] += v
            step += 1
    rate = {k: v[0] / v[1] for k, v in totals.items()}
    cpu_ms = {k: 1000 * v[2] / v[0] for k, v in totals.items()}
    print(f"device: {clip.device} ({'autocast ' + str(clip.autocast_dtype) if clip.autocast_dtype else 'fp32'}), "
          f"model {args.model} (random weights), {n} JPEGs 640x480, batch {batch}, workers {workers}, threads {threads}, "
          f"cores {clip_score._cores()}, {args.repeats} passes in chunks of {chunk}")
    print(f"model-only  : {rate['model']:8.2f} img/s   (pre-decoded tensors in memory)")
    print(f"end-to-end  : {rate[f'e2e{workers}']:8.2f} img/s   (JPEG files, {workers} DataLoader workers)")
    print(f"ratio       : {rate[f'e2e{workers}'] / rate['model']:8.3f}   (end-to-end / model-only; goal >= 0.90)")
    print(f"cpu/image   : model-only {cpu_ms['model']:.1f} ms, end-to-end {cpu_ms[f'e2e{workers}']:.1f} ms incl. decode "
          f"workers (work ratio {cpu_ms['model'] / cpu_ms[f'e2e{workers}']:.3f}: the ratio on an otherwise idle CPU)")
    for w in variants[1:]:
        print(f"  workers={w}: {rate[f'e2e{w}']:8.2f} img/s, ratio {rate[f'e2e{w}'] / rate['model']:.3f}, "
              f"cpu/image {cpu_ms[f'e2e{w}']:.1f} ms")

    if not args.no_stage:
        t0 = time.perf_counter()
        s = clip_score.score_workspace(m, ws, clip, show_progress=False)
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        clip_score.build_text_bank(clip, m)
        text = time.perf_counter() - t1
        print(f"stage       : {n / total:8.2f} img/s   ({total:.1f} s for {s.encoded} images: encoding {s.encode_seconds:.1f} s "
              f"= {s.encoded / s.encode_seconds:.2f} img/s, text prompts ~{text:.1f} s, catalog+report the rest)")
        t2 = time.perf_counter()
        s2 = clip_score.score_workspace(m, ws, clip, show_progress=False)
        print(f"re-score    : {time.perf_counter() - t2:8.2f} s     ({s2.cached} embeddings from the cache, {s2.encoded} encoded)")


if __name__ == "__main__":
    main()
