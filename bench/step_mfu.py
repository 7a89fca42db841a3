"""Model FLOP utilisation of the stage-0 policy training step (VLM + action head + AdamW).

FLOPs are counted by PyTorch's own `FlopCounterMode` over one forward + backward (no hand formulas); the
step time is the median of timed steps after warm-up until nothing new compiles (the mean is printed beside it); MFU is reported against the bf16 matrix-product rate measured in
the same run (an 8192^3 product) and against the H200 datasheet figure (790 TFLOP/s dense bf16).

    python bench/step_mfu.py                     # 2B-shaped Qwen3-VL, batch 16, ~350 tokens, 224 px
"""
import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from latent_overhead import build_policy, make_batch, profile_step, set_mode, time_step
from timing import environment

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
    ap.add_argument("--steps", type=int, default=10, help="timed steps, after warm-up until nothing compiles")
    ap.add_argument("--mode", choices=("compiled", "graphed", "eager"), nargs="+", default=["compiled"],
                    help="compiled as training compiles (decoder layers, vision and DiT blocks), graphed (compiled, "
                         "the compiled regions' training calls replayed from CUDA graphs), or eager; several are timed "
                         "one after the other in this process (compiled and graphed share one compiled model)")
    ap.add_argument("--profile", action="store_true", help="profile one step: top kernels, launches, kernel vs wall time")
    ap.add_argument("--second-width", type=int, default=64, metavar="TOKENS",
                    help="graphed: then train on a batch this many tokens longer, a second signature for every region, "
                         "and print the memory it adds (0: skip)")
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
    print(environment(device), flush=True)
    results = {}
    for mode in a.mode:
        set_mode(policy, mode, device)
        results[mode] = time_step(policy, batch, a.steps, device)
        if mode == "graphed" and a.second_width:  # each signature holds its activations in its graphs' pools
            longer = make_batch(policy.backbone.vlm, 0, a.batch, a.tokens + a.second_width, a.image, device)
            _, (_, two), _ = time_step(policy, longer, 2, device, max_warmup=2)
            _, (_, one), _ = results[mode]
            print(f"graphed, a second signature ({a.second_width} tokens longer): peak reserved "
                  f"{two / 2**30:.1f} GiB, against {one / 2**30:.1f} GiB with one", flush=True)
        if a.profile:
            profile_step(policy, batch, device, rows=25)
    ceiling = matmul_tflops(device)
    print(f"bf16 matmul measured in this run: {ceiling:.0f} TFLOP/s;  {flops / 1e12:.2f} TFLOP counted (fwd+bwd)")
    for mode, (timed, (allocated, reserved), _) in results.items():
        t = timed["median"]
        achieved = flops / t / 1e12
        print(f"stage-0 step ({mode}): median {t * 1e3:.1f} ms, mean {timed['mean'] * 1e3:.1f} ms ({timed['n']} steps), "
              f"{achieved:.0f} TFLOP/s at the median; MFU vs measured matmul rate: {achieved / ceiling:.1%}, vs "
              f"datasheet {DATASHEET_TFLOPS:.0f}: {achieved / DATASHEET_TFLOPS:.1%} (target >= 45%); "
              f"peak memory {allocated / 2**30:.1f} GiB allocated, {reserved / 2**30:.1f} GiB reserved")


if __name__ == "__main__":
    main()
