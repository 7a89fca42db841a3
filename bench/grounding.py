#!/usr/bin/env python3
"""Can the tiny VLM learn to find the instructed object in the image? A probe of grounding alone (CPU).

The policy's reasoning names where its target is ("the orange cube at the back right"); at inference the VLM must
write that from the image. This probe isolates that skill: each frame's reasoning is replaced by one sentence,
"the target is at the <front|back> <left|right>" (the target's place on the table at that frame, from the
simulation), and only the VLM trains, on its teacher-forced text loss. Held-out frames are scored with their own
images and with images shuffled across frames: a VLM that reads the image scores better with its own. The two
location words carry ln 4 = 1.39 nats of a ~15-token sentence, so a loss near 0.09 per token is chance.

    python bench/grounding.py                                          # the embedded world, 96 px (9 image tokens)
    python bench/grounding.py --override "datasets.vla_data.image_size=[192,192]"   # 36 image tokens
    python bench/grounding.py --n-train 160                            # fewer scenes
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import world_learnability as wl  # noqa: E402
from ecot import synthetic as syn  # noqa: E402
from ecot.build import build_dataset, run_config  # noqa: E402
from ecot.run import build_run  # noqa: E402


def where_sentences(samples, specs):
    "The samples with their reasoning replaced by the target's place on the table at that frame."
    out = []
    for s in samples:
        m = s["meta"]
        spec = specs[(m["file_path"], m["episode_id"])]
        target = next(o for o in spec.objects_at(m["step"]) if o.label == spec.target.label)
        out.append(dict(s, reasoning={"SUBTASK REASONING": f"the target is {syn.where_on_table(target)}"}))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=1000, help="training episodes (scenes) of the embedded world")
    ap.add_argument("--frame-stride", type=int, default=5, help="every k-th training frame")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=500, help="score the held-out frames every this many steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--val-frames", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--override", action="append", default=[], help="dotted config override (repeatable)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads or torch.get_num_threads())
    torch.manual_seed(0)
    root = syn.embedded_dataset(seed=0, n_train=a.n_train, n_val=20)
    cfg = run_config("tiny", 0, a.override + [f"datasets.vla_data.ecot.data_root_dir={root}", "wandb_mode=disabled"])
    specs = wl.spec_index(root)
    train = where_sentences(wl.frames_of(build_dataset(cfg, train=True))[::a.frame_stride], specs)
    val = where_sentences(wl.frames_of(build_dataset(cfg, train=False), a.val_frames), specs)
    shuffled = wl.permuted(val, "image", 1)
    run = build_run(cfg)
    policy, collator = run.policy, run.collator
    params = [p for p in policy.backbone.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=1e-8)
    print(f"{a.n_train} scenes, {len(train)} training frames, {len(val)} held-out; image "
          f"{cfg.datasets.vla_data.image_size}; VLM {sum(p.numel() for p in params) / 1e6:.2f} M parameters", flush=True)
    rng, t0 = np.random.default_rng(0), time.time()
    policy.train()
    for step in range(1, a.steps + 1):
        batch = policy._to_device(collator([train[i] for i in rng.integers(len(train), size=a.batch_size)]))
        loss = policy.run_backbone(batch, True).vlm_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        if step % a.every == 0:
            own, other = wl.text_loss(policy, collator, val, 50), wl.text_loss(policy, collator, shuffled, 50)
            policy.train()
            print(f"step {step} ({time.time() - t0:.0f}s): train {loss.item():.4f}; held-out {own:.4f} with its images, "
                  f"{other:.4f} with images shuffled (ratio {own / other:.2f})", flush=True)


if __name__ == "__main__":
    main()
