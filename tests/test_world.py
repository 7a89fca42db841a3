"""A policy trained on the embedded world beats the baselines and needs the image (#16, item 1).

The world of `ecot.synthetic` at the scale where the tiny policy learns it on a CPU: 1,000 training scenes at 192 px,
the whole dataset shuffled (the tiny config's default), no reasoning, 8,000 steps of batch 16 with the config's seed
on one thread: 21 minutes on a 2-core machine, the longest test here. Training on the CPU is deterministic, so a
machine of the same kind reproduces the figures of `bench/README.md` (*World learnability*, 8,000 steps, seed 42).
Scored by `bench/world_learnability.py` on 200 frames of the validation split through the inference path (the
policy's expected chunk), against baselines fitted on the training split only."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_policy_beats_the_baselines_and_reads_the_image(tmp_path):
    out = tmp_path / "world.json"
    cmd = [sys.executable, "bench/world_learnability.py", "--n-train", "1000", "--n-val", "20", "--val-frames", "200",
           "--steps", "8000", "--batch-size", "16", "--threads", "1", "--out", str(out),
           "--override", "datasets.vla_data.image_size=[192,192]",
           "--override", "datasets.vla_data.ecot.reasoning_dropout_prob=1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    policy = res["mse_policy_expected_gold"]
    for baseline in ("mse_mean_action", "mse_zero", "mse_state_ridge", "mse_state_mlp"):
        assert policy < res[baseline], f"held-out MSE {policy:.4f} is not below {baseline} {res[baseline]:.4f}"
    # the image carries what the state does not: another frame's image makes the actions worse
    shuffled = res["mse_policy_expected_images_shuffled"]
    assert shuffled > 1.05 * policy, f"images shuffled: MSE {shuffled:.4f} against {policy:.4f} with the frames' own"
