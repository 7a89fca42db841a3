"""All-reduce bandwidth between the GPUs of this machine, as DDP's gradient reduction sees it: NCCL all-reduce of
fp32 and bf16 buffers from 64 MiB to 2 GiB, warm-up then timed calls; prints per size the median time, algorithm
bandwidth (bytes / time) and bus bandwidth (x 2(n-1)/n, NCCL's convention: what each GPU's links carry). The cost
model of `bench/README.md` (expected scaling to 8-64 GPUs) takes its bus bandwidth from here.

    torchrun --nproc_per_node 2 bench/allreduce.py
"""
import argparse
import os
import statistics

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 256, 1024, 2048])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    if rank == 0:
        print(f"{world} x {torch.cuda.get_device_name()}, torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}")
        print(f"{'dtype':>8} {'MiB':>6} {'median ms':>10} {'mean ms':>8} {'algbw GB/s':>11} {'busbw GB/s':>11}")
    for dtype in (torch.float32, torch.bfloat16):
        for mib in a.sizes_mib:
            x = torch.ones(mib * 2**20 // torch.finfo(dtype).bits * 8, dtype=dtype, device="cuda")
            times = []
            for i in range(a.warmup + a.iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                dist.barrier(); start.record()
                dist.all_reduce(x)
                end.record(); torch.cuda.synchronize()
                if i >= a.warmup:
                    times.append(start.elapsed_time(end) / 1e3)
            med = statistics.median(times)
            alg = x.numel() * x.element_size() / med / 1e9
            if rank == 0:
                print(f"{str(dtype).removeprefix('torch.'):>8} {mib:>6} {1e3 * med:>10.2f} "
                      f"{1e3 * statistics.mean(times):>8.2f} {alg:>11.1f} {alg * 2 * (world - 1) / world:>11.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
