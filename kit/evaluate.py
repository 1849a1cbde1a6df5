"""Evaluation: validation loss (more to come: MMLU, BoolQ, sweeps)."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import batched, encode


@dataclass(frozen=True)
class LossResult:
    loss: float  # mean next-token cross-entropy over all non-pad tokens (nats)
    normalized: float  # loss / log(vocab size), as the paper reports it
    tokens: int  # number of predicted tokens


@torch.no_grad()
def validation_loss(model, tokenizer, texts: list[str], *, max_length: int = 512, batch_size: int = 8) -> LossResult:
    """Token-weighted mean next-token loss of `model` on `texts`."""
    if not texts:
        raise ValueError("validation_loss needs at least one text")
    total, count, vocab = 0.0, 0, None
    for batch in batched(texts, batch_size, desc="validation loss"):
        enc = encode(tokenizer, batch, max_length=max_length, device=model.device)
        logits = model(**enc).logits.float()
        vocab = logits.shape[-1]
        targets = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    if count == 0:
        raise ValueError("the texts hold no tokens to predict (each needs at least two tokens)")
    loss = total / count
    return LossResult(loss, loss / math.log(vocab), count)
