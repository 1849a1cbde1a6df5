"""Property-based tests of the pruning bookkeeping: random layer counts and sequences of blocks and sets
of layers (pruning up to three times) on every tiny architecture, against a brute-force list of kept
layers and the original model with the removed layers bypassed."""

import functools

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import kit
from kit.core import layers
from kit.core.block import Block, Layers
from kit.testing import bypassed

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None)


@functools.lru_cache(maxsize=None)
def _original(arch: str, num_layers: int):
    return kit.tiny_model(arch, num_layers=num_layers)


@st.composite
def prunings(draw):
    """(architecture, layer count, removals applied one after the other: each a Block or Layers (any set),
    valid on what is left)."""
    arch = draw(st.sampled_from(kit.TINY_ARCHITECTURES))
    num_layers = draw(st.integers(3, 8))
    removals, left = [], num_layers
    for _ in range(draw(st.integers(1, 3))):
        if left < 2:
            break
        if draw(st.booleans()):
            n = draw(st.integers(1, left - 1))
            removals.append(Block(draw(st.integers(0, left - n)), n))
        else:
            removals.append(Layers(draw(st.sets(st.integers(0, left - 1), min_size=1, max_size=left - 1))))
        left -= len(removals[-1].layers)
    return arch, num_layers, removals


def _prune(arch, num_layers, removals):
    model, tokenizer = _original(arch, num_layers)
    kept, pruned = list(range(num_layers)), model
    kinds = getattr(layers.text_config(model.config), "layer_types", None)
    for removal in removals:
        kept = [k for i, k in enumerate(kept) if i not in removal.layers]
        try:
            pruned = kit.drop_layers(pruned, removal)
        except ValueError as err:  # a hybrid keeps an attention layer: the refusal is right, the case is void
            assert "leaves no attention layer" in str(err) and not any(layers.caches_keys(kinds[i]) for i in kept), err
            assume(False)
    return model, tokenizer, pruned, kept


def _as_runs(removed: set[int], runs: list[list[int]]) -> bool:
    """Whether `runs` ([start, n] pairs) are `removed` as maximal runs of consecutive layers, in order:
    they cover exactly `removed`, and each starts past the end of the one before with a kept layer between."""
    covered = [start + k for start, n in runs for k in range(n)]
    separated = all(start > prev + n for (prev, n), (start, _) in zip(runs, runs[1:]))
    return covered == sorted(removed) and all(n >= 1 for _, n in runs) and separated


def test_as_runs_is_the_specification():
    assert _as_runs({2, 3, 4, 7}, [[2, 3], [7, 1]]) and _as_runs(set(), [])
    assert not _as_runs({2, 3, 4, 7}, [[2, 2], [4, 1], [7, 1]])  # not maximal
    assert not _as_runs({2, 3, 4, 7}, [[7, 1], [2, 3]]) and not _as_runs({2, 3}, [[2, 1]])


@SETTINGS
@given(prunings())
def test_bookkeeping_names_the_original_layers(case):
    arch, num_layers, _ = case
    model, _, pruned, kept = _prune(*case)
    assert layers.num_layers(pruned) == layers.text_config(pruned.config).num_hidden_layers == len(kept)
    assert _as_runs(set(range(num_layers)) - set(kept), pruned.config.pruned_blocks)
    for name, values in vars(layers.text_config(model.config)).items():
        if isinstance(values, list) and len(values) == num_layers and name != "pruned_blocks":
            assert getattr(layers.text_config(pruned.config), name) == [values[i] for i in kept], name
    originals = layers.decoder_layers(model)
    for position, (layer, source) in enumerate(zip(layers.decoder_layers(pruned), kept)):
        assert {m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")} <= {position}
        expected = originals[source].state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in layer.state_dict().items())


@SETTINGS
@given(prunings())
def test_pruned_model_equals_the_layers_bypassed_and_reloads(tmp_path_factory, long_prompt, case):
    model, tokenizer, pruned, kept = _prune(*case)
    ids = long_prompt(tokenizer)
    with torch.no_grad():
        with bypassed(model, set(range(case[1])) - set(kept)):
            expected = model(ids).logits
        assert torch.equal(pruned(ids).logits, expected)
    path = kit.save_pruned(pruned, tokenizer, tmp_path_factory.mktemp("pruned") / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert layers.num_layers(reloaded) == len(kept) and reloaded.config.pruned_blocks == pruned.config.pruned_blocks
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=0)
