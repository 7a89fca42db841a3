"CRaFT in the training loop: ranks agree on λ, resume keeps θ0 and λ, every parameter is updated, retention holds."
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ecot.run import build_run
from ecot.config import load_config, with_stage
from ecot.craft import CRaFT, CRaFTHook, DualVariable, FrozenReference, PolicyRetentionFeatures, retention_loss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on every rank
    net = torch.nn.Linear(5, 3)
    craft = CRaFT(net.parameters(), DualVariable(lr=0.5, epsilon=0.05))
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(3):
        x = torch.randn(8, 5, generator=g)
        craft.backward(net(x).pow(2).mean(), (net(x) - 1).pow(2).mean())
        craft.apply()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.1 * p.grad
    out[rank] = (craft.dual.lam, [p.detach().clone() for p in net.parameters()])
    dist.destroy_process_group()


def test_two_gloo_ranks_hold_the_same_lambda_and_weights():
    out = mp.Manager().dict()
    mp.spawn(_rank_main, args=(2, _free_port(), out), nprocs=2, join=True)
    (lam0, w0), (lam1, w1) = out[0], out[1]
    assert lam0 > 0 and lam0 == lam1
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))


def _cfg(steps, craft="enable", eps=0.1):
    return with_stage(load_config("tiny", [f"trainer.max_train_steps={steps}", "trainer.logging_frequency=1",
                                           "wandb_mode=disabled", "datasets.vla_data.per_device_batch_size=2",
                                           f"trainer.craft.{craft}=true", f"trainer.craft.epsilon={eps}",
                                           "trainer.craft.dual_lr=1.0"]), 0)


def test_every_trainable_parameter_gets_the_craft_update():
    run = build_run(_cfg(1))
    policy, batch = run.policy, run.collator(next(iter(run.loader)))
    feats = PolicyRetentionFeatures(policy)
    ref = FrozenReference(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1e-2 * torch.randn_like(p))  # move away from θ0 so the retention gradient is non-zero
    craft = CRaFT(policy.parameters(), DualVariable(init=0.5))
    l_ret = retention_loss(feats(batch), ref(feats, batch))
    assert l_ret > 0
    craft.backward(policy(batch)["total_loss"], l_ret)
    stats = craft.apply()
    params = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert any(n.startswith("action_head.") and p.grad.abs().sum() > 0 for n, p in params)
    assert 0 <= stats["conflict_ratio"] <= 1 and -1 <= stats["grad_cosine"] <= 1


def test_resume_restores_lambda_and_theta0(tmp_path):
    full = build_run(_cfg(6)).trainer(tmp_path / "full", progress=False)
    full_hist = full.train()
    build_run(_cfg(6)).trainer(tmp_path / "part", progress=False).train(stop_at=3)
    run = build_run(_cfg(6))
    theta0_fresh = {k: v.clone() for k, v in
                    FrozenReference(run.policy).theta0.items()}  # what a fresh start would snapshot
    resumed = run.trainer(tmp_path / "part", progress=False)
    hist = resumed.train(resume="latest")
    resumed, full = resumed.hook(CRaFTHook), full.hook(CRaFTHook)  # CRaFT's part in the loop: a trainer hook
    assert resumed.craft.dual.lam == full.craft.dual.lam and full.craft.dual.lam > 0
    for k, v in full.theta0.theta0.items():
        assert torch.equal(resumed.theta0.theta0[k], v)  # the original θ0, not the resumed weights
        assert torch.equal(theta0_fresh[k], v)  # same seed: the original snapshot is the initial weights
    for a, b in zip(full_hist[3:], hist):
        assert a["total_loss"] == b["total_loss"] and a["lambda"] == b["lambda"]


def test_retention_loss_stays_under_epsilon_more_often_with_craft(tmp_path):
    steps, eps = 30, 0.1
    shares = {}
    for mode in ("measure_only", "enable"):
        hist = build_run(_cfg(steps, mode, eps)).trainer(tmp_path / mode, progress=False).train()
        rets = [r["retention_loss"] for r in hist[5:]]  # after the first steps, when the model has moved
        shares[mode] = sum(r <= eps for r in rets) / len(rets)
    print("share of steps with L_ret <= eps:", shares)
    assert shares["enable"] > shares["measure_only"] + 0.2
