"""Where one training forward and backward of the policy makes the host wait for the GPU, op by op, with the line that
asked for it. A step bound by its host (`step_mfu.py`, `ddp_scaling.py`) loses its lead at each such wait: the GPU's
queue drains, and the next kernels start only when the host has launched them.

On CUDA the waits are the ones PyTorch itself reports (`torch.cuda.set_sync_debug_mode`: `.item()`, `nonzero`, boolean
indexing, copies to the host, ...). On a CPU nothing waits, so the ops that would wait on a GPU are counted instead,
by name (a proxy: it also counts such ops on tensors that stay on the CPU by design). Neither sees a copy to the GPU
from pageable memory, which also waits: batches and other host tensors must come from page-locked memory (the
trainer pins its batches).

    python bench/host_syncs.py                                  # the tiny config on this machine
    python bench/host_syncs.py --config qwen3vl2b_random --stage 2
"""
import argparse
import collections
import os
import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that make the host wait for a CUDA device (their result's size or value is read on the host)
WAITS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
         "aten._unique2.default", "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor"}


# frames that only carry the wait: torch's own (by its install directory: a path such as /opt/torch/.venv/... holds
# "/torch/" in other packages' files too) and the warnings machinery that reports it on CUDA
CARRIERS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(warnings.__file__) + os.sep + "warnings.py")


def site(skip: str) -> str:
    "The innermost frames outside torch (and this file): where the wait was asked for."
    frames = [f for f in traceback.extract_stack() if not f.filename.startswith(CARRIERS) and skip not in f.filename]
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-3:])) or \
        "(the backward, in autograd's thread)"


class WouldWait(TorchDispatchMode):
    "Counts, by site, the ops that would make the host wait on a GPU (and boolean-mask indexing, which does)."

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        masked = name.startswith("aten.index") and any(
            isinstance(a, (list, tuple)) and any(torch.is_tensor(t) and t.dtype == torch.bool for t in a) for a in args)
        if name in WAITS or masked:
            self.sites[(name.removeprefix("aten."), site(__file__))] += 1
        return func(*args, **(kwargs or {}))


def count(step, device: torch.device) -> collections.Counter:
    "Run `step()` and count its waits by (op, site)."
    if device.type != "cuda":
        with WouldWait() as mode:
            step()
        return mode.sites
    sites = collections.Counter()
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing CUDA operation" in str(message):
            sites[("synchronizing op", site(__file__))] += 1
        elif "Synchronization debug mode" not in str(message):  # the mode's own "prototype" notice is dropped
            show(message, category, filename, lineno, file, line)

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = show
    return sites


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    a = ap.parse_args()
    from ecot.build import build_collator, build_dataset, build_policy, build_processor, run_config
    from ecot.trainer import _pinned, _to_device
    cfg = run_config(a.config, a.stage, [f"datasets.vla_data.per_device_batch_size={a.batch_size}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    processor, dataset = build_processor(cfg), build_dataset(cfg, train=True)
    collate = build_collator(cfg, processor)
    collate.stage = a.stage
    samples = [s for _, s in zip(range(a.batch_size), iter(dataset))]
    batch = collate(samples)
    batch = _to_device(_pinned(batch) if device.type == "cuda" else batch, device)
    policy = build_policy(cfg, processor, dataset.statistics).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = policy(batch)
        (out["total_loss"] if "total_loss" in out else out["action_loss"]).backward()

    step()  # warm-up: compilation and first-call checks are not the steady state
    sites = count(step, device)
    print(f"{a.config}, stage {a.stage}, batch {a.batch_size}, {device}: {sum(sites.values())} waits in one forward "
          f"and backward ({'reported by CUDA' if device.type == 'cuda' else 'ops that wait on a GPU, counted on a CPU'})")
    for (op, where), n in sorted(sites.items(), key=lambda kv: -kv[1]):
        print(f"{n:>4}  {op:<34} {where}")


if __name__ == "__main__":
    main()
