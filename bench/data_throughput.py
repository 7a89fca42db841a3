#!/usr/bin/env python3
"""Frames per second of the ECoT data pipeline (tf.data RLDS -> torch DataLoader) at a given image size.

Runs the same dataset through DataLoaders with 0, 1, 2, ... workers (spawned) and prints a table of
frames/s overall and per worker, each as a ratio to a reference measured in the same run: the bare
tf.data pipeline (no torch, no PIL, no reasoning lookup) in this process.

    python bench/data_throughput.py                     # embedded synthetic Bridge data, 224 px
    python bench/data_throughput.py --frames 600 --workers 0,1,2,4 --data-root /data/tfds
"""
import argparse
import itertools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ecot.dataset import ECoTRLDSDataset, make_dataloader  # noqa: E402
from ecot.rlds import iterate_numpy, make_interleaved_dataset  # noqa: E402


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
    kw = dict(image_size=tuple(args.image_size), future_action_window_size=7, shuffle_buffer_size=args.shuffle_buffer,
              image_aug=args.image_aug, train=True, seed=0)
    ds = ECoTRLDSDataset(args.data_root, args.data_mix, **kw)

    def tf_only():
        tds, _, files = make_interleaved_dataset(args.data_root, args.data_mix, kw["image_size"], True, 0, 7,
                                                 args.shuffle_buffer, args.image_aug, 0, statistics=ds.statistics)
        return iterate_numpy(tds, files)

    rows = [("tf.data only", "-", *timed(endless(tf_only), args.frames))]
    for nw in workers:
        loader = make_dataloader(ds, batch_size=args.batch_size, num_workers=nw)
        frames = (s for batch in endless(lambda: iter(loader)) for s in batch)
        rows.append(("DataLoader", nw, *timed(frames, args.frames)))

    ref = rows[0][3]
    print(f"\nECoT data throughput: {args.data_mix} at {args.image_size[0]}x{args.image_size[1]}, "
          f"{args.frames} frames timed, batch {args.batch_size}, {os.cpu_count()} CPU cores, "
          f"aug {'on' if args.image_aug else 'off'}")
    print(f"{'pipeline':<14}{'workers':>8}{'first (s)':>11}{'frames/s':>10}{'per worker':>12}{'vs tf.data':>12}")
    for name, nw, first, fps in rows:
        per = fps / nw if isinstance(nw, int) and nw > 0 else fps
        print(f"{name:<14}{nw!s:>8}{first:>11.2f}{fps:>10.1f}{per:>12.1f}{fps / ref:>11.2f}x")


if __name__ == "__main__":
    main()
