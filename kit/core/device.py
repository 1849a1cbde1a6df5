"""The one device and dtype policy of the kit: GPU when there is one, else CPU; bf16 only where
the GPU computes it natively (Ampere and newer), fp16 on older GPUs (T4, V100), fp32 on CPU.
The same choice sets the 4-bit compute dtype and the Trainer's mixed-precision flag."""

import gc
import os

import torch

from .distributed import local_gpu

AUTO = "auto"


def default_device() -> torch.device:
    """$KIT_DEVICE when set (the test suite pins "cpu"), else this process's CUDA GPU when one is visible
    (distributed.local_gpu: under torchrun / accelerate launch cuda:$LOCAL_RANK, whoever made the process
    group; cuda:0 where each process sees one GPU), else the CPU."""
    if os.environ.get("KIT_DEVICE"):
        return torch.device(os.environ["KIT_DEVICE"])
    return local_gpu() if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device=AUTO) -> torch.device:
    """A torch.device from "auto", "cpu", "cuda", "cuda:1" or a torch.device; CUDA must exist. A bare
    "cuda" is this process's GPU (distributed.local_gpu), not cuda:0 on every rank."""
    device = default_device() if device == AUTO else torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but no CUDA GPU is visible: use device='auto' or 'cpu'")
    if device.type == "cuda" and device.index is None:
        device = local_gpu()
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (a T4 only emulates it, several times slower)."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):  # is_bf16_supported reads the current device: make it `device`
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4 has no including_emulation
            return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_dtype(dtype=AUTO, device=AUTO) -> torch.dtype:
    """The dtype for weights and compute: the policy's for "auto", else `dtype` itself."""
    if dtype != AUTO:
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError("dtype must be 'auto', a torch dtype or its name such as 'bfloat16'")
        return dtype
    device = resolve_device(device)
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if native_bf16(device) else torch.float16


def mixed_precision(dtype: torch.dtype, device: torch.device) -> dict[str, bool]:
    """TrainingArguments' bf16 / fp16 flags for training in `dtype` on `device`."""
    on_gpu = device.type == "cuda"
    return {"bf16": on_gpu and dtype == torch.bfloat16, "fp16": on_gpu and dtype == torch.float16}


def free_bytes(device: torch.device) -> int:
    """Bytes PyTorch can still allocate on the GPU `device`: what CUDA reports free plus what PyTorch's
    caching allocator holds reserved but unallocated (free to PyTorch, yet counted as used by
    torch.cuda.mem_get_info). Size chunks from this, never from mem_get_info alone."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def model_device(model) -> torch.device:
    """Where the model's inputs go: the device its input embeddings run on, which accelerate's hook
    names when they are dispatched or offloaded (their weights then wait on the meta device)."""
    embeddings = model.get_input_embeddings()
    execution = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
    return torch.device(execution) if execution is not None else embeddings.weight.device


def compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in (a 4-bit model's compute dtype, not its storage)."""
    quantization = getattr(model.config, "quantization_config", None)
    compute = getattr(quantization, "bnb_4bit_compute_dtype", None) if quantization is not None else None
    if isinstance(compute, str):
        compute = getattr(torch, compute)
    return compute if isinstance(compute, torch.dtype) else model.get_input_embeddings().weight.dtype


def provenance(model) -> dict:
    """How the model was loaded and where it runs: device, GPU name, dtype and quantization.
    Recorded in manifests and part of the scan's resume fingerprint."""
    device = model_device(model)
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(compute_dtype(model)).removeprefix("torch."),
        "quantization": "4bit" if getattr(model, "is_loaded_in_4bit", False) else None,
        "devices": sorted({str(p.device) for p in model.parameters()}),
    }


def require_finite(finite: bool, what: str, model) -> None:
    """Stop with a clear error where `what` came out inf or NaN (an overflowing fp16 residual stream),
    instead of returning NaN distances, losses or accuracies."""
    if not finite:
        raise FloatingPointError(
            f"{what} came out inf or NaN: the model's activations overflow in {compute_dtype(model)}. "
            "Load it in float32 or bfloat16 (kit.load_model(..., dtype='float32')) and run again."
        )


def release_memory() -> None:
    """Give back the memory of models and tensors no longer referenced: Python's garbage collector, then
    PyTorch's cache of freed GPU blocks (so the next model loaded, or another process, can use it).
    Drop your own references first (`del model`)."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
