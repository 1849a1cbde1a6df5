"""How the kit's own float sums are taken: the chunk sizes of its loops over tokens and features (the
scan's cosines, the LM head's logits, the oracle's replay, distillation's KL), and sums by group.

A float sum depends on how it is split: a BLAS library blocks its sums by the shapes it is given,
differently on each CPU, so two computations that agree bit for bit on one machine may not on the
next. Under `KIT_ODD_CHUNKS=1` (a setting for tests) the kit does the same to itself: every chunk
size becomes an odd value derived from the shape of the work at hand. A repeated computation (a
rerun, a resume, another rank doing the same sums) is chunked the same way; two differently shaped
computations are not, so a test that compares them exactly fails on any machine."""

import os
import zlib

import torch

ODD_CHUNKS = "KIT_ODD_CHUNKS"
# The default chunk sizes, in one place (kit.core.ledger predicts the memory they bound):
SCAN_TOKENS = 1024  # tokens per pairwise-cosine chunk of the scan: bounds its [tokens, positions, positions] buffers
HIDDEN_SLICE = 512  # hidden features per float64 copy in the scan's Gram matrix
LOGIT_ELEMENTS = 2**25  # logits materialised at once by the validation loss (128 MiB in fp32), whatever the vocabulary
REPLAY_TOKENS = 256  # tokens per LM-head chunk of the oracle and the greedy removal (kit.choose.replay)


def chunk_size(default: int, extent: int, *shape: int) -> int:
    """Items per chunk when splitting `extent` items of work of this `shape`: `default`, or under
    KIT_ODD_CHUNKS=1 an odd size that splits `extent` (where it can be split) and depends on
    (default, extent, shape) alone."""
    if os.environ.get(ODD_CHUNKS) != "1":
        return default
    top = max(1, min(default, extent - 1))
    low = max(1, top // 3)
    digest = zlib.crc32(repr((default, extent, *shape)).encode())
    size = low + digest % (top - low + 1)
    return size if size % 2 else max(1, size - 1)


def sum_by(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """Rows of `values` summed into `size` rows by `index` (result[k] = sum of values[i] with index[i] == k),
    in values' dtype. A product with a one-hot matrix, so the same on every run on a GPU too, where
    index_add_ adds colliding rows with atomics in whatever order the threads arrive."""
    one_hot = torch.nn.functional.one_hot(index.to(values.device), size).to(values.dtype)
    return (one_hot.T @ values.reshape(len(values), -1)).reshape(size, *values.shape[1:])
