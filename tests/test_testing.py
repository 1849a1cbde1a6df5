"""kit.testing's judges of two computations' choices (greedy tokens, answers): they must agree wherever the
reference's choice was clear, and may part after a near tie."""

import pytest
import torch

import kit
from kit.testing import GREEDY_MARGIN, assert_same_choices, assert_same_greedy, greedy


def _reference(gaps: list[float]):
    """One row choosing token 1 at each step, by `gaps` over token 2."""
    logits = torch.zeros(1, len(gaps), 4)
    logits[0, :, 1], logits[0, :, 2] = 1.0, 1.0 - torch.tensor(gaps)
    return torch.ones(1, len(gaps), dtype=torch.long), logits


def test_a_clear_choice_must_be_the_same():
    reference = _reference([1.0, 1.0, 1.0])
    assert_same_greedy(torch.tensor([[1, 1, 1]]), reference)
    with pytest.raises(AssertionError, match=r"row 0, step 1: token \[2\] against 1, which won by 1.00e\+00"):
        assert_same_greedy(torch.tensor([[1, 2, 1]]), reference)


def test_after_a_near_tie_either_continuation_is_right():
    reference = _reference([1.0, GREEDY_MARGIN / 2, 1.0])
    assert_same_greedy(torch.tensor([[1, 2, 3]]), reference)
    with pytest.raises(AssertionError, match="row 0, step 0"):
        assert_same_greedy(torch.tensor([[3, 2, 3]]), reference)


def test_greedy_returns_the_new_tokens_and_the_logits_that_chose_them():
    model, tokenizer = kit.testing.tiny_model("llama")
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    tokens, logits = greedy(model, ids, 4, use_cache=False)
    assert tokens.shape == (1, 4) and logits.shape == (1, 4, model.config.vocab_size)
    assert torch.equal(tokens, logits.argmax(-1))  # the same logits: argmax is exact


def test_choices_must_agree_where_the_reference_is_clear():
    reference = [[0.0, 1.0], [0.5, 0.5 + 1e-5], [2.0, 0.0]]
    assert_same_choices(["b", "a", "a"], [("a", "b")] * 3, reference, margin=1e-4)  # row 1 is a near tie
    with pytest.raises(AssertionError, match="row 2: 'b', the reference 'a' by 2.00e\\+00"):
        assert_same_choices(["b", "b", "b"], [("a", "b")] * 3, reference, margin=1e-4)
