"""Memory a step holds, measured: the peak of the tensor bytes that torch operations allocate while it
runs, on any device (the CPU included, where no allocator keeps statistics). kit.core.ledger predicts the same
peaks from a model's config; the tests hold the two together, in multiples of the weight bytes."""

import gc
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Measured:
    """What a `measure()` block allocated: its peak of live tensor bytes, the bytes still live at its end,
    and the largest single tensor storage (e.g. a [tokens, vocab] logits tensor where only chunks belong)."""

    peak: int = 0
    held: int = 0
    largest: int = 0

    def in_weights(self, weight_bytes: int) -> float:
        """The peak in multiples of `weight_bytes`."""
        return self.peak / weight_bytes


def _real(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "meta"


def _key(tensor: torch.Tensor) -> tuple:
    return tensor.device, tensor.untyped_storage().data_ptr()


class _LiveTensorBytes(TorchDispatchMode):
    """Counts every storage that an operation's outputs bring into being, until it is freed; a view or an
    in-place result (an output on the storage of an input) adds nothing, nor does what lived before."""

    def __init__(self, measured: Measured):
        super().__init__()
        self.measured, self.live = measured, {}

    def _free(self, key):
        self.measured.held -= self.live.pop(key, 0)  # 0: freed after the block, no longer counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if _real(t)}  # a view or in-place result: no new storage
        for tensor in tree_flatten(out)[0]:
            if not _real(tensor):
                continue
            storage, key = tensor.untyped_storage(), _key(tensor)
            if storage.nbytes() and key not in self.live and key not in inputs:
                self.live[key] = storage.nbytes()
                self.measured.held += storage.nbytes()
                self.measured.peak = max(self.measured.peak, self.measured.held)
                self.measured.largest = max(self.measured.largest, storage.nbytes())
                weakref.finalize(storage, self._free, key)
        return out


class measure:
    """`with measure() as m: step()`; then m.peak is the most tensor bytes the step held at once beyond
    what lived before it (weights it loads included, temporaries inside one fused kernel not)."""

    def __enter__(self) -> Measured:
        self.measured = Measured()
        self.mode = _LiveTensorBytes(self.measured)
        self.mode.__enter__()
        return self.measured

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.mode.live.clear()  # tensors freed later are no longer this block's
        return False


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage the process still references (weights included), each counted once:
    what an earlier step left behind, e.g. a model a notebook cell still holds."""
    seen = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type != "meta":  # type(): never a weak proxy's target
            seen[_key(obj)] = obj.untyped_storage().nbytes()
    return sum(seen.values())
