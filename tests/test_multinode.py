"""Several processes and machines: two torchrun 'nodes' on one machine (c10d rendezvous, gloo) train and resume, with DDP
and with FSDP; the SLURM and accelerate launch files."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml

from ecot.trainer import checkpoint_tensors, checkpoints, read_metrics

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "scripts/slurm/ecot_train.sbatch"
MULTI_NODE_YAML = ROOT / "configs/accelerate/multi_node.yaml"
FSDP_YAML = ROOT / "configs/accelerate/fsdp.yaml"
KEYS = ("action_loss", "vlm_loss", "total_loss", "grad_norm")


def _ecot_train() -> str:
    "The `ecot-train` entry point of this interpreter (a pyenv/conda shim on PATH is a shell script torchrun cannot run)."
    exe = Path(sys.executable).with_name("ecot-train")
    found = str(exe) if exe.exists() else shutil.which("ecot-train")
    assert found, "ecot-train is installed with the package (pip install -e .)"
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_cmd(run_dir: Path, max_steps: int, *extra) -> list[str]:
    "`ecot-train` of the tiny config at stage 2, batch 2, logging every step and saving every 3."
    return [_ecot_train(), "--config", "tiny", "--stage", "2", "--max-steps", str(max_steps), "--batch-size", "2",
            "--wandb-mode", "disabled", "--run-dir", str(run_dir),
            # constant LR without warmup: a resume may raise max_train_steps (a cosine schedule refuses that)
            "--override", "trainer.lr_scheduler_type=constant", "--override", "trainer.num_warmup_steps=0",
            "--override", "trainer.logging_frequency=1", "--override", "trainer.save_interval=3",
            "--override", "trainer.eval_samples=0", *extra]


def _launch_two_nodes(run_dir: Path, max_steps: int, *extra, timeout: float = 300, env: Optional[dict] = None) -> str:
    """Start two `torchrun --nnodes 2 --nproc_per_node 1` agents at once, meeting at a c10d rendezvous on localhost
    (the rendezvous assigns the node ranks), as two machines would; both must exit 0. Returns their output."""
    port, rdzv_id = _free_port(), f"ecot-test-{uuid.uuid4().hex[:12]}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", rdzv_id,
           "--rdzv_conf", "join_timeout=120", "--max_restarts", "0", *_train_cmd(run_dir, max_steps, *extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               **(env or {}))
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              start_new_session=True) for _ in range(2)]
    outs, deadline = [], time.time() + timeout
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
    finally:
        for p in procs:  # a node that failed leaves the other waiting on a collective: end both, and their workers
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    out = "\n".join(f"--- node process {i} ---\n{o[-4000:]}" for i, o in enumerate(outs))
    assert [p.returncode for p in procs] == [0, 0], out
    return "\n".join(outs)


def _train_records(run_dir):
    return [r for r in read_metrics(run_dir) if "event" not in r]


def test_two_nodes_train_and_resume_as_a_straight_run(tmp_path):
    "Two 'machines' (torchrun agents, c10d rendezvous): 3 steps, then --resume latest to 6, equal to a straight 6-step run."
    straight, part = tmp_path / "straight", tmp_path / "part"
    out = _launch_two_nodes(straight, 6)
    assert "x 2 processes" in out  # the banner (printed by global rank 0) records the world size
    first = _launch_two_nodes(part, 3)
    resumed = _launch_two_nodes(part, 6, "--resume", "latest")
    assert "resumed from" in resumed and "step_000003" in resumed, resumed[-3000:]

    for run_dir in (straight, part):
        names = [p.name for p in checkpoints(run_dir / "checkpoints")]
        assert names == ["step_000003", "step_000006"], names  # complete checkpoints (completion marker written)
        for ckpt in checkpoints(run_dir / "checkpoints"):
            assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
            assert (ckpt / "rng_0.pt").exists() and (ckpt / "rng_1.pt").exists()  # one RNG state per rank
        assert (run_dir / "policy/model.safetensors").exists()
    assert "x 2 processes" in first

    a, b = _train_records(straight), _train_records(part)
    assert [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]  # each step once: global rank 0 alone writes
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # the resume appended 4..6 to the first launch's 1..3
    for x, y in zip(a, b):  # bit-exact, as the single-machine resume test (tests/test_train.py) asserts
        for k in KEYS:
            assert x[k] == y[k], (x["step"], k, x[k], y[k])


def _fsdp_env() -> dict:
    """What `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets for each process (`ACCELERATE_USE_FSDP`,
    and `FSDP_*` from `fsdp_config`), so torchrun runs the shipped FSDP config."""
    env = {"ACCELERATE_USE_FSDP": "true"}
    for k, v in yaml.safe_load(FSDP_YAML.read_text())["fsdp_config"].items():
        name = "FSDP_" + k.removeprefix("fsdp_").upper().replace("TRANSFORMER_LAYER_CLS", "TRANSFORMER_CLS")
        env[name] = str(v).lower() if isinstance(v, bool) else str(v)
    return env


def test_fsdp_saves_shards_and_resumes_as_a_straight_run(tmp_path):
    """FSDP2 on two 'machines' (gloo), at a latent stage, with the EOS head and CRaFT: each rank writes its own shard of
    weights, optimizer state and θ0 and its own EOS buffer; λ is the same on both; 3 steps resumed to 6 equal a straight
    6-step run bit for bit, and train as DDP does; the policy is written whole; a checkpoint of two sharded ranks
    resumes in one process."""
    eos = ("--override", "framework.action_model.use_eos_classification=true", "--override", "trainer.craft.enable=true",
           "--override", "trainer.craft.epsilon=0.0")  # ε = 0: λ rises from the first step
    straight, part, ddp = tmp_path / "straight", tmp_path / "part", tmp_path / "ddp"
    fsdp = dict(env=_fsdp_env())
    out = _launch_two_nodes(straight, 6, *eos, **fsdp)
    assert "FSDP" in out  # the banner says the weights are sharded
    _launch_two_nodes(part, 3, *eos, **fsdp)
    resumed = _launch_two_nodes(part, 6, "--resume", "latest", *eos, **fsdp)
    assert "resumed from" in resumed and "step_000003" in resumed, resumed[-3000:]
    a, b = _train_records(straight), _train_records(part)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        for k in KEYS + ("eos_loss", "eos_buffer_pos", "eos_buffer_neg", "retention_loss", "lambda", "grad_cosine"):
            assert x.get(k) == y.get(k), (x["step"], k, x.get(k), y.get(k))
    assert any("checkpoint_s" in r for r in a)  # what a save costs is logged

    ckpt = straight / "checkpoints/step_000006"
    shards = sorted((ckpt / "state").glob("*.distcp"))
    assert [f.name for f in shards] == ["__0_0.distcp", "__1_0.distcp"]
    sizes = [f.stat().st_size for f in shards]
    assert max(sizes) < 0.7 * sum(sizes), sizes  # each rank wrote its half: nothing was gathered on one rank
    buffers = [torch.load(ckpt / f"extras_{r}.pt", weights_only=False)["eos_buffer"]["buffers"] for r in (0, 1)]
    assert buffers[0][0] and buffers[1][0]
    assert not torch.equal(torch.stack(list(buffers[0][0])[:1]), torch.stack(list(buffers[1][0])[:1]))  # own frames
    lams = [torch.load(ckpt / f"extras_{r}.pt", weights_only=False)["craft"]["dual"]["lam"] for r in (0, 1)]
    assert lams[0] == lams[1] > 0, lams  # every rank steps λ with the rank-averaged retention loss
    assert all(r["retention_loss"] > 0 for r in a[1:])  # θ0's features differ from the moved model's

    from ecot.policy import ECoTPolicy
    whole, saved = checkpoint_tensors(ckpt)["model"], ECoTPolicy.from_pretrained(straight / "policy").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in whole.items()), "the policy holds the checkpoint's whole weights"

    _launch_two_nodes(ddp, 6, *eos)  # the same run with DDP: the same first step, then losses within float noise
    c = _train_records(ddp)
    assert abs(a[0]["action_loss"] - c[0]["action_loss"]) < 1e-5, (a[0], c[0])
    for k in ("total_loss", "retention_loss", "lambda"):  # CRaFT's statistics too: projected over shards as whole
        assert all(abs(x[k] - y[k]) <= 1e-3 * abs(y[k]) for x, y in zip(a, c)), (k, [(x[k], y[k]) for x, y in zip(a, c)])

    # resharded: the 2-rank FSDP checkpoint of step 3 (2 ranks x 2 samples), resumed by one plain process, which must
    # keep the global batch of 4: refused at 1 x 2, resumed at 1 x 2 x 2 micro-batches
    one = tmp_path / "one"
    shutil.copytree(part, one)
    shutil.rmtree(one / "checkpoints/step_000006"); (one / "checkpoints/latest").write_text("step_000003\n")
    solo = lambda steps, *extra: subprocess.run(_train_cmd(one, steps, "--resume", "latest", *eos, *extra),
                                                capture_output=True, text=True, timeout=300,
                                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    before = (one / "metrics.jsonl").read_bytes()
    r = solo(4)
    assert r.returncode != 0 and "the global batch" in r.stderr and "gradient_accumulation_steps = 4" in r.stderr, r.stderr[-2000:]
    assert (one / "metrics.jsonl").read_bytes() == before  # the refused resume wrote nothing
    r = solo(4, "--override", "trainer.gradient_accumulation_steps=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "the global batch is kept" in r.stdout, r.stdout[-3000:]
    assert [x["step"] for x in _train_records(one)][-1] == 4
    state = lambda step: json.loads((one / f"checkpoints/step_{step:06d}/trainer_state.json").read_text())
    # the data cursor counts this layout's micro-batches: twice as many of half the frames each, plus step 4's two
    assert state(4)["batches_consumed"] == 2 * state(3)["batches_consumed"] + 2, (state(3), state(4))
    assert state(4)["world_size"] == 1

    # and back onto two ranks (2 x 2 samples): rank 1, which the one-process run did not have, gets its own RNG seed
    resumed = _launch_two_nodes(one, 5, "--resume", "latest", *eos, **fsdp)
    assert "the global batch is kept" in resumed and "step_000004" in resumed, resumed[-3000:]
    assert state(5)["batches_consumed"] == state(4)["batches_consumed"] // 2 + 1 and state(5)["world_size"] == 2
    assert [x["step"] for x in _train_records(one)] == [1, 2, 3, 4, 5]


def test_fsdp_evaluates_as_ddp(tmp_path):
    """Held-out evaluation under FSDP (an unsharded copy gathered from the shards, the EOS threshold calibrated on it)
    gives DDP's figures, and training after it goes on as under DDP."""
    ev = ("--override", "trainer.eval_samples=8", "--override", "trainer.eval_interval=2",
          "--override", "framework.action_model.use_eos_classification=true")
    _launch_two_nodes(tmp_path / "fsdp", 4, *ev, env=_fsdp_env())
    _launch_two_nodes(tmp_path / "ddp", 4, *ev)
    evals = {k: [r for r in read_metrics(tmp_path / k) if r.get("event") == "eval"] for k in ("fsdp", "ddp")}
    assert [r["step"] for r in evals["fsdp"]] == [r["step"] for r in evals["ddp"]] == [2, 4]
    for a, b in zip(evals["fsdp"], evals["ddp"]):
        assert set(a) == set(b)
        for k in ("eval/action_loss", "eval/expected_mse", "eval/mse", "eval/vlm_loss", "eval/eos_threshold"):
            assert abs(a[k] - b[k]) <= 1e-3 * abs(b[k]) + 1e-6, (k, a[k], b[k])
    a, b = _train_records(tmp_path / "fsdp"), _train_records(tmp_path / "ddp")
    assert all(abs(x["total_loss"] - y["total_loss"]) <= 1e-3 * abs(y["total_loss"]) for x, y in zip(a, b))


GRADS_WORKER = """
import copy, json, sys, torch, torch.distributed as dist
from ecot.config import load_config, with_stage
from ecot.run import build_run
from ecot.trainer import make_accelerator
acc = make_accelerator("no")  # FSDP2 from the environment (`_fsdp_env`), as ecot-train gets it
cfg = with_stage(load_config("tiny", ["datasets.vla_data.per_device_batch_size=2", "trainer.eval_samples=0"]), 2)
run = build_run(cfg)
batch = run.collator(next(iter(run.loader)))  # this rank's own batch
ref = copy.deepcopy(run.policy)
torch.manual_seed(1); ref(batch)["total_loss"].backward()
want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
for g in want.values():  # what data parallelism must give: the ranks' mean gradient
    dist.all_reduce(g); g /= dist.get_world_size()
model, _ = acc.prepare(run.policy, torch.optim.AdamW(run.policy.parameters()))
model.backbone.shard_columns()
torch.manual_seed(1); model(batch)["total_loss"].backward()
got = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
worst = max(float((got[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in want.items())
with open(f"{sys.argv[1]}/grads_{dist.get_rank()}.json", "w") as f:
    json.dump({"same_params": sorted(got) == sorted(want), "worst": worst}, f)
"""


def test_fsdp_latent_gradients_equal_the_ranks_mean_gradient(tmp_path):
    """One stage-2 step under FSDP2 (sharded decoder layers, the latent columns through their hooks): every
    parameter's gradient equals the mean over ranks of each rank's unsharded gradient on its own batch."""
    script = tmp_path / "grads.py"
    script.write_text(GRADS_WORKER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), str(script), str(tmp_path)], capture_output=True, text=True,
                       timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", **_fsdp_env()))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = [json.loads((tmp_path / f"grads_{rank}.json").read_text()) for rank in (0, 1)]
    assert all(x["same_params"] for x in res), res
    assert all(x["worst"] < 1e-6 for x in res), res


def test_multi_node_accelerate_config_loads():
    cfg = yaml.safe_load(MULTI_NODE_YAML.read_text())
    assert cfg["num_machines"] > 1
    assert cfg["num_processes"] % cfg["num_machines"] == 0  # num_processes counts every GPU of every machine
    assert cfg["distributed_type"] == "MULTI_GPU" and cfg["rdzv_backend"] in ("static", "c10d")
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import ClusterConfig
    assert ClusterConfig.from_yaml_file(str(MULTI_NODE_YAML)).num_machines == cfg["num_machines"]  # accelerate's own reader


def test_sbatch_script_is_valid_bash_and_launches_each_node(tmp_path):
    "`bash -n`, then a dry run with stand-ins for `scontrol` and `srun`: one launcher a node, ranks from SLURM."
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True).returncode == 0
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text("#!/bin/bash\n[ \"$1 $2\" = 'show hostnames' ] && printf 'gpu-a\\ngpu-b\\n'\n")
    # srun stand-in: run the command once per node with that node's SLURM_NODEID, dropping srun's own options
    (bin_ / "srun").write_text("#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\n"
                               "for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i \"$@\" || exit $?; done\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", SLURM_JOB_ID="123", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="64",
               SLURM_SUBMIT_DIR=str(ROOT), RUN_DIR=str(tmp_path / "run"), DRY_RUN="1")
    for launcher in ("torchrun", "accelerate"):
        res = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, env=dict(env, LAUNCHER=launcher),
                             cwd=tmp_path, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        lines = [l for l in res.stdout.splitlines() if "ecot-train" in l and "--config" in l]
        assert len(lines) == 2, res.stdout  # one launcher command a node
        assert all("gpu-a:" in l or "gpu-a " in l for l in lines), lines  # MASTER_ADDR: the first host
        assert "--resume" not in lines[0]  # no checkpoint yet: a fresh run
        if launcher == "accelerate":
            assert "--machine_rank 0" in lines[0] and "--machine_rank 1" in lines[1]
            assert "--num_processes 16" in lines[0] and "--num_machines 2" in lines[0]
        else:
            assert "--nnodes 2" in lines[0] and "--nproc_per_node 8" in lines[0] and "--rdzv_backend c10d" in lines[0]
    ckpt = tmp_path / "run/checkpoints/step_000010"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").touch()  # a complete checkpoint: what a requeued job finds
    res = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert res.returncode == 0 and "--resume latest" in res.stdout, res.stdout + res.stderr  # a requeued job resumes
