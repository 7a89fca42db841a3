"""Collator properties on random ragged batches (hypothesis), the real-processor loading path, and M-RoPE
position ids against transformers' own Qwen3VLModel. The exact per-stage masks live in nbs/12_collate.ipynb."""
import json
import string

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from ecot.collate import ECoTCollator, ROLES, masked_share, mrope_position_ids, token_roles, toy_sample
from ecot.config import TAGS
from ecot.processor import add_thinking_tokens, load_processor, tiny_processor_dir
from ecot.render import THINKING_TOKENS, render_reasoning, thinking_count

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
WORDS = "pick up the red cup place it on plate move left right forward grasp lift bowl".split()


def _fixture_json(path):
    step = {"task": "pick up the red cup", "plan": "reach the cup, grasp the cup", "subtask": "reach the cup",
            "subtask_reason": "the cup must be reached first", "move": "move left", "move_reason": "the cup is left"}
    path.write_text(json.dumps({"/toy/ep.npy": {"0": {"reasoning": {"0": step}, "features": {
        "gripper_position": [[10, 20]], "bboxes": [[[0.9, "red cup", [1, 2, 30, 40]]]]}}}}))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    "The tiny processor saved with save_pretrained (built from a small reasoning JSON)."
    tmp = tmp_path_factory.mktemp("proc")
    return tiny_processor_dir(_fixture_json(tmp / "r.json"), vocab_size=400, cache=tmp / "cache")


@pytest.fixture(scope="module")
def proc(tiny_dir):
    "Loaded through the real-processor path: a local directory, AutoProcessor.from_pretrained."
    return load_processor(str(tiny_dir))


def ids_of(proc):
    return [proc.tokenizer.convert_tokens_to_ids(t) for t in THINKING_TOKENS]


# ---------------------------------------------------------------- loading and tokens

def test_real_processor_path_loads_saved_tiny_processor(tiny_dir, proc):
    from transformers import Qwen3VLProcessor
    assert isinstance(proc, Qwen3VLProcessor)
    assert (tiny_dir / "processor_config.json").is_file()
    # same result through the 'tiny' entry point (cache hit) and through the directory
    assert len(proc.tokenizer) == len(load_processor(str(tiny_dir)).tokenizer)
    sot, think, eot = ids_of(proc)
    assert len({sot, think, eot}) == 3 and min(sot, think, eot) >= len(proc.tokenizer) - 3
    assert add_thinking_tokens(proc) == [sot, think, eot]


def test_missing_directory_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_processor("/no/such/qwen3vl")


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from(list(THINKING_TOKENS)), st.text(string.printable, max_size=8)), max_size=12))
def test_thinking_tokens_never_split(proc, pieces):
    tok = proc.tokenizer
    ids = tok.encode("".join(pieces), add_special_tokens=False)
    want = [ids_of(proc)[list(THINKING_TOKENS).index(p)] for p in pieces if p in THINKING_TOKENS]
    assert [i for i in ids if i in ids_of(proc)] == want


def test_stage_beyond_tags_is_an_error(proc):
    with pytest.raises(ValueError, match=f"stage = {len(TAGS) + 1}"):
        ECoTCollator(proc, stage=len(TAGS) + 1)
    col = ECoTCollator(proc, stage=0)
    with pytest.raises(ValueError, match="0 <= stage <= 8"):
        col.stage = 9
    with pytest.raises(ValueError, match="stage = 9"):
        render_reasoning({}, 9)


# ---------------------------------------------------------------- ragged batches

tag_text = st.text(alphabet=string.ascii_lowercase + string.digits + " ,[]", min_size=1, max_size=24)
reasoning_st = st.dictionaries(st.sampled_from(TAGS), tag_text, max_size=len(TAGS))
sample_st = st.builds(lambda lang, r, views, hw, seed: toy_sample(" ".join(lang), r, views, (hw, hw), seed=seed),
                      st.lists(st.sampled_from(WORDS), min_size=1, max_size=12), reasoning_st,
                      st.integers(1, 2), st.sampled_from([32, 64, 96]), st.integers(0, 10_000))


@SETTINGS
@given(samples=st.lists(sample_st, min_size=1, max_size=4), stage=st.integers(0, len(TAGS)),
       count=st.integers(0, 3), overrides=st.dictionaries(st.sampled_from(TAGS), st.integers(0, 3), max_size=3))
def test_alignment_and_masking_invariants(proc, samples, stage, count, overrides):
    col = ECoTCollator(proc, stage=stage, thinking_token_count=count, tag2think_count=overrides)
    b = col(samples)
    sot, think, eot = ids_of(proc)
    ids, lab, am = b["input_ids"], b["labels"], b["attention_mask"]
    B, L = ids.shape
    n = thinking_count(stage, count, overrides)
    assert b["think_counts"].tolist() == [n if stage else 0] * B
    assert int((ids == think).sum()) == B * n
    # pads: mask 0, label -100, pad id, position 0
    pad = am == 0
    assert (lab[pad] == -100).all() and (ids[pad] == proc.tokenizer.pad_token_id).all()
    assert (b["position_ids"][:, pad] == 0).all()
    # every row's real tokens are contiguous
    for r in range(B):
        real = am[r].nonzero().flatten()
        assert (real == torch.arange(real[0], real[-1] + 1)).all()
    # thinking tokens, markers and the prompt carry no label; supervised text decodes back
    assert (lab[torch.isin(ids, torch.tensor([sot, think, eot]))] == -100).all()
    for r, s in enumerate(samples):
        row, y = ids[r][am[r].bool()], lab[r][am[r].bool()]
        sup = (y != -100).nonzero().flatten()
        assert sup.numel() > 0 and (sup == torch.arange(sup[0], len(y))).all()  # one block, at the end
        prompt_len = sup[0].item() - (n + 2 if stage else 0)
        assert row[prompt_len - 1] != think and (row[:prompt_len] == proc.image_token_id).sum() > 0
        text = render_reasoning(s["reasoning"], stage, count, overrides).text
        assert proc.tokenizer.decode(row[sup]) == text + "<|im_end|>"
    if stage:
        start_cols = (ids == sot).int().argmax(1)
        assert (ids == sot).sum(1).tolist() == [1] * B and len(set(start_cols.tolist())) == 1  # aligned
        ts = int(start_cols[0]) + 1  # the first thinking column, the same in every row
        assert b["think_start"] == (ts if n else None)
        assert (ids[:, ts:ts + n] == think).all() and (ids[:, ts + n] == eot).all()
    else:
        assert b["think_start"] is None and (am[:, 0] == 1).all()  # stage 0: right padding only
    roles = token_roles(b, col)
    assert ((roles == ROLES.index("supervised")) == (lab != -100)).all()
    assert (masked_share(b) < 1).all()


@SETTINGS
@given(samples=st.lists(sample_st, min_size=1, max_size=3), stage=st.integers(0, len(TAGS)), cut=st.integers(1, 60))
def test_truncation_keeps_prompt_and_thinking(proc, samples, stage, cut):
    full = ECoTCollator(proc, stage=stage)(samples)
    longest = int(full["attention_mask"].sum(1).max())
    col = ECoTCollator(proc, stage=stage, model_max_length=max(1, longest - cut))
    unsup = (full["labels"] != -100).logical_not() & full["attention_mask"].bool()
    if int(unsup.sum(1).max()) > col.model_max_length:
        with pytest.raises(ValueError, match="model_max_length"):
            col(samples)
        return
    b = col(samples)
    assert int(b["attention_mask"].sum(1).max()) <= col.model_max_length
    assert (b["think_counts"] == full["think_counts"]).all() and b["think_start"] == full["think_start"]
    dropped = 0
    for r in range(len(samples)):
        a = full["input_ids"][r][full["attention_mask"][r].bool()]
        t = b["input_ids"][r][b["attention_mask"][r].bool()]
        assert (a[:len(t)] == t).all()  # a prefix of the full row: prompt and thinking kept
        assert int(unsup[r].sum()) <= len(t)
        dropped += len(a) - len(t)
        assert b["meta"][r]["truncated_tokens"] == len(a) - len(t)
    assert col.n_truncated_tokens == dropped and col.n_truncated_rows == sum(m["truncated_tokens"] > 0 for m in b["meta"])


# ---------------------------------------------------------------- M-RoPE against transformers

def tiny_model(proc):
    tok = proc.tokenizer
    cid = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, pad_token_id=tok.pad_token_id,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                     mrope_interleaved=True))
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=64, deepstack_visual_indexes=[0])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=cid("<|image_pad|>"),
                        video_token_id=cid("<|video_pad|>"), vision_start_token_id=cid("<|vision_start|>"),
                        vision_end_token_id=cid("<|vision_end|>"))
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def vlm(proc):
    return tiny_model(proc)


@pytest.mark.parametrize("stage", [0, 2, 8])
def test_position_ids_match_qwen3vl_model(proc, vlm, stage):
    samples = [toy_sample("lift", seed=1), toy_sample("pick up the red cup and lift it", n_views=2, seed=2, image_hw=(96, 64)),
               toy_sample("reach", reasoning={"MOVE": "left"}, seed=3, image_hw=(32, 32))]
    col = ECoTCollator(proc, stage=stage, model_config=vlm.config)
    b = col(samples)
    want, _ = vlm.model.get_rope_index(b["input_ids"], b["mm_token_type_ids"], b["image_grid_thw"],
                                       attention_mask=b["attention_mask"])
    assert torch.equal(b["position_ids"], want)
    # the batch runs through the model as is, and positions given or inferred agree
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "labels")
    with torch.no_grad():
        given_pos = vlm(**{k: b[k] for k in keys}, position_ids=b["position_ids"])
        inferred = vlm(**{k: b[k] for k in keys})
    real = b["attention_mask"].bool()
    torch.testing.assert_close(given_pos.logits[real], inferred.logits[real])
    assert torch.isfinite(given_pos.loss)


def test_mrope_position_ids_direct_equals_model(vlm):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 100, (2, 30), generator=g)
    mm = torch.zeros_like(ids, dtype=torch.int32)
    mm[0, 3:7] = 1
    mm[1, 10:16] = 1  # a 1x4x6 grid: 2x3 merged
    am = torch.ones_like(ids)
    am[1, :4] = 0
    grid = torch.tensor([[1, 4, 4], [1, 4, 6]])
    want, _ = vlm.model.get_rope_index(ids, mm, grid, attention_mask=am)
    assert torch.equal(mrope_position_ids(ids, mm, grid, am, 2), want)
