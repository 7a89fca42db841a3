"""Latent-forward overhead: full policy training step (VLM + action head + AdamW) at n thinking tokens,
divided by the stage-0 step on the same model, batch and sequence — for the project's KV-cache latent path
(lean one-column passes), the Coconut-style loop (one full `language_model` call per column on a growing
`DynamicCache`, `ecot.reference.loop_latent_forward`) and the naive full recompute per pass, plus peak-memory ratios.
All numbers are ratios measured in one run, every case built the same way (`--mode`: all compiled as training
compiles, or all eager), each warmed up until nothing new compiles, then median and mean of `--steps` timed steps.

    python bench/latent_overhead.py                      # 2B-shaped Qwen3-VL (random weights), bf16, GPU
    python bench/latent_overhead.py --preset tiny --device cpu --batch 4 --steps 3   # smoke run (eager on a CPU)
    python bench/latent_overhead.py --check --profile    # + exactness on the device, + a profile of one step
"""
import argparse
import time
import types

import torch

from ecot.backbone import QwenVLBackbone, build_qwen3vl, graph_regions, tiny_qwen3vl_config
from ecot.build import compile_model
from ecot.reference import compare_latent_to_reference, loop_latent_forward, reference_latent_forward
from ecot.testing import ToyTokenizer, float64_rmsnorm, toy_batch
from ecot.action_head import ActionHeadConfig
from ecot.policy import ECoTPolicy, PolicyConfig
from transformers import Qwen3VLForConditionalGeneration

from timing import environment, stats, time_calls, warm_up

PRESETS = {  # Qwen3-VL-2B shapes (random weights: nothing is downloaded)
    "2b": dict(vocab_size=151936, hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
               intermediate_size=6144, vision_depth=24, vision_hidden_size=1024, vision_heads=16,
               deepstack_visual_indexes=(5, 11, 17)),
    "tiny": dict(vocab_size=600),
}


def build_policy(preset: str, device, dtype):
    p = dict(PRESETS[preset])
    vocab = p.pop("vocab_size")
    cfg = tiny_qwen3vl_config(vocab_size=vocab, image_token_id=vocab - 4, video_token_id=vocab - 3,
                              vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1, **p)
    torch.manual_seed(0)
    vlm = Qwen3VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    head = ActionHeadConfig(action_dim=7, chunk_len=16, state_dim=7, hidden_size=512, num_layers=8, num_heads=8)
    policy = ECoTPolicy(vlm, PolicyConfig(repeated_diffusion_steps=4, vlm_loss_weight=0.1), action_head=head)
    return policy.to(device=device, dtype=dtype), cfg


def make_batch(vlm, n: int, batch: int, tokens: int, image: int, device):
    "Rows of about `tokens` tokens with one `image`-px image; n thinking tokens per row (0: a stage-0 batch)."
    vc = vlm.config.vision_config
    n_img = (image // vc.patch_size) ** 2 // vc.spatial_merge_size ** 2
    prefix, thinking_span = 20, (n + 2 if n else 0)
    suffix = max(8, tokens - prefix - n_img - 4 - thinking_span)
    vocab = vlm.config.text_config.vocab_size
    b = toy_batch(vlm, think_counts=[n] * batch, prefix_lens=[prefix] * batch, suffix_lens=[suffix] * batch,
                  image_hw=(image, image), thinking_ids=(vocab - 7, vocab - 6, vocab - 5), n_text=vocab - 8,
                  pad_id=vocab - 8, chunk_len=16, stage=1 if n else 0)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


def time_step(policy, batch, steps: int, device, max_warmup: int = 6):
    """Training steps (forward, backward, AdamW) on `batch`: warmed up until nothing new compiles, then `steps` timed.
    Returns (median and mean seconds, peak memory of the timed steps: (allocated, reserved) bytes, the forward's path).
    Reserved counts what the allocator holds, CUDA graphs' private pools included (their activations are not
    allocated between replays); the cache is emptied first, so that it is this mode's own."""
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5,
                            fused=device.type == "cuda")
    path = []

    def step():
        out = policy(batch)
        out["total_loss"].backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        path[:] = [out["path"]]

    warm_up(step, device, max_warmup)
    if device.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    times = time_calls(step, device, steps, max_warmup=0)
    peak = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if device.type == "cuda" else (0, 0)
    del opt
    return stats(times), peak, path[0]


def set_mode(policy, mode: str, device) -> bool:
    """Compile the policy as training does (`ecot.build.compile_model`: decoder layers, vision and DiT blocks, the
    latent column step) or leave all of it eager, so that every step of a run, stage 0 and latent alike, is built the
    same way. `graphed`: compiled, and the compiled regions' training calls replay CUDA graphs
    (`framework.qwenvl.cuda_graphs`). `auto`: compiled on CUDA. On a policy already compiled, switching between
    `compiled` and `graphed` only switches the graphs."""
    on = device.type == "cuda" if mode == "auto" else mode in ("compiled", "graphed")
    if on and any(m._compiled_call_impl is not None for m in policy.modules()):
        graph_regions(policy, mode == "graphed")
    else:
        compile_model(policy, on, cuda_graphs=mode == "graphed")
    return on


def check_exactness(policy, device, n: int):
    "Both KV implementations against the naive reference on `device`: tiny model in float64/float32, bench model as is."
    for dtype in (torch.float64, torch.float32):
        vlm = build_qwen3vl("tiny", ToyTokenizer(), seed=3, num_layers=3, deepstack_visual_indexes=(0, 1)).to(device, dtype)
        bb = QwenVLBackbone(vlm).eval()
        b = toy_batch(vlm, think_counts=(2, 0, 3, 1), prefix_lens=(3, 5, 4, 2), suffix_lens=(4, 2, 5, 3))
        b = {k: v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else
             v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        for impl, forward in (("columns", bb.forward), ("loop", lambda **kw: loop_latent_forward(bb, **kw))):
            with float64_rmsnorm():
                d = compare_latent_to_reference(bb, b, forward=forward)
            print(f"check tiny {dtype} {impl}: " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()), flush=True)
    bb = policy.backbone
    vlm = bb.vlm
    b = make_batch(vlm, n, 4, 120, 64, device)
    b["think_counts"] = torch.tensor([n, 0, n - 1, 1], device=device)  # ragged
    for impl, forward in (("columns", bb.forward), ("loop", lambda **kw: loop_latent_forward(bb, **kw))):
        d = compare_latent_to_reference(bb, b, forward=forward)
        print(f"check bench model {next(vlm.parameters()).dtype} {impl}: "
              + ", ".join(f"{k} {v:.1e}" for k, v in d.items()), flush=True)
    policy.zero_grad(set_to_none=True)


def profile_step(policy, batch, device, rows: int = 14):
    "Top CUDA kernels and host ops of one training step, and the number of kernel launches."
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        out = policy(batch)
        out["total_loss"].backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    policy.zero_grad(set_to_none=True)
    ka = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(ka.table(sort_by=sort, row_limit=rows, max_name_column_width=60))
    if device.type == "cuda":  # where the host's time goes: a step bound by launches and Python shows it here
        print(ka.table(sort_by="cpu_time_total", row_limit=rows, max_name_column_width=60))
        kernels = [e for e in prof.events()  # kernels, not ranges on the GPU's timeline (which repeat their time)
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
        busy = sum(e.device_time for e in kernels) / 1e3
        print(f"{len(kernels)} kernels, {busy:.1f} ms of kernel time in the profiled forward + backward "
              f"({wall:.1f} ms wall under the profiler)", flush=True)
        by_kind = {}
        for e in kernels:
            n, t = by_kind.get(kernel_kind(e.name), (0, 0.0))
            by_kind[kernel_kind(e.name)] = (n + 1, t + e.device_time / 1e3)
        print("kernel time by kind: " + ", ".join(f"{k} {t:.1f} ms ({n})" for k, (n, t) in
                                                  sorted(by_kind.items(), key=lambda kv: -kv[1][1])), flush=True)


KINDS = (("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
         ("attention", ("fmha", "flash", "attention", "efficient")),
         ("fused (inductor)", ("triton",)), ("memcpy/memset", ("memcpy", "memset")),
         ("reduction", ("reduce",)), ("elementwise", ("elementwise", "vectorized", "unrolled")))


def kernel_kind(name: str) -> str:
    "A kernel's kind by its name, for the profile's summary."
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def run_cases(policy, a, device, label: str) -> tuple:
    """The stage-0 step, then the latent step at each n (and the loop and naive references), as ratios to it.
    Returns (the stage-0 step's timing, a row per n)."""
    vlm = policy.backbone.vlm
    rows = []
    batch0 = make_batch(vlm, 0, a.batch, a.tokens, a.image, device)
    base_t, (base_m, _), _ = time_step(policy, batch0, a.steps, device)
    L = batch0["input_ids"].shape[1]
    print(f"stage 0: median {base_t['median'] * 1e3:.1f} ms/step, mean {base_t['mean'] * 1e3:.1f} ({base_t['n']} steps), "
          f"peak {base_m / 2**30:.2f} GiB, batch {a.batch} x {L} tokens ({a.preset}, {next(vlm.parameters()).dtype}, "
          f"{label})", flush=True)
    ratio = lambda t: {k: t[k] / base_t[k] for k in ("median", "mean")}
    kv_forward = policy.backbone.forward
    for n in a.n:
        batch = make_batch(vlm, n, a.batch, a.tokens, a.image, device)
        t, (m, _), path = time_step(policy, batch, a.steps, device)
        assert path == "latent", path
        row = {"n": n, "latent": ratio(t), "latent_mem": m / base_m if base_m else float("nan")}
        if not a.no_loop:
            policy.backbone.forward = types.MethodType(loop_latent_forward, policy.backbone)
            tl, (ml, _), _ = time_step(policy, batch, a.steps, device)
            policy.backbone.forward = kv_forward
            row.update(loop=ratio(tl), loop_mem=ml / base_m if base_m else float("nan"))
        if not a.no_naive:
            policy.backbone.forward = types.MethodType(reference_latent_forward, policy.backbone)
            tn, (mn, _), _ = time_step(policy, batch, a.steps, device)
            policy.backbone.forward = kv_forward
            row.update(naive=ratio(tn), naive_mem=mn / base_m if base_m else float("nan"))
        rows.append(row)
        print(row, flush=True)
    return base_t, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="2b", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=350)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per case, after warm-up until nothing compiles")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive full-recompute reference")
    ap.add_argument("--no-loop", action="store_true", help="skip the Coconut-style loop (ecot.reference.loop_latent_forward)")
    ap.add_argument("--mode", choices=("auto", "compiled", "graphed", "eager"), nargs="+", default=["auto"],
                    help="every case compiled as training compiles it (graphed: and its compiled regions and thinking "
                         "columns replayed from CUDA graphs), or every case eager (auto: compiled on CUDA); several: "
                         "one after the other in this process, each against its own stage-0 step")
    ap.add_argument("--check", action="store_true", help="first compare both KV paths with the reference on the device")
    ap.add_argument("--profile", action="store_true", help="profile one stage-0 step and one latent step at the largest n")
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy, _ = build_policy(a.preset, device, dtype)
    policy.train()
    vlm = policy.backbone.vlm
    print(environment(device), flush=True)
    tables = {}
    for mode in a.mode:
        compiled = set_mode(policy, mode, device)
        label = mode if mode != "auto" else "compiled" if compiled else "eager"
        if a.check:
            check_exactness(policy, device, max(a.n))
        tables[label] = run_cases(policy, a, device, label)
        if a.profile:  # the stage-0 step beside the latent one: where the latent step's extra time goes
            for n in (0, max(a.n)):
                print(f"profile, {'stage 0' if n == 0 else f'latent n = {n}'} ({label}):", flush=True)
                profile_step(policy, make_batch(vlm, n, a.batch, a.tokens, a.image, device), device)
    for label, (base_t, rows) in tables.items():
        print(f"\nstep time (median / mean of {a.steps} steps) and peak memory relative to the stage-0 step "
              f"({base_t['median'] * 1e3:.1f} / {base_t['mean'] * 1e3:.1f} ms): same model, batch and sequence, all "
              f"{label}, one run")
        cell = lambda r, k: f"{r[k]['median']:.2f}x / {r[k]['mean']:.2f}x" if k in r else "-"
        print(f"{'n':>3} {'latent (KV cache)':>18} {'coconut loop':>16} {'naive recompute':>16} {'latent mem':>11} "
              f"{'loop mem':>9} {'naive mem':>10}")
        nan = float("nan")
        for r in rows:
            print(f"{r['n']:>3} {cell(r, 'latent'):>18} {cell(r, 'loop'):>16} {cell(r, 'naive'):>16} "
                  f"{r['latent_mem']:>10.2f}x {r.get('loop_mem', nan):>8.2f}x {r.get('naive_mem', nan):>9.2f}x")
    print("targets: latent <= 1.3x at n = 8, peak memory <= 1.2x of stage 0")


if __name__ == "__main__":
    main()
