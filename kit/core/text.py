"""Batching and tokenising: the two helpers every forward pass over texts uses. Imports nothing
but the progress bar."""

from .progress import progress


def batched(items, batch_size: int, *, desc: str | None = None):
    """Consecutive slices of `items`, with a progress bar."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, len(items), batch_size)
    for start in progress(starts, desc=desc, show=desc is not None):
        yield items[start : start + batch_size]


def encode(tokenizer, texts: list[str], *, max_length: int, device=None, padding_side: str = "right"):
    """Tokenize a batch (truncated to max_length, padded on `padding_side`) as tensors on `device`."""
    enc = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt", padding_side=padding_side
    )
    return enc.to(device) if device is not None else enc


def too_short(tokenizer, texts: list[str], *, max_length: int, min_tokens: int) -> list[int]:
    """Indices of the texts that `encode` turns into fewer than `min_tokens` tokens: checked on all
    texts before any work, so every process of a distributed run stops on them together."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return [i for i, row in enumerate(ids) if len(row) < min_tokens]
