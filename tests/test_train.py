"The main job end to end on the embedded default: papermill runs, curriculum stage, resume exactness, SIGTERM, bad configs."
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ecot.run import build_run
from ecot.config import load_config, with_stage
from ecot.trainer import checkpoints, read_metrics

ROOT = Path(__file__).resolve().parent.parent
pm = pytest.importorskip("papermill")


def _train_records(run_dir):
    return [r for r in read_metrics(run_dir) if "event" not in r]


@pytest.mark.parametrize("stage", [0, 2])
def test_train_notebook_runs_the_requested_stage(stage, tmp_path):
    nb = json.loads((ROOT / "nbs/train.ipynb").read_text())
    assert any("parameters" in c["metadata"].get("tags", []) for c in nb["cells"]), "parameters tag lost"
    run_dir = tmp_path / "run"
    pm.execute_notebook(str(ROOT / "nbs/train.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(ROOT / "nbs"),
                        parameters=dict(stage=stage, max_steps=40, run_dir=str(run_dir), wandb_mode="offline"),
                        progress_bar=False)
    recs = _train_records(run_dir)
    assert recs and all(r["stage"] == stage for r in recs)  # -p stage really took effect
    first, last = recs[0], recs[-1]
    assert last["step"] == 40
    assert last["action_loss"] < 0.8 * first["action_loss"]
    assert last["vlm_loss"] < 0.9 * first["vlm_loss"]
    assert [p.name for p in checkpoints(run_dir / "checkpoints")][-1] == "step_000040"
    ckpt = run_dir / "checkpoints/step_000040"
    for f in ("state/.metadata", "scheduler.pt", "rng_0.pt", "extras_0.pt", "trainer_state.json", "config.yaml",
              "dataset_statistics.json"):
        assert (ckpt / f).exists(), f
    assert (run_dir / "figures/losses.pdf").exists() and (run_dir / "figures/losses.png").exists()
    assert (run_dir / "policy/model.safetensors").exists()
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"


@pytest.mark.parametrize("stage", [0, 2])
def test_e2e_notebook_passes(stage, tmp_path):
    out = tmp_path / "e2e.ipynb"
    pm.execute_notebook(str(ROOT / "nbs/e2e_test.ipynb"), str(out), cwd=str(ROOT / "nbs"),
                        parameters=dict(stage=stage, steps=10), progress_bar=False)
    text = out.read_text()
    assert f"checks passed at stage {stage}: ✅" in text
    assert ("latent" if stage else "single") in text


def _cfg(steps, stage=2):
    return with_stage(load_config("tiny", [f"trainer.max_train_steps={steps}", "trainer.logging_frequency=1",
                                           "trainer.save_interval=1000", "wandb_mode=disabled",
                                           "datasets.vla_data.per_device_batch_size=2"]), stage)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    full = build_run(_cfg(8)).trainer(tmp_path / "full", progress=False).train()
    build_run(_cfg(8)).trainer(tmp_path / "part", progress=False).train(stop_at=4)
    resumed = build_run(_cfg(8)).trainer(tmp_path / "part", progress=False).train(resume="latest")
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    for a, b in zip(full[4:], resumed):
        for k in ("action_loss", "vlm_loss", "total_loss", "grad_norm"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])


def test_sigterm_saves_a_loadable_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        from ecot.run import build_run
        from ecot.config import load_config, with_stage
        cfg = with_stage(load_config("tiny", ["trainer.max_train_steps=500", "trainer.logging_frequency=1",
                                              "wandb_mode=disabled", "datasets.vla_data.per_device_batch_size=2"]), 0)
        build_run(cfg).trainer({str(tmp_path / 'run')!r}, progress=False).train()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run/metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "interrupted at step" in out
    ckpt = checkpoints(tmp_path / "run/checkpoints")[-1]
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert 3 <= step < 500
    cfg = with_stage(load_config("tiny", ["trainer.max_train_steps=500", "wandb_mode=disabled",
                                          "datasets.vla_data.per_device_batch_size=2", "trainer.logging_frequency=1"]), 0)
    rec = build_run(cfg).trainer(tmp_path / "run", progress=False).train(resume="latest", stop_at=step + 1)
    assert [r["step"] for r in rec] == [step + 1]


@pytest.mark.parametrize("params,expected", [
    (dict(stage=9), "0..8"),
    (dict(overrides=["trainer.max_train_step=5"]), "did you mean 'trainer.max_train_steps'"),
    (dict(config="nonexistent"), "no config named 'nonexistent'"),
    (dict(overrides=["datasets.vla_data.ecot.data_root_dir=/no/data"]), "data_root_dir = '/no/data'"),
    (dict(batch_size=0), "per_device_batch_size = 0"),
])
def test_bad_configs_fail_before_heavy_work(params, expected, tmp_path):
    run_dir = tmp_path / "run"
    t = time.time()
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / "nbs/train.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(ROOT / "nbs"),
                            parameters=dict(params, run_dir=str(run_dir)), progress_bar=False)
    assert expected in str(e.value)
    assert not run_dir.exists()
    assert time.time() - t < 60


@pytest.mark.parametrize("extra", [[], ["--override", "trainer.craft.enable=true",
                                        "--override", "trainer.gradient_accumulation_steps=2"]], ids=["ddp", "ddp-craft"])
def test_two_process_training_with_torchrun(extra, tmp_path):
    "Two CPU processes (gloo) through the `ecot-train` command: rank 0 alone logs and saves, every rank's RNG is kept."
    import shutil
    exe = shutil.which("ecot-train")
    assert exe, "ecot-train is installed with the package (pip install -e .)"
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", exe, "--config", "tiny",
           "--stage", "2", "--max-steps", "3", "--batch-size", "2", "--wandb-mode", "disabled",
           "--run-dir", str(run_dir), "--override", "trainer.logging_frequency=1", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = run_dir / "checkpoints/step_000003"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert (ckpt / "rng_0.pt").exists() and (ckpt / "rng_1.pt").exists()
    recs = _train_records(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3]  # one line per step: rank 0 alone writes
    evals = [r for r in read_metrics(run_dir) if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [3]  # held-out evaluation at the last step, logged once
    assert evals[0]["eval/samples"] == 16  # the two ranks' shares of the 16 held-out frames, summed
    assert all(evals[0][k] is not None and evals[0][k] >= 0 for k in ("eval/mse", "eval/action_loss", "eval/mean_action_mse"))
    if extra:
        assert all("lambda" in r and "conflict_ratio" in r for r in recs)
