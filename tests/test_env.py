"""The gymnasium environment of the embedded world (`ecot.env`): gymnasium's own checks, the dataset's scenes and
frames, the grasp/carry/release rules, and the scripted expert that wrote the dataset succeeding in it (open loop:
its demonstrations replayed; closed loop: its plan re-made from the true state)."""
import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from ecot.env import (DEFAULT_MAX_STEPS, ENV_ID, GRASP_MAX_Z, MAX_DELTA_M, PickPlaceEnv, ScriptedExpert,
                      object_to_grasp)
from ecot.synthetic import (HALF_SIZE_M, MAX_STEPS, SPLITS, Z_CARRY, Z_GRASP, Z_HOVER, Z_PLACE, SceneObject,
                            sample_episode)

N_SCENES = 100


def replay(env, spec) -> dict:
    "Step a demonstration's own actions from its start (open loop)."
    env.reset(seed=0, options={"index": spec.index})
    for t, a in enumerate(spec.actions):
        obs, reward, terminated, truncated, info = env.step(a)
        if terminated or truncated:
            break
    return dict(success=info["success"], steps=t + 1, reward=reward)


def expert_episode(env, index, chunk_len=8, replan=4, max_calls=100) -> dict:
    "The scripted expert in the loop: a chunk per call, `replan` actions of it executed."
    obs, info = env.reset(seed=0, options={"index": index})
    expert = ScriptedExpert(env, chunk_len)
    for call in range(max_calls):
        for a in expert.predict_action(obs["image"], obs["instruction"], obs["state"], seed=call)["actions"][0][:replan]:
            obs, reward, terminated, truncated, info = env.step(a)
            if terminated or truncated:
                return dict(success=info["success"], steps=info["steps"])
    raise AssertionError(f"scene {index}: the episode did not end within {max_calls} calls")


def test_check_env_direct_and_through_make():
    check_env(PickPlaceEnv(render_mode="rgb_array"))
    made = gym.make(ENV_ID, render_mode="rgb_array", split="train", max_steps=12)
    assert made.spec.id == ENV_ID
    check_env(made.unwrapped)  # with a spec: the seeded-reset determinism checks run too
    assert (made.unwrapped.split, made.unwrapped.max_steps) == ("train", 12)
    assert PickPlaceEnv().max_steps == DEFAULT_MAX_STEPS > MAX_STEPS


@pytest.mark.parametrize("split", SPLITS)
def test_a_replayed_demonstration_shows_the_dataset_frames(split):
    "Every frame of the replay is the dataset's frame: the env moves the target as `objects_at` does."
    env = PickPlaceEnv(split=split, render_mode="rgb_array", jpeg_quality=None)
    for index in range(4):
        spec = sample_episode(split, index, 0)
        frames = spec.frames()
        obs, info = env.reset(seed=0, options={"index": index})
        assert obs["instruction"] == spec.instruction and info["target"] == spec.target.label
        np.testing.assert_array_equal(obs["image"], frames[0])
        for t, a in enumerate(spec.actions):
            obs, reward, terminated, truncated, info = env.step(a)
            np.testing.assert_array_equal(obs["image"], frames[t + 1], err_msg=f"{split} {index} step {t + 1}")
            np.testing.assert_allclose(obs["state"], spec.states[t + 1], atol=1e-6)
            if terminated:
                break
        assert info["success"] and not truncated


@pytest.mark.parametrize("split", SPLITS)
def test_the_demonstrations_succeed_open_loop(split):
    env = PickPlaceEnv(split=split, jpeg_quality=None)
    runs = [replay(env, sample_episode(split, i, 0)) for i in range(N_SCENES)]
    rate = np.mean([r["success"] for r in runs])
    print(f"{split}: open-loop replay {rate:.0%}")
    assert rate >= 0.95, rate
    assert all(r["reward"] == 1.0 for r in runs if r["success"])


def test_the_expert_succeeds_closed_loop():
    env = PickPlaceEnv(split="val", jpeg_quality=None)
    runs = [expert_episode(env, i) for i in range(N_SCENES)]
    rate = np.mean([r["success"] for r in runs])
    print(f"closed-loop expert {rate:.0%}, {np.mean([r['steps'] for r in runs]):.1f} steps")
    assert rate >= 0.95, rate
    assert max(r["steps"] for r in runs) <= MAX_STEPS


def test_a_demonstration_shifted_off_its_target_fails():
    "The success check can fail: shifted by more than the grasp radius, the same motion grasps nothing."
    env = PickPlaceEnv(jpeg_quality=None)
    spec = sample_episode("val", 0, 0)
    shift = HALF_SIZE_M[spec.target.kind] + 0.005
    env.reset(seed=0, options={"index": 0})
    actions = spec.actions.copy()
    actions[0, 1] += shift if spec.target.y < 0 else -shift  # first step sideways (towards the middle)
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        assert info["held"] is None
    assert not info["success"] and not terminated and reward == 0.0


def test_grasp_carry_release_rules():
    env = PickPlaceEnv(jpeg_quality=None)
    env.reset(seed=0, options={"index": 1})
    tgt, dst = env.target, env.destination

    def go(x, y, z, g):
        for _ in range(60):
            d = np.array([x, y, z]) - env.state[:3]
            out = env.step(np.r_[np.clip(d, -MAX_DELTA_M, MAX_DELTA_M), 0, 0, 0, g])
            if np.abs(d).max() <= MAX_DELTA_M:
                return out[4]
        raise AssertionError("not reached")

    assert go(tgt.x, tgt.y, GRASP_MAX_Z + 0.005, 0)["held"] is None   # closing too high
    assert go(tgt.x, tgt.y, Z_GRASP, 0)["held"] is None               # already closed: nothing is picked up
    go(tgt.x, tgt.y, Z_HOVER, 1)
    assert go(tgt.x, tgt.y, Z_GRASP, 0)["held"] == tgt.label           # open, down, close: held
    info = go(dst.x, dst.y + 0.1 * np.sign(-dst.y), Z_CARRY, 0)         # carried next to the destination
    assert info["held"] == tgt.label and not info["success"]
    assert (env.target.x, env.target.y) == pytest.approx(tuple(env.state[:2]))
    obs, reward, terminated, truncated, info = env.step(np.r_[np.zeros(6), 1.0])  # dropped beside it
    assert info["held"] is None and not terminated and info["distance"] == pytest.approx(0.1, abs=1e-6)
    go(env.target.x, env.target.y, Z_GRASP, 1)
    assert go(env.target.x, env.target.y, Z_GRASP, 0)["held"] == tgt.label  # picked up again
    info = go(dst.x, dst.y, Z_PLACE, 0)
    assert info["held"] == tgt.label and not info["success"]  # over the destination but still held
    obs, reward, terminated, truncated, info = env.step(np.r_[np.zeros(6), 1.0])
    assert (reward, terminated, info["success"]) == (1.0, True, True)


def test_only_graspable_objects_under_the_fingers_are_grasped():
    objs = [SceneObject("red", "cube", 0.3, 0.0), SceneObject("blue", "plate", 0.45, 0.0)]
    at = lambda x, y, z=Z_GRASP: np.array([x, y, z, 0, 0, 0, 0.0])
    assert object_to_grasp(objs, at(0.3, HALF_SIZE_M["cube"] * 0.9)) == 0
    assert object_to_grasp(objs, at(0.3, HALF_SIZE_M["cube"] * 1.1)) is None
    assert object_to_grasp(objs, at(0.3, 0.0, GRASP_MAX_Z)) is None
    assert object_to_grasp(objs, at(0.45, 0.0)) is None  # plates are destinations


def test_limits_truncation_and_bad_input():
    env = PickPlaceEnv(max_steps=12, jpeg_quality=None)
    obs, _ = env.reset(seed=3)
    for t in range(12):
        obs, reward, terminated, truncated, info = env.step([1.0, 1.0, 1.0, 0, 0, 0, 1])  # clipped to the limits
        assert obs in env.observation_space
    assert truncated and not terminated and info["steps"] == 12
    np.testing.assert_allclose(obs["state"][:3], [0.6, 0.25, 0.25], atol=1e-6)  # stopped at the workspace's edge
    with pytest.raises(ValueError, match="expected 7 finite numbers"):
        env.step([0.0] * 8)
    with pytest.raises(ValueError, match="unknown"):
        env.reset(options={"seed": 1})
    with pytest.raises(ValueError, match="split must be one of"):
        gym.make(ENV_ID, split="test")


def test_seeded_resets_are_the_dataset_sampler():
    env = PickPlaceEnv(split="train")
    a = [env.reset(seed=5)[0]["instruction"], env.reset()[0]["instruction"]]
    b = [sample_episode("train", i, 5).instruction for i in range(2)]
    assert a == b
    obs1, _ = env.reset(seed=5, options={"index": 9})
    obs2, _ = env.reset(seed=5, options={"index": 9})
    np.testing.assert_array_equal(obs1["image"], obs2["image"])
    obs3, _ = env.reset(seed=6, options={"index": 9})
    assert not np.array_equal(obs1["image"], obs3["image"])
