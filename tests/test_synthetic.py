"""The embedded synthetic Bridge dataset at full default size, its cache and its concurrency safety.

The notebook nbs/01_synthetic.ipynb tests the parts on a tiny dataset; here: the real default
(24 train + 4 val episodes) through the package as users import it, several processes asking for
the cache at once, and the package importing without TensorFlow.
"""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import ecot.synthetic as syn


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    "The default embedded dataset generated into a fresh cache (via $ECOT_CACHE), with its generation time."
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("ECOT_CACHE")
    os.environ["ECOT_CACHE"] = str(cache)
    try:
        t0 = time.time()
        root = syn.embedded_dataset()
        seconds = time.time() - t0
    finally:
        if old is None:
            os.environ.pop("ECOT_CACHE")
        else:
            os.environ["ECOT_CACHE"] = old
    return root, cache, seconds


def test_default_dataset_is_cached_small_and_fast(full):
    root, cache, seconds = full
    assert root == cache / syn.dataset_dir_name(24, 4, 0)
    assert syn.is_complete(root)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"generated in {seconds:.1f}s, {size / 1e6:.2f} MB")
    assert 1e6 < size < 10e6, size
    assert seconds < 60, seconds
    assert syn.embedded_dataset(cache=cache) == root  # reused
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


def test_reads_back_with_tfds(full):
    root, _, _ = full
    tf, tfds = syn.import_tf()
    assert tf.config.get_visible_devices("GPU") == []
    ds_dir = root / "bridge_orig" / "1.0.0"
    assert (ds_dir / "dataset_info.json").exists() and (ds_dir / "features.json").exists()
    builder = tfds.builder_from_directory(str(ds_dir))
    assert (builder.info.name, str(builder.info.version)) == ("bridge_orig", "1.0.0")
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 24, "val": 4}
    feats = builder.info.features
    assert set(feats["steps"].keys()) == {"observation", "action", "discount", "reward", "is_first", "is_last",
                                          "is_terminal", "language_instruction"}
    assert set(feats["episode_metadata"].keys()) == {"file_path", "episode_id", "has_image_0", "has_image_1",
                                                     "has_image_2", "has_image_3", "has_language"}
    specs = {(s.file_path, s.episode_id): s for s in syn.episode_specs(24, 4, 0)}
    seen = set()
    for episode in tfds.as_numpy(builder.as_dataset(split="train")):
        m = episode["episode_metadata"]
        key = (m["file_path"].decode(), int(m["episode_id"]))
        spec = specs[key]
        steps = list(episode["steps"])
        states = np.stack([s["observation"]["state"] for s in steps])
        actions = np.stack([s["action"] for s in steps])
        assert states.dtype == actions.dtype == np.float32 and states.shape == (spec.n_steps, 7)
        np.testing.assert_array_equal(states, spec.states)
        # actions take state t to state t+1
        np.testing.assert_allclose(states[:-1, :6] + actions[:-1, :6], states[1:, :6], atol=1e-6)
        np.testing.assert_array_equal(actions[:-1, 6], states[1:, 6])
        assert set(np.unique(actions[:, 6])) == {0.0, 1.0}
        assert steps[0]["observation"]["image_0"].shape == (256, 256, 3)
        seen.add(key)
    assert len(seen) == 24


def test_reasoning_json_matches_manifest_and_contract(full):
    root, _, _ = full
    rj = json.loads((root / syn.REASONING_FILE).read_text())
    manifest = syn.load_manifest(root)
    eps = manifest["episodes"]
    assert len(eps) == 28
    missing = [e for e in eps if not e["has_reasoning"]]
    assert [e["split"] for e in missing].count("train") == 3 and [e["split"] for e in missing].count("val") == 1
    assert sum(bool(e["missing_steps"]) for e in eps) == 1
    frames_with = 0
    for e in eps:
        entry = rj.get(e["file_path"], {}).get(str(e["episode_id"]))
        assert (entry is not None) == e["has_reasoning"], e["file_path"]
        if entry is None:
            continue
        n = e["n_steps"]
        keys = sorted(map(int, entry["reasoning"]))
        assert keys == [t for t in range(n) if t not in e["missing_steps"]]
        frames_with += len(keys)
        assert entry["metadata"]["subtask_boundaries"] == e["subtask_boundaries"]
        assert len(e["subtask_boundaries"]) == 3
        feats = entry["features"]
        assert all(len(feats[k]) == n for k in ("gripper_position", "bboxes", "move_primitive"))
        for u, v in feats["gripper_position"]:
            assert 0 <= u < 256 and 0 <= v < 256
        for boxes in feats["bboxes"]:
            assert len(boxes) == len(e["objects"])
            for score, label, box in boxes:
                assert isinstance(label, str) and len(box) == 4 and all(isinstance(c, int) for c in box)
        subs = [entry["reasoning"][str(t)]["subtask"] for t in keys]
        changes = [b for a, b, sa, sb in zip(keys, keys[1:], subs, subs[1:]) if sa != sb]
        assert changes == e["subtask_boundaries"]
    total = sum(e["n_steps"] for e in eps)
    assert manifest["coverage"]["all"] == pytest.approx(frames_with / total)
    assert 0.7 < manifest["coverage"]["all"] < 1.0


def test_deterministic_bytes(full, tmp_path):
    root, _, _ = full
    again = syn.embedded_dataset(cache=tmp_path)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            assert p.read_bytes() == (again / p.relative_to(root)).read_bytes(), p.name


def test_concurrent_callers_share_one_copy(tmp_path):
    code = textwrap.dedent(f"""
        import ecot.synthetic as syn
        print(syn.embedded_dataset(seed=3, cache={str(tmp_path)!r}, n_train=3, n_val=1))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert paths == {str(tmp_path / syn.dataset_dir_name(3, 1, 3))}
    assert syn.is_complete(Path(paths.pop()))
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_lost_rename_race_uses_the_other_copy(tmp_path, monkeypatch):
    final = syn.embedded_dataset(seed=5, cache=tmp_path, n_train=2, n_val=1)
    stamp = (final / syn.MANIFEST_FILE).stat().st_mtime_ns
    real, calls = syn.is_complete, []

    def late(root):  # pretend the other process finished only after our checks
        calls.append(root)
        return False if len(calls) <= 2 else real(root)

    monkeypatch.setattr(syn, "is_complete", late)
    assert syn.embedded_dataset(seed=5, cache=tmp_path, n_train=2, n_val=1) == final
    assert (final / syn.MANIFEST_FILE).stat().st_mtime_ns == stamp  # theirs kept
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # ours removed


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="n_val must be an int >= 1"):
        syn.episode_specs(4, 0, 0)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        syn.episode_specs(4, 1, -1)
    with pytest.raises(FileNotFoundError, match="synthetic_manifest.json"):
        syn.load_manifest(tmp_path)
    (tmp_path / "bridge_orig").mkdir()
    with pytest.raises(FileExistsError, match="bridge_orig already exists"):
        syn.write_synthetic_bridge(tmp_path, 2, 1, 0)


def test_package_imports_without_tensorflow():
    code = textwrap.dedent("""
        import sys
        sys.modules["tensorflow"] = None          # any `import tensorflow` now fails
        sys.modules["tensorflow_datasets"] = None
        import ecot.synthetic as syn
        spec = syn.episode_specs(2, 1, 0)[0]
        assert spec.frames()[0].shape == (256, 256, 3)
        try:
            syn.write_synthetic_bridge("/nonexistent/should/not/be/created", 2, 1, 0)
        except ImportError as e:
            assert "tensorflow" in str(e)
        else:
            raise AssertionError("expected ImportError")
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
