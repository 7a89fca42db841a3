"""Closed-loop rollouts (`ecot.rollout`, `ecot-eval`): the scripted expert through the evaluator, a tiny saved policy
through the command end to end, the same rollout against `ecot-serve`, and the command's errors."""
import json
import socket
import subprocess
import time

import gymnasium as gym
import numpy as np
import pytest
from PIL import Image

from ecot.env import ENV_ID, ScriptedExpert
from ecot.rollout import evaluate, main, run_episode, wilson_interval


@pytest.fixture(scope="module")
def saved_policy(tmp_path_factory):
    "A tiny random policy (stage 2, EOS head, robot-unit statistics of the embedded world) saved as <run>/policy."
    import torch
    from ecot.inference import ActingSpec
    from ecot.policy import ECoTPolicy
    from ecot.eos import EOSConfig
    from ecot.action_head import ActionHeadConfig
    from ecot.processor import load_processor
    torch.manual_seed(0)
    stats = {"bridge": {"action": {"q01": [-0.03] * 6 + [0.0], "q99": [0.03] * 6 + [1.0]},
                        "state": {"q01": [0.1, -0.25, 0.0, -0.1, -0.1, -0.3, 0.0],
                                  "q99": [0.6, 0.25, 0.15, 0.1, 0.1, 0.3, 1.0]}}}
    pol = ECoTPolicy.build("tiny", load_processor("tiny"), 
                           action_head=ActionHeadConfig(action_dim=7, chunk_len=4, state_dim=7, hidden_size=32, num_layers=1), dataset_statistics=stats, eos=EOSConfig(hidden_dim=16),
                           acting=ActingSpec(stage=2, image_size=(64, 64), max_new_tokens=6))
    return pol.save_pretrained(tmp_path_factory.mktemp("run") / "policy")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(saved_policy):
    "`ecot-serve` on the saved policy, in a subprocess: its port."
    port = _free_port()
    proc = subprocess.Popen(["ecot-serve", "--policy", str(saved_policy), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline, "ecot-serve did not listen within 180 s"
            time.sleep(0.5)
    yield port
    proc.kill()
    proc.wait()


def test_wilson_interval():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(50, 50) == pytest.approx((0.9287, 1.0), abs=1e-4)
    with pytest.raises(ValueError, match="successes must be"):
        wilson_interval(-1, 10)


def test_the_scripted_expert_succeeds_through_the_evaluator(tmp_path):
    env = gym.make(ENV_ID, render_mode="rgb_array")
    summary, records = evaluate(ScriptedExpert(env, chunk_len=8), env, episodes=20, seed=1, replan_steps=4, videos=1,
                                out=tmp_path, progress=False, name="expert")
    assert summary["success_rate"] >= 0.95, summary
    lo, hi = summary["success_ci95"]
    assert lo <= summary["success_rate"] <= hi
    assert all(r["policy_calls"] == -(-r["length"] // 4) for r in records)
    assert [json.loads(line)["index"] for line in (tmp_path / "episodes.jsonl").read_text().splitlines()] == list(range(20))
    assert not (tmp_path / "episodes.jsonl.partial").exists()
    assert Image.open(tmp_path / "episode_000.gif").n_frames == records[0]["length"] + 1


def test_a_failing_policy_is_reported_as_failing():
    "The evaluator can report failure: the expert's motion with a gripper that never closes does nothing."
    env = gym.make(ENV_ID, max_steps=60)

    class NeverCloses(ScriptedExpert):
        def predict_action(self, *args, **kwargs):
            out = super().predict_action(*args, **kwargs)
            out["actions"][0, :, 6] = 1.0
            return out

    summary, records = evaluate(NeverCloses(env), env, episodes=5, progress=False)
    assert summary["successes"] == 0 and all(r["truncated"] and r["length"] == 60 for r in records)
    assert summary["success_ci95"][0] == 0.0


def test_ecot_eval_runs_a_saved_policy_end_to_end(saved_policy):
    r = subprocess.run(["ecot-eval", "--policy", str(saved_policy), "--episodes", "2", "--max-steps", "20",
                        "--videos", "1", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "95% Wilson interval" in r.stdout and "control rate" in r.stdout, r.stdout
    out = saved_policy.parent / "eval"  # the default: <run_dir>/eval
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert summary["episodes"] == len(records) == 2 and summary["max_steps"] == 20
    assert summary["policy_seconds"] > 0 and summary["control_hz"] > 0 and summary["videos"] == ["episode_000.gif"]
    for rec in records:
        assert 1 <= rec["length"] <= 20 and rec["policy_calls"] == -(-rec["length"] // 4)  # chunk 4, replan 4
        assert all(len(c["eos_probs"]) == 4 and "reasoning_text" in c for c in rec["calls"])
    assert Image.open(out / "episode_000.gif").n_frames == records[0]["length"] + 1


def test_ecot_eval_refuses_a_directory_that_is_not_a_policy(saved_policy):
    r = subprocess.run(["ecot-eval", "--policy", str(saved_policy.parent), "--episodes", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "no policy_config.json" in r.stderr and f"did you mean {saved_policy}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--expert", "--episodes", "0"], "--episodes: expected an int >= 1, got 0"),
    (["--expert", "--episodes", "-3"], "--episodes: expected an int >= 1, got -3"),
    (["--expert", "--max-steps", "ten"], "--max-steps: expected an int >= 1, got 'ten'"),
    (["--expert", "--videos", "-1"], "--videos: expected an int >= 0"),
    (["--policy", "/nonexistent/policy"], "no such directory"),
    ([], "one of the arguments --policy --server --expert is required"),
])
def test_ecot_eval_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_ecot_eval_says_when_the_server_cannot_be_reached(capsys):
    port = _free_port()  # nothing listens there
    with pytest.raises(SystemExit) as e:
        main(["--server", f"ws://127.0.0.1:{port}", "--episodes", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--server ws://127.0.0.1:{port}: cannot connect" in err, err


def test_a_served_policy_rolls_out_as_the_local_one(saved_policy, server, tmp_path):
    "Same observations, same seeds: the remote policy's chunks and the episode are the in-process policy's."
    from ecot.policy import ECoTPolicy
    from ecot.serve import RemotePolicy

    class Recorder:
        "Keeps what each call saw and returned."
        def __init__(self, policy):
            self.policy, self.calls = policy, []

        def predict_action(self, images, instruction, state, seed=0):
            out = self.policy.predict_action(images, instruction, state, seed=seed)
            self.calls.append(dict(image=images.copy(), instruction=instruction, state=state.copy(), seed=seed, out=out))
            return out

    env = gym.make(ENV_ID, max_steps=12)
    remote, local = Recorder(RemotePolicy(f"ws://127.0.0.1:{server}")), Recorder(ECoTPolicy.from_pretrained(saved_policy))
    try:
        rec_remote, _ = run_episode(remote, env, index=2, seed=0, replan_steps=2)
    finally:
        remote.policy.close()
    rec_local, _ = run_episode(local, env, index=2, seed=0, replan_steps=2)
    first = remote.calls[0]
    again = local.policy.predict_action(first["image"], first["instruction"], first["state"], seed=first["seed"])
    np.testing.assert_allclose(first["out"]["actions"], again["actions"], atol=1e-5)
    assert first["out"]["reasoning_text"] == again["reasoning_text"]
    for r, l in zip(remote.calls, local.calls):  # the whole episode: same observations, same answers
        np.testing.assert_allclose(r["out"]["actions"], l["out"]["actions"], atol=1e-5)
        assert (r["seed"], r["out"]["reasoning_text"]) == (l["seed"], l["out"]["reasoning_text"])
    strip = lambda rec: {k: v for k, v in rec.items() if k not in ("calls", "policy_seconds")}
    assert strip(rec_remote) == strip(rec_local) and rec_remote["policy_calls"] == 6

    # and through the command
    main(["--server", f"ws://127.0.0.1:{server}", "--episodes", "1", "--max-steps", "8", "--videos", "1",
          "--out", str(tmp_path), "--no-progress"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["policy"] == f"ws://127.0.0.1:{server}" and summary["episodes"] == 1
    assert (tmp_path / "episode_000.gif").is_file()
