"""Acting as trained: with the gold text forced, the inference path hands the action head the hidden states of the
training forward (float64, stages 0, 2 and 8, one row and a ragged batch); and a run trained with `ecot-train`
leaves a policy that acts from its directory alone."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ecot.action_head import FlowMatchingActionHead
from ecot.backbone import QwenVLBackbone, build_qwen3vl
from ecot.collate import TOY_REASONING, toy_sample
from ecot.inference import ActingSpec, Reasoner, teacher_forced_gap
from ecot.render import THINKING_TOKENS
from ecot.testing import float64_rmsnorm


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def processor():
    from ecot.processor import load_processor
    return load_processor("tiny")


def _reasoner(processor, hidden_layer=-1, **tiny):
    vlm = build_qwen3vl("tiny", processor, seed=3, **tiny).to(torch.float64)
    bb = QwenVLBackbone(vlm, hidden_layer=hidden_layer).eval()
    head = FlowMatchingActionHead(bb.hidden_size, action_dim=7, chunk_len=4, state_dim=7, hidden_size=32,
                                  num_layers=1).double().eval()
    act = lambda h, m, s, noise, n: {"normalized_actions": head.predict_action(h, m, s, n, noise=noise)}
    tok = processor.tokenizer
    return Reasoner(bb, act, tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids(THINKING_TOKENS.end),
                    tok.pad_token_id, [tok.eos_token_id])


ROWS = {"one": [dict(seed=0)],
        "ragged": [dict(seed=0), dict(lang="put the spoon in the pot on the left of the stove", seed=1, n_views=2),
                   dict(lang="open it", seed=2, reasoning={k: v for k, v in TOY_REASONING.items()
                                                           if k not in ("PLAN", "MOVE")}),
                   dict(lang="wipe", seed=3, reasoning={})]}


@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("stage", [0, 2, 8])
def test_teacher_forced_inference_equals_training(processor, stage, rows):
    reasoner = _reasoner(processor)
    samples = [toy_sample(**kw) for kw in ROWS[rows]]
    noise = torch.randn(len(samples), 4, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with float64_rmsnorm():
        gap = teacher_forced_gap(reasoner, ActingSpec(stage=stage, tag2think_count={"PLAN": 3}).collator(processor),
                                 samples, noise)
    print(stage, rows, gap)
    assert all(a == b for a, b in gap["columns"]), gap
    assert gap["hidden"] < 1e-10 and gap["act"] < 1e-6, gap


def test_teacher_forcing_from_a_middle_layer(processor):
    "The action head reading a middle layer (vlm_hidden_layer) gets that layer at inference too."
    reasoner = _reasoner(processor, hidden_layer=1, num_layers=3, deepstack_visual_indexes=(0, 1))
    samples = [toy_sample(seed=0), toy_sample(lang="put it down", seed=1)]
    noise = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with float64_rmsnorm():
        gap = teacher_forced_gap(reasoner, ActingSpec(stage=3).collator(processor), samples, noise)
    assert gap["hidden"] < 1e-10, gap


def test_a_wrong_layout_is_caught(processor):
    "The check can fail: one thinking column too few at inference changes what the head reads."
    reasoner = _reasoner(processor)
    samples = [toy_sample(seed=0)]
    noise = torch.randn(1, 4, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spec = ActingSpec(stage=2)
    collator = spec.collator(processor)
    prompts = collator.prompts(samples)
    with float64_rmsnorm():
        good = reasoner(prompts, spec.n_thinking, 200, noise, forced=prompts["text_ids"])
        bad = reasoner(prompts, spec.n_thinking - 1, 200, noise, forced=prompts["text_ids"])
    assert good.mask.sum() - bad.mask.sum() == 1
    n = int(bad.mask.sum())
    assert (good.hidden[0][good.mask[0]][-n:] - bad.hidden[0][bad.mask[0]][-n:]).abs().max() > 1e-3


def test_greedy_rows_of_a_batch_equal_single_rows(processor):
    "Decoding for real (not forced): each row of a ragged batch writes what it writes alone."
    reasoner = _reasoner(processor)
    spec = ActingSpec(stage=2)
    col = spec.collator(processor)
    samples = [toy_sample(**kw) for kw in ROWS["ragged"]]
    noise = torch.randn(len(samples), 4, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with float64_rmsnorm():
        batch = reasoner(col.prompts(samples), spec.n_thinking, 12, noise)
        for b, s in enumerate(samples):
            one = reasoner(col.prompts([s]), spec.n_thinking, 12, noise[b:b + 1])
            assert one.token_ids[0] == batch.token_ids[b]
            torch.testing.assert_close(one.outputs["normalized_actions"][0], batch.outputs["normalized_actions"][b])


def test_ecot_train_leaves_a_policy_that_acts_alone(tmp_path):
    "A new user's path: ecot-train with a curriculum, then from_pretrained(run_dir/policy).predict_action in a fresh process."
    import shutil
    exe = shutil.which("ecot-train")
    run_dir = tmp_path / "run"
    res = subprocess.run([exe, "--config", "tiny", "--stage", "0", "--max-steps", "4", "--batch-size", "2",
                          "--wandb-mode", "disabled", "--run-dir", str(run_dir),
                          "--override", "trainer.curriculum_learning.enable=true",
                          "--override", "framework.enable_latent_reasoning=true",
                          "--override", "trainer.curriculum_learning.stage_schedule={0: 0, 2: 1, 3: 2}"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    saved = json.loads((run_dir / "policy/policy_config.json").read_text())
    assert saved["acting"]["stage"] == 2  # the stage the curriculum ended at
    assert saved["acting"]["image_size"] == [96, 96]
    script = textwrap.dedent(f'''
        import json, numpy as np
        from ecot.policy import ECoTPolicy
        pol = ECoTPolicy.from_pretrained({str(run_dir / "policy")!r})
        frame = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
        r = pol.predict_action(frame, "Put the red block in the bowl", np.zeros(7), max_new_tokens=8)
        print(json.dumps(dict(shape=list(r["actions"].shape), stage=r["stage"], n=r["n_columns"],
                              finite=bool(np.isfinite(r["actions"]).all()))))
    ''')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["shape"] == [1, 8, 7] and info["stage"] == 2 and info["finite"]
    assert 2 * 2 + 1 + 1 <= info["n"] <= 2 * 2 + 1 + 8 + 1  # thinking, marker, text, <|im_end|>


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_cuda_graphs_act_like_eager(processor):
    "On CUDA the captured column and act graphs give eager's tokens and actions, on every shape and on replays."
    from ecot.build import compile_model
    from ecot.policy import ECoTPolicy
    from ecot.eos import EOSConfig
    from ecot.action_head import ActionHeadConfig
    stats = {"bridge": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7}, "state": {"q01": [-1.0] * 7, "q99": [1.0] * 7}}}
    pol = ECoTPolicy.build("tiny", processor, 
                           action_head=ActionHeadConfig(action_dim=7, chunk_len=4, state_dim=7, hidden_size=32, num_layers=1), dataset_statistics=stats, eos=EOSConfig(),
                           acting=ActingSpec(stage=2, image_size=(64, 64), max_new_tokens=12)).cuda().eval()
    compile_model(pol, True)  # as ecot-train builds it on CUDA: compiled decoder layers and DiT blocks
    frame = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    calls = [(frame, "pick up the cup", np.zeros(7)),
             ([frame, frame[::-1].copy()], ["pick up the cup", "open the drawer on the left"], [np.zeros(7)] * 2),
             (frame, "pick up the cup", np.zeros(7))]
    out = {}
    for graphs in (True, False):
        pol.cuda_graphs = graphs
        out[graphs] = [pol.predict_action(*c, seed=2) for c in calls]
    for g, e in zip(out[True], out[False]):
        assert g["reasoning_text"] == e["reasoning_text"] and g["n_columns"] == e["n_columns"]
        np.testing.assert_allclose(g["actions"], e["actions"], atol=1e-4)
        np.testing.assert_allclose(g["eos_probs"], e["eos_probs"], atol=1e-4)
    np.testing.assert_array_equal(out[True][0]["actions"], out[True][2]["actions"])  # a replay repeats itself
    reasoner = pol.reasoner
    reasoner.cuda_graphs = True
    samples = [toy_sample(seed=0), toy_sample(lang="put the spoon in the pot", seed=1)]
    gap = teacher_forced_gap(reasoner, pol.acting.collator(processor), samples, torch.randn(2, 4, 7))
    assert gap["hidden"] < 1e-4 and gap["act"] < 1e-4, gap
