"""Inference speed through `predict_action` (batch 1, one GPU): ms and Hz per action chunk at stage 0 (full text
reasoning), stage 2 and stage 8 (all tags latent), ms per decoded token against the weight-read limit (bf16 weight
bytes read per token ÷ copy bandwidth measured in the same run), with CUDA graphs and, as the same-run baseline,
eagerly (no graphs, no compiled column step).

    python bench/inference.py                                  # 2B-shaped Qwen3-VL (random weights), bf16, GPU
    python bench/inference.py --config tiny --device cpu --tokens 16 --steps 3 --no-eager   # smoke run

A random-weight model never writes `<|im_end|>`, so every text phase runs to `--tokens`: the decoded-token count is
fixed and printed. ms per token = (stage-0 chunk with T tokens − stage-0 chunk without text) / T.
"""
import argparse
import statistics
from dataclasses import replace

import numpy as np
import torch

from ecot.build import build_dataset, build_policy, build_processor, plain_statistics, run_config
from timing import dynamo_graphs, environment, stats, time_calls


def copy_bandwidth(device, gib: float = 2.0) -> float:
    "Bytes per second of a device-to-device copy (read + write), median of 10."
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(int(gib * 2 ** 30) // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    ts = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        torch.cuda.synchronize(device)
        if i >= 3:
            ts.append(start.elapsed_time(end) / 1e3)
    del x, y
    torch.cuda.empty_cache()  # leave the allocator as it was for the calls timed next
    return 2 * gib * 2 ** 30 / statistics.median(ts)


def profile(policy, spec, frame, lang, state, device, steps: int):
    "Median wall time per phase of a stage-8 and a stage-0 (no text) call, each phase synchronised (`Reasoner.timed`)."
    t = time_calls(lambda: policy.observation_batch([(frame, lang, state)]), device, steps)
    print(f"  observation -> prompt batch (processor, positions, CPU): {statistics.median(t) * 1e3:.1f} ms")
    for stage, reasoning in ((8, True), (0, False)):
        policy.acting = replace(spec, stage=stage, max_new_tokens=0)
        call = lambda: policy.predict_action(frame, lang, state, with_reasoning=reasoning)
        time_calls(call, device, 2)
        policy.reasoner.timed = True
        phases = [call()["timings"] for _ in range(steps)]
        policy.reasoner.timed = False
        print(f"  stage {stage}: " + ", ".join(f"{k} {statistics.median(p[k] for p in phases):.1f} ms" for k in phases[0]))


def trace(policy, spec, frame, lang, state, device, path):
    "A torch.profiler trace of 3 stage-8 calls (CPU ops and GPU kernels), and the CPU ops that took longest."
    from torch.profiler import ProfilerActivity, profile
    policy.acting = replace(spec, stage=8, max_new_tokens=0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            policy.predict_action(frame, lang, state)
            sync(device)
    prof.export_chrome_trace(path)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="qwen3vl2b_random")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=256, help="text tokens decoded at stage 0 (a full ECoT reasoning)")
    ap.add_argument("--stage2-tokens", type=int, default=160, help="text tokens at stage 2 (6 tags as text)")
    ap.add_argument("--steps", type=int, default=10, help="timed calls per case")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager baseline")
    ap.add_argument("--profile", action="store_true", help="also print where a call's time goes, phase by phase")
    ap.add_argument("--trace", default=None, help="write a torch.profiler trace (.json.gz) of 3 stage-8 calls here")
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    cfg = run_config(a.config, 0, ["datasets.vla_data.ecot.image_aug=false"])
    ds = build_dataset(cfg)
    proc = build_processor(cfg, ds)
    policy = build_policy(cfg, proc, plain_statistics(ds.statistics)).to(device=device, dtype=dtype).eval()
    sample = next(iter(ds))
    frame, lang = np.asarray(sample["image"][0]), sample["lang"]
    state = np.asarray(next(iter(policy.dataset_statistics.values()))["state"]["mean"])
    spec = replace(policy.acting, reasoning_dropout_prob=0.1)  # lets the no-text case run (the bench's baseline)

    lm = policy.backbone.language_model
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.layers.parameters()) + \
        sum(p.numel() * p.element_size() for p in policy.backbone.vlm.lm_head.parameters())
    bw = copy_bandwidth(device)
    print(environment(device))
    print(f"config {a.config}: {sum(p.numel() for p in policy.parameters()) / 1e9:.2f} B parameters, {dtype}, "
          f"image {tuple(cfg.datasets.vla_data.image_size)}, chunk {policy.action_head.chunk_len}, "
          f"{policy.action_head.num_inference_steps} denoising steps, {replace(spec, stage=2).n_thinking} thinking columns at stage 2 "
          f"({replace(spec, stage=8).n_thinking} at stage 8)")
    limit = weight_bytes / bw if device.type == "cuda" else float("nan")
    print(f"weights read per decoded token {weight_bytes / 2 ** 30:.2f} GiB; copy bandwidth {bw / 1e12:.2f} TB/s "
          f"-> weight-read limit {limit * 1e3:.2f} ms/token")

    cases = [("stage 0, no text (prompt -> action head)", 0, False, 0),
             ("stage 8, all tags latent", 8, True, 0),
             (f"stage 2, {a.stage2_tokens} text tokens", 2, True, a.stage2_tokens),
             (f"stage 0, {a.tokens} text tokens", 0, True, a.tokens)]
    modes = [("graphs", True)] + ([] if a.no_eager else [("eager", False)])
    results, columns = {}, {}
    for mode, on in modes:
        policy.cuda_graphs = on
        policy.backbone.compile_columns = None if on else False
        torch._dynamo.reset()
        calls = {}
        with torch.compiler.set_stance("default" if on else "force_eager"):  # eager: nothing compiled, DiT included
            for name, stage, reasoning, tokens in cases:  # warm every case up (graphs captured, nothing left to compile)
                policy.acting = replace(spec, stage=stage, max_new_tokens=tokens)
                calls[name] = lambda reasoning=reasoning: policy.predict_action(frame, lang, state, with_reasoning=reasoning)
                columns[name] = calls[name]()["n_columns"]
                time_calls(calls[name], device, 0)
            # the timed calls in rounds, every case once a round, so a slow spell of the machine hits all cases alike
            for name, *_ in cases:
                results[mode, name] = []
            for _ in range(a.steps):
                for name, stage, reasoning, tokens in cases:
                    policy.acting = replace(spec, stage=stage, max_new_tokens=tokens)
                    results[mode, name] += time_calls(calls[name], device, 1, max_warmup=0)
        for name, *_ in cases:
            t = results[mode, name]
            s = stats(t)
            med, mean = s["median"], s["mean"]
            print(f"[{mode:6s}] {name:42s} median {med * 1e3:8.1f} ms  mean {mean * 1e3:8.1f} ms  "
                  f"{1 / med:6.2f} Hz  ({columns[name]} generated columns, total of {len(t)} calls "
                  f"{sum(t):.2f} s)", flush=True)
        if a.profile:
            profile(policy, spec, frame, lang, state, device, a.steps)
        if a.trace and on:
            trace(policy, spec, frame, lang, state, device, a.trace)
        full, none = cases[3][0], cases[0][0]
        n_tokens = columns[full] - columns[none]  # text columns decoded (the closing <|im_end|> is in both)
        per_token = (statistics.median(results[mode, full]) - statistics.median(results[mode, none])) / n_tokens
        print(f"[{mode:6s}] decoding: {per_token * 1e3:.2f} ms per token ({per_token / limit:.2f}x the weight-read "
              f"limit) over {n_tokens} tokens; stage 0 with its text -> {1 / statistics.median(results[mode, full]):.2f} Hz")
    if len(modes) == 2:
        for name, *_ in cases:
            g, e = statistics.median(results["graphs", name]), statistics.median(results["eager", name])
            print(f"eager / graphs  {name:42s} {e / g:6.2f}x")
    print(f"compiled graphs: {dynamo_graphs()}")


if __name__ == "__main__":
    main()
