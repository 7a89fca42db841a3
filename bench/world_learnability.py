#!/usr/bin/env python3
"""Does a policy trained on the embedded world need what it sees and reads? A study on the held-out split.

Builds a run exactly as `ecot-train --config tiny` does (`ecot.build.run_config` + `ecot.run.build_run`: the embedded
synthetic dataset, the tiny Qwen3-VL, the processor trained on the reasoning corpus), trains it for `--steps`
optimizer steps in this process, then measures on every frame of the VALIDATION split:

  * the flow-matching action loss with fixed noise and times (the same draws for every variant), with the
    gold reasoning as the training forward sees it (teacher forcing), for the frames as they are and with
    the images / instructions / reasoning shuffled across frames; beside it the VLM's teacher-forced loss on the
    reasoning text of the frames that have reasoning (shuffled among them), which shows whether the VLM reads the
    image to write its reasoning;
  * the MSE of the inference path (`policy.act_on`, what `predict_action` runs: the policy decodes its own
    reasoning, then acts) against the true normalised action chunk, for the frames as they are and with images /
    instructions shuffled: of the sampled chunk (what the robot executes) and of the policy's expected chunk (one
    Euler step from t = 0, a point estimate: the one to hold against the baselines, which are point estimates);

against baselines fitted on the TRAIN split only: the mean training action chunk, zeros, a state-only
ridge regression and a state-only MLP (normalised state -> chunk), plus two privileged MLPs that are told
what the policy has to find out (state + the target's and destination's positions; state + the phase) —
the ceiling of what reading the image and instruction can add.

MSEs are over the valid steps of each chunk and all 7 dims, in the normalised action space the policy
predicts in (BOUNDS_Q99 for dims 0-5, the gripper as 0/1). Each ratio below is to a figure measured in the
same run.

    python bench/world_learnability.py --steps 400                      # the default embedded world
    python bench/world_learnability.py --steps 400 --seed 1 --out runs/world_seed1.json
    python bench/world_learnability.py --steps 0 --baselines-only      # data and baselines, no policy
    python bench/world_learnability.py --steps 2500 --every 500          # the VLM's text loss, own vs shuffled images, as it trains
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ecot import synthetic as syn  # noqa: E402
from ecot.build import build_dataset, run_config  # noqa: E402
from ecot.run import build_run  # noqa: E402


def log(*a):
    print(*a, flush=True)


# -- data --------------------------------------------------------------------------------------------------
def frames_of(dataset, limit=None):
    "Every frame of one pass over `dataset` (an ECoTRLDSDataset) as sample dicts."
    out = []
    for s in dataset.iter_shard(0, 1):
        out.append(s)
        if limit and len(out) >= limit:
            break
    return out


def spec_index(root):
    "(file_path, episode_id) -> EpisodeSpec of the synthetic dataset at `root` (from its manifest parameters)."
    m = syn.load_manifest(root)
    specs = syn.episode_specs(m["n_train"], m["n_val"], m["seed"])
    return {(s.file_path, s.episode_id): s for s in specs}


def arrays(samples):
    "states (N, 7), actions (N, chunk, 7), masks (N, chunk) float32 from samples."
    S = np.stack([s["state"] for s in samples]).astype(np.float32)
    A = np.stack([s["action"] for s in samples]).astype(np.float32)
    M = np.stack([s["action_mask"] for s in samples]).astype(np.float32)
    return S, A, M


def masked_mse(pred, A, M):
    "Mean over valid chunk steps and all dims of (pred - A)^2; pred (N, chunk, D) or broadcastable."
    err = ((pred - A) ** 2).mean(-1)
    return float((err * M).sum() / M.sum())


def privileged(samples, specs):
    """Per frame, read from the simulation: target xy, destination xy (m), the one-hot phase, and the scene without
    the instruction (xy of the graspable objects, then of the containers, each sorted by x; 3 graspable slots)."""
    feats = []
    for s in samples:
        m = s["meta"]
        spec = specs[(m["file_path"], m["episode_id"])]
        t = m["step"]
        ph = np.zeros(4, np.float32)
        ph[int(spec.phases[t])] = 1
        objs = spec.objects_at(t)
        grasp = sorted((o.x, o.y) for o in objs if o.kind in syn.GRASPABLE)
        grasp = grasp + [grasp[-1]] * (3 - len(grasp))
        cont = sorted((o.x, o.y) for o in objs if o.kind not in syn.GRASPABLE)
        feats.append(np.r_[spec.target.x, spec.target.y, spec.destination.x, spec.destination.y, ph,
                           np.ravel(grasp), np.ravel(cont)].astype(np.float32))
    return np.stack(feats)


# -- baselines ---------------------------------------------------------------------------------------------
def ridge(Xtr, Ytr, Wtr, Xte, lam=1e-3):
    "Ridge regression with a bias, rows weighted by `Wtr` (chunk steps that are valid)."
    X = np.c_[Xtr, np.ones(len(Xtr))]
    Xt = np.c_[Xte, np.ones(len(Xte))]
    Y = Ytr.reshape(len(Ytr), -1)
    w = np.repeat(Wtr, Ytr.shape[-1], axis=1)  # (N, chunk*D)
    # independent weighted least squares per output column (few columns: solve each)
    out = np.zeros((len(Xte), Y.shape[1]), np.float64)
    for j in range(Y.shape[1]):
        sw = w[:, j]
        A = (X * sw[:, None]).T @ X + lam * np.eye(X.shape[1])
        b = (X * sw[:, None]).T @ Y[:, j]
        out[:, j] = Xt @ np.linalg.solve(A, b)
    return out.reshape(len(Xte), *Ytr.shape[1:]).astype(np.float32)


def mlp(Xtr, Ytr, Mtr, Xte, steps=1500, hidden=256, seed=0):
    "A 2-hidden-layer MLP X -> chunk (masked MSE), Adam on minibatches of 256; standardised inputs."
    g = torch.Generator().manual_seed(seed)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    xt = torch.tensor((Xtr - mu) / sd)
    yt, mt = torch.tensor(Ytr), torch.tensor(Mtr)
    D = Ytr.shape[1] * Ytr.shape[2]
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(xt.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                              torch.nn.GELU(), torch.nn.Linear(hidden, D))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    bs = min(256, len(xt))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(len(xt), (bs,), generator=g)
        pred = net(xt[idx]).view(-1, *Ytr.shape[1:])
        loss = (((pred - yt[idx]) ** 2).mean(-1) * mt[idx]).sum() / mt[idx].sum()
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    with torch.no_grad():
        return net(torch.tensor((Xte - mu) / sd)).view(-1, *Ytr.shape[1:]).numpy()


# -- the policy --------------------------------------------------------------------------------------------
def permuted(samples, key, seed):
    "Copies of `samples` with `key` taken from another frame (a derangement-ish permutation, fixed seed)."
    rng = np.random.default_rng(seed)
    n = len(samples)
    perm = rng.permutation(n)
    # avoid self-pairs: rotate the fixed points
    fixed = np.nonzero(perm == np.arange(n))[0]
    if len(fixed) > 1:
        perm[fixed] = perm[np.roll(fixed, 1)]
    elif len(fixed) == 1 and n > 1:
        i = fixed[0]; j = (i + 1) % n
        perm[i], perm[j] = perm[j], perm[i]
    out = []
    for i, s in enumerate(samples):
        t = dict(s)
        t[key] = samples[perm[i]][key]
        out.append(t)
    return out


@torch.no_grad()
def teacher_forced(policy, collator, samples, draws=4, seed=1234, batch_size=32):
    "The flow-matching action loss with fixed noise/times per (frame, draw), teacher-forced: masked mean over valid steps."
    policy.eval()
    g = torch.Generator().manual_seed(seed)
    head = policy.action_head
    n = len(samples)
    noise = torch.randn(n, draws, head.chunk_len, head.action_dim, generator=g)
    beta = torch.distributions.Beta(torch.tensor(float(head.noise_beta_alpha)), torch.tensor(float(head.noise_beta_beta)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u = beta.sample((n, draws))
    tt = (head.noise_s - u) / head.noise_s
    tot, cnt = 0.0, 0.0
    for i in range(0, n, batch_size):
        batch = policy._to_device(collator(samples[i:i + batch_size]))
        vlm = policy.run_backbone(batch, with_labels=False)
        A = batch["actions"].float()
        M = batch["action_mask"].float()
        for d in range(draws):
            nz, t = noise[i:i + batch_size, d].to(A.device), tt[i:i + batch_size, d].to(A.device)
            x_t = (1 - t)[:, None, None] * nz + t[:, None, None] * A
            v = head.velocity(x_t, t, vlm.hidden_states, batch["attention_mask"], batch.get("states"))
            per = (v.float() - (A - nz)).pow(2).mean(-1)
            tot += float((per * M).sum()); cnt += float(M.sum())
    return tot / cnt


@torch.no_grad()
def text_loss(policy, collator, samples, batch_size=32):
    """The VLM's teacher-forced loss per token on the reasoning text, frame-weighted over `samples`: whether the VLM
    reads the image to write its reasoning shows against the same frames with images shuffled. Give it frames that
    have reasoning: a frame without any is scored on the tokens that say so, which no image or instruction predicts
    (the embedded world leaves 1 in 8 training and 1 in 4 validation episodes without reasoning, as ECoT's JSON does
    Bridge), so mixing them in swamps the comparison."""
    policy.eval()
    total = 0.0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        total += float(policy.run_backbone(policy._to_device(collator(chunk)), True).vlm_loss) * len(chunk)
    return total / len(samples)


@torch.no_grad()
def predict(policy, samples, batch_size=32, seed=0):
    """The inference path (`policy.act_on`, what `predict_action` runs after the observation transform) on dataset
    frames: sampled normalised chunks, the policy's expected chunks (one Euler step from t = 0), decoded reasoning."""
    policy.eval()
    sampled, expected, texts = [], [], []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        out = policy.act_on(policy.prompt_batch(chunk), seed=[seed * 100000 + i + k for k in range(len(chunk))],
                            expected=True)
        sampled.append(out["normalized_actions"])
        expected.append(out["expected_normalized_actions"])
        texts += out["reasoning"]
    return np.concatenate(sampled), np.concatenate(expected), texts


def text_loss_evaluator(evaluator, policy, collator, own, shuffled, every, evaluations):
    """A Trainer `evaluator` (it runs every `trainer.eval_interval` = `every` steps and at the last): the VLM's text loss
    on the reasoning of `own` (frames with reasoning) and of `shuffled` (the same, images shuffled among them), appended
    to `evaluations`, printed and returned (nothing when `own` is empty); at the last step also the run's own `evaluator`,
    which is all the Trainer ran before. The global torch RNG is forked around the scoring, so a run trains exactly as
    one that never scores."""
    def evaluate(trainer):
        out = {}
        if own:
            was_training = policy.training
            with torch.random.fork_rng(devices=[]):
                rec = {"step": trainer.step, "vlm_gold": text_loss(policy, collator, own),
                       "vlm_images_shuffled": text_loss(policy, collator, shuffled)}
            policy.train(was_training)
            rec["ratio"] = rec["vlm_gold"] / rec["vlm_images_shuffled"]
            evaluations.append(rec)
            log(f"every {every}: step {rec['step']:6d}   VLM loss on the reasoning: own images {rec['vlm_gold']:.4f}, "
                f"images shuffled {rec['vlm_images_shuffled']:.4f}, ratio {rec['ratio']:.3f}")
            out = {f"eval/reasoning_{k}": v for k, v in rec.items() if k != "step"}
        if trainer.step == trainer.cfg.trainer.max_train_steps and evaluator is not None:
            out.update(evaluator(trainer))
        return out
    return evaluate


def reasoning_accuracy(decoded, samples, tags=("SUBTASK", "MOVE")):
    "Share of frames whose decoded tag text equals the gold one, per tag."
    acc = {}
    for tag in tags:
        ok = [d.get(tag, "").strip().lower() == str(s["reasoning"].get(tag, "")).strip().lower()
              for d, s in zip(decoded, samples) if tag in s["reasoning"]]
        acc[tag] = float(np.mean(ok)) if ok else float("nan")
    return acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps of the tiny policy")
    ap.add_argument("--seed", type=int, default=42, help="run seed (model init, data order, noise)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the tiny config's")
    ap.add_argument("--lr", type=float, default=None, help="default: the tiny config's")
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--override", action="append", default=[], help="dotted config override (repeatable)")
    ap.add_argument("--n-train", type=int, default=None, help="episodes (default: the embedded default's)")
    ap.add_argument("--n-val", type=int, default=None)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--val-frames", type=int, default=None, help="cap on validation frames (default: all)")
    ap.add_argument("--baselines-only", action="store_true", help="data and baselines, no policy")
    ap.add_argument("--no-predict", action="store_true", help="skip predict_action (decoding) metrics")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--every", type=int, default=None,
                    help="while training, every this many optimizer steps and at the end: the VLM's text loss on the "
                         "held-out reasoning with own vs shuffled images (the figures of the end do not change)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads or max(1, os.cpu_count() or 1))

    t0 = time.time()
    import inspect
    defaults = inspect.signature(syn.embedded_dataset).parameters
    n_train = a.n_train or defaults["n_train"].default
    n_val = a.n_val or defaults["n_val"].default
    root = syn.embedded_dataset(seed=a.data_seed, n_train=n_train, n_val=n_val)
    gen_s = time.time() - t0
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    log(f"data: {root} ({n_train} train + {n_val} val episodes, generator v{syn.GENERATOR_VERSION}), "
        f"{size / 1e6:.1f} MB, ready in {gen_s:.1f}s")

    ov = list(a.override) + [f"datasets.vla_data.ecot.data_root_dir={root}", "wandb_mode=disabled",
                             "trainer.save_interval=100000", f"trainer.eval_interval={a.every or 100000}",
                             f"trainer.logging_frequency={max(1, a.steps // 10) if a.steps else 1}"]
    params = dict(max_steps=max(1, a.steps), seed=a.seed)
    if a.batch_size:
        params["batch_size"] = a.batch_size
    if a.lr:
        params["learning_rate"] = a.lr
    cfg = run_config("tiny", a.stage, ov, **params)
    specs = spec_index(root)

    # validation frames (every frame of the val split, in order) and the train split's frames for the baselines
    val_ds = build_dataset(cfg, train=False)
    val = frames_of(val_ds, a.val_frames)
    train_ds = build_dataset(cfg, train=True)
    train = frames_of(train_ds)
    Str, Atr, Mtr = arrays(train)
    Sva, Ava, Mva = arrays(val)
    log(f"frames: {len(train)} train, {len(val)} val; chunk {Atr.shape[1]}x{Atr.shape[2]}")

    res = {"steps": a.steps, "seed": a.seed, "n_train": n_train, "n_val": n_val, "generator": syn.GENERATOR_VERSION,
           "train_frames": len(train), "val_frames": len(val), "dataset_mb": size / 1e6, "data_ready_s": gen_s}
    mean_chunk = (Atr * Mtr[..., None]).sum(0) / np.maximum(Mtr.sum(0), 1)[:, None]
    res["mse_mean_action"] = masked_mse(mean_chunk[None], Ava, Mva)
    res["mse_zero"] = masked_mse(np.zeros_like(Ava), Ava, Mva)
    res["mse_state_ridge"] = masked_mse(ridge(Str, Atr, Mtr, Sva), Ava, Mva)
    t1 = time.time()
    res["mse_state_mlp"] = masked_mse(mlp(Str, Atr, Mtr, Sva), Ava, Mva)
    Ptr, Pva = privileged(train, specs), privileged(val, specs)
    # privileged: what the image and instruction could tell a policy (upper bounds of reading them)
    res["mse_oracle_state_phase_mlp"] = masked_mse(mlp(np.c_[Str, Ptr[:, 4:8]], Atr, Mtr, np.c_[Sva, Pva[:, 4:8]]), Ava, Mva)
    res["mse_oracle_state_scene_no_instruction_mlp"] = masked_mse(
        mlp(np.c_[Str, Ptr[:, 4:]], Atr, Mtr, np.c_[Sva, Pva[:, 4:]]), Ava, Mva)
    res["mse_oracle_state_target_destination_mlp"] = masked_mse(mlp(np.c_[Str, Ptr[:, :8]], Atr, Mtr, np.c_[Sva, Pva[:, :8]]), Ava, Mva)
    log(f"baselines in {time.time() - t1:.0f}s")
    for k in [k for k in res if k.startswith("mse_")]:
        log(f"  {k:40s} {res[k]:.4f}")

    if not a.baselines_only:
        run = build_run(cfg)
        policy, collator = run.policy, run.collator
        shuffles = {"gold": None, "images_shuffled": ("image", 1), "instruction_shuffled": ("lang", 2),
                    "reasoning_shuffled": ("reasoning", 3)}
        tagged = [s for s in val if s["reasoning"]]  # the VLM's text loss: frames with reasoning, shuffled among them
        res["vlm_frames"] = len(tagged)
        with tempfile.TemporaryDirectory() as d:
            t2 = time.time()
            trainer = run.trainer(d, progress=False)
            if a.every:
                res["every"] = []
                trainer.evaluator = text_loss_evaluator(trainer.evaluator, policy, collator, tagged,
                                                        permuted(tagged, *shuffles["images_shuffled"]), a.every,
                                                        res["every"])
            hist = trainer.train()
            res["train_s"] = time.time() - t2
        res["train_action_loss_first_last"] = [hist[0]["action_loss"], hist[-1]["action_loss"]]
        log(f"trained {a.steps} steps in {res['train_s']:.0f}s: action loss {hist[0]['action_loss']:.3f} -> "
            f"{hist[-1]['action_loss']:.3f}")
        variants = {}
        for name, how in shuffles.items():
            variants[name] = permuted(val, *how) if how else val
            res[f"flow_{name}"] = teacher_forced(policy, collator, variants[name])
            res[f"vlm_{name}"] = text_loss(policy, collator, permuted(tagged, *how) if how else tagged) if tagged else None
            text = "" if res[f"vlm_{name}"] is None else f"   VLM loss on the reasoning {res[f'vlm_{name}']:.4f}"
            log(f"  flow loss {name:24s} {res[f'flow_{name}']:.4f}{text}")
        if not a.no_predict:
            for name in ("gold", "images_shuffled", "instruction_shuffled"):
                t3 = time.time()
                pred, mean, dec = predict(policy, variants[name])
                res[f"mse_policy_{name}"] = masked_mse(pred, Ava, Mva)
                res[f"mse_policy_expected_{name}"] = masked_mse(mean, Ava, Mva)
                if name == "gold":
                    res["reasoning_accuracy"] = reasoning_accuracy(dec, val)
                    res["decoded_example"] = dec[len(dec) // 2]
                log(f"  predict_action {name:22s} MSE sampled {res[f'mse_policy_{name}']:.4f}, expected "
                    f"{res[f'mse_policy_expected_{name}']:.4f} ({time.time() - t3:.0f}s)")
        p = res.get("mse_policy_expected_gold")  # a point estimate, held against point estimates
        if p is not None:
            for b in ("mse_mean_action", "mse_zero", "mse_state_ridge", "mse_state_mlp",
                      "mse_policy_expected_images_shuffled", "mse_policy_expected_instruction_shuffled"):
                res[f"ratio_policy_expected_to_{b[4:]}"] = p / res[b]
        res["ratio_flow_gold_to_images_shuffled"] = res["flow_gold"] / res["flow_images_shuffled"]

    res["total_s"] = time.time() - t0
    log(json.dumps({k: v for k, v in res.items() if k.startswith("ratio")}, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1, default=float))
    return res


if __name__ == "__main__":
    main()
