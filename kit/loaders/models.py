"""Loading decoder-only LMs (embedded aliases, local checkpoints, GGUF files, Hub ids) by the device
policy of kit.core.device. Tiny random models for tests live in kit.testing."""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..core import device as device_policy
from ..core import layers
from ..prune import sublayers as removed_sublayers
from . import assets


def _quantization_config(quantize: str | None, compute_dtype: torch.dtype):
    if quantize is None:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def checkpoint_bytes(source: str, dtype: torch.dtype, trust_remote_code: bool = False) -> int:
    """Bytes the weights of checkpoint `source` would take loaded in `dtype`, counted on the meta device
    (nothing loaded); kit.evaluate.inference_cost.weight_bytes measures a loaded model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in empty.parameters()) * dtype.itemsize


def gpu_capacity(device: torch.device, device_map=None, max_memory=None) -> int:
    """Bytes of GPU memory the weights may use: the GPUs in `max_memory` when given, every visible GPU
    under a device_map such as "auto", else `device` alone."""
    if max_memory:
        from accelerate.utils import convert_file_size_to_int

        return sum(convert_file_size_to_int(size) for key, size in max_memory.items() if key not in ("cpu", "disk", "mps"))
    indices = range(torch.cuda.device_count()) if device_map is not None else [device.index or 0]
    return sum(torch.cuda.get_device_properties(i).total_memory for i in indices)


def resolve_quantize(quantize, source: str, device: torch.device, dtype: torch.dtype, trust_remote_code=False, *,
                     device_map=None, max_memory=None):  # fmt: skip
    """None or "4bit". "auto" picks 4-bit (NF4) only on a GPU (or the GPUs of a device_map) that cannot
    hold the weights in `dtype` with a fifth of its memory to spare; then bitsandbytes must be installed."""
    if quantize not in (None, "4bit", device_policy.AUTO):
        raise ValueError(f"quantize must be '4bit', 'auto' or None, not {quantize!r}")
    if quantize != device_policy.AUTO:
        return quantize
    if device.type != "cuda":
        return None
    size, capacity = checkpoint_bytes(source, dtype, trust_remote_code), gpu_capacity(device, device_map, max_memory)
    if size <= 0.8 * capacity:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"{source} takes {size / 2**30:.1f} GiB in {dtype}, more than 80% of the {capacity / 2**30:.1f} GiB of GPU "
            "memory, and quantize='auto' would load it 4-bit, but bitsandbytes is not installed: install it "
            "(pip install bitsandbytes), or pass quantize=None with device_map='auto' to offload to the CPU."
        )
    return "4bit"


def _gguf_checkpoint(path: Path) -> Path:
    """A GGUF file's dequantized safetensors copy in the cache, keyed by the file's hash."""
    digest = assets.sha256_of(path)[:16]
    return assets.convert_gguf(path, assets.cache_dir() / "models" / f"gguf-{digest}")


def resolve(name: str) -> str:
    """Where `name` loads from: an alias's cached checkpoint, a local folder, or the Hub id itself."""
    if name in assets.MODEL_ALIASES:
        return str(assets.model_dir(name))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return str(_gguf_checkpoint(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} holds no checkpoint (no config.json): pass a folder written by save_pretrained / "
                f"kit.save_pruned, a .gguf file, an embedded alias ({', '.join(assets.MODEL_ALIASES)}) or a Hub id"
            )
        return str(path)
    return name


def prepare_tokenizer(tokenizer):
    """Give the tokenizer a pad token when it lacks one (the EOS token, else UNK)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_model(
    name: str, *, device=device_policy.AUTO, dtype=device_policy.AUTO, quantize: str | None = None,
    device_map=None, max_memory=None, offload_folder=None, trust_remote_code: bool = False,
):  # fmt: skip
    """Load a causal LM and its tokenizer, in eval mode, from safetensors weights.

    Args:
        name: an embedded alias (offline), a local checkpoint folder, a `.gguf` file, or a Hub id.
        device: "auto" (the first GPU if there is one, else the CPU), "cpu", "cuda", "cuda:1".
        dtype: "auto" (fp32 on CPU; bf16 on GPUs that have it natively, else fp16) or a torch dtype.
            For a 4-bit model this is the compute dtype.
        quantize: "4bit" loads NF4 weights through bitsandbytes (QLoRA's base); "auto" does so only
            when the weights would not fit the GPU; None keeps full precision.
        device_map, max_memory, offload_folder: accelerate's dispatch over several devices (and
            CPU/disk offload), passed through; `device` is then ignored.

    A checkpoint of kit.save_pruned with removed sublayers (config.pruned_sublayers) comes back with them
    removed again (kit.prune.sublayers.reapply), as it was saved.
    """
    source = resolve(name)
    target = device_policy.resolve_device(device)
    dtype = device_policy.resolve_dtype(dtype, target)
    quantize = resolve_quantize(quantize, source, target, dtype, trust_remote_code, device_map=device_map, max_memory=max_memory)
    kwargs = dict(
        dtype=dtype,
        device_map=device_map if device_map is not None else {"": target},
        max_memory=max_memory,
        offload_folder=offload_folder,
        quantization_config=_quantization_config(quantize, dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        if Path(source).exists():
            raise
        raise OSError(
            f"Could not load {name!r}: it is not an embedded alias ({', '.join(assets.MODEL_ALIASES)}), "
            f"a local checkpoint folder or a .gguf file, and loading it from the Hub failed. "
            f"Hub names need network access to the model Hub. ({err})"
        ) from err
    layers.anatomy(model)  # fail early, saying what was looked for
    model.eval()
    removed_sublayers.reapply(model)  # a checkpoint with removed sublayers: their zero weights freed, no KV cache
    return model, prepare_tokenizer(tokenizer)
