"""The TensorFlow-free TFDS reader (ecot.tfds_reader): it runs without TensorFlow or protobuf, yields the same
samples as the tf.data backend (parity), shares the statistics and their cache, shards like it, and names the
file in every corruption error."""
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from collections import Counter

import numpy as np
import pytest

from ecot.dataset import ECoTRLDSDataset, make_dataloader
from ecot.synthetic import write_synthetic_bridge
from ecot import tfds_reader as R

tf = pytest.importorskip("tensorflow")  # parity needs the reference; the no-TF test below blocks it explicitly
from ecot import rlds  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_synthetic_bridge(tmp_path_factory.mktemp("data"), n_train=4, n_val=2, seed=0)


@pytest.fixture(scope="module")
def multi_root(root, tmp_path_factory):
    "A copy whose train split is 2 shard files of 17 episodes each (records repeated): exercises the interleave."
    copy = tmp_path_factory.mktemp("multi") / "data"
    shutil.copytree(root, copy)
    d = R.TFDSDirectory(R.dataset_dir(copy, "bridge_orig"))
    recs = [r for _, r in R.iter_tfrecord(d.files("train")[0])]
    for f in d.files("train"):
        f.unlink()
    info = json.loads((d.path / "dataset_info.json").read_text())
    split = next(s for s in info["splits"] if s["name"] == "train")
    split["shardLengths"] = ["17", "17"]
    (d.path / "dataset_info.json").write_text(json.dumps(info))
    d = R.TFDSDirectory(d.path)
    for k, f in enumerate(d.files("train")):
        R.write_tfrecord(f, [recs[(17 * k + i) % len(recs)] for i in range(17)])
    return copy


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ECOT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


KW = dict(image_size=(40, 48), past_action_window_size=1, future_action_window_size=3, shuffle_buffer_size=1,
          image_aug=False, reasoning_dropout_prob=0.3, seed=5)


def assert_same_samples(a: list, b: list):
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert set(x) == set(y)
        assert [np.asarray(i).tolist() for i in x["image"]] == [np.asarray(i).tolist() for i in y["image"]]
        for k in ("action", "action_mask", "state", "eos", "eos_mask"):
            if k in x:
                assert x[k] is None and y[k] is None or (x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k])), k
        assert (x["lang"], x["reasoning"], x["meta"]) == (y["lang"], y["reasoning"], y["meta"])
        assert list(x["reasoning"]) == list(y["reasoning"])  # tag order too


@pytest.mark.parametrize("train", [True, False])
def test_parity_with_tf_backend(root, train):
    tf_s = list(ECoTRLDSDataset(root, train=train, backend="tf", **KW))
    pt_s = list(ECoTRLDSDataset(root, train=train, backend="torch", **KW))
    assert_same_samples(tf_s, pt_s)
    assert any(s["reasoning"] for s in pt_s) and any(not s["action_mask"].all() for s in pt_s)


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_parity_multi_file_interleave_and_sharding(multi_root, num_shards):
    "2 files of 17 episodes: TFDS's interleave (block 16) order, sharding by files (2) or by episodes (3)."
    kw = {**KW, "image_size": (8, 8)}
    tf_ds, pt_ds = (ECoTRLDSDataset(multi_root, backend=b, **kw) for b in ("tf", "torch"))
    seen = []
    for i in range(num_shards):
        tf_s, pt_s = list(tf_ds.iter_shard(i, num_shards)), list(pt_ds.iter_shard(i, num_shards))
        assert_same_samples(tf_s, pt_s)
        seen += [(s["meta"]["file_path"], s["meta"]["episode_id"], s["meta"]["step"]) for s in pt_s]
    everything = [(s["meta"]["file_path"], s["meta"]["episode_id"], s["meta"]["step"]) for s in pt_ds.iter_shard(0, 1)]
    assert Counter(seen) == Counter(everything)  # the shards partition the frames


def test_statistics_identical_and_cache_shared(root, tmp_path):
    spec = R.DATASETS["bridge_orig"]
    assert R.STATS_VERSION == rlds.STATS_VERSION
    d = R.TFDSDirectory(R.dataset_dir(root, "bridge_orig"))
    b = rlds.open_builder(root, "bridge_orig")
    assert R.dataset_fingerprint(d, spec) == rlds.dataset_fingerprint(b, spec)
    ours, theirs = R.compute_dataset_statistics(d, spec), rlds.compute_dataset_statistics(b, spec)
    assert json.dumps(R._jsonable(ours)) == json.dumps(rlds._jsonable(theirs))  # the same numbers, bit for bit
    R.dataset_statistics(root, spec, cache=tmp_path)  # torch fills the cache ...
    files = list((tmp_path / "dataset_statistics").glob("*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    rlds.dataset_statistics(root, spec, cache=tmp_path)  # ... and tf reads it
    assert [f.stat().st_mtime_ns for f in (tmp_path / "dataset_statistics").glob("*.json")] == [mtime]


def test_registry_is_shared():
    assert rlds.DATASETS is R.DATASETS and rlds.resolve_mixture is R.resolve_mixture
    assert rlds.CorruptShardError is R.CorruptShardError and rlds.UnknownNameError is R.UnknownNameError


@pytest.mark.parametrize("value", [None, "", "/no/such/dir"])
def test_data_root_checks_match_rlds(value):
    errors = []
    for check in (rlds.check_data_root, R.check_data_root):
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            check(value)
        errors.append((type(e.value), str(e.value)))
    assert errors[0] == errors[1]


def test_interleave_matches_tf_data():
    rng = np.random.default_rng(0)
    for _ in range(25):
        lens = rng.integers(1, 7, rng.integers(1, 7)).tolist()
        src = [list(range(100 * k, 100 * k + n)) for k, n in enumerate(lens)]
        c, b = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        ref = tf.data.Dataset.range(len(src)).interleave(
            lambda k: tf.data.Dataset.from_tensor_slices(tf.gather(tf.ragged.constant(src), k)),
            cycle_length=c, block_length=b, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        assert list(R._interleave([lambda s=s: iter(s) for s in src], c, b)) == [int(x) for x in ref.as_numpy_iterator()]


def test_reads_without_tensorflow_or_protobuf(root, tmp_path):
    "A child process where importing tensorflow or google.protobuf fails: the torch backend still works."
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("tensorflow", "tensorflow_datasets") or name.startswith("google.protobuf"):
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        from ecot.tfds_reader import resolve_backend
        from ecot.dataset import ECoTRLDSDataset
        assert resolve_backend("auto") == "torch"
        ds = ECoTRLDSDataset({str(root)!r}, image_size=(16, 16), future_action_window_size=2, train=False)
        assert ds.backend == "torch"
        n = sum(1 for _ in ds)
        assert not [m for m in sys.modules if m.startswith(("tensorflow", "google.protobuf"))]
        print("frames", n)
    """)
    env = {**os.environ, "ECOT_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split("frames")[-1]) > 0
    with pytest.raises(ValueError, match="backend = 'jax'"):
        R.resolve_backend("jax")


def test_spawned_workers_cover_each_frame_once_torch(root):
    ds = ECoTRLDSDataset(root, image_size=(16, 16), future_action_window_size=2, shuffle_buffer_size=8, seed=3,
                         backend="torch")
    ref = sorted((s["meta"]["file_path"], s["meta"]["episode_id"], s["meta"]["step"]) for s in ds)
    got = [(s["meta"]["file_path"], s["meta"]["episode_id"], s["meta"]["step"])
           for b in make_dataloader(ds, batch_size=4, num_workers=2) for s in b]
    assert sorted(got) == ref
    assert [s["meta"]["step"] for s in ds] != sorted(s["meta"]["step"] for s in ds)  # shuffled


def _train_shard(copy):
    return R.TFDSDirectory(R.dataset_dir(copy, "bridge_orig")).files("train")[0]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_shard_is_named_torch_backend(root, tmp_path, damage, damage_shard):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shard = _train_shard(copy)
    damage_shard(shard, damage)
    with pytest.raises(R.CorruptShardError, match=f"corrupted TFRecord shard: .*{shard.name}: record \\d+ at byte offset"):
        list(ECoTRLDSDataset(copy, image_size=(16, 16), backend="torch"))


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
    with pytest.raises(R.CorruptShardError, match=f"{shard.name}: record 1 at byte offset {second}: data checksum mismatch"):
        list(R.iter_tfrecord(shard))
    assert len(list(R.iter_tfrecord(shard, verify_checksums=False))) == 4  # the data itself is intact


def test_unknown_feature_type_is_named(root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    feats = R.dataset_dir(copy, "bridge_orig") / "features.json"
    tree = json.loads(feats.read_text())
    obs = tree["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"]["observation"]
    obs["featuresDict"]["features"]["depth_0"] = {"pythonClassName": "my_pkg.features.PointCloud", "pointCloud": {}}
    feats.write_text(json.dumps(tree))
    with pytest.raises(R.FeatureSpecError, match="features.json: feature 'steps/observation/depth_0' "
                                                 "\\(my_pkg.features.PointCloud\\): unknown feature type"):
        ECoTRLDSDataset(copy, image_size=(16, 16), backend="torch")


def test_crc32c_and_cost(capsys):
    rng = np.random.default_rng(1)
    for n in (0, 7, 4096, 12345, 1 << 18):
        d = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert R.crc32c_numpy(d) == R._crc32c_python(d)
    data = rng.integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    R.crc32c_numpy(data)
    mb_s = len(data) / (time.perf_counter() - t) / 1e6
    with capsys.disabled():
        print(f"\nnumpy CRC32C: {mb_s:.0f} MB/s")
    assert mb_s > 20
