#!/usr/bin/env python3
"""Frames per second of the ECoT data pipeline (the TensorFlow-free RLDS reader), bare and through DataLoaders.

  * a fresh subprocess measures the import cost (seconds and RSS after importing the reader), then the bare
    pipeline's frames/s (no torch DataLoader, no PIL conversion, no reasoning lookup) and its peak RSS;
  * this process runs ECoTRLDSDataset through DataLoaders with 0, 1, 2, ... spawned workers.
Every frames/s is also printed as a ratio to a reference measured in the same run: the bare pipeline.

    python bench/data_throughput.py                          # embedded synthetic Bridge data, 224 px
    python bench/data_throughput.py --frames 600 --workers 0,1,2,4 --data-root /data/tfds
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Runs in a fresh interpreter: import cost and RSS of the reader, then its bare pipeline.
CHILD = r"""
import json, os, sys, time, itertools
def rss_mib(key="VmRSS"):  # VmHWM = peak RSS of this process image (ru_maxrss would include the parent's, via fork)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
a = json.loads(sys.argv[1])
base = rss_mib()
t0 = time.perf_counter()
from ecot.dataset import make_interleaved_frames
import_s, import_rss = time.perf_counter() - t0, rss_mib()
def frames():
    while True:
        yield from make_interleaved_frames(a["root"], a["mix"], a["size"], True, 0, 7, a["shuffle"], a["aug"], 0)[0]
it = frames()
t1 = time.perf_counter(); next(it); first = time.perf_counter() - t1
t2 = time.perf_counter()
for _ in itertools.islice(it, a["frames"]): pass
fps = a["frames"] / (time.perf_counter() - t2)
peak = rss_mib("VmHWM")
print(json.dumps({"import_s": import_s, "base_rss": base, "import_rss": import_rss, "peak_rss": peak,
                  "first": first, "fps": fps}))
"""


def endless(make_iter):
    "Restart a finite iterable (one epoch) until the caller stops."
    while True:
        yield from make_iter()


def timed(frames_iter, n_frames: int) -> tuple[float, float]:
    "(seconds to the first frame, frames/s over the next n_frames)."
    t0 = time.perf_counter()
    next(frames_iter)
    t1 = time.perf_counter()
    for _ in itertools.islice(frames_iter, n_frames):
        pass
    return t1 - t0, n_frames / (time.perf_counter() - t1)


def bare_pipeline(args) -> dict:
    "Import cost, RSS and bare-pipeline frames/s of the reader, measured in a fresh interpreter."
    spec = {"root": str(args.data_root), "mix": args.data_mix, "size": list(args.image_size),
            "shuffle": args.shuffle_buffer, "aug": args.image_aug, "frames": args.frames}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bare pipeline failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=400, help="frames timed per configuration (after the first)")
    ap.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    ap.add_argument("--image-size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-root", default=None, help="TFDS data_dir (default: the embedded synthetic dataset)")
    ap.add_argument("--data-mix", default="bridge")
    ap.add_argument("--shuffle-buffer", type=int, default=256)
    ap.add_argument("--image-aug", action="store_true")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    if args.data_root is None:
        from ecot.synthetic import embedded_dataset
        args.data_root = embedded_dataset()
    from ecot.dataset import ECoTRLDSDataset, make_dataloader
    kw = dict(image_size=tuple(args.image_size), future_action_window_size=7, shuffle_buffer_size=args.shuffle_buffer,
              image_aug=args.image_aug, train=True, seed=0)

    bare = bare_pipeline(args)
    rows = [("bare", "-", bare["first"], bare["fps"])]
    ds = ECoTRLDSDataset(args.data_root, args.data_mix, **kw)
    for nw in workers:
        loader = make_dataloader(ds, batch_size=args.batch_size, num_workers=nw)
        frames = (s for batch in endless(lambda: iter(loader)) for s in batch)
        rows.append(("DataLoader", nw, *timed(frames, args.frames)))

    ref = bare["fps"]
    print(f"\nECoT data throughput: {args.data_mix} at {args.image_size[0]}x{args.image_size[1]}, "
          f"{args.frames} frames timed, batch {args.batch_size}, {os.cpu_count()} CPU cores, "
          f"aug {'on' if args.image_aug else 'off'}")
    print(f"{'pipeline':<12}{'workers':>8}{'first (s)':>11}{'frames/s':>10}{'per worker':>12}{'vs bare':>10}")
    for name, nw, first, fps in rows:
        per = fps / nw if isinstance(nw, int) and nw > 0 else fps
        print(f"{name:<12}{nw!s:>8}{first:>11.2f}{fps:>10.1f}{per:>12.1f}{fps / ref:>9.2f}x")
    print(f"\nimport {bare['import_s']:.2f} s, RSS after import {bare['import_rss']:.0f} MiB, "
          f"peak RSS of the bare run {bare['peak_rss']:.0f} MiB")


if __name__ == "__main__":
    main()
