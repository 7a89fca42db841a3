"""The RLDS reader (ecot.registry, ecot.episodes, ecot.transforms, ecot.dataset), checked against tensorflow-datasets'
own reader as the reference: the same episodes, frames aligned step by step, the same statistics. It runs without
TensorFlow or protobuf, holds out episodes of a dataset without a val split by a seeded hash, works with datasets
registered at run time in spawned workers, and names the file in every corruption error."""
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ecot import episodes as E
from ecot.dataset import ECoTRLDSDataset, make_dataloader
from ecot.registry import DATASETS, DatasetSpec, HoldOut, dataset_dir, register_dataset
from ecot.synthetic import load_manifest, write_synthetic_bridge
from ecot.transforms import dataset_statistics, normalize_bounds_q99

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_synthetic_bridge(tmp_path_factory.mktemp("data"), n_train=4, n_val=2, seed=0)


@pytest.fixture(scope="module")
def multi_root(root, tmp_path_factory):
    "A copy whose train split is 2 shard files (records repeated): exercises file-level and episode-level sharding."
    copy = tmp_path_factory.mktemp("multi") / "data"
    shutil.copytree(root, copy)
    d = E.TFDSDirectory(dataset_dir(copy, "bridge_orig"))
    recs = [r for _, r in E.iter_tfrecord(d.files("train")[0])]
    for f in d.files("train"):
        f.unlink()
    info = json.loads((d.path / "dataset_info.json").read_text())
    split = next(s for s in info["splits"] if s["name"] == "train")
    split["shardLengths"] = ["7", "6"]
    (d.path / "dataset_info.json").write_text(json.dumps(info))
    d = E.TFDSDirectory(d.path)
    for k, f in enumerate(d.files("train")):
        E.write_tfrecord(f, [recs[(7 * k + i) % len(recs)] for i in range((7, 6)[k])])
    return copy


@pytest.fixture(scope="module")
def noval_root(tmp_path_factory):
    "40 episodes in a train split and no val split (as Bridge-like real data often comes)."
    root = write_synthetic_bridge(tmp_path_factory.mktemp("noval"), n_train=40, n_val=1, seed=2)
    d = E.TFDSDirectory(dataset_dir(root, "bridge_orig"))
    for f in d.files("val"):
        f.unlink()
    info = json.loads((d.path / "dataset_info.json").read_text())
    info["splits"] = [s for s in info["splits"] if s["name"] != "val"]
    (d.path / "dataset_info.json").write_text(json.dumps(info))
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ECOT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def tfds_episodes(root, split):
    "The reference: episodes as tensorflow-datasets reads them (images left encoded), keyed by (file path, episode id)."
    tfds = pytest.importorskip("tensorflow_datasets")
    skip = {"steps": {"observation": {"image_0": tfds.decode.SkipDecoding()}}}
    ds = tfds.builder_from_directory(str(dataset_dir(root, "bridge_orig"))).as_dataset(split=split, decoders=skip)
    out = {}
    for ep in tfds.as_numpy(ds):
        steps = list(ep["steps"])
        md = ep["episode_metadata"]
        out[(md["file_path"].decode(), int(md["episode_id"]))] = {
            "action": np.stack([s["action"] for s in steps]).astype(np.float32),
            "state": np.stack([s["observation"]["state"] for s in steps]).astype(np.float32),
            "image_0": [bytes(s["observation"]["image_0"]) for s in steps],
            "language": [s["language_instruction"] for s in steps]}
    return out


def key(x):
    return x["meta"]["file_path"], x["meta"]["episode_id"], x["meta"]["step"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_episodes_equal_the_tfds_reference(root, split):
    ref = tfds_episodes(root, split)
    ours = list(E.TFDSDirectory(dataset_dir(root, "bridge_orig")).episodes(split, decode_images=False))
    assert len(ours) == len(ref) > 0
    for ep in ours:
        r = ref[(ep["episode_metadata"]["file_path"].decode(), int(ep["episode_metadata"]["episode_id"]))]
        np.testing.assert_array_equal(ep["steps"]["action"], r["action"])
        np.testing.assert_array_equal(ep["steps"]["observation"]["state"], r["state"])
        assert list(ep["steps"]["observation"]["image_0"]) == r["image_0"]
        assert list(ep["steps"]["language_instruction"]) == r["language"]


@pytest.mark.parametrize("train", [True, False])
def test_frames_are_the_reference_steps_chunked_and_normalised(root, train):
    "Every frame: its step's image, state and instruction, and the chunk of the next actions, from the reference."
    past, future, size = 1, 3, (40, 48)
    ds = ECoTRLDSDataset(root, image_size=size, past_action_window_size=past, future_action_window_size=future,
                         shuffle_buffer_size=1, train=train)
    ref, stats = tfds_episodes(root, "train" if train else "val"), ds.statistics["bridge_orig"]
    spec = DATASETS["bridge_orig"]
    frames = list(ds)
    assert Counter((f, e) for f, e, _ in map(key, frames)) == Counter({k: len(v["action"]) for k, v in ref.items()})
    for x in frames:
        fp, eid, t = key(x)
        r = ref[(fp, eid)]
        raw = r["action"].copy()
        raw[:, 6] = (raw[:, 6] > 0.5).astype(np.float32)  # gripper binarised
        T, idx = len(raw), np.arange(t - past, t + future + 1)
        valid = (idx >= 0) & (idx < T)
        chunk = np.where(valid[:, None] | np.array(spec.absolute_action_mask), raw[np.clip(idx, 0, T - 1)], 0.0)
        np.testing.assert_array_equal(x["action_mask"], valid)
        np.testing.assert_array_equal(x["action"], normalize_bounds_q99(chunk, stats["action"], spec.action_normalization_mask))
        np.testing.assert_array_equal(x["state"], normalize_bounds_q99(r["state"][t], stats["state"]))
        assert x["lang"] == r["language"][t].decode().lower()
        with Image.open(__import__("io").BytesIO(r["image_0"][t])) as im:
            want = np.asarray(im.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(np.asarray(x["image"][0]), want)


def test_statistics_equal_numpy_over_the_reference(root, tmp_path):
    ref = tfds_episodes(root, "train")  # the training split only
    action = np.concatenate([r["action"] for r in ref.values()])
    action[:, 6] = (action[:, 6] > 0.5).astype(np.float32)
    state = np.concatenate([r["state"] for r in ref.values()])
    stats = dataset_statistics(root, DATASETS["bridge_orig"], cache=tmp_path)
    assert stats["num_trajectories"] == len(ref) and stats["num_transitions"] == len(action)
    for name, x in (("action", action), ("state", state)):
        np.testing.assert_allclose(stats[name]["q01"], np.quantile(x, 0.01, axis=0), rtol=1e-6)
        np.testing.assert_allclose(stats[name]["q99"], np.quantile(x, 0.99, axis=0), rtol=1e-6)
        np.testing.assert_allclose(stats[name]["mean"], x.mean(0), rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "dataset_statistics").glob("bridge_orig_*.json"))) == 1


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_shards_partition_the_frames(multi_root, num_shards):
    "2 files: sharding by files (2 shards) or by episodes (3 shards); the shards partition the frames."
    ds = ECoTRLDSDataset(multi_root, image_size=(8, 8), future_action_window_size=2, shuffle_buffer_size=1)
    seen = [key(s) for i in range(num_shards) for s in ds.iter_shard(i, num_shards)]
    assert Counter(seen) == Counter(key(s) for s in ds.iter_shard(0, 1))


def test_heldout_split_without_val_split(noval_root):
    "No val split: train and held-out episodes are disjoint, cover everything, at about the fraction, in any process."
    kw = dict(image_size=(8, 8), future_action_window_size=1, shuffle_buffer_size=1, heldout_fraction=0.25, heldout_seed=7)
    episodes = lambda ds: {(f, e) for f, e, _ in map(key, ds)}
    train, held = episodes(ECoTRLDSDataset(noval_root, train=True, **kw)), episodes(ECoTRLDSDataset(noval_root, train=False, **kw))
    everything = {(e["file_path"], e["episode_id"]) for e in load_manifest(noval_root)["episodes"] if e["split"] == "train"}
    assert train & held == set() and train | held == everything
    assert 0.1 <= len(held) / len(everything) <= 0.4, len(held)  # 40 episodes: binomial spread around 0.25
    stats = ECoTRLDSDataset(noval_root, train=True, **kw).statistics["bridge_orig"]
    assert stats["num_trajectories"] == len(train)  # statistics from the training side only
    code = textwrap.dedent(f"""
        from ecot.dataset import ECoTRLDSDataset
        ds = ECoTRLDSDataset({str(noval_root)!r}, train=False, **{kw!r})
        print(sorted({{(x["meta"]["file_path"], x["meta"]["episode_id"]) for x in ds}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(sorted(held))
    other_seed = episodes(ECoTRLDSDataset(noval_root, train=False, **{**kw, "heldout_seed": 8}))
    assert other_seed != held


@pytest.mark.parametrize("fraction", [0.0, 0.001])
def test_an_empty_heldout_side_is_an_error_naming_dataset_split_and_fraction(noval_root, fraction):
    with pytest.raises(ValueError, match=f"dataset 'bridge_orig' at .*: no held-out episodes.* no 'val' split.*"
                                         f"40 episodes of split 'train'.*held-out fraction {fraction}"):
        ECoTRLDSDataset(noval_root, image_size=(8, 8), train=False, heldout_fraction=fraction)
    ECoTRLDSDataset(noval_root, image_size=(8, 8), train=True, heldout_fraction=fraction)  # the training side is fine


def test_a_registered_dataset_works_in_spawned_workers(root, tmp_path):
    "A dataset registered at run time (unknown to a fresh interpreter): spawned workers use the resolved specs."
    other = tmp_path / "other"
    shutil.copytree(root / "bridge_orig", other / "my_robot")
    register_dataset(DatasetSpec("my_robot"))
    try:
        ds = ECoTRLDSDataset(other, "my_robot", image_size=(8, 8), future_action_window_size=1, shuffle_buffer_size=4)
        ref = sorted(key(s) for s in ds)
        loader = make_dataloader(ds, batch_size=4, num_workers=2, multiprocessing_context="spawn")
        assert sorted(key(s) for b in loader for s in b) == ref and ref
        assert {s["meta"]["dataset"] for b in loader for s in b} == {"my_robot"}
    finally:
        DATASETS.pop("my_robot", None)


def test_reads_without_tensorflow_or_protobuf(root, tmp_path):
    "A child process where importing tensorflow or google.protobuf fails: the reader still works."
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("tensorflow", "tensorflow_datasets") or name.startswith("google.protobuf"):
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        from ecot.dataset import ECoTRLDSDataset
        ds = ECoTRLDSDataset({str(root)!r}, image_size=(16, 16), future_action_window_size=2, train=False)
        n = sum(1 for _ in ds)
        assert not [m for m in sys.modules if m.startswith(("tensorflow", "google.protobuf"))]
        print("frames", n)
    """)
    env = {**os.environ, "ECOT_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split("frames")[-1]) > 0


def _train_shard(copy):
    return E.TFDSDirectory(dataset_dir(copy, "bridge_orig")).files("train")[0]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_shard_is_named(root, tmp_path, damage, damage_shard):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shard = _train_shard(copy)
    damage_shard(shard, damage)
    with pytest.raises(E.CorruptShardError, match=f"corrupted TFRecord shard: .*{shard.name}: record \\d+ at byte offset"):
        list(ECoTRLDSDataset(copy, image_size=(16, 16)))


def test_wrong_checksum_names_file_and_offset(root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shard = _train_shard(copy)
    data = bytearray(shard.read_bytes())
    (n0,) = struct.unpack("<Q", data[:8])
    second = 12 + n0 + 4  # offset of record 1
    (n1,) = struct.unpack("<Q", data[second: second + 8])
    crc_at = second + 12 + n1
    data[crc_at: crc_at + 4] = bytes(b ^ 0x55 for b in data[crc_at: crc_at + 4])  # only the stored checksum
    shard.write_bytes(bytes(data))
    with pytest.raises(E.CorruptShardError, match=f"{shard.name}: record 1 at byte offset {second}: data checksum mismatch"):
        list(E.iter_tfrecord(shard))
    assert len(list(E.iter_tfrecord(shard, verify_checksums=False))) == 4  # the data itself is intact


def test_unknown_feature_type_is_named(root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    feats = dataset_dir(copy, "bridge_orig") / "features.json"
    tree = json.loads(feats.read_text())
    obs = tree["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"]["observation"]
    obs["featuresDict"]["features"]["depth_0"] = {"pythonClassName": "my_pkg.features.PointCloud", "pointCloud": {}}
    feats.write_text(json.dumps(tree))
    with pytest.raises(E.FeatureSpecError, match="features.json: feature 'steps/observation/depth_0' "
                                                 "\\(my_pkg.features.PointCloud\\): unknown feature type"):
        ECoTRLDSDataset(copy, image_size=(16, 16))


def test_config_declares_datasets_and_refuses_the_removed_backend_key(root, tmp_path):
    from ecot.build import build_dataset
    from ecot.config import ConfigError, load_config
    other = tmp_path / "other"
    shutil.copytree(root / "bridge_orig", other / "cfg_robot")
    cfg = load_config("tiny", [f"datasets.vla_data.ecot.data_root_dir={other}", "datasets.vla_data.ecot.data_mix=cfg_mix",
                               "datasets.vla_data.image_size=[16,16]"])
    cfg.datasets.vla_data.ecot.datasets = {"cfg_robot": {"image_keys": ["image_0"]}}
    cfg.datasets.vla_data.ecot.mixtures = {"cfg_mix": {"cfg_robot": 1.0}}
    try:
        ds = build_dataset(cfg, train=False)
        assert [s.name for s, _ in ds.mixture] == ["cfg_robot"] and next(iter(ds))["meta"]["dataset"] == "cfg_robot"
    finally:
        DATASETS.pop("cfg_robot", None)
        from ecot.registry import MIXTURES
        MIXTURES.pop("cfg_mix", None)
    with pytest.raises(ConfigError, match="key 'datasets.vla_data.ecot.backend' was removed: there is one RLDS reader"):
        load_config("tiny", ["datasets.vla_data.ecot.backend=torch"])
    cfg = load_config("tiny", ["datasets.vla_data.dataset_py=nope"])
    with pytest.raises(ValueError, match="datasets.vla_data.dataset_py = 'nope': expected one of 'ecot_rlds'"):
        build_dataset(cfg)


def _passes(loader, n):
    return [[[(key(s), tuple(s["reasoning"]), int(np.asarray(s["image"][0]).sum())) for s in b] for b in loader]
            for _ in range(n)]


@pytest.mark.parametrize("num_workers,drop_last", [(0, False), (2, False), (0, True), (2, True)])
def test_a_seeked_loader_gives_the_rest_of_the_epoch_then_the_next(root, num_workers, drop_last):
    """Resume by seeking: after seek(epoch, b) the loader gives exactly what an uninterrupted one gave from batch b on
    (also when each worker's last partial batch is dropped, as training does)."""
    def loader():
        ds = ECoTRLDSDataset(root, image_size=(8, 8), future_action_window_size=1, shuffle_buffer_size=16, seed=3,
                             reasoning_dropout_prob=0.5, image_aug=True)
        return make_dataloader(ds, batch_size=3, num_workers=num_workers, drop_last=drop_last)
    e0, e1 = _passes(loader(), 2)
    assert all(len(b) == 3 for b in e0 + e1) or not drop_last
    for b in (1, len(e0) - 2, len(e0)):  # workers run out at different batches near the end (unequal shards)
        seeked = loader()
        seeked.seek(0, b)
        assert _passes(seeked, 2) == [e0[b:], e1], b


def test_seeking_reads_only_the_block_it_lands_in(root, monkeypatch):
    "Data work at resume does not grow with the position: the episodes read are those of the block sought."
    ds = ECoTRLDSDataset(root, image_size=(8, 8), future_action_window_size=1, shuffle_buffer_size=1)
    total = sum(1 for _ in ds)
    reads = []
    real = E.TFDSDirectory.read_at
    monkeypatch.setattr(E.TFDSDirectory, "read_at", lambda self, *a, **k: reads.append(a) or real(self, *a, **k))
    for start in (total - 1, total // 2):
        reads.clear()
        next(ds.iter_shard(0, 1, start=start))
        assert len(reads) == 1, (start, reads)  # unshuffled: a block is one episode
