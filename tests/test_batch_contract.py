"""The batch contract (`ecot.collate.Batch`, `PromptBatch`, `check_batch`): the collator's output passes at stage 0 and
at latent stages, with and without robot state and EOS labels; each kind of mistake fails with a message naming the
key, what was found and what was expected. The contract itself is documented in nbs/12_collate.ipynb."""
import numpy as np
import pytest
import torch

from ecot.collate import (BATCH_KEYS, BATCH_TENSORS, Batch, ECoTCollator, PromptBatch, check_batch, toy_sample)
from ecot.processor import load_processor


@pytest.fixture(scope="module")
def proc():
    return load_processor("tiny")


def _samples(states: bool = True, eos: bool = False):
    rows = [toy_sample("lift", seed=1, state_dim=7 if states else None),
            toy_sample("pick up the red cup and lift it high", n_views=2, seed=2, state_dim=7 if states else None),
            toy_sample("reach", reasoning={"MOVE": "move left"}, seed=3, state_dim=7 if states else None)]
    if eos:  # one labelled sample, one partly known, one without labels
        rows[0] = {**rows[0], "eos": np.array([0, 1, 0, 0], np.float32)}
        rows[1] = {**rows[1], "eos": [0, 0, 0, 1], "eos_mask": np.array([1, 1, 1, 0], bool)}
    return rows


@pytest.fixture(scope="module")
def latent_batch(proc):
    return ECoTCollator(proc, stage=2)(_samples())


def test_contract_lists_every_key():
    assert BATCH_KEYS == tuple(k for k in Batch.__annotations__ if k not in ("eos", "eos_mask"))
    assert Batch.__optional_keys__ == {"eos", "eos_mask"}
    assert PromptBatch.__required_keys__ == set(PromptBatch.__annotations__)
    non_tensors = {"think_start", "stage", "meta", "text_ids"}
    assert set(BATCH_TENSORS) == (set(Batch.__annotations__) | set(PromptBatch.__annotations__)) - non_tensors


@pytest.mark.parametrize("stage", [0, 1, 3, 8])
@pytest.mark.parametrize("states", [True, False])
@pytest.mark.parametrize("eos", [False, True])
def test_collated_batches_pass(proc, stage, states, eos):
    b = ECoTCollator(proc, stage=stage)(_samples(states, eos))
    check_batch(b)
    assert set(b) == set(BATCH_KEYS) | ({"eos", "eos_mask"} if eos else set())
    assert (b["states"] is None) == (not states)
    assert (b["think_start"] is None) == (stage == 0)


@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("states", [True, False])
def test_prompt_batches_pass(proc, stage, states):
    col = ECoTCollator(proc, stage=stage)
    check_batch(col.prompts(_samples(states)), PromptBatch)
    check_batch(col.prompts(_samples(states), pad_to_multiple_of=8), PromptBatch)
    with pytest.raises(KeyError, match="lacks \\['labels'"):  # a prompt batch is not a training batch
        check_batch(col.prompts(_samples(states)))


def _drop(b, key):
    return {k: v for k, v in b.items() if k != key}


@pytest.mark.parametrize("key", BATCH_KEYS)
def test_missing_key_is_named(latent_batch, key):
    with pytest.raises(KeyError, match=f"batch lacks \\['{key}'\\]"):
        check_batch(_drop(latent_batch, key))


def test_unknown_key_and_half_an_eos_pair(proc, latent_batch):
    with pytest.raises(KeyError, match="outside ecot.collate.Batch: \\['eos_masks'\\]"):
        check_batch({**latent_batch, "eos_masks": latent_batch["action_mask"]})
    labelled = ECoTCollator(proc, stage=2)(_samples(eos=True))
    with pytest.raises(KeyError, match="'eos' but no 'eos_mask'"):
        check_batch(_drop(labelled, "eos_mask"))
    with pytest.raises(KeyError, match="'eos_mask' but no 'eos'"):
        check_batch(_drop(labelled, "eos"))


@pytest.mark.parametrize("key, bad, found, expected", [
    ("input_ids", torch.int32, "torch.int32", "torch.int64"),
    ("attention_mask", torch.bool, "torch.bool", "torch.int64"),
    ("labels", torch.float32, "torch.float32", "torch.int64"),
    ("mm_token_type_ids", torch.int64, "torch.int64", "torch.int32"),
    ("position_ids", torch.int32, "torch.int32", "torch.int64"),
    ("pixel_values", torch.bfloat16, "torch.bfloat16", "torch.float32"),
    ("actions", torch.float64, "torch.float64", "torch.float32"),
    ("action_mask", torch.uint8, "torch.uint8", "torch.bool"),
    ("states", torch.float16, "torch.float16", "torch.float32"),
    ("think_counts", torch.int32, "torch.int32", "torch.int64"),
])
def test_wrong_dtype_names_key_found_and_expected(latent_batch, key, bad, found, expected):
    with pytest.raises(TypeError, match=f"batch\\['{key}'\\] has dtype {found}: expected {expected}"):
        check_batch({**latent_batch, key: latent_batch[key].to(bad)})


def test_not_a_tensor(latent_batch):
    with pytest.raises(TypeError, match=r"batch\['states'\] is a ndarray: expected a torch.float32 tensor of shape "
                                        r"\(B, S\) or None"):
        check_batch({**latent_batch, "states": latent_batch["states"].numpy()})
    with pytest.raises(TypeError, match=r"batch\['actions'\] is a NoneType"):
        check_batch({**latent_batch, "actions": None})
    with pytest.raises(TypeError, match=r"batch\['stage'\] is 2.0 \(float\)"):
        check_batch({**latent_batch, "stage": 2.0})


def test_mismatched_shapes_name_key_found_expected_and_source(latent_batch):
    b = latent_batch
    B, L = b["input_ids"].shape
    with pytest.raises(ValueError, match=rf"batch\['labels'\] has shape \({B}, {L - 1}\): expected \(B, L\) = "
                                         rf"\({B}, {L}\) \(L = {L} from batch\['input_ids'\]\)"):
        check_batch({**b, "labels": b["labels"][:, 1:]})
    with pytest.raises(ValueError, match=rf"batch\['think_counts'\] has shape \({B - 1},\): expected \(B,\) = \({B},\) "
                                         r"\(B = 3 from batch\['input_ids'\]\)"):
        check_batch({**b, "think_counts": b["think_counts"][1:]})
    with pytest.raises(ValueError, match=r"batch\['action_mask'\] has shape \(3, 3\): expected \(B, T\) = \(3, 4\) "
                                         r"\(T = 4 from batch\['actions'\]\)"):
        check_batch({**b, "action_mask": b["action_mask"][:, :3]})
    with pytest.raises(ValueError, match=rf"batch\['position_ids'\] has shape \({B}, {L}\): expected \(3, B, L\)"):
        check_batch({**b, "position_ids": b["position_ids"][0]})
    with pytest.raises(ValueError, match=r"batch\['image_grid_thw'\] has shape \(4, 2\): expected \(I, 3\) = \(4, 3\)"):
        check_batch({**b, "image_grid_thw": b["image_grid_thw"][:, :2]})
    with pytest.raises(ValueError, match=r"batch\['pixel_values'\] has 63 rows: expected N = 64"):
        check_batch({**b, "pixel_values": b["pixel_values"][1:]})
    with pytest.raises(ValueError, match=r"batch\['meta'\] is a list of 2: expected a list of B = 3"):
        check_batch({**b, "meta": b["meta"][:2]})
    with pytest.raises(TypeError, match=r"batch\['meta'\] holds \['str'\]"):
        check_batch({**b, "meta": ["a", "b", "c"]})


def test_thinking_columns(proc, latent_batch):
    b = latent_batch
    L = b["input_ids"].shape[1]
    with pytest.raises(ValueError, match=rf"batch\['think_start'\] is {L}: expected None or a column in \[0, L = {L}\)"):
        check_batch({**b, "think_start": L})
    with pytest.raises(ValueError, match=r"batch\['think_start'\] is None at stage 2"):
        check_batch({**b, "think_start": None})
    b0 = ECoTCollator(proc, stage=0)(_samples())
    with pytest.raises(ValueError, match=r"batch\['think_start'\] is 5 at stage 0"):
        check_batch({**b0, "think_start": 5})
    with pytest.raises(ValueError, match=r"batch\['think_counts'\] is \[1, 0, 0\]: expected counts >= 0, all 0 at stage 0"):
        check_batch({**b0, "think_counts": torch.tensor([1, 0, 0])})


def test_prompt_batch_mistakes(proc):
    p = ECoTCollator(proc, stage=2).prompts(_samples())
    with pytest.raises(KeyError, match=r"lacks \['text_ids'\]: expected the keys of ecot.collate.PromptBatch"):
        check_batch(_drop(p, "text_ids"), PromptBatch)
    with pytest.raises(ValueError, match=r"batch\['text_ids'\] is a list of 1: expected a list of B = 3"):
        check_batch({**p, "text_ids": p["text_ids"][:1]}, PromptBatch)
    with pytest.raises(ValueError, match=r"batch\['attention_mask'\] has shape"):
        check_batch({**p, "attention_mask": p["attention_mask"][:, 1:]}, PromptBatch)
