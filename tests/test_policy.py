"""Policy tests too heavy for the notebooks: latent-forward exactness over several cases, overfitting one batch,
and a save/load round trip checked in a fresh process."""
import json
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from ecot.action_head import ActionHeadConfig
from ecot.backbone import QwenVLBackbone, build_qwen3vl
from ecot.reference import compare_latent_to_reference, loop_latent_forward
from ecot.testing import float64_rmsnorm, toy_batch
from ecot.policy import ECoTPolicy, PolicyConfig


class ToyTok:
    "Tokenizer stand-in: 64 ids, vision specials at 60..63 (toy_batch uses 50 = pad, 51..53 = thinking markers)."
    unk_token_id, pad_token_id = None, 50
    _special = {"<|image_pad|>": 60, "<|video_pad|>": 61, "<|vision_start|>": 62, "<|vision_end|>": 63}

    def convert_tokens_to_ids(self, t):
        return self._special.get(t)

    def __len__(self):
        return 64


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny models on a shared 2-core machine: intra-op threads cost far more than they save (5-40x here)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _float64_backbone(hidden_layer=-1, attn="sdpa", dtype=torch.float64, **tiny):
    vlm = build_qwen3vl("tiny", ToyTok(), attn_implementation=attn, seed=3, **tiny).to(dtype)
    return QwenVLBackbone(vlm, hidden_layer=hidden_layer).eval()


def _float64_batch(vlm, **kw):
    b = toy_batch(vlm, **kw)
    b["pixel_values"] = b["pixel_values"].to(vlm.dtype)
    return b


EXACT_CASES = {
    "ragged-left-right-pad": dict(batch=dict(think_counts=(2, 0, 3))),
    "all-rows-thinking": dict(batch=dict(think_counts=(3, 1, 2), prefix_lens=(2, 6, 4), suffix_lens=(1, 6, 3))),
    "batch-of-one": dict(batch=dict(think_counts=(4,), prefix_lens=(3,), suffix_lens=(5,))),
    "no-suffix": dict(batch=dict(think_counts=(2, 1), prefix_lens=(3, 3), suffix_lens=(0, 0))),
    "middle-layer-deeper": dict(hidden_layer=2, tiny=dict(num_layers=3, deepstack_visual_indexes=(0, 1), head_dim=32),
                                batch=dict(think_counts=(1, 3, 2), image_hw=(64, 96))),
    # eager attention only in float32: transformers' eager softmax runs in float32, where a float64 mask minimum
    # becomes -inf and left-padded (fully masked) rows turn NaN -- a float64-only artefact of the library
    "eager-float32": dict(attn="eager", dtype=torch.float32, atol=1e-5, batch=dict(think_counts=(2, 0, 3))),
}


@pytest.mark.parametrize("impl", ["columns", "loop"])
@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_latent_forward_equals_naive_reference(case, impl):
    "KV-cache latent forward (and the Coconut-style loop of ecot.reference) == full recompute per column (float64)."
    spec = EXACT_CASES[case]
    bb = _float64_backbone(spec.get("hidden_layer", -1), spec.get("attn", "sdpa"), spec.get("dtype", torch.float64),
                           **spec.get("tiny", {}))
    forward = {"columns": bb.forward, "loop": lambda **b: loop_latent_forward(bb, **b)}[impl]
    batch = _float64_batch(bb.vlm, **spec["batch"])
    t0 = time.perf_counter()
    with float64_rmsnorm():
        diff = compare_latent_to_reference(bb, batch, forward=forward)
    elapsed = time.perf_counter() - t0
    print(f"{case} ({impl}): {diff} in {elapsed:.2f}s")
    for k in ("logits", "hidden", "latent_inputs", "loss", "grads"):
        assert diff[k] < spec.get("atol", 1e-10), (k, diff)
    # prefix pass, one pass per thinking column, then the rest (<|end_of_thinking|> always follows the span)
    assert diff["passes"] == 1 + max(spec["batch"]["think_counts"]) + 1


def _fresh_dynamo_stats():
    "Dynamo as in a new process, and its graph counters (`reset()` keeps them: earlier tests' graphs would count)."
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch._dynamo.utils.counters["stats"]


def test_compiled_columns_equal_reference():
    "The torch.compile'd layer steps (what runs on CUDA), forced on CPU: == reference in float32; graphs reused."
    stats = _fresh_dynamo_stats()
    bb = _float64_backbone(hidden_layer=2, dtype=torch.float32, num_layers=3, deepstack_visual_indexes=(0, 1))
    bb.compile_columns = True
    bb.train()  # the training step is what the compiled path is for (dropout 0 in this config)
    for kw in (dict(think_counts=(2, 0, 3)), dict(think_counts=(4, 1), prefix_lens=(3, 6), suffix_lens=(2, 4))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            diff = compare_latent_to_reference(bb, _float64_batch(bb.vlm, **kw))
        # a failed compile falls back to eager with a warning: that must not be what was tested
        assert not [w for w in caught if "layer steps failed" in str(w.message)]
        print("compiled columns:", diff)
        for k in ("logits", "hidden", "latent_inputs", "loss", "grads"):
            assert diff[k] < 2e-5, (k, diff)
    assert bb.compile_columns is True
    # every column of a batch has the same shapes, and so has every layer of a pass: 7 columns and 2 x 2 chunk passes
    # (prefix, without past keys; the rest, with them) of 3 layers each ran on at most two graphs per kind (the first
    # batch's, then one with dynamic shapes after the second batch changed them), not one per column, pass or layer
    print(dict(stats))
    assert stats["unique_graphs"] <= 3 * 2, dict(stats)


def test_stage0_equals_transformers_forward():
    "The one-pass path with the batch's position ids == Qwen3VLForConditionalGeneration.forward (float64)."
    bb = _float64_backbone()
    b = _float64_batch(bb.vlm, stage=0, prefix_lens=(3, 7, 1), suffix_lens=(4, 6, 2))
    with torch.no_grad():
        ours = bb(**{k: v for k, v in b.items() if k not in ("stage", "meta")}, return_logits=True)
        ref = bb.vlm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                     image_grid_thw=b["image_grid_thw"], mm_token_type_ids=b["mm_token_type_ids"], labels=b["labels"])
    real = b["attention_mask"].bool()
    assert ours.path == "single"
    assert (ours.logits - ref.logits)[real].abs().max() < 1e-10
    # both losses are computed from float32-upcast logits (transformers' convention), reduced in another order
    assert abs(ours.vlm_loss.item() - ref.loss.item()) < 1e-6 * ref.loss.item()


def _policy(**kw):
    args = dict(action_head=ActionHeadConfig(action_dim=7, chunk_len=4, state_dim=7, hidden_size=64, num_layers=2),
                config=PolicyConfig(repeated_diffusion_steps=8, vlm_loss_weight=0.5))
    args.update(kw)
    return ECoTPolicy.build("tiny", ToyTok(), **args)


@pytest.mark.parametrize("stage,path", [(0, "single"), (1, "latent"), (2, "latent")])
def test_gradients_present_and_finite(stage, path):
    "Every trainable parameter gets a finite, non-zero gradient on both paths."
    pol = _policy()
    out = pol(toy_batch(pol.backbone.vlm, stage=stage, think_counts=(2, 0, 3) if stage == 1 else (4, 4, 4)))
    assert out["path"] == path
    out["total_loss"].backward()
    bad = [n for n, p in pol.named_parameters()
           if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not bad


def test_overfit_one_batch_latent():
    "Training the whole tiny policy on one stage-1 batch drives the action loss down by >= 90%."
    torch.manual_seed(0)
    pol = _policy()
    batch = toy_batch(pol.backbone.vlm, stage=1)

    def eval_loss():
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            pol.eval()
            pol.config = replace(pol.config, repeated_diffusion_steps=32)
            with torch.no_grad():
                loss = pol(batch)["action_loss"].item()
            pol.train()
            pol.config = replace(pol.config, repeated_diffusion_steps=8)
        return loss

    opt = torch.optim.AdamW(pol.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    before = eval_loss()
    for _ in range(100):
        out = pol(batch)
        opt.zero_grad()
        out["total_loss"].backward()
        torch.nn.utils.clip_grad_norm_(pol.parameters(), 1.0)
        opt.step()
    after = eval_loss()
    elapsed = time.perf_counter() - t0
    print(f"overfit: action loss {before:.3f} -> {after:.4f} ({after / before:.1%}), vlm loss "
          f"{out['vlm_loss'].item():.3f}, {elapsed:.1f}s")
    assert out["path"] == "latent"
    assert after <= 0.1 * before


@pytest.fixture(scope="module")
def processor():
    from ecot.processor import load_processor
    return load_processor("tiny")


STATS = {"bridge": {"action": {"q01": [-0.1] * 7, "q99": [0.1] * 7, "mask": [True] * 6 + [False]},
                    "state": {"q01": [-1.0] * 7, "q99": [1.0] * 7}}}
FRAME = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)


def _acting_policy(processor, stage=2, **kw):
    from ecot.inference import ActingSpec
    return ECoTPolicy.build("tiny", processor, 
                            action_head=ActionHeadConfig(action_dim=7, chunk_len=4, state_dim=7, hidden_size=32, num_layers=1),
                            dataset_statistics=STATS, config=PolicyConfig(seed=1),
                            acting=ActingSpec(stage=stage, image_size=(64, 64), max_new_tokens=5), **kw)


def test_predict_action_shapes_and_determinism(processor):
    pol = _acting_policy(processor)
    a = pol.predict_action(FRAME, "pick up the cup", np.zeros(7), seed=5)
    b = pol.predict_action(FRAME, "pick up the cup", np.zeros(7), seed=5)
    c = pol.predict_action(FRAME, "pick up the cup", np.zeros(7), seed=6, num_steps=8)
    assert a["actions"].shape == (1, 4, 7) and a["normalized_actions"].shape == (1, 4, 7)
    np.testing.assert_array_equal(a["actions"], b["actions"])
    assert a["reasoning_text"] == b["reasoning_text"]
    assert not np.array_equal(a["actions"], c["actions"])
    assert np.all(np.abs(a["actions"][..., :6]) <= 0.1 + 1e-6)


def test_save_load_roundtrip_fresh_process(tmp_path, processor):
    "A trained policy saved here reloads in a new Python process with nothing else and gives identical outputs."
    from ecot.collate import ECoTCollator, toy_sample
    torch.manual_seed(0)
    pol = _acting_policy(processor)
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-3)
    batch = ECoTCollator(processor, stage=2)([toy_sample(seed=0), toy_sample(seed=1)])
    for _ in range(3):  # move the weights away from their seeded initialisation
        opt.zero_grad()
        pol(batch)["total_loss"].backward()
        opt.step()
    expected = pol.predict_action(FRAME, "x", np.ones(7), seed=11)
    ckpt = pol.save_pretrained(tmp_path / "ckpt")
    np.save(tmp_path / "frame.npy", FRAME)
    checksum = float(sum(p.double().sum() for p in pol.state_dict().values()))
    script = textwrap.dedent(f'''
        import json, numpy as np, torch
        torch.set_num_threads(1)  # same as the test process: bitwise-identical reductions
        from ecot.policy import ECoTPolicy
        pol = ECoTPolicy.from_pretrained({str(ckpt)!r})
        r = pol.predict_action(np.load({str(tmp_path / "frame.npy")!r}), "x", np.ones(7), seed=11)
        np.save({str(tmp_path / "actions.npy")!r}, r["actions"])
        print(json.dumps(dict(checksum=float(sum(p.double().sum() for p in pol.state_dict().values())),
                              stats=pol.dataset_statistics, text=r["reasoning_text"], stage=r["stage"])))
    ''')
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["checksum"] == checksum
    assert info["stats"] == STATS
    assert (info["text"], info["stage"]) == (expected["reasoning_text"], 2)
    np.testing.assert_array_equal(np.load(tmp_path / "actions.npy"), expected["actions"])


def test_from_pretrained_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="policy_config.json"):
        ECoTPolicy.from_pretrained(tmp_path / "missing")


def test_collated_batch_latent_exactness(processor):
    "On a real collated stage-2 batch (chat template, left padding from prompts of different lengths): KV == naive."
    from ecot.collate import ECoTCollator, toy_sample
    vlm = build_qwen3vl("tiny", processor, seed=5).to(torch.float64)
    bb = QwenVLBackbone(vlm).eval()
    batch = ECoTCollator(processor, stage=2)([toy_sample(lang="pick up the red cup", seed=0),
                                              toy_sample(lang="put the spoon in the pot on the left", seed=1),
                                              toy_sample(lang="open it", seed=2, reasoning={})])
    assert (batch["attention_mask"][:, 0] == 0).any()
    batch["pixel_values"] = batch["pixel_values"].double()
    with float64_rmsnorm():
        diff = compare_latent_to_reference(bb, batch)
    print("collated stage 2:", diff)
    for k in ("logits", "hidden", "latent_inputs", "loss", "grads"):
        assert diff[k] < 1e-10, (k, diff)


def test_acting_without_reasoning_needs_a_policy_trained_without_it(processor):
    "with_reasoning=False is refused for a policy whose every training row carried reasoning text; allowed with dropout."
    from dataclasses import replace
    pol = _acting_policy(processor)
    with pytest.raises(ValueError, match="reasoning_dropout_prob = 0"):
        pol.predict_action(FRAME, "x", np.zeros(7), with_reasoning=False)
    pol.acting = replace(pol.acting, reasoning_dropout_prob=0.3)
    r = pol.predict_action(FRAME, "x", np.zeros(7), with_reasoning=False)
    n = pol.acting.n_thinking
    assert r["reasoning"] == [{}] and r["n_columns"] == n + 2  # latent columns, end marker, <|im_end|>


def test_bad_observations_name_what_is_wrong(processor):
    pol = _acting_policy(processor)
    for args, msg in [((FRAME[..., :1], "x", np.zeros(7)), "image view 0"),
                      ((FRAME, "x", np.zeros(6)), r"expected \(7,\)"),
                      ((FRAME, "x", np.full(7, np.inf)), "finite"),
                      ((FRAME, 3, np.zeros(7)), "instruction"),
                      (([FRAME], ["a", "b"], [np.zeros(7)] * 2), "images: 1 entries for 2")]:
        with pytest.raises((ValueError, TypeError), match=msg):
            pol.predict_action(*args)


def test_compiled_blocks_reuse_one_graph_across_lengths_and_batch_sizes():
    "compile_blocks (forced on CPU): equal to eager, and new lengths / batch sizes compile nothing new."
    stats = _fresh_dynamo_stats()
    bb = _float64_backbone(dtype=torch.float32, num_layers=3, deepstack_visual_indexes=(0, 1)).train()
    bb.compile_blocks()
    shapes = [((3, 5, 4), (4, 2, 5)), ((3, 5, 4), (9, 9, 9)), ((3, 5), (4, 4)), ((2, 2, 2, 2), (5, 1, 3, 8))]
    first = None
    for prefix_lens, suffix_lens in shapes:  # every batch is padded (ragged rows): the first one's graphs serve them all
        b = _float64_batch(bb.vlm, think_counts=[0] * len(prefix_lens), prefix_lens=prefix_lens,
                           suffix_lens=suffix_lens, stage=0)
        kw = {k: v for k, v in b.items() if k not in ("stage", "meta", "think_start", "think_counts")}
        out = bb(**kw, return_logits=True)
        with torch.compiler.set_stance("force_eager"):
            ref = bb(**kw, return_logits=True)
        real = b["attention_mask"].bool()
        torch.testing.assert_close(out.logits[real], ref.logits[real], rtol=1e-4, atol=1e-4)
        out.vlm_loss.backward()
        first = first or dict(stats)
    # one graph for every decoder layer; two for the vision blocks (the first block's input is a view, the others' not)
    assert first["unique_graphs"] == 3, first
    assert stats["unique_graphs"] == 3, dict(stats)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_graphs_train_like_compiled(autocast):
    """Training steps whose compiled regions and latent text passes replay CUDA graphs (`cuda_graphs`) give the
    compiled steps' losses and gradients: over two sequence lengths (two signatures), latent batches (their text
    passes one region, `LatentText`) of two lengths, a second forward before the backward (CRaFT's pattern: the second
    one runs the compiled call), and gradients accumulated over two micro-batches; under bf16 autocast (its weight
    cache off) as the trainer runs it on a GPU."""
    from ecot.build import compile_model
    # (suffix lengths, stage, micro-batches: "once", "twice" = two forwards then one backward, "accum" = two backwards)
    plan = [((4, 4, 4), 0, "once"), ((9, 9, 9), 0, "once"), ((4, 4, 4), 0, "once"), ((4, 4, 4), 0, "twice"),
            ((4, 4, 4), 1, "once"), ((9, 9, 9), 0, "accum"), ((4, 4, 4), 0, "once"), ((4, 4, 4), 1, "once"),
            ((9, 9, 9), 1, "once"), ((4, 4, 4), 1, "twice"), ((4, 4, 4), 1, "accum"), ((4, 4, 4), 1, "once")]
    runs = {}
    for graphs in (False, True):
        pol = _policy().cuda().train()
        compile_model(pol, True, cuda_graphs=graphs)
        torch.manual_seed(1)
        losses, grads = [], []
        for suffix, stage, how in plan:
            batch = lambda s: {k: v.cuda() if torch.is_tensor(v) else v for k, v in toy_batch(
                pol.backbone.vlm, stage=stage, suffix_lens=s, think_counts=(2, 0, 3) if stage else (0,) * 3).items()}
            with torch.autocast("cuda", torch.bfloat16, enabled=autocast, cache_enabled=False):
                loss = pol(batch(suffix))["total_loss"]
                if how == "twice":
                    loss = loss + 0.5 * pol(batch(suffix))["total_loss"]
            loss.backward()
            if how == "accum":
                with torch.autocast("cuda", torch.bfloat16, enabled=autocast, cache_enabled=False):
                    extra = pol(batch((4, 4, 4)))["total_loss"]
                extra.backward()
                loss = loss + extra
            losses.append(loss.item())
            grads.append(torch.cat([p.grad.flatten() for p in pol.parameters() if p.grad is not None]))
            with torch.no_grad():
                for p in pol.parameters():
                    if p.grad is not None:
                        p -= 0.01 * p.grad
            pol.zero_grad(set_to_none=True)
        captured = sum(len(m._compiled_call_impl.graphs) for m in pol.modules()
                       if m._compiled_call_impl is not None and hasattr(m._compiled_call_impl, "graphs"))
        latent = pol.backbone.latent_text._compiled_call_impl  # not a submodule: not among pol.modules()
        runs[graphs] = losses, grads, captured, latent and list(latent.graphs.values())
    (l0, g0, _, _), (l1, g1, captured, latent_sigs) = runs[False], runs[True]
    assert captured >= 2 * 2 + 2 + 2 * 2, captured  # decoder layers x 2 lengths, vision blocks, DiT blocks x 2 lengths
    assert len(latent_sigs) == 2 and all(latent_sigs), latent_sigs  # the latent text passes of both lengths captured
    tol = dict(rtol=2e-2, atol=1e-3) if autocast else dict(rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(l1, l0, **tol)
    # float32: a parameter's gradients from the latent passes are summed inside the region's graph before reaching
    # `.grad`, which may order the sum differently from the compiled step's autograd
    gtol = tol if autocast else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, **gtol)


def test_decoding_stops_where_training_rows_were_cut(processor):
    "Text never runs past model_max_length: training cut its rows there, so the policy never saw longer ones."
    from dataclasses import replace
    pol = _acting_policy(processor)
    prompt = int(pol.observation_batch([(FRAME, "x", np.zeros(7))])["attention_mask"].sum())
    pol.acting = replace(pol.acting, model_max_length=prompt + 12, max_new_tokens=100)
    r = pol.predict_action(FRAME, "x", np.zeros(7))
    assert prompt + r["n_columns"] <= prompt + 12 and r["truncated"] == [True]
