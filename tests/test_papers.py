"papers/compare.ipynb runs end to end with its quick settings, writes only where it is told, and reads finished runs."
import csv
import hashlib
import json
from pathlib import Path

import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parent.parent
NB = ROOT / "papers/compare.ipynb"


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*")) if p.is_file()}


def _run(tmp_path: Path, out: str, **params) -> tuple[Path, Path, str]:
    "Execute the notebook with quick settings into `tmp_path`: (figures dir, table dir, what its cells printed)."
    fig, tab = tmp_path / "figures", tmp_path / "metrics"
    pm.execute_notebook(str(NB), str(tmp_path / out), cwd=str(ROOT), progress_bar=False,
                        parameters=dict(quick=True, runs_dir=str(tmp_path / "runs"), figures_dir=str(fig),
                                        table_dir=str(tab), **params))
    nb = json.loads((tmp_path / out).read_text())
    printed = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    return fig, tab, printed


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_compare_notebook_is_parameterised_and_clean():
    nb = json.loads(NB.read_text())
    params = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(params) == 1, "the papermill parameters tag is lost"
    src = "".join(params[0]["source"])
    for name in ("config", "seeds", "max_steps", "episodes", "runs_dir", "retrain", "conditions", "device", "quick",
                 "figures_dir", "table_dir"):
        assert f"{name} =" in src, name
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), "commit the notebook without outputs"


@pytest.mark.slow
def test_compare_notebook_quick_writes_table_and_figures_then_reads_the_runs(tmp_path):
    committed = _digests(ROOT / "papers/figures")
    fig, tab, text = _run(tmp_path, "first.ipynb")
    assert _digests(ROOT / "papers/figures") == committed, "the quick run overwrote the committed figures"

    table = _rows(tab / "table.csv")
    assert [r["condition"] for r in table] == ["stage 0", "stage 2"]
    for r in table:
        assert r["seeds"] == "1" and r["episodes"] == "1" and r["steps"] == "2"
        assert float(r["mse_mean"]) > 0 and float(r["mean_action_mse_mean"]) > 0
        assert float(r["calls_per_s_mean"]) > 0 and 0 <= float(r["success_pooled"]) <= 1
        assert float(r["timed_ms_mean"]) > 0 and float(r["columns_mean"]) >= 1  # the timed calls ran
    assert [r["final_stage"] for r in table] == ["0", "2"]  # each run acted at its own stage
    runs = _rows(tab / "runs.csv")
    assert [(r["condition"], r["seed"]) for r in runs] == [("stage 0", "0"), ("stage 2", "0")]
    assert "eval/tag_acc/TASK" in runs[0] and runs[1]["eval/tag_acc/TASK"] == ""  # TASK is latent at stage 2
    assert runs[1]["eval/retention_loss"] and not runs[0]["eval/retention_loss"]  # stage 2 measures retention
    md = (tab / "table.md").read_text()
    assert "| stage 0 | 1 |" in md and "| stage 2 | 1 |" in md and "quick smoke settings" in md
    findings = (tab / "findings.md").read_text()
    assert "smoke-test settings" in findings and "stage 2" in findings
    for stem in ("compare_success_vs_latency", "compare_tag_accuracy", "compare_craft_retention"):
        for ext in ("png", "pdf"):
            assert (fig / f"{stem}.{ext}").stat().st_size > 1000, f"{stem}.{ext}"
    assert not (fig / "compare_eos_f1.png").exists()  # no EOS condition was run
    for run in ("stage0-seed0", "stage2-seed0"):
        assert (tab / "runs" / run / "metrics.jsonl").exists() and (tab / "runs" / run / "rollout_summary.json").exists()
    assert text.count("training into") == 2

    # a second execution reads the finished runs and their rollouts: same table, nothing trained
    _, _, again = _run(tmp_path, "second.ipynb")
    assert "training into" not in again and again.count("reading") >= 2
    untimed = lambda rows: [{k: v for k, v in r.items() if not k.startswith("timed_ms")} for r in rows]
    assert untimed(_rows(tab / "table.csv")) == untimed(table)  # the calls are timed again; the rest is read


@pytest.mark.slow
def test_compare_notebook_quick_runs_the_other_conditions(tmp_path):
    "No reasoning (acting without decoding), the curriculum to stage 8, the EOS head and CRaFT, each for two steps."
    conditions = ["no reasoning", "stage 2", "stage 8", "stage 2 + EOS", "stage 2 + CRaFT"]
    fig, tab, _ = _run(tmp_path, "out.ipynb", conditions=conditions)
    table = {r["condition"]: r for r in _rows(tab / "table.csv")}
    assert list(table) == conditions
    assert table["stage 8"]["final_stage"] == "8" and table["no reasoning"]["final_stage"] == "0"
    assert float(table["stage 8"]["columns_mean"]) >= 16  # 8 tags x 2 thinking tokens, computed one after another
    assert float(table["no reasoning"]["columns_mean"]) < float(table["stage 8"]["columns_mean"])
    runs = {r["condition"]: r for r in _rows(tab / "runs.csv")}
    assert runs["stage 2 + EOS"]["eval/eos_f1"] != "" and runs["stage 2 + EOS"]["eval/eos_all_positive_f1"] != ""
    assert runs["stage 2 + CRaFT"]["eval/retention_loss"] != ""
    for stem in ("compare_success_vs_latency", "compare_eos_f1", "compare_craft_retention", "craft_vs_plain_craft",
                 "craft_vs_plain_losses", "craft_vs_plain_optimization"):
        assert (fig / f"{stem}.png").stat().st_size > 1000 and (fig / f"{stem}.pdf").exists(), stem
    saved = json.loads((tmp_path / "runs/stage8-curriculum-seed0/policy/policy_config.json").read_text())
    assert saved["acting"]["stage"] == 8
    summary = json.loads((tmp_path / "runs/no-reasoning-seed0/eval/summary.json").read_text())
    episodes = [json.loads(line) for line in (tmp_path / "runs/no-reasoning-seed0/eval/episodes.jsonl").open()]
    assert summary["episodes"] == 1 and all(not c["reasoning"] for e in episodes for c in e["calls"])
