"""Property-based tests of the pruning bookkeeping: random layer counts and sequences of blocks
(pruning up to three times) on every tiny architecture, against a brute-force list of kept layers."""

import functools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import kit
from kit import layers
from kit.prune import Block

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None)


@functools.lru_cache(maxsize=None)
def _original(arch: str, num_layers: int):
    return kit.tiny_model(arch, num_layers=num_layers)


@st.composite
def prunings(draw):
    """(architecture, layer count, blocks applied one after the other, each valid on what is left)."""
    arch = draw(st.sampled_from(kit.TINY_ARCHITECTURES))
    num_layers = draw(st.integers(3, 8))
    blocks, left = [], num_layers
    for _ in range(draw(st.integers(1, 3))):
        if left < 2:
            break
        n = draw(st.integers(1, left - 1))
        blocks.append(Block(draw(st.integers(0, left - n)), n))
        left -= n
    return arch, num_layers, blocks


def _prune(arch, num_layers, blocks):
    model, tokenizer = _original(arch, num_layers)
    kept, pruned = list(range(num_layers)), model
    for block in blocks:
        del kept[block.start : block.end]
        pruned = kit.drop_layers(pruned, block)
    return model, tokenizer, pruned, kept


def _runs(removed: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive indices as [start, length]."""
    runs = []
    for i in removed:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return runs


@SETTINGS
@given(prunings())
def test_bookkeeping_names_the_original_layers(case):
    arch, num_layers, blocks = case
    model, _, pruned, kept = _prune(*case)
    assert layers.num_layers(pruned) == pruned.config.num_hidden_layers == len(kept)
    assert pruned.config.pruned_blocks == _runs(sorted(set(range(num_layers)) - set(kept)))
    for name, values in vars(model.config).items():
        if isinstance(values, list) and len(values) == num_layers and name != "pruned_blocks":
            assert getattr(pruned.config, name) == [values[i] for i in kept], name
    originals = layers.decoder_layers(model)
    for position, (layer, source) in enumerate(zip(layers.decoder_layers(pruned), kept)):
        assert {m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")} <= {position}
        expected = originals[source].state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in layer.state_dict().items())


@SETTINGS
@given(prunings())
def test_saved_pruned_model_reloads_and_generates_with_its_kv_cache(tmp_path_factory, long_prompt, case):
    _, tokenizer, pruned, kept = _prune(*case)
    ids = long_prompt(tokenizer)
    path = kit.save_pruned(pruned, tokenizer, tmp_path_factory.mktemp("pruned") / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert layers.num_layers(reloaded) == len(kept) and reloaded.config.pruned_blocks == pruned.config.pruned_blocks
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits, atol=1e-5, rtol=0)
    cached = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(cached, reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False))
