"Several machines: two torchrun 'nodes' on one machine (c10d rendezvous, gloo), train, resume; the SLURM and accelerate launch files."
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

import pytest
import yaml

from ecot.trainer import checkpoints, read_metrics

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "scripts/slurm/ecot_train.sbatch"
MULTI_NODE_YAML = ROOT / "configs/accelerate/multi_node.yaml"
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


def _launch_two_nodes(run_dir: Path, max_steps: int, *extra, timeout: float = 300) -> str:
    """Start two `torchrun --nnodes 2 --nproc_per_node 1` agents at once, meeting at a c10d rendezvous on localhost
    (the rendezvous assigns the node ranks), as two machines would; both must exit 0. Returns their output."""
    port, rdzv_id = _free_port(), f"ecot-test-{uuid.uuid4().hex[:12]}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", rdzv_id,
           "--rdzv_conf", "join_timeout=120", "--max_restarts", "0",
           _ecot_train(), "--config", "tiny", "--stage", "2", "--max-steps", str(max_steps), "--batch-size", "2",
           "--wandb-mode", "disabled", "--run-dir", str(run_dir),
           # constant LR without warmup: a resume may raise max_train_steps (a cosine schedule refuses that)
           "--override", "trainer.lr_scheduler_type=constant", "--override", "trainer.num_warmup_steps=0",
           "--override", "trainer.logging_frequency=1", "--override", "trainer.save_interval=3",
           "--override", "trainer.eval_samples=0", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
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
