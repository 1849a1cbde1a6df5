"""Tiny random causal LMs of every tested architecture, with a small tokenizer trained in-process
on the offline corpus: for tests, benchmarks and the GPU check (no download)."""

from functools import lru_cache

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from .data import corpus

TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "phi", "gpt2", "gpt_neox", "opt")
_TINY_VOCAB = 512


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """A byte-level BPE tokenizer trained in-process on the offline corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


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

