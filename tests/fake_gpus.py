"""Two fake GPUs on the CPU, for the kit's device moves under a multi-GPU `device_map`: `OnGpu` tags a
tensor with a fake GPU and raises where an op mixes two of them, as CUDA does; `split_over_two_gpus`
places a model's inputs on GPU 0 and its second half of layers, final norm and head on GPU 1, moving
each of those layers' inputs there as accelerate's hooks do."""

import torch
from torch.utils import _pytree as pytree

import kit
from kit.core.text import encode


class OnGpu(torch.Tensor):
    """A CPU tensor said to sit on fake GPU `gpu`: `.device` is cpu:<gpu>, `.to(cpu:<n>)` moves it to GPU n,
    and an op on tensors of two GPUs raises, as CUDA does (plain tensors go with either)."""

    gpu = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.device.__get__:
            return torch.device("cpu", args[0].gpu)
        gpus = {t.gpu for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, OnGpu)}
        if len(gpus) > 1:
            raise RuntimeError(f"{func.__name__}: tensors on cuda:0 and cuda:1")  # as CUDA raises on two devices
        moved = [a.index for a in (*args, *kwargs.values()) if isinstance(a, torch.device)] if func is torch.Tensor.to else []
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        return on_gpu(out, moved[0] if moved else min(gpus, default=None))


def on_gpu(tree, gpu: int | None):
    """The tensors in `tree` placed on fake GPU `gpu`; None: plain tensors again."""

    def place(tensor):
        with torch._C.DisableTorchFunctionSubclass():
            tensor = tensor.as_subclass(torch.Tensor if gpu is None else OnGpu)
        if gpu is not None:
            tensor.gpu = gpu
        return tensor

    return pytree.tree_map_only(torch.Tensor, place, tree)


def split_over_two_gpus(model, monkeypatch, modules) -> None:
    """`model` as a device_map puts it on two GPUs: the inputs that `modules` encode on GPU 0, the second half
    of the decoder layers, the final norm and the head on GPU 1 (each of their inputs moved there, as
    accelerate's hooks move them), and the model's outputs back on GPU 0. The model's top level and first
    half run plain, on either."""
    for module in modules:
        monkeypatch.setattr(f"{module}.encode", lambda *args, **kwargs: on_gpu(dict(encode(*args, **kwargs)), 0))
    model.register_forward_pre_hook(lambda module, args, kwargs: (args, on_gpu(kwargs, None)), with_kwargs=True)
    model.register_forward_hook(lambda module, args, output: on_gpu(output, 0))  # accelerate's io_same_device
    decoder = kit.core.layers.decoder_layers(model)
    for layer in decoder[len(decoder) // 2 :]:
        layer.register_forward_pre_hook(lambda module, args, kwargs: (on_gpu(args, 1), on_gpu(kwargs, 1)), with_kwargs=True)
    kit.core.layers.final_norm(model).register_forward_pre_hook(lambda module, args: on_gpu(args, 1))
