"""Model FLOP utilisation of the stage-0 policy training step (VLM + action head + AdamW).

FLOPs are counted by PyTorch's own `FlopCounterMode` over one forward + backward (no hand formulas); the
step time is the median of timed steps; MFU is reported against the bf16 matrix-product rate measured in
the same run (an 8192^3 product) and against the H200 datasheet figure (790 TFLOP/s dense bf16).

    python bench/step_mfu.py                     # 2B-shaped Qwen3-VL, batch 16, ~350 tokens, 224 px
"""
import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from latent_overhead import build_policy, make_batch, profile_step, time_step

DATASHEET_TFLOPS = 790.0


def matmul_tflops(device, n: int = 8192, reps: int = 10) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="2b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=350)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile-layers", action="store_true",
                    help="torch.compile every text decoder layer and vision block (regional compilation)")
    ap.add_argument("--profile", action="store_true", help="profile one step: top kernels, launches, kernel vs wall time")
    a = ap.parse_args()
    device = torch.device("cuda")
    policy, _ = build_policy(a.preset, device, torch.bfloat16)
    policy.train()
    batch = make_batch(policy.backbone.vlm, 0, a.batch, a.tokens, a.image, device)
    # PyTorch's counter has no formula for SDPA with grouped KV heads: count once with eager attention
    # (the same matrix products, written out), then time with SDPA.
    vlm = policy.backbone.vlm
    vlm.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as fc:
        policy(batch)["total_loss"].backward()
    policy.zero_grad(set_to_none=True)
    vlm.set_attn_implementation("sdpa")
    flops = fc.get_total_flops()
    if a.compile_layers:
        policy.backbone.compile_blocks()
    t, peak_mem, _ = time_step(policy, batch, a.steps, a.warmup, device)
    if a.profile:
        profile_step(policy, batch, device, rows=25)
    achieved = flops / t / 1e12
    ceiling = matmul_tflops(device)
    print(f"stage-0 step: {t * 1e3:.1f} ms, {flops / 1e12:.2f} TFLOP counted (fwd+bwd), {achieved:.0f} TFLOP/s")
    print(f"bf16 matmul measured in this run: {ceiling:.0f} TFLOP/s")
    print(f"MFU vs measured matmul rate: {achieved / ceiling:.1%};  vs datasheet {DATASHEET_TFLOPS:.0f}: "
          f"{achieved / DATASHEET_TFLOPS:.1%}  (target >= 45%)")
    print(f"peak memory {peak_mem / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
