"""Loading decoder-only LMs (embedded aliases, local checkpoints, GGUF files, Hub ids) and
tiny random models of each supported architecture for tests."""

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from . import assets, layers
from . import device as device_policy


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


def weight_bytes(source: str, dtype: torch.dtype, trust_remote_code: bool = False) -> int:
    """Bytes the weights of `source` take in `dtype`, counted on the meta device (nothing loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in empty.parameters()) * dtype.itemsize


def resolve_quantize(quantize, source: str, device: torch.device, dtype: torch.dtype, trust_remote_code=False):
    """None or "4bit". "auto" picks 4-bit (NF4) only on a GPU that cannot hold the weights in `dtype`
    with a fifth of its memory to spare, and only when bitsandbytes is installed."""
    if quantize not in (None, "4bit", device_policy.AUTO):
        raise ValueError(f"quantize must be '4bit', 'auto' or None, not {quantize!r}")
    if quantize != device_policy.AUTO:
        return quantize
    if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        return None
    free = 0.8 * torch.cuda.get_device_properties(device).total_memory
    return "4bit" if weight_bytes(source, dtype, trust_remote_code) > free else None


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
    """
    source = resolve(name)
    target = device_policy.resolve_device(device)
    dtype = device_policy.resolve_dtype(dtype, target)
    quantize = resolve_quantize(quantize, source, target, dtype, trust_remote_code)
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
    layers.anatomy(model)  # fail early, naming the supported architectures
    model.eval()
    return model, prepare_tokenizer(tokenizer)


# ---------------------------------------------------------------------------------- tiny models

TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "phi", "gpt2", "gpt_neox", "opt")
_TINY_VOCAB = 512


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """A byte-level BPE tokenizer trained in-process on the offline corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .data import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus("train"), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()), bos_token=eos, eos_token=eos, pad_token=eos
    )


def _tiny_config(arch: str, num_layers: int, vocab: int):
    import transformers as tf

    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, **ids,
    )  # fmt: skip
    builders = {
        "llama": lambda: tf.LlamaConfig(**common),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=32),
        "qwen2": lambda: tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=32, max_window_layers=num_layers // 2),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=16),
        "gemma3": lambda: tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=32),
        "phi3": lambda: tf.Phi3Config(**common),
        "phi": lambda: tf.PhiConfig(**{k: v for k, v in common.items() if k != "num_key_value_heads"}),
        "gpt2": lambda: tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=num_layers, n_head=4, n_positions=2048, **ids),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
            num_attention_heads=4, max_position_embeddings=2048, **ids,
        ),  # fmt: skip
        "opt": lambda: tf.OPTConfig(
            vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=num_layers, num_attention_heads=4,
            max_position_embeddings=2048, word_embed_proj_dim=64, **ids,
        ),  # fmt: skip
    }
    if arch not in builders:
        raise ValueError(f"No tiny model for {arch!r}; choose one of {', '.join(TINY_ARCHITECTURES)}")
    return builders[arch]()


def tiny_model(arch: str = "llama", *, num_layers: int = 6, seed: int = 0):
    """A small random causal LM of architecture `arch` with a small trained tokenizer, for tests."""
    tokenizer = tiny_tokenizer()
    config = _tiny_config(arch, num_layers, len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.name_or_path = f"tiny-{arch}"
    model.eval()
    return model, tokenizer

