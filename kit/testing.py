"""Test fixtures: tiny random causal LMs of every tested architecture, with a small tokenizer trained
in-process on the offline corpus (no download), for tests, benchmarks and the GPU check; random
distance matrices; brute-force references for the scan (of layers and of sublayers) and for the greedy
removal (every candidate model rebuilt and scored); and the reference of pruning (layers bypassed, or attention
or MLP branches zeroed, by hooks)."""

import copy
from collections.abc import Iterable
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from .core import layers
from .loaders.data import corpus
from .scan.distances import Distances

# One family of each kind beyond the dense ones, built from kit.families' tiny sizes (hidden size 32):
# name -> (model type, config fields for a model of n layers).
_ALTERNATING = lambda n: {"layer_types": (["linear_attention", "full_attention"] * n)[:n]}  # noqa: E731
FAMILY_ARCHITECTURES = {
    "qwen3_moe": ("qwen3_moe", lambda n: {}),  # MoE: every layer routed over fused experts
    "deepseek_v3": ("deepseek_v3", lambda n: {"first_k_dense_replace": 1}),  # MLA; a dense layer, then routed + shared experts
    "granitemoehybrid": ("granitemoehybrid", _ALTERNATING),  # hybrid: Mamba 2 and attention layers alternate; MoE MLPs
    "qwen3_next": ("qwen3_next", _ALTERNATING),  # linear attention (gated DeltaNet) and full attention alternate; MoE
    "gemma3_vl": ("gemma3", lambda n: {}),  # multimodal: the text tower (sliding-window pattern) under model.language_model
}  # fmt: skip
TINY_ARCHITECTURES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "olmo2", "phi3", "phi", "gpt2", "gpt_neox", "opt",
    *FAMILY_ARCHITECTURES,
)  # fmt: skip
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
        "gemma": lambda: tf.GemmaConfig(**common, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(  # soft-caps small enough to bite on a random model's small scores and logits
            **common, head_dim=16, query_pre_attn_scalar=16, sliding_window=32, attn_logit_softcapping=0.05,
            final_logit_softcapping=0.3,
        ),  # fmt: skip
        "gemma3": lambda: tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=32),
        "olmo2": lambda: tf.Olmo2Config(**common),
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
    if arch in FAMILY_ARCHITECTURES:
        from . import families

        model_type, fields = FAMILY_ARCHITECTURES[arch]
        sizes = dict(num_hidden_layers=num_layers, vocab_size=vocab, max_position_embeddings=2048, **fields(num_layers))
        if "text_config" in families.tiny_config(model_type).sub_configs:  # a multimodal model: sizes of its text tower
            return families.tiny_config(model_type, text_config=sizes)
        return families.tiny_config(model_type, **sizes)
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


def random_distances(num_layers: int = 7, seed: int = 0) -> Distances:
    """A random symmetric (L+1) x (L+1) Distances with a zero diagonal (an "angular_last" scan of nothing)."""
    rng = np.random.default_rng(seed)
    matrix = rng.random((num_layers + 1, num_layers + 1))
    matrix = (matrix + matrix.T) / 2
    np.fill_diagonal(matrix, 0)
    return Distances(torch.tensor(matrix), {"model": "synthetic", "metric": "angular_last"})


# The scan's metrics written out independently of kit.scan.similarity: which tokens, and the distance of a cosine.
REFERENCE_METRICS = {
    "angular_last": (True, lambda cos: np.arccos(cos) / np.pi),
    "angular_all": (False, lambda cos: np.arccos(cos) / np.pi),
    "block_influence": (False, lambda cos: 1 - cos),
}


def _hooked_states(model, ids) -> list[torch.Tensor]:
    """Positions 0..L of one full, unpatched forward pass, by forward hooks: each decoder layer's input,
    then the last layer's output."""
    decoder, states = layers.decoder_layers(model), []
    keep_input = lambda module, args, kwargs: states.append(layers.layer_input(args, kwargs))  # noqa: E731
    handles = [layer.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in decoder]
    handles.append(decoder[-1].register_forward_hook(lambda module, args, out: states.append(layers.layer_output(out))))
    try:
        model(**ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(states) != len(decoder) + 1:
        raise RuntimeError(f"the decoder layers ran {len(states) - 1} times for {len(decoder)} layers")
    return states


@torch.no_grad()
def reference_distance_sums(model, tokenizer, texts: list[str], max_length: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Brute-force reference for kit.angular_distances: {metric: (per-text distance sums [texts, L+1, L+1],
    token counts [texts])}, one unpadded text at a time through HF's `output_hidden_states` with the final
    norm made the identity (so the last hidden state is position L), in numpy float64. Families whose
    hidden states list the layers' outputs only (Mamba, RWKV: the last one repeated by the final norm)
    get the input embeddings as position 0. Where the final-norm module also runs before the layers
    (NanoChat), making it the identity would change the network: the states are then taken by forward
    hooks on the layers of a full, unpatched pass."""
    norm = layers.final_norm(model)
    calls = []
    if norm is not None:
        norm.forward = lambda hidden, *args, **kwargs: hidden  # the module and its weights stay in place
        counter = norm.register_forward_hook(lambda *_: calls.append(1))
    sums = {metric: [] for metric in REFERENCE_METRICS}
    counts = {metric: [] for metric in REFERENCE_METRICS}
    try:
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            calls.clear()
            states = list(model(**ids, output_hidden_states=True, use_cache=False).hidden_states)
            if len(calls) > 1:  # the norm runs before the layers too: restore it and hook the layers
                del norm.forward
                states = _hooked_states(model, ids)
                norm.forward = lambda hidden, *args, **kwargs: hidden
            elif torch.equal(states[-1], states[-2]) and len(states) == layers.num_layers(model) + 1:
                states = [model.get_input_embeddings()(ids["input_ids"]), *states[:-1]]
            _add_metric_sums(states, sums, counts)
    finally:
        if norm is not None:
            del norm.forward
            counter.remove()
    return {metric: (np.stack(sums[metric]), np.array(counts[metric], float)) for metric in REFERENCE_METRICS}


def _add_metric_sums(states: list[torch.Tensor], sums: dict, counts: dict) -> None:
    """One text's states [1, tokens, hidden] at each position: appends, per metric, the sum over its tokens
    of the distance between every pair of positions, and its token count."""
    x = np.stack([h[0].double().cpu().numpy() for h in states])
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)  # [positions, tokens, hidden]
    for metric, (last_only, distance) in REFERENCE_METRICS.items():
        tokens = x[:, -1:] if last_only else x
        cos = np.clip(np.einsum("ith,jth->tij", tokens, tokens), -1, 1)
        sums[metric].append(distance(cos).sum(0))
        counts[metric].append(tokens.shape[1])


# Where each tiny family's MLP branch ends (the modules whose outputs it adds to the residual stream),
# written out by hand for the sublayer reference: the layer's `mlp` child unless named here.
MLP_BRANCH_ENDS = {
    "gemma2": ("post_feedforward_layernorm",), "gemma3": ("post_feedforward_layernorm",),
    "olmo2": ("post_feedforward_layernorm",), "opt": ("fc2",), "granitemoehybrid": ("block_sparse_moe", "shared_mlp"),
}  # fmt: skip


# Where each tiny family's attention (token-mixer) branch ends, by hand, for the reference of removing sublayers:
# the layer's `self_attn` child unless named here; each layer of a hybrid has one of the names.
ATTENTION_BRANCH_ENDS = {
    "gemma2": ("post_attention_layernorm",), "gemma3": ("post_attention_layernorm",),
    "olmo2": ("post_attention_layernorm",), "gpt2": ("attn",), "gpt_neox": ("attention",),
    "granitemoehybrid": ("mamba", "self_attn"), "qwen3_next": ("linear_attn", "self_attn"),
}  # fmt: skip


def _zero(module, args, out):
    """A forward hook: the module's output (a tensor, or the first of a tuple) as zeros."""
    return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)


@torch.no_grad()
def reference_sublayer_sums(model, tokenizer, texts: list[str], max_length: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Brute-force reference for a sublayer scan (kit.angular_distances(..., sublayers=True)): like
    reference_distance_sums, over the 2L + 1 positions x_0, m_0, x_1, ..., x_L, one unpadded text at a
    time. x_i is layer i's input (a forward pre-hook), x_L the last layer's output; the middle m_i is
    layer i run again on its own inputs with its MLP branch's ends (MLP_BRANCH_ENDS) returning zeros,
    i.e. x_i plus its attention branch alone (a parallel-residual layer's too)."""
    decoder, ends = layers.decoder_layers(model), MLP_BRANCH_ENDS.get(model.config.model_type, ("mlp",))
    states, rerunning = [], []

    def keep_input(module, args, kwargs):
        if not rerunning:
            states.append(layers.layer_input(args, kwargs))

    def keep_middle(module, args, kwargs, out):
        if rerunning:
            return
        rerunning.append(1)
        zeroing = [getattr(module, name).register_forward_hook(_zero) for name in ends]
        try:
            states.append(layers.layer_output(module(*args, **kwargs)))
        finally:
            rerunning.clear()
            for handle in zeroing:
                handle.remove()
        if module is decoder[-1]:
            states.append(layers.layer_output(out))

    handles = [layer.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in decoder]
    handles += [layer.register_forward_hook(keep_middle, with_kwargs=True) for layer in decoder]
    sums = {metric: [] for metric in REFERENCE_METRICS}
    counts = {metric: [] for metric in REFERENCE_METRICS}
    try:
        for text in texts:
            states.clear()
            model(**tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt"), use_cache=False)
            if len(states) != 2 * len(decoder) + 1:
                raise RuntimeError(f"captured {len(states)} positions for {len(decoder)} layers, expected {2 * len(decoder) + 1}")
            _add_metric_sums(states, sums, counts)
    finally:
        for handle in handles:
            handle.remove()
    return {metric: (np.stack(sums[metric]), np.array(counts[metric], float)) for metric in REFERENCE_METRICS}


def reference_distances(model, tokenizer, texts: list[str], max_length: int, *, sublayers: bool = False) -> dict[str, np.ndarray]:
    """{metric: mean distance matrix} of reference_distance_sums (of reference_sublayer_sums with
    `sublayers`), with a zero diagonal."""
    matrices, reference = {}, reference_sublayer_sums if sublayers else reference_distance_sums
    for metric, (sums, counts) in reference(model, tokenizer, texts, max_length).items():
        matrices[metric] = sums.sum(0) / counts.sum()
        np.fill_diagonal(matrices[metric], 0)
    return matrices


def _identity(module, args, kwargs, output):
    """A forward hook: the decoder layer returns its input."""
    hidden = layers.layer_input(args, kwargs)
    return type(output)([hidden, *output[1:]]) if isinstance(output, (tuple, list)) else hidden


@contextmanager
def bypassed(model, indices: Iterable[int]):
    """`model` with the decoder layers `indices` returning their input unchanged (forward hooks), inside a
    `with` block: what removing those layers must compute, without removing anything.

    Args:
        model: the causal LM; its hooks are removed on exit.
        indices: the layers to bypass.
    """

    decoder = layers.decoder_layers(model)
    handles = [decoder[i].register_forward_hook(_identity, with_kwargs=True) for i in indices]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


# A tiny layer's modules whose parameters, zeroed, make its branch add nothing, written out by hand for the greedy
# reference: the attention (or mixer) module, whichever the layer has; the MLP modules, `mlp` unless named here
# (not the norms of MLP_BRANCH_ENDS: Gemma's scale by 1 + weight, so zeroing their weights zeroes nothing).
ATTENTION_BRANCHES = ("self_attn", "attn", "attention", "linear_attn", "mamba")
MLP_BRANCHES = {"opt": ("fc2",), "granitemoehybrid": ("block_sparse_moe", "shared_mlp")}


def without_units(model, unit: str, indices: Iterable[int]):
    """A new model without the `unit` of each layer in `indices`, built independently of kit.choose: whole
    layers by kit.prune.drop_layers (or, where it refuses to leave a hybrid without attention layers, bypassed
    by hooks in a deep copy); attention or MLP branches by a deep copy whose branch modules
    (ATTENTION_BRANCHES, MLP_BRANCHES) have every parameter zeroed, so they add nothing."""
    from .prune import drop_layers

    if unit == "layers":
        try:
            return drop_layers(model, list(indices))
        except ValueError as error:
            if "leaves no attention layer" not in str(error):
                raise
        copied = copy.deepcopy(model)
        for i in indices:
            layers.decoder_layers(copied)[i].register_forward_hook(_identity, with_kwargs=True)
        return copied
    copied = copy.deepcopy(model)
    ends = MLP_BRANCHES.get(model.config.model_type, ("mlp",))
    for i in indices:
        layer = layers.decoder_layers(copied)[i]
        names = ends if unit == "mlp" else [next(n for n in ATTENTION_BRANCHES if getattr(layer, n, None) is not None)]
        for name in names:
            for parameter in getattr(layer, name).parameters():
                parameter.data.zero_()
    return copied


def reference_greedy(model, tokenizer, texts: list[str], *, unit: str, steps: int, max_length: int, batch_size: int):
    """Brute-force greedy removal: at each step every remaining unit's candidate model rebuilt
    (without_units) and scored by kit.evaluate.validation_loss; the one of least loss (lower layer on ties)
    removed. Returns (order, losses after each step, {step: {layer: candidate loss}})."""
    from .evaluate.loss import validation_loss

    gone, losses, tables = [], [], {}
    for step in range(steps):
        tables[step] = {}
        for j in (j for j in range(layers.num_layers(model)) if j not in gone):
            pruned = without_units(model, unit, [*gone, j])
            tables[step][j] = validation_loss(pruned, tokenizer, texts, max_length=max_length, batch_size=batch_size).loss
        winner = min(tables[step], key=tables[step].get)
        gone.append(winner)
        losses.append(tables[step][winner])
    return gone, losses, tables


@contextmanager
def zeroed_sublayers(model, kind: str, indices: Iterable[int]):
    """`model` with the attention or MLP branches of the decoder layers `indices` returning zeros (forward hooks
    on the branch ends of ATTENTION_BRANCH_ENDS or MLP_BRANCH_ENDS), inside a `with` block: what removing those
    sublayers must compute, without removing anything. The branches still run (and fill the KV cache).

    Args:
        model: the causal LM; its hooks are removed on exit.
        kind: "attention" or "mlp".
        indices: the layers whose branch is zeroed.
    """
    table, default = (ATTENTION_BRANCH_ENDS, "self_attn") if kind == "attention" else (MLP_BRANCH_ENDS, "mlp")
    ends = table.get(model.config.model_type, (default,))
    decoder = layers.decoder_layers(model)
    ends = [getattr(decoder[i], name, None) for i in indices for name in ends]
    handles = [end.register_forward_hook(_zero) for end in ends if end is not None]  # a hybrid's layer has one mixer
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from one full forward and HF's own shifted `labels=` loss: the
    independent computation the benchmarks' cached, batched log-likelihoods are tested against."""
    context_ids = tokenizer(context)["input_ids"]
    ids = torch.tensor([tokenizer(context + continuation)["input_ids"]])
    labels = ids.clone()
    labels[:, : len(context_ids)] = -100
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss.item()
    return -loss * (ids.shape[1] - len(context_ids))


# Greedy decoding compared across two computations (with and without the KV cache, one token at a time or
# the whole sequence again): their logits agree to ~1e-5 in fp32, so a token may differ where the two best
# logits are closer than that, which only a third machine's rounding decides.
GREEDY_MARGIN = 1e-3


def greedy(model, ids: torch.Tensor, steps: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.generate` greedily: the new tokens [batch, steps] and the logits that chose them
    [batch, steps, vocab] (fewer steps where every row ended)."""
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         **options)  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1).float()


def greedy_mismatch(tokens: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor], margin: float = GREEDY_MARGIN):
    """Where `tokens` [batch, steps] part from the `reference` (its tokens and logits, as `greedy` returns
    them) while the reference's choice was clear, described; None where they agree row by row up to the
    first step whose two best reference logits are within `margin` (there either token is right, and the
    rows go on from other prefixes)."""
    ref_tokens, ref_logits = reference
    if tokens.shape[0] != ref_tokens.shape[0]:
        return f"{tokens.shape[0]} rows against {ref_tokens.shape[0]}"
    for row in range(len(ref_tokens)):
        for step in range(ref_logits.shape[1]):
            best, second = ref_logits[row, step].topk(2).values.tolist()
            if best - second < margin:
                break
            if step >= tokens.shape[1] or tokens[row, step] != ref_tokens[row, step]:
                return (f"row {row}, step {step}: token {tokens[row, step:step + 1].tolist()} against "
                        f"{int(ref_tokens[row, step])}, which won by {best - second:.2e}")  # fmt: skip
    return None


def assert_same_greedy(tokens: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor], margin: float = GREEDY_MARGIN):
    """greedy_mismatch is None, else AssertionError naming the row and step."""
    mismatch = greedy_mismatch(tokens, reference, margin)
    assert mismatch is None, mismatch


def assert_same_choices(predictions, labels, reference, margin: float):
    """Each `predictions[i]` is `labels[i][argmax(reference[i])]` wherever the reference scores' two best are
    more than `margin` apart: the choices of two computations whose scores agree to less than margin / 2
    (cached and naive scoring, another library, another number of processes) may differ only at near ties."""
    reference = np.asarray(reference)
    assert len(predictions) == len(labels) == len(reference)
    for i, (prediction, row) in enumerate(zip(predictions, reference)):
        second, best = np.sort(row)[-2:]
        if best - second > margin:
            assert prediction == labels[i][int(np.argmax(row))], f"row {i}: {prediction!r}, the reference {labels[i][int(np.argmax(row))]!r} by {best - second:.2e}"
