"""Log-likelihoods of continuations, as lm-evaluation-harness computes them, batched, with an
optional KV cache of the tokens that every request starts with (a few-shot prefix)."""

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin

from ..core import distributed
from ..core.device import model_device, require_finite
from ..core.sums import sum_by
from ..core.text import batched


@dataclass(frozen=True)
class Request:
    """Score log p(continuation | context), both as token ids."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


def encode_request(tokenizer, context: str, continuation: str) -> Request:
    """Tokenize as lm-eval does: trailing whitespace of the context moves to the continuation, and
    the continuation's ids are those of `context + continuation` after the context's own ids."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = tokenizer(context)["input_ids"]
    whole_ids = tokenizer(context + continuation)["input_ids"]
    if len(whole_ids) <= len(context_ids):
        raise ValueError(f"the continuation {continuation!r} adds no tokens to its context")
    return Request(tuple(context_ids), tuple(whole_ids[len(context_ids) :]))


def _shared_length(rows: list[tuple[int, ...]]) -> int:
    """Length of the longest token prefix common to all rows."""
    first, n = rows[0], min(map(len, rows))
    for row in rows[1:]:
        n = next((i for i in range(n) if row[i] != first[i]), n)
    return n


def _right_pad(rows, device):
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # pad id is arbitrary: masked, never attended
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    return ids.to(device), mask.to(device)


class SharedPrefixCache(DynamicCache):
    """A prefix's KV cache read by every row of a batch and never written: each layer attends to the
    prefix (broadcast over the batch, a view) followed by the rows' own keys and values, which are
    not kept. No copy of the prefix per batch or per row; memory beyond the forward's own is one
    layer's concatenated keys and values at a time."""

    def __init__(self, prefix: DynamicCache):
        self.__dict__.update(prefix.__dict__)  # the prefix's layers and settings, shared read-only

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer, batch = self.layers[layer_idx], key_states.shape[0]
        keys = torch.cat([layer.keys.expand(batch, -1, -1, -1), key_states], dim=-2)
        values = torch.cat([layer.values.expand(batch, -1, -1, -1), value_states], dim=-2)
        return keys, values


def _shareable(cache) -> bool:
    """Whether SharedPrefixCache can serve `cache` to every batch: each layer holds keys and values only.
    A recurrent layer (Mamba, linear attention) holds a state that every row's tokens rewrite, so the
    prefix of a hybrid or recurrent model is not cached."""
    return isinstance(cache, DynamicCache) and all(
        isinstance(layer, DynamicLayer) and not isinstance(layer, LinearAttentionCacheLayerMixin) for layer in cache.layers
    )


def _forward(model, rows, keep: torch.Tensor, prefix_cache, prefix_len: int) -> torch.Tensor:
    """Logits at positions `keep` (batch, k) of right-padded rows that continue a cached prefix of
    `prefix_len` tokens (or stand alone when `prefix_cache` is None)."""
    ids, mask = _right_pad(rows, model_device(model))
    keep = keep.to(ids.device)
    if prefix_cache is None:
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits
    mask = torch.cat([mask.new_ones(len(rows), prefix_len), mask], dim=1)
    positions = torch.arange(prefix_len, prefix_len + ids.shape[1], device=ids.device).expand(len(rows), -1)
    cache = SharedPrefixCache(prefix_cache)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=keep).logits


@torch.no_grad()
def loglikelihoods(model, requests: list[Request], *, batch_size: int = 8, cache_prefix: bool = True, desc=None):
    """Sum of log-probabilities of each request's continuation given its context (list of floats).

    The model reads `context + continuation[:-1]`; requests that feed it the same tokens share one
    row (the four answer letters of a question whose letters are single tokens share one forward).
    With `cache_prefix`, the tokens that all rows start with run once and their KV cache extends
    to every batch (not for models with recurrent layers, whose state each row rewrites); the rows
    are exactly the requests' tokens, so the result equals full forwards to float rounding (other shapes:
    1e-4 nats on the tiny models, 1e-3 on SmolLM2-135M in the tests).
    `cache_prefix=False, batch_size=1` is the naive loop: one full forward per row.
    """
    if not requests:
        return []
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, request in enumerate(requests):
        rows.setdefault(request.context + request.continuation[:-1], []).append(i)
    longest, limit = max(map(len, rows)), getattr(model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise ValueError(f"an input of {longest} tokens exceeds the model's {limit} positions: shorten it or use fewer shots")
    prefix_len, prefix_cache = 0, None
    if cache_prefix:
        # at least the last context token stays out of the prefix: every row has a logit to read
        prefix_len = min(_shared_length(list(rows)), min(len(r.context) for r in requests) - 1)
    if prefix_len > 0:
        prefix = torch.tensor([next(iter(rows))[:prefix_len]], device=model_device(model))
        prefix_cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).cache  # no logits over the prefix
        if not _shareable(prefix_cache):
            prefix_len, prefix_cache = 0, None  # every row runs in full: the same scores, without the shortcut
    scores = [0.0] * len(requests)
    for batch in batched(sorted(rows, key=len), batch_size, desc=desc):
        # the positions (after the prefix) whose logits predict each request's continuation
        spans = {
            i: range(len(requests[i].context) - 1 - prefix_len, len(row) - prefix_len) for row in batch for i in rows[row]
        }
        needed = [sorted({p for i in rows[row] for p in spans[i]}) for row in batch]
        width = max(map(len, needed))
        keep = torch.tensor([positions + positions[-1:] * (width - len(positions)) for positions in needed])
        logits = _forward(model, [row[prefix_len:] for row in batch], keep, prefix_cache, prefix_len)
        logprobs = logits.float().log_softmax(-1)  # (batch, width, vocab): only the kept positions
        index, owners = [], []  # (row, column, token) of each continuation token; the request it belongs to
        for b, row in enumerate(batch):
            for i in rows[row]:
                index += [(b, needed[b].index(p), t) for p, t in zip(spans[i], requests[i].continuation)]
                owners += [i] * len(requests[i].continuation)
        b, column, token = torch.tensor(index, device=logprobs.device).T
        owner_ids, owner_index = torch.tensor(owners).unique(return_inverse=True)
        sums = sum_by(owner_index, logprobs[b, column, token], len(owner_ids))
        for i, value in zip(owner_ids.tolist(), sums.tolist()):  # one device sync per batch
            scores[i] = value
    require_finite(all(map(math.isfinite, scores)), "the log-likelihoods of the answers", model)
    return scores


def choice_loglikelihoods(model, tokenizer, prompts: list[str], choices: list[tuple[str, ...]], *, what: str,
                          batch_size: int = 8, cache_prefix: bool = True) -> np.ndarray:  # fmt: skip
    """(items, k) log p(choice | prompt) of k continuations per item, e.g. " no" / " yes" for BoolQ.

    Under torch.distributed each rank scores its share of the items and every rank gets the whole
    array; ranks given other items stop with an error naming `what` (the benchmark).
    """
    distributed.require_same(what, dict(items=distributed.digest([p + "".join(c) for p, c in zip(prompts, choices)]),
                                        batch_size=batch_size, cache_prefix=cache_prefix))  # fmt: skip
    mine = distributed.shard(len(prompts))
    requests = [encode_request(tokenizer, prompts[i], choice) for i in mine for choice in choices[i]]
    desc = what if distributed.is_main() else None
    scores = loglikelihoods(model, requests, batch_size=batch_size, cache_prefix=cache_prefix, desc=desc)
    local = torch.tensor(scores, dtype=torch.float64).view(len(mine), len(choices[0]))
    return distributed.assemble(local, mine, len(prompts)).numpy()
