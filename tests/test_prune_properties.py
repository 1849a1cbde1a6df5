"""Property-based tests of the pruning bookkeeping: random layer counts and sequences of blocks and sets
of layers (pruning up to three times) on every tiny architecture, against a brute-force list of kept
layers and the original model with the removed layers bypassed; then random attention and MLP sublayers
removed (after whole layers or not), against the original with those branches zeroed."""

import functools

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import kit
from kit.core import layers
from kit.core.block import Block, Layers, Sublayers
from kit.testing import bypassed, zeroed_sublayers

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None)


@functools.lru_cache(maxsize=None)
def _original(arch: str, num_layers: int):
    return kit.testing.tiny_model(arch, num_layers=num_layers)


@st.composite
def prunings(draw):
    """(architecture, layer count, removals applied one after the other: each a Block or Layers (any set),
    valid on what is left)."""
    arch = draw(st.sampled_from(kit.testing.TINY_ARCHITECTURES))
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


@st.composite
def sublayer_prunings(draw):
    """(architecture, layer count, whole layers removed first (a Layers, or None), then Sublayers removals one after
    the other, each of a random kind and a set of the layers left that names no sublayer removed before)."""
    arch = draw(st.sampled_from(kit.testing.TINY_ARCHITECTURES))
    num_layers = draw(st.integers(3, 8))
    whole = draw(st.none() | st.sets(st.integers(0, num_layers - 1), min_size=1, max_size=num_layers - 2).map(Layers))
    left = num_layers - (len(whole.layers) if whole else 0)
    removals, taken = [], {"attention": set(), "mlp": set()}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(sorted(taken)))
        free = sorted(set(range(left)) - taken[kind])
        if not free:
            break
        chosen = draw(st.sets(st.sampled_from(free), min_size=1))
        taken[kind] |= chosen
        removals.append(Sublayers(kind, chosen))
    return arch, num_layers, whole, removals


def _prune_sublayers(arch, num_layers, whole, removals):
    """The pruned model, and the original indices of the layers kept and of the sublayers removed, by kind."""
    model, _, pruned, kept = _prune(arch, num_layers, [whole] if whole else [])
    for removal in removals:
        pruned = kit.drop_layers(pruned, removal)
    gone = {kind: {kept[i] for r in removals if r.kind == kind for i in r.layers} for kind in ("attention", "mlp")}
    return model, pruned, kept, gone


@SETTINGS
@given(sublayer_prunings())
def test_removed_sublayers_equal_the_branches_zeroed_and_reload(tmp_path_factory, long_prompt, case):
    arch, num_layers, whole, removals = case
    model, pruned, kept, gone = _prune_sublayers(*case)
    tokenizer = _original(arch, num_layers)[1]
    current = {kind: sorted(kept.index(i) for i in indices) for kind, indices in gone.items()}
    assert pruned.config.pruned_sublayers == current and layers.num_layers(pruned) == len(kept)
    ids = long_prompt(tokenizer)[:, :40]
    with torch.no_grad():
        with bypassed(model, set(range(num_layers)) - set(kept)), zeroed_sublayers(model, "attention", gone["attention"]):
            with zeroed_sublayers(model, "mlp", gone["mlp"]):
                expected = model(ids).logits
                generated = model.generate(ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(pruned(ids).logits, expected)
    assert torch.equal(pruned.generate(ids, max_new_tokens=3, do_sample=False), generated)
    path = kit.save_pruned(pruned, tokenizer, tmp_path_factory.mktemp("sublayers") / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=0)
