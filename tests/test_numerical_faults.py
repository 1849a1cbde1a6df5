"""A residual stream that overflows stops the scan and every evaluation with a clear error, never NaN."""

import pytest
import torch

import kit
from kit.core import layers
from kit.evaluate import boolq, mmlu, validation_loss
from kit.loaders.data import boolq_items, mmlu_questions

TEXTS = kit.loaders.data.corpus("validation")[:2]
ADVICE = "came out inf or NaN: the model's activations overflow in torch.float16. Load it in float32"


def _overflowing():
    """A tiny fp16 model whose layer 2 writes activations past fp16's range (65504) into the residual stream."""
    model, tokenizer = kit.testing.tiny_model("llama")
    with torch.no_grad():
        layers.decoder_layers(model)[2].mlp.down_proj.weight.mul_(1e6)
    return model.half(), tokenizer


def _inf_injected():
    model, tokenizer = kit.testing.tiny_model("llama")
    layer = layers.decoder_layers(model)[3]
    layer.register_forward_hook(lambda module, args, output: output * float("inf") if torch.is_tensor(output) else (output[0] * float("inf"), *output[1:]))
    return model, tokenizer


def test_fp16_overflow_really_gives_inf():
    model, tokenizer = _overflowing()
    with torch.no_grad():
        hidden = layers.body(model)(**tokenizer(TEXTS[:1], return_tensors="pt")).last_hidden_state
    assert not torch.isfinite(hidden).all()


@pytest.mark.parametrize("broken", [_overflowing, _inf_injected])
def test_scan_stops_and_saves_no_poisoned_progress(broken, tmp_path):
    model, tokenizer = broken()
    with pytest.raises(FloatingPointError, match=r"the scan's distances \(batch 0\) came out inf or NaN"):
        kit.angular_distances(model, tokenizer, TEXTS, batch_size=1, max_length=32, cache_path=tmp_path / "scan.cache")
    assert list(tmp_path.iterdir()) == []


def test_evaluations_stop_with_advice():
    model, tokenizer = _overflowing()
    with pytest.raises(FloatingPointError, match=f"the validation loss {ADVICE}"):
        validation_loss(model, tokenizer, TEXTS, max_length=32)
    with pytest.raises(FloatingPointError, match=f"the log-likelihoods of the answers {ADVICE}"):
        mmlu(model, tokenizer, mmlu_questions(["anatomy"], per_subject=2), shots=1)
    with pytest.raises(FloatingPointError, match="the log-likelihoods of the answers came out inf or NaN"):
        boolq(*_inf_injected(), boolq_items("tests/fixtures/boolq.jsonl", n=2))
