"""What every GPU benchmark here times with, so that each ratio it prints is measured the same way: warm-up until
the compiler makes no new graph (checked through its counters, not a fixed count), then timed calls each ended by a
device sync; median and mean of them; the machine and software printed with the figures."""
import platform
import statistics
import time

import torch
import transformers


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def dynamo_graphs() -> int:
    "Graphs torch.compile has made in this process so far (one more after warm-up is a recompile)."
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def warm_up(fn, device, max_calls: int = 6) -> int:
    "Call `fn` until a call makes no new compiled graph (at least 2 calls, at most `max_calls`); returns the calls."
    before = None
    for i in range(max_calls):
        fn()
        sync(device)
        now = dynamo_graphs()
        if i >= 1 and now == before:
            return i + 1
        before = now
    print(f"warning: still compiling after {max_calls} warm-up calls ({dynamo_graphs()} graphs): timings include it")
    return max_calls


def time_calls(fn, device, steps: int, max_warmup: int = 6) -> list[float]:
    """Warm up (`warm_up`; none with `max_warmup=0`), then `steps` timed calls: seconds each. Says so when a timed
    call compiled a new graph (a recompile inside the timing)."""
    if max_warmup:
        warm_up(fn, device, max_warmup)
    graphs, times = dynamo_graphs(), []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    if dynamo_graphs() > graphs:
        print(f"warning: {dynamo_graphs() - graphs} graph(s) compiled during the timed calls")
    return times


def stats(times: list[float]) -> dict:
    "Median and mean of timed calls (seconds), and how many."
    return {"median": statistics.median(times), "mean": statistics.mean(times), "n": len(times)}


def environment(device) -> str:
    "The device and the software a figure was measured with."
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    return (f"device {name}, torch {torch.__version__}{cuda}, transformers {transformers.__version__}, "
            f"python {platform.python_version()}")
