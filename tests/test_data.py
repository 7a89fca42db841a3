"""Bad-input catalogue of the data layer (ecot.reasoning, ecot.registry, ecot.episodes, ecot.dataset): each bad input is a
clear error naming the thing; a frame without reasoning is counted, not fatal."""
import json
import shutil

import pytest

from ecot.dataset import ECoTRLDSDataset, make_dataloader
from ecot.reasoning import ReasoningFormatError
from ecot.episodes import TFDSDirectory
from ecot.registry import CorruptShardError, UnknownNameError, dataset_dir
from ecot.synthetic import load_manifest, write_synthetic_bridge


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_synthetic_bridge(tmp_path_factory.mktemp("data"), n_train=4, n_val=1, seed=0)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ECOT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def make(root, **kw):
    kw = {"image_size": (32, 32), "future_action_window_size": 2, "shuffle_buffer_size": 8, **kw}
    return ECoTRLDSDataset(root, **kw)


def test_missing_data_root_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_root_dir does not exist: .*nowhere"):
        make(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="data_root_dir is not set"):
        make(None)


def test_dataset_directory_missing_under_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset 'bridge_orig' not found"):
        make(tmp_path)


def test_incomplete_tfds_directory_names_the_file_and_cause(root, tmp_path):
    "A dataset directory without features.json, or whose dataset_info.json lacks version/splits: a clear error."
    bad = tmp_path / "data"
    shutil.copytree(root, bad)
    version = next((bad / "bridge_orig").iterdir())
    (version / "features.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a TFDS dataset directory: .*features.json is missing"):
        make(bad)
    shutil.copy(next((root / "bridge_orig").iterdir()) / "features.json", version / "features.json")
    (version / "dataset_info.json").write_text("{}")
    with pytest.raises(ValueError, match="dataset_info.json: no 'version' or 'splits'"):
        make(bad)


@pytest.mark.parametrize("mix", ["bridg", "no_such_mixture"])
def test_unknown_dataset_or_mixture(root, mix):
    with pytest.raises(UnknownNameError, match=f"unknown dataset or mixture '{mix}'"):
        make(root, data_mix=mix)


def test_mixture_member_missing(root):
    with pytest.raises(FileNotFoundError, match="dataset 'bridge_orig_aux' not found"):
        make(root, data_mix="bridge_two")


@pytest.mark.parametrize("size", [(224,), (0, 224), (-5, 5), (224.0, 224), "224", None, (224, 224, 3), (True, 4)])
def test_invalid_image_size(root, size):
    with pytest.raises(ValueError, match="image_size"):
        make(root, image_size=size)


def test_missing_reasoning_json(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="reasoning JSON not found: .*absent.json"):
        make(root, reasoning_json=tmp_path / "absent.json")


def test_malformed_reasoning_json(root, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"x": {"0": {"reasoning": ')
    with pytest.raises(ReasoningFormatError, match="broken.json: malformed JSON"):
        make(root, reasoning_json=bad)


def test_unknown_reasoning_layout_names_file_and_key_path(root, tmp_path):
    ep = next(e for e in load_manifest(root)["episodes"] if e["split"] == "val")
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({ep["file_path"]: {str(ep["episode_id"]): {"reasoning": ["step 0", "step 1"]}}}))
    ds = make(root, reasoning_json=odd, train=False)
    with pytest.raises(ReasoningFormatError, match=f"odd.json: {ep['file_path']}/{ep['episode_id']}/reasoning"):
        list(ds)


def test_frame_without_reasoning_is_counted_not_fatal(root, tmp_path):
    full = json.loads((root / "embodied_features_bridge.json").read_text())
    val = [e for e in load_manifest(root)["episodes"] if e["split"] == "val"]
    for e in val:  # strip every val episode's reasoning
        full.get(e["file_path"], {}).pop(str(e["episode_id"]), None)
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(full))
    loader = make_dataloader(make(root, reasoning_json=path, train=False), batch_size=3)
    samples = [s for b in loader for s in b]
    assert len(samples) == sum(e["n_steps"] for e in val)
    assert all(s["reasoning"] == {} and not s["meta"]["has_reasoning"] for s in samples)
    assert (loader.coverage.with_reasoning, loader.coverage.without_reasoning) == (0, len(samples))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_tfrecord_shard_is_named(root, tmp_path, damage, damage_shard):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shard = TFDSDirectory(dataset_dir(copy, "bridge_orig")).files("train")[0]
    damage_shard(shard, damage)
    with pytest.raises(CorruptShardError, match=f"corrupted TFRecord shard: .*{shard.name}"):
        list(make(copy))  # statistics (new fingerprint) or iteration: either names the file


def test_bad_loader_arguments(root):
    ds = make(root, train=False)
    with pytest.raises(ValueError, match="batch_size = 0"):
        make_dataloader(ds, batch_size=0)
    with pytest.raises(ValueError, match="num_workers = -1"):
        make_dataloader(ds, batch_size=2, num_workers=-1)


def test_bad_window_and_dropout(root):
    with pytest.raises(ValueError, match="future_action_window_size = -1"):
        make(root, future_action_window_size=-1)
    with pytest.raises(ValueError, match="dropout_prob = 2"):
        make(root, reasoning_dropout_prob=2)


def test_spawned_workers_cover_each_frame_once(root):
    ds = make(root, train=True, seed=3)
    ref = sorted((s["meta"]["file_path"], s["meta"]["episode_id"], s["meta"]["step"]) for s in ds)
    got = [(s["meta"]["file_path"], s["meta"]["episode_id"], s["meta"]["step"])
           for b in make_dataloader(ds, batch_size=4, num_workers=2) for s in b]
    assert sorted(got) == ref


def test_persistent_workers_reshuffle_every_epoch_like_fresh_workers(root):
    "Workers kept across epochs advance their own epoch: the same frames, order and reasoning as respawned ones."
    def passes(persistent):
        loader = make_dataloader(make(root, train=True, seed=3, reasoning_dropout_prob=0.5), batch_size=4,
                                 num_workers=2, persistent_workers=persistent)
        return [[(s["meta"]["episode_id"], s["meta"]["step"], sorted(s["reasoning"])) for b in loader for s in b]
                for _ in range(3)]
    kept, fresh = passes(True), passes(False)
    assert kept == fresh
    assert kept[0] != kept[1] != kept[2]  # reshuffled (and reasoning dropped differently) every epoch


def test_loader_leaves_the_global_rng_alone(root):
    "Epochs start in the trainer's collation thread: the loader must not draw from the global RNG (noise draws)."
    import torch
    state = torch.random.get_rng_state()
    loader = make_dataloader(make(root, train=True, seed=1), batch_size=4)
    for _ in range(2):
        assert sum(map(len, loader)) > 0
    assert torch.equal(torch.random.get_rng_state(), state)
