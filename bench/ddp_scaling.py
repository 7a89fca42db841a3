"""Data-parallel scaling of training: samples/s on N processes / (N x samples/s on one), measured with the trainer of
`nbs/train.ipynb` (`ecot.run.main`, what `ecot-train` runs) under `accelerate launch` with DDP (or FSDP:
`--layout fsdp`, `configs/accelerate/fsdp.yaml`), plus the share of each step spent waiting for data and the peak GPU
memory of rank 0. Throughput is whole-span: the samples of the steps after `--skip` (compilation
and warm-up excluded) over their wall time, from the record at step `--skip` to the last record (`window_samples`
and `wall_s` in each run's `metrics.jsonl`: samples over all ranks, seconds since training started), so stalls
inside the span count. Printed beside it: the median and range of the logged windows, and the graphs compiled
inside the span (`compiled_graphs`): one compiled after warm-up is a recompile, and it stalls every rank.

    python bench/ddp_scaling.py --config qwen3vl2b_random --stage 0 --steps 80     # GPUs: 1 and 2 processes
    python bench/ddp_scaling.py --layout fsdp --nproc 2 --override trainer.eval_samples=0   # the same under FSDP
    python bench/ddp_scaling.py --config tiny --steps 12 --skip 4 --log-every 4 --batch-size 2   # CPU smoke run (gloo)
    python bench/ddp_scaling.py --nproc 1 --out runs/scaling; python bench/ddp_scaling.py --out runs/scaling --reuse
    python bench/ddp_scaling.py --layout fsdp --nproc 8 --save-at 30 --resume-on 4   # resharded: 8 GPUs' checkpoint on 4

`--resume-on M`: the run on the most processes (N) saves a checkpoint at step `--save-at`, which is then resumed on M
processes with N/M times the micro-batches a step (the global batch kept, the shapes as before), to the same last
step; printed: both runs' losses over the resumed steps, window by window, and their means.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def launch(nproc: int, run_dir: Path, a, resume: tuple = ()) -> None:
    "One training run on `nproc` processes (`resume`: its extra arguments); this file is the per-process program (`--worker`)."
    train = ["--config", a.config, "--stage", str(a.stage), "--max-steps", str(a.steps), "--run-dir", str(run_dir),
             "--wandb-mode", "disabled", "--override", f"trainer.logging_frequency={a.log_every}",
             "--override", "trainer.save_at_end=false"]  # a 2B run's last checkpoint is ~31 GB: nothing to time
    if a.save_at:  # one checkpoint, kept, for --resume-on
        train += ["--override", f"trainer.save_interval={a.save_at}", "--override", "trainer.keep_last_checkpoints=1"]
    for o in a.override:
        train += ["--override", o]
    if a.batch_size:
        train += ["--batch-size", str(a.batch_size)]
    if a.profile and not resume:
        train += ["--profile", str(a.profile)]
    train += list(resume)
    layout = "ddp" if resume and nproc == 1 else a.layout  # a sharded checkpoint resumes whole in one plain process
    if torch.cuda.is_available():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / f"{layout}.yaml"), "--num_processes", str(nproc)]
    elif layout != "ddp":
        raise SystemExit("--layout fsdp runs on GPUs (on CPUs, tests/test_multinode.py runs FSDP with gloo)")
    else:  # CPU processes with gloo (accelerate's MULTI_CPU launcher runs one process on one machine)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    port = 29500 + nproc + (100 if resume else 0)
    cmd += ["--main_process_port" if torch.cuda.is_available() else "--master_port", str(port), __file__,
            "--worker", *train]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def summary(run_dir: Path, skip: int) -> dict:
    """Whole-span throughput (steps after `skip` over their wall time), window spread, recompiles (and CUDA graph captures)
    and data share of one run."""
    from ecot.metrics import read_metrics
    recs = [r for r in read_metrics(run_dir) if "samples_per_s" in r]
    start = [r for r in recs if r["step"] <= skip]
    span = [r for r in recs if r["step"] > skip]
    if not start or not span:
        raise SystemExit(f"{run_dir}/metrics.jsonl needs records at or before step {skip} and after it "
                         f"(--skip a multiple of --log-every, and more --steps)")
    a, b = start[-1], span[-1]
    wall = b["wall_s"] - a["wall_s"]
    data = statistics.mean(r["data_time"] for r in span)
    model = statistics.mean(r["model_time"] for r in span)
    windows = [r["samples_per_s"] for r in span]
    return {"samples_per_s": sum(r["window_samples"] for r in span) / wall, "steps": b["step"] - a["step"],
            "wall_s": wall, "window_median": statistics.median(windows), "window_min": min(windows),
            "window_max": max(windows), "recompiles": b.get("compiled_graphs", 0) - a.get("compiled_graphs", 0),
            "data_share": data / (data + model), "data_ms": 1e3 * data, "model_ms": 1e3 * model,
            **{k: max((r.get(k, float("nan")) for r in span), default=float("nan"))
               for k in ("peak_memory_gib", "peak_reserved_gib")},
            # with CUDA graphs: signatures captured (each stalls the span as a recompile does) or refused inside it
            **{f"graph_{k}_in_span": b[f"graph_{k}"] - a[f"graph_{k}"] for k in ("captured", "refused", "failed")
               if f"graph_{k}" in b}}


def records(run_dir: Path) -> dict:
    "A run's training records by step."
    from ecot.metrics import read_metrics
    return {r["step"]: r for r in read_metrics(run_dir) if "action_loss" in r}


def resume_on(n: int, m: int, out: Path, a) -> None:
    """Resume the `n`-process run's checkpoint at step `a.save_at` on `m` processes, n/m times the micro-batches a step,
    and print both runs' losses over the resumed steps."""
    from ecot.build import run_config
    if n % m:
        raise SystemExit(f"--resume-on {m}: the global batch of {n} processes cannot be kept on {m} (not a divisor)")
    accum = run_config(a.config, a.stage, a.override).trainer.gradient_accumulation_steps * n // m
    ckpt = out / f"nproc{n}" / "checkpoints" / f"step_{a.save_at:06d}"
    run_dir = out / f"nproc{n}_resumed_on{m}"
    if not (a.reuse and (run_dir / "metrics.jsonl").exists()):
        launch(m, run_dir, a, ("--resume", str(ckpt), "--override", f"trainer.gradient_accumulation_steps={accum}",
                               "--override", f"trainer.save_interval={a.steps}"))  # no checkpoint of its own
    straight, resumed = records(out / f"nproc{n}"), records(run_dir)
    steps = sorted(set(straight) & set(resumed))
    print(f"\nresumed on {m} process(es) from the {n}-process run's step {a.save_at} ({accum} micro-batches a step): "
          f"losses, straight / resumed")
    keys = ("action_loss", "vlm_loss")
    for step in steps:
        print(f"{step:>6}  " + "  ".join(f"{k} {straight[step][k]:.4f} / {resumed[step][k]:.4f}" for k in keys if k in straight[step]))
    for k in keys:
        if steps and k in straight[steps[0]]:
            x, y = (statistics.mean(r[s][k] for s in steps) for r in (straight, resumed))
            print(f"mean {k} over steps {a.save_at + 1}-{steps[-1]}: {x:.4f} / {y:.4f} ({(y - x) / x:+.1%})")


def profile_steps(first: int, count: int = 3) -> None:
    """Profile optimizer steps `first` .. `first + count - 1` of rank 0 (torch.profiler, CPU and CUDA) and write, beside
    its metrics, `profile.txt`: where the GPU time went (compute, communication) against the wall time of the steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from ecot.trainer import Trainer
    inner, prof = Trainer._accumulate, {}

    def _accumulate(self, prefetch):  # called once per optimizer step, before the step counter moves
        if self.acc.is_main_process and self.step in (first, first + count):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if self.step == first:
                prof["p"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                prof["p"].__enter__()
                prof["t0"] = time.perf_counter()
            elif "p" in prof:
                wall, p = time.perf_counter() - prof.pop("t0"), prof.pop("p")
                p.__exit__(None, None, None)
                events = p.key_averages()
                # kernels only: not the ops that launched them, nor ranges on the GPU's timeline (DDP's forward,
                # the optimizer step, NCCL's own record), which would count their kernels again
                kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
                gpu = lambda e: e.self_device_time_total / 1e3 / count  # ms per step
                comm = sum(gpu(e) for e in kernels if e.key.startswith("ncclDevKernel"))
                total = sum(gpu(e) for e in kernels)
                waits = sum(e.count for e in events if e.key == "cudaStreamSynchronize") / count
                text = (f"rank 0 of {self.acc.num_processes}, steps {first + 1}-{first + count}: wall {1e3 * wall / count:.1f} "
                        f"ms per step; GPU busy {total:.1f} ms per step, of which communication {comm:.1f} ms "
                        f"(kernels of concurrent streams add up); {sum(e.count for e in kernels) / count:.0f} kernels "
                        f"and {waits:.0f} host waits (cudaStreamSynchronize) per step\n\n"
                        + events.table(sort_by="self_device_time_total", row_limit=25) + "\n"
                        + events.table(sort_by="cpu_time_total", row_limit=15))
                (self.run_dir / "profile.txt").write_text(text)
        return inner(self, prefetch)

    Trainer._accumulate = _accumulate


def main():
    if "--worker" in sys.argv:
        from ecot.run import main as train
        argv = [x for x in sys.argv[1:] if x != "--worker"]
        if "--profile" in argv:
            i = argv.index("--profile")
            profile_steps(int(argv[i + 1]))
            del argv[i:i + 2]
        train(argv)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="qwen3vl2b_random")
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--skip", type=int, default=20, help="steps left out of the throughput (compile, warm-up)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=None, help="per-process batch (default: the config's)")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layout", choices=("ddp", "fsdp"), default="ddp", help="data parallel (DDP) or sharded (FSDP2)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEP",
                    help="profile 3 steps from this one on rank 0 (keep it before --skip); writes profile.txt, printed")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--reuse", action="store_true", help="read runs already in --out instead of running them again")
    ap.add_argument("--save-at", type=int, default=0, metavar="STEP", help="each run saves (and keeps) a checkpoint here")
    ap.add_argument("--resume-on", type=int, nargs="*", default=[], metavar="M",
                    help="resume the largest run's --save-at checkpoint on M processes, the global batch kept")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for both runs (repeatable), e.g. trainer.eval_samples=0")
    a = ap.parse_args()
    if a.resume_on and not 0 < a.save_at < a.steps:
        raise SystemExit(f"--resume-on needs --save-at between 1 and --steps - 1 ({a.steps - 1}), got {a.save_at}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out or tmp)
        res = {}
        for n in a.nproc:
            if not (a.reuse and (out / f"nproc{n}" / "metrics.jsonl").exists()):
                launch(n, out / f"nproc{n}", a)
            res[n] = summary(out / f"nproc{n}", a.skip)
            if a.profile:
                print((out / f"nproc{n}" / "profile.txt").read_text(), flush=True)
            print(f"{n} process(es): {json.dumps(res[n])}", flush=True)
        for m in a.resume_on:
            resume_on(max(a.nproc), m, out, a)
    base = res[min(res)]
    print(f"\n{'processes':>9} {'samples/s (span)':>17} {'windows: median, range':>24} {'recompiles':>10} "
          f"{'scaling efficiency':>19} {'data wait / step':>17} {'peak GiB':>9} {'reserved':>9}")
    for n, r in res.items():
        eff = r["samples_per_s"] / (n / min(res) * base["samples_per_s"])
        rng = f"{r['window_median']:.1f}, {r['window_min']:.1f}-{r['window_max']:.1f}"
        print(f"{n:>9} {r['samples_per_s']:>17.1f} {rng:>24} {r['recompiles']:>10} {eff:>18.1%} {r['data_share']:>16.1%} "
              f"{r['peak_memory_gib']:>9.1f} {r['peak_reserved_gib']:>9.1f}")
    print(f"layout {a.layout}; targets: scaling efficiency >= 90% (2 and 8 GPUs); data wait < 5% of the step")


if __name__ == "__main__":
    main()
