"CI's own checks: the README's test command is what CI runs, the sync check catches a notebook edited without re-export, and notebooks are numbered in reading order."
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci/run").read_text()
    assert "nbdev-test && pytest" in readme
    assert "nbdev-test\n" in ci and "pytest -q" in ci and "torch==2.13.0" in ci and "sync_check" in ci


def _clone(tmp_path) -> Path:
    if not (ROOT / ".git").exists() or shutil.which("nbdev-export") is None:
        pytest.fail("needs a git checkout and nbdev installed (pip install -e '.[dev]')")
    dst = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dst)], check=True)
    return dst


def _commit(repo: Path, msg: str):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "commit", "-qam", msg, "--no-verify"], cwd=repo, check=True, env=env)


def _sync(repo: Path):
    return subprocess.run(["bash", ".ci/sync_check"], cwd=repo, capture_output=True, text=True)


def test_sync_check_fails_on_a_notebook_edited_without_export(tmp_path):
    repo = _clone(tmp_path)
    clean = _sync(repo)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    nb_path = repo / "nbs/00_config.ipynb"
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).startswith("#| export"))
    cell["source"] = "".join(cell["source"]) + "\n\ndef added_without_export(): return 1\n"
    nb_path.write_text(json.dumps(nb, indent=1) + "\n")
    _commit(repo, "edit a notebook only")
    res = _sync(repo)
    assert res.returncode != 0
    assert "ecot/config.py" in res.stdout, res.stdout


def test_sync_check_fails_on_uncleaned_outputs(tmp_path):
    repo = _clone(tmp_path)
    nb_path = repo / "nbs/00_config.ipynb"
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code")
    cell["execution_count"] = 7
    cell["metadata"]["scrolled"] = True
    nb_path.write_text(json.dumps(nb, indent=1) + "\n")
    _commit(repo, "commit an uncleaned notebook")
    res = _sync(repo)
    assert res.returncode != 0 and "nbs/00_config.ipynb" in res.stdout, res.stdout


def _notebook_imports() -> tuple[dict[str, str], dict[str, set[str]]]:
    "(module -> the numbered notebook exporting it, notebook -> the ecot modules its cells import), from nbs/."
    import re
    owner, uses = {}, {}
    for nb in sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb")):
        cells = ["".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        for s in cells:
            if m := re.search(r"#\|\s*default_exp\s+(\w+)", s):
                owner[m.group(1)] = nb.stem
        uses[nb.stem] = {m.group(1) for s in cells for m in re.finditer(r"(?:from|import)\s+ecot\.(\w+)", s)}
    return owner, uses


def test_notebooks_are_numbered_in_reading_order():
    "Every numbered notebook (exported code and tests alike) imports only modules of lower-numbered notebooks."
    owner, uses = _notebook_imports()
    assert len(owner) >= 30 and len(set(owner.values())) == len(owner), owner  # one module per notebook
    later = {nb: sorted(f"{m} ({owner[m]})" for m in mods if m in owner and owner[m] > nb)
             for nb, mods in uses.items()}
    later = {nb: v for nb, v in later.items() if v}
    assert not later, f"notebooks importing a later module: {later}"
    assert all(m in owner for mods in uses.values() for m in mods if m != "_modidx"), uses


def test_notebooks_are_valid_jupyter_notebooks():
    "Every notebook opens in JupyterLab: nbformat's schema (e.g. a cell type 'md' instead of 'markdown' is invalid)."
    import nbformat
    paths = sorted((ROOT / "nbs").glob("*.ipynb")) + sorted((ROOT / "papers").glob("*.ipynb"))
    for p in paths:
        nbformat.validate(nbformat.read(p, as_version=4))


def test_latent_overhead_bench_runs_and_times_every_case_the_same_way():
    "The GPU benchmark's code path on a CPU (tiny preset): ratios with median and mean, versions, the build mode named."
    import sys
    r = subprocess.run([sys.executable, "bench/latent_overhead.py", "--preset", "tiny", "--device", "cpu", "--batch", "2",
                        "--steps", "2", "--n", "2", "--tokens", "100", "--image", "64", "--no-naive"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "torch " in r.stdout and "transformers " in r.stdout  # the software a figure was measured with
    assert "all eager" in r.stdout  # auto on a CPU: stage 0 and the latent step built the same way
    row = [l for l in r.stdout.splitlines() if l.strip().startswith("2 ") and "x /" in l]
    assert len(row) == 1 and row[0].count("x /") == 2, r.stdout[-2000:]  # latent and loop: median / mean ratios


def test_host_syncs_bench_names_the_waits_and_where_they_are_asked_for():
    "The host-sync inventory on a CPU (tiny config): a count, and each wait with the project's line that asked for it."
    import sys
    r = subprocess.run([sys.executable, "bench/host_syncs.py", "--batch-size", "2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    head = r.stdout.splitlines()[0]
    assert "waits in one forward and backward" in head and int(head.split(": ")[1].split()[0]) > 0, head
    assert "backbone.py" in r.stdout and "causal_lm_loss" in r.stdout  # the supervised positions' boolean mask
    assert "(the backward, in autograd's thread)" in r.stdout  # the deepstack merge's backward


def test_world_learnability_scores_while_training_without_changing_the_training(tmp_path):
    """`--every`: the VLM's held-out text loss, own against shuffled images, at each K steps and the last; the scoring
    forks the RNG, so the run's end-of-training figures equal those of a run without it."""
    import sys

    def run(name, *extra):
        out = tmp_path / f"{name}.json"
        r = subprocess.run([sys.executable, "bench/world_learnability.py", "--n-train", "6", "--n-val", "2",
                            "--val-frames", "12", "--steps", "4", "--batch-size", "2", "--no-predict", "--threads", "1",
                            "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return json.loads(out.read_text())

    plain, scored = run("plain"), run("scored", "--every", "2")
    assert [e["step"] for e in scored.pop("every")] == [2, 4]
    timing = lambda d: {k: v for k, v in d.items() if not k.endswith("_s")}
    assert timing(plain) == timing(scored)


def test_ddp_scaling_resumes_the_largest_run_on_fewer_processes_and_compares_losses(tmp_path):
    """The scaling bench on CPUs (gloo, tiny config): two processes save at step 4, one process resumes that checkpoint
    with two micro-batches a step (the global batch kept) to step 8; both runs' losses are printed side by side."""
    import sys
    r = subprocess.run([sys.executable, "bench/ddp_scaling.py", "--config", "tiny", "--steps", "8", "--skip", "4",
                        "--log-every", "2", "--batch-size", "2", "--nproc", "2", "--save-at", "4", "--resume-on", "1",
                        "--out", str(tmp_path), "--override", "trainer.eval_samples=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "the global batch is kept: 2 processes x 2 samples x 1 micro-batches = 4" in r.stdout, r.stdout[-3000:]
    assert "2 micro-batches a step" in r.stdout
    rows = [l.split() for l in r.stdout.splitlines() if l.strip().startswith(("6 ", "8 ")) and "action_loss" in l]
    assert [row[0] for row in rows] == ["6", "8"], r.stdout[-3000:]
    assert all(float(row[2]) > 0 and float(row[4]) > 0 for row in rows)  # straight / resumed action losses
    assert "mean action_loss over steps 5-8" in r.stdout
    resumed = [json.loads(l) for l in (tmp_path / "nproc2_resumed_on1/metrics.jsonl").read_text().splitlines() if l.strip()]
    assert [x["step"] for x in resumed if "action_loss" in x] == [6, 8]  # from step 5 on, one process
    assert not list((tmp_path / "nproc2_resumed_on1").glob("checkpoints/step_*"))  # no checkpoint of its own
