"""Validation loss as the paper reports it: token-weighted next-token cross-entropy, also divided
by log(vocab size), with the LM head applied in chunks so no [tokens, vocab] fp32 tensor is built."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import distributed, layers
from ..core.device import model_device, require_finite
from ..core.stats import ratio_stderr
from ..core.sums import LOGIT_ELEMENTS, chunk_size
from ..core.text import batched, encode


@dataclass(frozen=True)
class LossResult:
    loss: float  # mean next-token cross-entropy over all non-pad tokens (nats)
    normalized: float  # loss / log(vocab size), as the paper reports it
    tokens: int  # number of predicted tokens
    stderr: float  # standard error of loss over texts (nats; NaN for one text)
    text_losses: tuple[float, ...] = ()  # per text with tokens to predict, in order: its summed loss (nats)
    text_tokens: tuple[int, ...] = ()  # and its predicted tokens (what paired comparisons resample)


_LOGIT_ELEMENTS = LOGIT_ELEMENTS  # logits materialised at once (128 MiB in fp32), whatever the vocabulary


def token_losses(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `targets` (-100: ignored, loss 0) under the LM head applied to `hidden`,
    in float32, computed over chunks of tokens so that no [tokens, vocab] fp32 tensor is built."""
    flat_hidden, flat_targets = hidden.flatten(0, -2), targets.flatten()
    vocab = layers.lm_head(model).weight.shape[0]
    step = chunk_size(max(1, _LOGIT_ELEMENTS // vocab), len(flat_targets), vocab)
    losses = []
    for i in range(0, len(flat_targets), step):
        chunk = layers.logits(model, flat_hidden[i : i + step]).float()  # on the LM head's device when dispatched
        losses.append(F.cross_entropy(chunk, flat_targets[i : i + step].to(chunk.device), ignore_index=-100, reduction="none"))
    return torch.cat(losses).view(targets.shape).to(targets.device)


@torch.no_grad()
def validation_loss(model, tokenizer, texts: list[str], *, max_length: int = 512, batch_size: int = 8) -> LossResult:
    """Token-weighted mean next-token loss of `model` on `texts`."""
    if not texts:
        raise ValueError("validation_loss needs at least one text")
    distributed.require_same("the validation loss", dict(texts=distributed.digest(texts), max_length=max_length, batch_size=batch_size))
    device = model_device(model)
    mine = distributed.shard(len(texts), batch_size)  # under torch.distributed: this rank's batches
    per_text = torch.zeros(3, len(mine), dtype=torch.float64, device=device)  # loss sum, tokens, scored
    desc = "validation loss" if distributed.is_main() else None
    for start, batch in zip(range(0, len(mine), batch_size), batched(texts[mine.start : mine.stop], batch_size, desc=desc)):
        enc = encode(tokenizer, batch, max_length=max_length, device=device)
        if enc["input_ids"].shape[1] < 2:
            continue  # nothing to predict in this batch (empty or one-token texts)
        hidden = layers.body(model)(**enc, use_cache=False).last_hidden_state
        targets = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
        rows = slice(start, start + len(batch))
        per_text[0, rows] = token_losses(model, hidden[:, :-1], targets).double().sum(-1)
        per_text[1, rows], per_text[2, rows] = (targets != -100).sum(-1).double(), 1.0
    text_losses, text_tokens, scored = distributed.assemble(per_text.T, mine, len(texts)).T.cpu().numpy()  # one sync
    text_losses, text_tokens = text_losses[scored == 1], text_tokens[scored == 1]
    count = int(text_tokens.sum())
    if count == 0:
        raise ValueError("the texts hold no tokens to predict (each needs at least two tokens)")
    loss = float(text_losses.sum()) / count
    require_finite(math.isfinite(loss), "the validation loss", model)
    vocab = layers.lm_head(model).weight.shape[0]
    return LossResult(loss, loss / math.log(vocab), count, ratio_stderr(text_losses, text_tokens),
                      tuple(map(float, text_losses)), tuple(map(int, text_tokens)))  # fmt: skip
