"Config: round trips, overrides, and a catalogue of bad configs, each naming the key and the expected form."
import warnings
from pathlib import Path

import pytest
import yaml

from ecot.config import (Config, ConfigError, check_paths, load_config, parse_config, project_root,
                         read_config_dict, save_config, with_stage)

SHIPPED = sorted(p.stem for p in (project_root() / "configs").glob("*.yaml"))


def test_shipped_configs_are_found():
    assert {"tiny", "stage0", "stage2", "bridge_qwen3vl2b"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate_and_round_trip(name, tmp_path):
    cfg = load_config(name, check_inputs=False)
    again = parse_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert load_config(save_config(cfg, tmp_path / "c.yaml"), check_inputs=False) == cfg
    # every key of the file survives the typed round trip with the same value
    raw = read_config_dict(name)  # the file with its `base:` chain resolved
    dumped = cfg.to_dict()

    def same(a, b, path=""):
        if isinstance(a, dict):
            for k, v in a.items():
                key = k if k in b else str(k)
                assert key in b, f"{name}: {path}{k} lost"
                same(v, b[key], f"{path}{k}.")
        elif isinstance(a, (list, tuple)):
            assert list(a) == list(b), f"{name}: {path}"
        else:
            assert a == b, f"{name}: {path} {a!r} != {b!r}"
    same(raw, dumped)


def test_embedded_configs_need_no_paths():
    for name in ("tiny", "stage0", "stage2"):
        check_paths(load_config(name))


def test_real_config_names_missing_paths():
    with pytest.raises(ConfigError) as e:
        load_config("bridge_qwen3vl2b")
    msg = str(e.value)
    for key in ("datasets.vla_data.ecot.data_root_dir", "datasets.vla_data.ecot.reasoning_json",
                "framework.qwenvl.base_vlm"):
        assert key in msg


def test_overrides_apply_and_parse_yaml_values():
    cfg = load_config("tiny", ["seed=3", "trainer.learning_rate.base=2e-4", "framework.qwenvl.attn_implementation=eager",
                               "datasets.vla_data.ecot.tag2think_count={PLAN: 3}"])
    assert (cfg.seed, cfg.trainer.learning_rate.base) == (3, 2e-4)
    assert cfg.framework.qwenvl.attn_implementation == "eager"
    assert cfg.ecot.tag2think_count == {"PLAN": 3}


def test_stage_helper_turns_latent_on():
    cfg = with_stage(load_config("tiny"), 2)
    assert cfg.ecot.scheduled_stage == 2 and cfg.framework.enable_latent_reasoning


BAD = [  # (overrides, substrings the message must contain)
    (["trainer.max_train_step=5"], ["unknown key 'trainer.max_train_step'", "did you mean 'trainer.max_train_steps'"]),
    (["datasets.vla_data.ecot.reasoning_jsn=x.json"], ["did you mean 'datasets.vla_data.ecot.reasoning_json'"]),
    (["trainer.max_train_steps=abc"], ["trainer.max_train_steps = 'abc'", "integer"]),
    (["trainer.max_train_steps=0"], ["trainer.max_train_steps = 0", "greater than or equal to 1"]),
    (["trainer.lr_scheduler_type=step"], ["trainer.lr_scheduler_type = 'step'", "'cosine'"]),
    (["datasets.vla_data.per_device_batch_size=2.5"], ["per_device_batch_size = 2.5"]),
    (["datasets.vla_data.image_size=[224]"], ["datasets.vla_data.image_size"]),
    (["datasets.vla_data.image_size=[0, 224]"], ["datasets.vla_data.image_size = [0, 224]", "16..4096"]),
    (["datasets.vla_data.ecot.reasoning_dropout_prob=1.5"], ["reasoning_dropout_prob = 1.5", "less than or equal to 1"]),
    (["datasets.vla_data.ecot.scheduled_stage=1"], ["scheduled_stage = 1", "enable_latent_reasoning"]),
    (["datasets.vla_data.ecot.scheduled_stage=9", "framework.enable_latent_reasoning=true"], ["scheduled_stage = 9", "0..8"]),
    (["trainer.curriculum_learning.enable=true", "trainer.curriculum_learning.stage_schedule={0: 0, 50: 2}"],
     ["stage_schedule.50 = 2", "enable_latent_reasoning"]),
    (["trainer.curriculum_learning.enable=true", "framework.enable_latent_reasoning=true",
      "trainer.curriculum_learning.stage_schedule={0: 0, 50: 12}"], ["stage_schedule.50 = 12", "0..8"]),
    (["datasets.vla_data.ecot.tag2think_count={PLANS: 2}"], ["tag2think_count.PLANS", "unknown tag", "did you mean 'PLAN'"]),
    (["datasets.vla_data.ecot.tag2think_count={PLAN: 0}"], ["tag2think_count.PLAN = 0"]),
    (["framework.action_model.action_dim=8"], ["framework.action_model.action_dim = 8", "datasets.vla_data.ecot.action_dim = 7"]),
    (["framework.qwenvl.attn_implementation=flash"], ["attn_implementation = 'flash'"]),
    (["trainer.optimizer.betas=[0.9]"], ["trainer.optimizer.betas"]),
    (["datasets.vla_data.ecot.data_root_dir=/no/such/dir"], ["datasets.vla_data.ecot.data_root_dir = '/no/such/dir'", "does not exist"]),
    (["datasets.vla_data.ecot.reasoning_json=missing.json"], ["reasoning_json = 'missing.json'", "does not exist"]),
    (["framework.qwenvl.base_vlm=/no/weights"], ["framework.qwenvl.base_vlm = '/no/weights'", "does not exist"]),
    (["trainer.max_train_steps"], ["expected the form dotted.key=value"]),
    (["trainer=5"], ["trainer = 5"]),
    (["framework.action_model.action_model_type=DiT"],
     ["key 'framework.action_model.action_model_type' was removed", "delete the key"]),
    (["trainer.max_train_steps.x=1"], ["trainer.max_train_steps is a value, not a section"]),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_configs_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    for s in expected:
        assert s in str(e.value), f"{s!r} not in:\n{e.value}"


def _file_error(path, text: str, load: str | None = None) -> str:
    "Write `text` to `path`, load `load` (default `path`), and return the ConfigError's message."
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(load or path)
    return str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="no config named 'tinny'"):
        load_config("tinny")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    msg = _file_error(tmp_path / "typo.yaml", "trainer:\n  max_train_stepz: 3\n")
    assert "typo.yaml" in msg and "did you mean 'trainer.max_train_steps'" in msg


def test_warnings_for_window_mismatch_and_loss_weight():
    with pytest.warns(UserWarning, match="future_action_window_size = 3 differs"):
        load_config("tiny", ["framework.action_model.future_action_window_size=3"])
    with pytest.warns(UserWarning, match="vlm_loss_weight = 1.5 is outside"):
        load_config("tiny", ["framework.latent_reasoning.vlm_loss_weight=1.5"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config("tiny")


def test_relative_paths_read_against_project_root(tmp_path):
    cfg = load_config("tiny", ["datasets.vla_data.ecot.reasoning_json=configs/tiny.yaml"])
    assert cfg.ecot.reasoning_json == "configs/tiny.yaml"


def test_save_is_atomic(tmp_path):
    p = save_config(Config(), tmp_path / "sub" / "config.yaml")
    assert p.exists() and not list(p.parent.glob(".*tmp*"))


def test_a_bad_schedule_step_is_reported_first_and_late_switches_warn():
    "The schedule's keys are checked before the stages they set: the first line names the bad step."
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["trainer.curriculum_learning.enable=true",
                             "trainer.curriculum_learning.stage_schedule={0: 0, -5: 2}"])
    first = str(e.value).splitlines()[1].strip()
    assert first == "trainer.curriculum_learning.stage_schedule.-5: steps must be >= 0", first
    with pytest.warns(UserWarning, match=r"switches at steps \[500\].*never trained"):
        load_config("tiny", ["trainer.curriculum_learning.enable=true", "framework.enable_latent_reasoning=true",
                             "trainer.max_train_steps=10", "trainer.curriculum_learning.stage_schedule={0: 0, 500: 2}"])


def test_stage_configs_extend_one_base():
    "stage0 is tiny plus a longer run; stage2 is stage0 plus the curriculum: no copied sections."
    tiny, s0, s2 = (load_config(n).to_dict() for n in ("tiny", "stage0", "stage2"))
    assert yaml.safe_load((project_root() / "configs" / "stage0.yaml").read_text())["base"] == "tiny"
    assert yaml.safe_load((project_root() / "configs" / "stage2.yaml").read_text())["base"] == "stage0"
    assert s0["framework"] == tiny["framework"] and s0["datasets"] == tiny["datasets"]
    assert (s0["run_id"], s0["trainer"]["max_train_steps"], s0["trainer"]["eval_samples"]) == ("stage0", 400, 64)
    assert s2["framework"]["action_model"] == s0["framework"]["action_model"]
    assert s2["datasets"]["vla_data"]["ecot"]["scheduled_stage"] == 2 and s2["framework"]["enable_latent_reasoning"]
    assert load_config("stage2").trainer.curriculum_learning.stage_schedule == {0: 0, 100: 1, 200: 2}
    s2["trainer"]["curriculum_learning"] = s0["trainer"]["curriculum_learning"]
    assert {k: v for k, v in s2.items() if k not in ("run_id", "datasets", "framework")} == \
        {k: v for k, v in s0.items() if k not in ("run_id", "datasets", "framework")}


def test_base_inheritance_merges_nested_sections(tmp_path):
    (tmp_path / "parent.yaml").write_text("base: tiny\nseed: 7\ntrainer:\n  craft: {enable: true, epsilon: 0.3}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrainer:\n  craft: {epsilon: 0.2}\n  max_train_steps: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.seed, cfg.trainer.max_train_steps) == (7, 9)
    assert (cfg.trainer.craft.enable, cfg.trainer.craft.epsilon) == (True, 0.2)
    assert cfg.trainer.learning_rate == load_config("tiny").trainer.learning_rate
    saved = yaml.safe_load(save_config(cfg, tmp_path / "saved.yaml").read_text())
    assert "base" not in saved and load_config(tmp_path / "saved.yaml") == cfg  # a saved config stands alone


def test_base_inheritance_fails_clearly(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    msg = _file_error(tmp_path / "b.yaml", "base: a.yaml\n", load=tmp_path / "a.yaml")
    assert "comes back to it" in msg and "a.yaml -> " in msg and "b.yaml" in msg
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match="self.yaml"):
        load_config(tmp_path / "self.yaml")
    msg = _file_error(tmp_path / "orphan.yaml", "base: missing.yaml\n")
    assert "orphan.yaml" in msg and str(tmp_path / "missing.yaml") in msg
    msg = _file_error(tmp_path / "named.yaml", "base: tinny\n")
    assert "named.yaml" in msg and "no config named 'tinny'" in msg
    (tmp_path / "bad.yaml").write_text("base: [tiny]\n")
    with pytest.raises(ConfigError, match="bad.yaml: base = \\['tiny'\\]"):
        load_config(tmp_path / "bad.yaml")
