"End-of-substep (EOS) head end to end: buffer, labels from the embedded dataset, gradients in the policy, F1 after a short run."
import json
import time

import numpy as np
import pytest
import torch

from ecot.eos import EOSBufferManager, EOSHead, eos_metrics
from ecot.eos_labels import EOSLabeler
from ecot.reasoning import ReasoningLookup
from ecot.synthetic import embedded_dataset, episode_specs

# ---------------------------------------------------------------- buffer
def _rows(ids):
    "Hidden rows whose first column is an id, to see which rows the buffer keeps and samples."
    return torch.tensor(ids, dtype=torch.float32)[:, None].repeat(1, 3)


def test_buffer_is_fifo_per_class():
    buf = EOSBufferManager(capacity=4, sample_positive=2, sample_negative=3, min_positive=2, min_negative=3)
    buf.add(_rows(range(10)), torch.tensor([0, 1] * 5))
    assert buf.fill() == {"eos_buffer_neg": 4, "eos_buffer_pos": 4}
    assert [int(r[0]) for r in buf.buffers[0]] == [2, 4, 6, 8]  # 0 evicted first
    assert [int(r[0]) for r in buf.buffers[1]] == [3, 5, 7, 9]
    buf.add(_rows([100]), torch.tensor([1]))
    assert [int(r[0]) for r in buf.buffers[1]] == [5, 7, 9, 100]
    assert [int(r[0]) for r in buf.buffers[0]] == [2, 4, 6, 8]  # the other class is untouched


def test_buffer_samples_balanced_without_removal():
    buf = EOSBufferManager(capacity=10, sample_positive=3, sample_negative=5, min_positive=4, min_negative=5, seed=1)
    buf.add(_rows(range(20)), torch.tensor([0] * 17 + [1] * 3))
    assert not buf.ready()  # 3 positives < min_positive 4
    buf.add(_rows([50]), torch.tensor([1]))
    assert buf.ready()
    seen = {0: set(), 1: set()}
    for _ in range(50):
        x, y = buf.sample(torch.nn.Identity())
        assert y.tolist() == [1.0] * 3 + [0.0] * 5
        ids = x[:, 0].int().tolist()
        assert len(set(ids[:3])) == 3 and len(set(ids[3:])) == 5  # no row twice in one draw
        assert set(ids[:3]) <= {17, 18, 19, 50} and set(ids[3:]) <= set(range(7, 17))
        seen[1] |= set(ids[:3]); seen[0] |= set(ids[3:])
    assert buf.fill() == {"eos_buffer_neg": 10, "eos_buffer_pos": 4}  # sampling never removes
    assert seen == {1: {17, 18, 19, 50}, 0: set(range(7, 17))}  # every buffered row gets drawn


def test_buffer_path_gives_head_gradients():
    buf = EOSBufferManager(capacity=8, sample_positive=2, sample_negative=2, min_positive=2, min_negative=2)
    head = EOSHead(3, 8, 0.0)
    buf.add(torch.randn(6, 3, requires_grad=True) * 1, torch.tensor([0, 1, 0, 1, 0, 0]))
    assert all(not r.requires_grad for b in buf.buffers.values() for r in b)  # stored detached
    logits, y = buf.sample(head)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


# ---------------------------------------------------------------- labels
@pytest.fixture(scope="module")
def embedded():
    root = embedded_dataset()
    return root, ReasoningLookup.from_json(root / "embodied_features_bridge.json")


def test_labels_from_reasoning_match_the_generator(embedded):
    root, lookup = embedded
    raw = json.loads((root / "embodied_features_bridge.json").read_text())
    labeler = EOSLabeler(lookup)
    specs = episode_specs()  # the embedded default: 24 train, 4 val, seed 0
    n_gap = 0
    for spec in specs:
        lab = labeler.episode(spec.file_path, spec.episode_id)
        if not spec.has_reasoning:
            assert lab is None
            continue
        y, known, _ = lab
        assert len(y) == spec.n_steps
        truth = np.isin(np.arange(spec.n_steps), spec.substep_ends)
        meta = raw[spec.file_path][str(spec.episode_id)]["metadata"]
        assert meta["substep_ends"] == spec.substep_ends
        assert [e + 1 for e in spec.substep_ends[:-1]] == spec.boundaries
        np.testing.assert_array_equal(y[known], truth[known])  # never a wrong label
        if spec.missing_steps:
            n_gap += 1
            gap = spec.missing_steps[0]
            assert set(np.flatnonzero(~known)) <= {gap - 1, gap}
        else:
            assert known.all()
            assert np.flatnonzero(y).tolist() == meta["substep_ends"] == spec.substep_ends
    assert n_gap == 1


def test_dataset_samples_carry_the_labels(embedded):
    from ecot.dataset import ECoTRLDSDataset
    root, _ = embedded
    ends = {(s.file_path, s.episode_id): s.substep_ends for s in episode_specs() if s.split == "val" and s.has_reasoning}
    samples = list(ECoTRLDSDataset(root, image_size=(32, 32), future_action_window_size=3, train=False))
    assert samples
    for x in samples:
        key = (x["meta"]["file_path"], x["meta"]["episode_id"])
        steps = x["meta"]["step"] + np.arange(4)
        if key in ends:
            np.testing.assert_array_equal(x["eos_mask"], x["action_mask"])
            np.testing.assert_array_equal(x["eos"], np.isin(steps, ends[key]) & x["action_mask"])
        else:
            assert not x["eos_mask"].any() and not x["eos"].any()


# ---------------------------------------------------------------- in the policy, trained
def _eos_run(overrides):
    "A Run of the embedded default with the EOS head on."
    from ecot.run import Run
    from ecot.build import (build_collator, build_dataset, build_loader, build_policy, build_processor,
                            plain_statistics)
    from ecot.config import load_config
    from ecot.trainer import seed_everything
    cfg = load_config("tiny", ["framework.action_model.use_eos_classification=true"] + overrides)
    seed_everything(cfg.seed)
    ds = build_dataset(cfg)
    proc = build_processor(cfg, ds)
    col = build_collator(cfg, proc)
    stats = plain_statistics(ds.statistics)
    pol = build_policy(cfg, proc, stats)
    assert pol.eos is not None
    return Run(cfg, ds, build_loader(cfg, ds), proc, col, pol)


@torch.no_grad()
def eos_f1(policy, collator, samples, batch_size=16):
    "EOS metrics over all labelled steps of `samples`: head at the true chunk (as trained) and at the predicted one."
    was = policy.training
    policy.eval()
    true_l, pred_l, ys = [], [], []
    gen = torch.Generator().manual_seed(0)
    for i in range(0, len(samples), batch_size):
        b = policy._to_device(collator(samples[i:i + batch_size]))
        vlm = policy.run_backbone(b, with_labels=False)
        m = b["eos_mask"] & b["action_mask"]
        h = policy.eos_hidden(vlm.hidden_states, b["attention_mask"], b["actions"], b["states"])
        pred = policy.action_head.predict_action(vlm.hidden_states, b["attention_mask"], b["states"], generator=gen)
        hp = policy.eos_hidden(vlm.hidden_states, b["attention_mask"], pred, b["states"])
        true_l.append(policy.eos.head(h)[m]); pred_l.append(policy.eos.head(hp)[m]); ys.append(b["eos"][m])
    policy.train(was)
    y = torch.cat(ys)
    return eos_metrics(torch.cat(true_l), y), eos_metrics(torch.cat(pred_l), y), float(y.mean())


def test_policy_eos_head_gets_gradients_through_the_buffer():
    torch.manual_seed(0)
    run = _eos_run(["datasets.vla_data.per_device_batch_size=4", "framework.action_model.eos_min_positive=2",
                    "framework.action_model.eos_sample_positive=2", "framework.action_model.eos_min_negative=4",
                    "framework.action_model.eos_sample_negative=4"])
    pol, it = run.policy, iter(run.loader)
    for _ in range(10):
        out = pol(run.collator(next(it)))
        if out["eos_ready"]:
            break
        assert "eos_loss" not in out
    assert out["eos_ready"] == 1.0 and out["eos_buffer_pos"] >= 2 and out["eos_buffer_neg"] >= 4
    torch.testing.assert_close(out["total_loss"], out["action_loss"] + pol.config.vlm_loss_weight * out["vlm_loss"]
                               + pol.eos.config.weight * out["eos_loss"])
    pol.zero_grad()
    out["total_loss"].backward()
    for n, p in pol.eos.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_eos_f1_rises_in_a_short_run(tmp_path):
    """Train the tiny policy with the EOS head on the embedded default; F1 on the validation frames rises far above
    the all-negative baseline (F1 0) and the all-positive one (2p/(1+p)); the buffer is checkpointed (`EOSHook`)."""
    torch.set_num_threads(1)
    steps = 200
    # the head reads the action head at the true chunk (eos_input clean): the features it can learn from in a short run
    run = _eos_run([f"trainer.max_train_steps={steps}", "trainer.save_interval=100000", "trainer.logging_frequency=20",
                    "datasets.vla_data.per_device_batch_size=4", "framework.action_model.eos_input=clean"])
    from ecot.build import build_dataset
    val = list(build_dataset(run.cfg, train=False))
    before, _, pos_rate = eos_f1(run.policy, run.collator, val)
    t0 = time.time()
    run.trainer(tmp_path / "run", progress=False).train()  # the EOS hook checkpoints the buffer
    train_s = time.time() - t0
    after, after_pred, _ = eos_f1(run.policy, run.collator, val)
    all_positive = 2 * pos_rate / (1 + pos_rate)
    print(f"\nEOS F1 on {len(val)} val frames (positive rate {pos_rate:.3f}, all-positive F1 {all_positive:.3f}): "
          f"before {before['eos_f1']:.3f}, after {steps} steps {after['eos_f1']:.3f} "
          f"(precision {after['eos_precision']:.3f}, recall {after['eos_recall']:.3f}); at predicted chunks "
          f"{after_pred['eos_f1']:.3f}; training {train_s:.0f} s ({train_s / steps:.2f} s/step)")
    assert after["eos_f1"] > max(0.5, all_positive + 0.15, before["eos_f1"] + 0.2)
    recs = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "event" not in r]
    assert all(k in recs[-1] for k in ("eos_f1", "eos_loss", "eos_buffer_pos", "eos_buffer_neg", "eos_ready"))
    extras = torch.load(tmp_path / f"run/checkpoints/step_{steps:06d}/extras_0.pt", weights_only=False)
    assert {c: len(b) for c, b in extras["eos_buffer"]["buffers"].items()} == {0: 50, 1: 50}
