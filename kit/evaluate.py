"""Evaluation as the paper reports it: MMLU (5-shot, original format), BoolQ (0-shot), and
validation loss; optionally MMLU through lm-evaluation-harness."""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import layers
from .cost import CostResult, cost
from .data import BoolQItem, batched, encode
from .device import model_device, require_finite
from .harness import lm_eval_mmlu
from .mmlu import MMLUResult, mmlu
from .scoring import encode_request, loglikelihoods
from .stats import ratio_stderr, wilson

__all__ = ["mmlu", "boolq", "validation_loss", "lm_eval_mmlu", "cost", "MMLUResult", "BoolQResult", "LossResult", "CostResult"]


@dataclass(frozen=True)
class LossResult:
    loss: float  # mean next-token cross-entropy over all non-pad tokens (nats)
    normalized: float  # loss / log(vocab size), as the paper reports it
    tokens: int  # number of predicted tokens
    stderr: float  # standard error of loss over texts (nats; NaN for one text)


_LOGIT_ELEMENTS = 2**25  # logits materialised at once (128 MiB in fp32), whatever the vocabulary


def token_losses(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `targets` (-100: ignored, loss 0) under the LM head applied to `hidden`,
    in float32, computed over chunks of tokens so that no [tokens, vocab] fp32 tensor is built."""
    flat_hidden, flat_targets = hidden.flatten(0, -2), targets.flatten()
    vocab = layers.lm_head(model).weight.shape[0]
    step = max(1, _LOGIT_ELEMENTS // vocab)
    losses = [
        F.cross_entropy(layers.logits(model, flat_hidden[i : i + step]).float(), flat_targets[i : i + step],
                        ignore_index=-100, reduction="none")
        for i in range(0, len(flat_targets), step)
    ]  # fmt: skip
    return torch.cat(losses).view(targets.shape)


@torch.no_grad()
def validation_loss(model, tokenizer, texts: list[str], *, max_length: int = 512, batch_size: int = 8) -> LossResult:
    """Token-weighted mean next-token loss of `model` on `texts`."""
    if not texts:
        raise ValueError("validation_loss needs at least one text")
    device = model_device(model)
    text_losses, text_tokens = [], []
    for batch in batched(texts, batch_size, desc="validation loss"):
        enc = encode(tokenizer, batch, max_length=max_length, device=device)
        if enc["input_ids"].shape[1] < 2:
            continue  # nothing to predict in this batch (empty or one-token texts)
        hidden = layers.body(model)(**enc, use_cache=False).last_hidden_state
        targets = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
        text_losses.append(token_losses(model, hidden[:, :-1], targets).double().sum(-1))
        text_tokens.append((targets != -100).sum(-1))
    if not text_losses:
        raise ValueError("the texts hold no tokens to predict (each needs at least two tokens)")
    text_losses, text_tokens = torch.cat(text_losses).cpu().numpy(), torch.cat(text_tokens).cpu().numpy()  # one sync
    count = int(text_tokens.sum())
    if count == 0:
        raise ValueError("the texts hold no tokens to predict (each needs at least two tokens)")
    loss = float(text_losses.sum()) / count
    require_finite(math.isfinite(loss), "the validation loss", model)
    vocab = layers.lm_head(model).weight.shape[0]
    return LossResult(loss, loss / math.log(vocab), count, ratio_stderr(text_losses, text_tokens))


@dataclass(frozen=True)
class BoolQResult:
    accuracy: float
    predictions: list[bool]  # per item, in input order
    loglikelihoods: np.ndarray  # (items, 2): log p(" no" | prompt), log p(" yes" | prompt)
    correct: np.ndarray  # bool per item, in input order
    ci: tuple[float, float]  # Wilson 95% interval of accuracy


def boolq_prompt(item: BoolQItem) -> str:
    return f"{item.passage}\nQuestion: {item.question}?\nAnswer:"


def boolq(model, tokenizer, items: list[BoolQItem], *, batch_size: int = 8) -> BoolQResult:
    """0-shot BoolQ accuracy: the answer is whichever of " no" / " yes" is more likely (lm-eval's rule)."""
    if not items:
        raise ValueError("boolq needs at least one item, e.g. kit.data.boolq_items('hub', n=500)")
    requests = [encode_request(tokenizer, boolq_prompt(item), choice) for item in items for choice in (" no", " yes")]
    scores = loglikelihoods(model, requests, batch_size=batch_size, cache_prefix=False, desc="BoolQ")
    loglik = np.reshape(scores, (len(items), 2))
    predictions = [bool(choice) for choice in loglik.argmax(axis=1)]
    correct = np.array([p == item.answer for p, item in zip(predictions, items)])
    return BoolQResult(float(correct.mean()), predictions, loglik, correct, wilson(int(correct.sum()), len(correct)))
