"""The embedded synthetic Bridge dataset at full default size, its cache and its concurrency safety, and the
properties of its world that make a policy need the image and the instruction.

The notebook nbs/01_synthetic.ipynb tests the parts on a tiny dataset; here: the real default
(`DEFAULT_N_TRAIN` + `DEFAULT_N_VAL` episodes) through the package as users import it, several processes asking
for the cache at once, the package importing without TensorFlow, and the world's rules on the default episodes
(the start state does not give the target away, the instruction selects one of several objects, the reasoning
holds no future position). `bench/world_learnability.py` measures what these mean for a trained policy.
"""
import dataclasses
import json
import re
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import ecot.synthetic as syn

N_TRAIN, N_VAL = syn.DEFAULT_N_TRAIN, syn.DEFAULT_N_VAL


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
    assert root == cache / syn.dataset_dir_name(N_TRAIN, N_VAL, 0)
    assert syn.is_complete(root)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"generated in {seconds:.1f}s, {size / 1e6:.2f} MB")
    assert 1e6 < size < 10e6, size  # CI regenerates it: keep it small
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
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": N_TRAIN, "val": N_VAL}
    feats = builder.info.features
    assert set(feats["steps"].keys()) == {"observation", "action", "discount", "reward", "is_first", "is_last",
                                          "is_terminal", "language_instruction"}
    assert set(feats["episode_metadata"].keys()) == {"file_path", "episode_id", "has_image_0", "has_image_1",
                                                     "has_image_2", "has_image_3", "has_language"}
    specs = {(s.file_path, s.episode_id): s for s in syn.episode_specs()}
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
    assert len(seen) == N_TRAIN


def test_reasoning_json_matches_manifest_and_contract(full):
    root, _, _ = full
    rj = json.loads((root / syn.REASONING_FILE).read_text())
    manifest = syn.load_manifest(root)
    eps = manifest["episodes"]
    assert len(eps) == N_TRAIN + N_VAL
    missing = [e for e in eps if not e["has_reasoning"]]
    assert [e["split"] for e in missing].count("train") == N_TRAIN // 8
    assert [e["split"] for e in missing].count("val") == N_VAL // 4
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
        assert all(len(feats[k]) == n for k in ("gripper_position", "bboxes", "move_primitive", "gripper_pixel"))
        for u, v in feats["gripper_position"] + feats["gripper_pixel"]:
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


# ---------------------------------------------------------------- the world: what a policy has to see
INSTRUCTION = re.compile(r"^(?:put|place|move) the (.+) (?:in|on|into|onto) the (\w+ \w+)$")


@pytest.fixture(scope="module")
def specs():
    "More episodes than the embedded default (specs only, nothing rendered): enough for the statistics below."
    return syn.episode_specs(160, 20)


def test_the_start_state_does_not_give_the_target_away(specs):
    "Episodes that start in nearly the same pose go to far-apart targets; the start pose explains none of the target."
    train = [s for s in specs if s.split == "train"]
    start = np.stack([s.states[0][[0, 1, 2, 5]] for s in train])  # x, y, z, yaw
    target = np.stack([[s.target.x, s.target.y] for s in train])
    d_start = np.linalg.norm(start[:, None, :2] - start[None, :, :2], axis=-1)
    pairs = np.argwhere(np.triu(d_start < 0.02, 1))
    d_target = np.linalg.norm(target[pairs[:, 0]] - target[pairs[:, 1]], axis=-1)
    assert len(pairs) >= 10 and np.median(d_target) > 0.1, (len(pairs), np.median(d_target))
    X = np.c_[start, np.ones(len(start))]
    resid = target - X @ np.linalg.lstsq(X, target, rcond=None)[0]
    r2 = 1 - resid.var(0) / target.var(0)
    assert (r2 < 0.1).all(), r2
    # the gripper starts anywhere: the first move points every way (8 sectors, none nearly empty)
    first = np.stack([s.actions[0, :2] for s in train])
    sectors = np.histogram(np.arctan2(first[:, 1], first[:, 0]), bins=8, range=(-np.pi, np.pi))[0]
    assert sectors.min() >= len(train) / 40, sectors


def test_where_the_objects_are_is_what_the_state_lacks(specs):
    """The next xy motion from the state alone (least squares, fitted on train, scored on val) is no better than its
    mean; told where the gripper heads (what the image and instruction show), the same fit is several times better."""
    def rows(split, told):
        X, Y = [], []
        for s in (s for s in specs if s.split == split):
            for t in range(s.n_steps - 1):
                gx, gy = s.goal(t)
                X.append([*s.states[t]] + ([gx - s.states[t][0], gy - s.states[t][1]] if told else []))
                Y.append(s.actions[t, :2])
        return np.c_[np.asarray(X), np.ones(len(X))], np.asarray(Y)
    err = {}
    for told in (False, True):
        (X, Y), (Xv, Yv) = rows("train", told), rows("val", told)
        err[told] = float(((Xv @ np.linalg.lstsq(X, Y, rcond=None)[0] - Yv) ** 2).mean())
    base = float(((Yv - Y.mean(0)) ** 2).mean())
    assert err[False] > 0.9 * base, (err, base)
    assert err[True] < 0.4 * err[False], err


def test_the_instruction_names_one_of_several_objects(specs):
    "Two or three graspable objects and two containers; the instruction's phrases each name exactly one of them."
    by_relation = 0
    for s in specs:
        kinds = [o.kind for o in s.objects]
        assert 2 <= sum(k in syn.GRASPABLE for k in kinds) <= 3 and sum(k in syn.CONTAINERS for k in kinds) == 2
        assert len({o.colour for o in s.objects}) == len(s.objects)
        m = INSTRUCTION.match(s.instruction)
        assert m, s.instruction
        phrase, dest = m.groups()
        assert syn.resolve_reference(phrase, s.objects) == s.target, s.instruction
        assert syn.resolve_reference(dest, s.objects) == s.destination, s.instruction
        by_relation += phrase != s.target.label
        # the same scene with another graspable named: another object (the instruction, not the scene, selects)
        for other in (o for o in s.objects if o.kind in syn.GRASPABLE and o != s.target):
            assert syn.resolve_reference(other.label, s.objects) == other
    assert 0.1 < by_relation / len(specs) < 0.4, by_relation / len(specs)


def test_the_reasoning_holds_no_future_position(full):
    """GRIPPER POSITION as the policy reads it (the reader renders steps t..t+3) holds only the pixels of the objects
    the gripper heads for, never the gripper's later track; the text of step t does not change when every later
    state and action is scrambled."""
    from ecot.reasoning import ReasoningLookup
    root, _, _ = full
    lookup = ReasoningLookup.from_json(root / syn.REASONING_FILE)
    px = lambda x, y: tuple(int(round(c)) for c in syn.world_to_pixel(x, y))
    checked = 0
    specs = syn.episode_specs()  # the episodes of `full`
    for s in specs:
        if not s.has_reasoning:
            continue
        allowed = {px(s.target.x, s.target.y), px(s.destination.x, s.destination.y)}
        for t in s.reasoning_steps:
            text = lookup.render(s.file_path, s.episode_id, t)["GRIPPER POSITION"]
            nums = [int(v) for v in text.strip("[]").split(",")]
            shown = set(zip(nums[::2], nums[1::2]))
            assert shown <= allowed, (s.file_path, t, shown, allowed)
            checked += 1
    assert checked > 500
    s = next(s for s in specs if s.has_reasoning and not s.missing_steps)
    rng = np.random.default_rng(0)
    for t in range(s.n_steps - 1):
        cut = dataclasses.replace(s)
        cut.states = s.states.copy()
        cut.states[t + 1:, :6] += rng.normal(0, 0.05, (s.n_steps - t - 1, 6)).astype(np.float32)
        cut.actions = s.actions.copy()
        cut.actions[t + 1:] = rng.normal(0, 0.05, (s.n_steps - t - 1, 7)).astype(np.float32)
        assert syn.episode_reasoning(cut)["reasoning"][str(t)] == syn.episode_reasoning(s)["reasoning"][str(t)], t
