"""Regenerate the LeRobot v3 test fixture `tests/fixtures/lerobot_synthetic/`, written by lerobot's own `LeRobotDataset`.

The fixture proves that `ecot.lerobot` reads what lerobot writes. lerobot does not install beside ecot's pinned stack
(lerobot 0.4.4 pins torch < 2.11 and huggingface-hub < 0.36; transformers 5.17 needs huggingface-hub 1.x), so this is
done in two steps, in two environments:

1. In the ecot environment, export a few short synthetic episodes (frames downscaled to 64 x 64, states, actions,
   instructions, and their ECoT reasoning re-keyed for LeRobot) to a compressed .npz. The .npz is committed: the
   tests compare what the reader returns with it.

       python scripts/make_lerobot_fixture.py export

2. In a separate virtual environment with lerobot 0.4.4, write the LeRobot dataset from the .npz:

       python3 -m venv /tmp/lerobot-venv && /tmp/lerobot-venv/bin/pip install lerobot==0.4.4
       /tmp/lerobot-venv/bin/python scripts/make_lerobot_fixture.py write

   (lerobot encodes the videos as AV1 with libsvtav1, through the PyAV wheel it installs.)

3. Optionally, check in the lerobot environment that lerobot reads a LeRobot root that ecot wrote (e.g. the embedded
   default of `ecot.lerobot_writer.embedded_lerobot_dataset()`, or `write_lerobot_synthetic(root, 4, 2)`): every frame
   loads, its video frame within lerobot's timestamp tolerance, with the parquet's action.

       /tmp/lerobot-venv/bin/python scripts/make_lerobot_fixture.py check --root /path/to/root
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
SOURCE = HERE / "lerobot_synthetic_source.npz"
ROOT = HERE / "lerobot_synthetic"
REPO_ID = "ecot/lerobot_synthetic"  # the root's last component is the reasoning JSON's dataset key (ecot.lerobot)
N_EPISODES, SIZE, FPS, SEED = 3, 64, 5, 0


def export(path: Path = SOURCE) -> Path:
    "Step 1 (ecot environment): episodes of the embedded synthetic world, as arrays, to `path`."
    from PIL import Image
    sys.path.insert(0, str(HERE.parent.parent))  # this checkout's ecot, wherever the script is run from
    from ecot.synthetic import episode_reasoning, sample_episode

    specs = [sample_episode("train", i, SEED) for i in range(N_EPISODES)]
    frames = [np.stack([np.asarray(Image.fromarray(f).resize((SIZE, SIZE), Image.BILINEAR)) for f in s.frames()])
              for s in specs]
    name = ROOT.name
    reasoning = {name: {str(k): episode_reasoning(s) for k, s in enumerate(specs)}}
    arrays = {"lengths": np.array([s.n_steps for s in specs]), "instructions": np.array([s.instruction for s in specs]),
              "frames": np.concatenate(frames), "states": np.concatenate([s.states for s in specs]).astype(np.float32),
              "actions": np.concatenate([s.actions for s in specs]).astype(np.float32),
              "reasoning_json": np.array(json.dumps(reasoning))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB): {N_EPISODES} episodes, {len(arrays['actions'])} frames")
    return path


def write(source: Path = SOURCE, root: Path = ROOT) -> Path:
    "Step 2 (lerobot environment): the LeRobot v3 dataset at `root`, written by `LeRobotDataset`."
    import lerobot
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    src = np.load(source)
    names7 = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
    features = {
        "observation.images.image_0": {"dtype": "video", "shape": (SIZE, SIZE, 3),
                                       "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (7,), "names": names7},
        "action": {"dtype": "float32", "shape": (7,), "names": [f"d{n}" if n != "gripper" else n for n in names7]},
    }
    # lerobot refuses to create into an existing folder: build in a fresh temporary one, then move it in place
    tmp = Path(tempfile.mkdtemp(prefix=".lerobot-fixture-", dir=root.parent)) / root.name
    ds = LeRobotDataset.create(repo_id=REPO_ID, fps=FPS, features=features, root=tmp, robot_type="synthetic_arm",
                               use_videos=True)
    start = 0
    for k, n in enumerate(src["lengths"]):
        for t in range(start, start + int(n)):
            ds.add_frame({"observation.images.image_0": src["frames"][t], "observation.state": src["states"][t],
                          "action": src["actions"][t], "task": str(src["instructions"][k])})
        ds.save_episode()
        start += int(n)
    ds.finalize()
    (tmp / "embodied_features_bridge.json").write_text(str(src["reasoning_json"]))
    (tmp / "GENERATED_BY.txt").write_text(f"lerobot {lerobot.__version__} LeRobotDataset.create/add_frame/"
                                          f"save_episode/finalize via scripts/make_lerobot_fixture.py\n")
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    shutil.rmtree(tmp.parent, ignore_errors=True)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(f"wrote {root} ({size / 1e3:.0f} kB) with lerobot {lerobot.__version__}")
    return root


def check(root: Path) -> Path:
    "Step 3 (lerobot environment): lerobot's `LeRobotDataset` reads every frame of `root`."
    import lerobot
    import pyarrow.parquet as pq
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    # PyAV: torchcodec's wheel needs FFmpeg's shared libraries installed on the system
    ds = LeRobotDataset(f"ecot/{root.name}", root=root, video_backend="pyav")
    actions = {}
    for f in sorted((root / "data").glob("chunk-*/file-*.parquet")):
        t = pq.read_table(f, columns=["index", "action"])
        actions.update(zip(t["index"].to_pylist(), t["action"].to_pylist()))
    for i in range(ds.num_frames):
        item = ds[i]
        np.testing.assert_allclose(item["action"].numpy(), np.asarray(actions[int(item["index"])], np.float32))
        for key in ds.meta.video_keys:
            assert item[key].shape[0] == 3, (key, item[key].shape)
    print(f"lerobot {lerobot.__version__} read all {ds.num_frames} frames of {ds.num_episodes} episodes of {root}")
    return root


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["export", "write", "check"],
                    help="export: in the ecot env; write, check: in the lerobot env")
    ap.add_argument("--root", type=Path, default=ROOT, help="check: the LeRobot root to read")
    a = ap.parse_args()
    sys.exit(0 if {"export": export, "write": write, "check": lambda: check(a.root)}[a.step]() else 1)
