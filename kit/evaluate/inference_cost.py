"""What running a model costs where it sits: parameters, weight and KV-cache bytes counted exactly
from the model and its config, and prefill speed, greedy decode speed with the KV cache, time to
first token and peak memory, timed the way the device needs (CUDA events, or a fixed CPU thread count)."""

import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from ..core import layers
from ..core.device import model_device
from ..loaders.data import corpus
from ..prune import outside_view
from ..prune.sublayers import removed_attention


@dataclass(frozen=True)
class CostResult:
    """Counts are exact; speeds are medians over repeats, each repeat's seconds kept for the spread."""

    parameters: int  # unique parameters (tied embeddings once, 4-bit weights unpacked)
    weight_bytes: int  # bytes the parameters occupy as stored
    kv_bytes_per_token: float  # KV-cache bytes per token of one sequence of `context` tokens, all layers
    prefill_tokens_per_s: float  # prompt tokens of the whole batch per second of prefill
    decode_tokens_per_s: float  # generated tokens of the whole batch per second of cached decoding
    time_to_first_token_s: float  # prefill of the prompt up to the first generated token
    peak_memory_bytes: int | None  # CUDA: peak allocated, summed over the model's GPUs; CPU: peak resident set of the process;
    # less what a dropped view's removed layers still hold (see cost) (None: unreadable)
    device: str
    dtype: str
    context: int  # tokens per sequence in the cache after generation (prompt + new tokens - 1)
    batch_size: int
    threads: int | None  # CPU threads the timing ran with (None on GPU)
    load: float | None  # the machine's 1-minute load average before timing (None where the OS has none)
    prefill_seconds: tuple[float, ...]  # every repeat
    decode_seconds: tuple[float, ...]

    @property
    def spread(self) -> dict[str, float]:
        """(max - min) / median of the repeat times of each phase."""
        return {
            name: (max(seconds) - min(seconds)) / statistics.median(seconds)
            for name, seconds in (("prefill", self.prefill_seconds), ("decode", self.decode_seconds))
        }

    def metrics(self) -> dict[str, float]:
        """The cost columns of a sweep or a comparison."""
        names = ("parameters", "weight_bytes", "kv_bytes_per_token", "prefill_tokens_per_s", "decode_tokens_per_s",
                 "time_to_first_token_s")  # fmt: skip
        peak = float("nan") if self.peak_memory_bytes is None else float(self.peak_memory_bytes)
        spread = {f"{phase}_spread": value for phase, value in self.spread.items()}
        return {**{name: float(getattr(self, name)) for name in names}, "peak_memory_bytes": peak, **spread}


def parameters(model) -> int:
    """Unique parameters of `model`: tied weights once, bitsandbytes 4-bit weights at their unpacked size."""
    return sum(p.quant_state.shape.numel() if hasattr(p, "quant_state") else p.numel() for p in model.parameters())


def weight_bytes(model) -> int:
    """Bytes the unique parameters of `model` occupy as stored (4-bit weights packed)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def attention_types(config) -> list[str]:
    """Each layer's cache kind, as transformers' DynamicCache builds it from the (text) config:
    "full_attention", "sliding_attention", "linear_attention" (a recurrent state), "dummy" (no cache), ..."""
    return get_layer_types_and_kwargs(layers.text_config(config))[0]


def _cached_tokens(kind: str, kwargs: dict, tokens: int) -> int:
    """Tokens a layer's cache holds keys and values for: a sliding window keeps `sliding_window - 1`,
    a recurrent (Mamba, linear-attention, conv) or shared-KV layer none."""
    if not layers.caches_keys(kind):
        return 0
    window = issubclass(DYNAMIC_LAYER_TYPE_MAPPING.get(kind, object), DynamicSlidingWindowLayer)
    return min(tokens, kwargs["sliding_window"] - 1) if window else tokens


def _values_per_token(config, kind: str) -> int:
    """Key plus value entries one attention layer caches per token: 2 x kv_heads x head_dim (a sliding-window
    layer's own, swa_*, where the config has them: Inkling), or for multi-head latent attention (DeepSeek)
    the compressed latent and the rope key it shares over heads."""
    heads = config.num_attention_heads
    if getattr(config, "kv_lora_rank", None) and getattr(config, "qk_rope_head_dim", None):
        return config.kv_lora_rank + config.qk_rope_head_dim
    swa = "sliding" in kind and getattr(config, "swa_num_key_value_heads", None) is not None
    kv_heads = config.swa_num_key_value_heads if swa else getattr(config, "num_key_value_heads", None) or heads
    head_dim = config.swa_head_dim if swa else getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * kv_heads * head_dim


def kv_cache_bytes(model, tokens: int, batch_size: int = 1) -> int:
    """Bytes of keys and values a DynamicCache holds for `batch_size` sequences of `tokens` tokens.

    Only what each layer caches per token counts, in the model's dtype: full attention every token, a
    sliding-window layer the last `sliding_window - 1` (what transformers' cache stores), recurrent
    layers (Mamba, linear attention) and layers sharing another's KV nothing (their state does not grow).
    A removed attention sublayer (kit.prune.sublayers.RemovedSublayer) keeps one zero key and one zero value
    per token, so that the cache counts positions; a plain reload of its checkpoint caches what it did before.
    """
    config = layers.text_config(model.config)
    size = torch.empty((), dtype=model.dtype).element_size()
    kinds, kwargs = get_layer_types_and_kwargs(config)
    per_layer, removed = config.per_layer_config, removed_attention(model)
    values = lambda i, kind: 2 if i in removed else _values_per_token(per_layer[i], kind)  # noqa: E731
    cached = sum(_cached_tokens(kind, kw, tokens) * values(i, kind) for i, (kind, kw) in enumerate(zip(kinds, kwargs)))
    return batch_size * cached * size


def _check(model, prompt_tokens: int, new_tokens: int, batch_size: int, repeats: int) -> None:
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None:
        raise ValueError(
            f"cost needs a causal LM with a generation head, got {type(model).__name__}: "
            "load it with kit.load_model or AutoModelForCausalLM"
        )
    for name, value, least in (("prompt_tokens", prompt_tokens, 1), ("new_tokens", new_tokens, 2),
                               ("batch_size", batch_size, 1), ("repeats", repeats, 1)):  # fmt: skip
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and prompt_tokens + new_tokens > positions:
        raise ValueError(
            f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the model's {positions} positions: "
            "use a shorter prompt or fewer new tokens"
        )


def prompt_ids(tokenizer, prompt_tokens: int) -> torch.Tensor:
    """The first `prompt_tokens` tokens of the validation corpus, as a (1, prompt_tokens) tensor."""
    ids: list[int] = []
    for text in corpus("validation"):
        ids += tokenizer(text)["input_ids"]
        if len(ids) >= prompt_tokens:
            break
    ids = (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]
    return torch.tensor([ids])


def _timed(fn, device: torch.device):
    """fn() and its duration in seconds: CUDA events on GPU (recorded on `device`'s stream, whichever
    GPU is current), the wall clock elsewhere."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
        return result, start.elapsed_time(end) / 1000
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@torch.no_grad()
def generate(model, prompt: torch.Tensor, new_tokens: int):
    """Greedy generation with a KV cache: (tokens (batch, new_tokens), prefill seconds, decode seconds, cache).

    The prefill runs the prompt and picks the first token; each decode step feeds only the last token.
    """
    cache = DynamicCache(config=model.config)

    def step(ids):
        return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)

    def decode(token):
        tokens = [token]
        for _ in range(new_tokens - 1):
            tokens.append(step(tokens[-1]))
        return torch.cat(tokens, dim=1)

    first, prefill_s = _timed(lambda: step(prompt), prompt.device)
    tokens, decode_s = _timed(lambda: decode(first), prompt.device)
    return tokens, prefill_s, decode_s, cache


def gpus(model) -> list[torch.device]:
    """The GPUs holding the model's parameters: one, or each of a device_map's."""
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=lambda d: d.index or 0)


def _reset_peak(device: torch.device, devices: list[torch.device]) -> bool:
    if device.type == "cuda":
        for gpu in devices:
            torch.cuda.reset_peak_memory_stats(gpu)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident set (VmHWM)
        return True
    except OSError:
        return False


def _peak(device: torch.device, devices: list[torch.device]) -> int | None:
    """CUDA: the sum over the model's GPUs of each one's peak allocation; CPU: the peak resident set."""
    if device.type == "cuda":
        return sum(torch.cuda.max_memory_allocated(gpu) for gpu in devices)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def _held_outside(model, devices: list[torch.device]) -> int:
    """Bytes on `devices` of the parameters a kit.prune.dropped view of `model` leaves out but keeps
    allocated (each storage once, none the view itself uses); 0 outside a view."""
    key = lambda p: (p.device, p.untyped_storage().data_ptr())  # noqa: E731
    kept = {key(p) for p in model.parameters()}
    held = {key(p): p.untyped_storage().nbytes() for p in outside_view(model) if p.device in devices}
    return sum(size for where, size in held.items() if where not in kept)


@contextmanager
def _threads(device: torch.device, threads: int | None):
    """Fix the CPU thread count for the timing (yields it; None on GPU), and restore it afterwards."""
    if device.type == "cuda":
        yield None
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def cost(model, tokenizer, *, prompt_tokens: int = 128, new_tokens: int = 32, batch_size: int = 1, repeats: int = 5,
         threads: int | None = None) -> CostResult:  # fmt: skip
    """Measure what inference with `model` costs on its device and dtype.

    One untimed warm-up, then `repeats` times: prefill `batch_size` copies of a `prompt_tokens`-token
    prompt (the validation corpus), then greedy-decode with the KV cache up to `new_tokens` tokens.

    Everything is about the model as it runs: inside kit.prune.dropped, the pruned model. Its parameters
    and weight bytes are the view's (those of the model with the layers removed by drop_layers); its peak
    memory is the measured peak less the bytes the view's removed layers (and sublayers) still hold on the
    measured devices, what the same model with those layers really removed would have peaked at. On the
    CPU the measure is the process's resident set, so that assumes their weights were read in (they are
    once the full model has run).

    Args:
        threads: CPU threads for the timing (default: torch's current count); ignored on GPU.
    """
    _check(model, prompt_tokens, new_tokens, batch_size, repeats)
    device = model_device(model)
    prompt = prompt_ids(tokenizer, prompt_tokens).to(device).expand(batch_size, -1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with _threads(device, threads) as used:
        generate(model, prompt, new_tokens)
        measured = gpus(model) or [device]
        readable = _reset_peak(device, measured)
        runs = [generate(model, prompt, new_tokens)[1:3] for _ in range(repeats)]
        peak = _peak(device, measured) if readable else None
    if peak is not None:
        peak -= _held_outside(model, measured)
    prefill_s, decode_s = (tuple(seconds) for seconds in zip(*runs))
    context = prompt_tokens + new_tokens - 1
    return CostResult(
        parameters=parameters(model), weight_bytes=weight_bytes(model),
        kv_bytes_per_token=kv_cache_bytes(model, context) / context,
        prefill_tokens_per_s=batch_size * prompt_tokens / statistics.median(prefill_s),
        decode_tokens_per_s=batch_size * (new_tokens - 1) / statistics.median(decode_s),
        time_to_first_token_s=statistics.median(prefill_s), peak_memory_bytes=peak,
        device=str(device), dtype=str(model.dtype).removeprefix("torch."), context=context, batch_size=batch_size,
        threads=used, load=load, prefill_seconds=prefill_s, decode_seconds=decode_s,
    )  # fmt: skip
