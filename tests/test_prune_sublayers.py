"""Removing attention or MLP sublayers: in memory (dropped, drop_layers), as a plain checkpoint, with the KV
cache, on every tiny architecture, against the original model with those branches zeroed by forward hooks."""

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import kit
from kit.core import layers
from kit.core.block import Block, Layers, Sublayers
from kit.prune import dropped
from kit.prune.sublayers import RemovedSublayer, materialised
from kit.testing import assert_same_greedy, bypassed, greedy, zeroed_sublayers

SET = {0, 2, 5}  # the first layer (whose cache counts positions), one in the middle, the last
KINDS = pytest.mark.parametrize("kind", ["attention", "mlp"])


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def _generate(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=5, do_sample=False, **kwargs)


# ------------------------------------------------------------------------------ Sublayers


def test_sublayers_are_sorted_and_named():
    chosen = Sublayers("attention", [5, 0, 2, 3])
    assert chosen.layers == (0, 2, 3, 5) and chosen == Sublayers("attention", {0, 2, 3, 5})
    assert chosen.label == "attention of layers 0, 2..3, 5" and Sublayers("mlp", {4}).label == "mlp of layer 4"
    assert chosen.check(6) is chosen and Sublayers("mlp", range(6)).check(6).layers == tuple(range(6))  # all may go
    assert "Sublayers" in kit.__all__ and kit.Sublayers is Sublayers


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Sublayers("attn", {0}), r"Unknown sublayer kind 'attn': choose one of 'attention', 'mlp'\."),
        (lambda: Sublayers("mlp", [2, 2, 1]), r"Layers \[2\] are named more than once in \[2, 2, 1\]: name each layer once"),
    ],
)
def test_bad_sublayers_say_what_is_allowed(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "removal, message",
    [
        (Sublayers("mlp", ()), r"No mlp sublayers to remove: name at least one of the layers 0 <= i <= 5\."),
        (Sublayers("attention", {0, 6, -1}), r"Layer indices \[-1, 6\] are out of range: choose 0 <= i <= 5 for 6 layers"),
    ],
)
def test_bad_removals_say_what_is_allowed(removal, message, snapshot):
    model, _ = kit.testing.tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        kit.drop_layers(model, removal, inplace=True)
    with pytest.raises(ValueError, match=message):
        with dropped(model, removal):
            pass
    assert snapshot(model) == before


def test_a_sublayer_is_removed_once_and_whole_layers_go_first():
    model, _ = kit.testing.tiny_model("llama")
    pruned = kit.drop_layers(model, Sublayers("attention", {1, 3}))
    with pytest.raises(ValueError, match=r"The attention of layers \[3\] is already removed .*name each sublayer once"):
        kit.drop_layers(pruned, Sublayers("attention", {2, 3}))
    with pytest.raises(ValueError, match=r"The attention of layers \[1\] is already removed"):
        with dropped(pruned, Sublayers("attention", {1})):
            pass
    for removal in (Block(0, 1), {4}):
        with pytest.raises(ValueError, match=r"has removed sublayers .*remove whole layers first, then sublayers"):
            kit.drop_layers(pruned, removal)
        with pytest.raises(ValueError, match="remove whole layers first"):
            with dropped(pruned, removal):
                pass
    with pytest.raises(ValueError, match=r"copies whole layers, so no recipe removes the attention of layers 1, 3: .*save_pruned"):
        kit.prune.mergekit_config("m", Sublayers("attention", {1, 3}), 6)
    both = kit.drop_layers(pruned, Sublayers("mlp", {3}))  # the other kind of the same layer may go
    assert both.config.pruned_sublayers == {"attention": [1, 3], "mlp": [3]}
    first = kit.drop_layers(kit.drop_layers(model, Layers({0, 5})), Sublayers("mlp", {0}))  # layers, then sublayers
    assert first.config.pruned_blocks == [[0, 1], [5, 1]] and first.config.pruned_sublayers == {"attention": [], "mlp": [0]}


@pytest.mark.parametrize(
    "arch, attention, mlp, outputs",
    [
        ("llama", ["self_attn"] * 2, ("mlp",), {"self_attn": (64, 2), "mlp": (64, 0)}),
        ("olmo2", ["self_attn"] * 2, ("mlp",), {"self_attn": (64, 2), "mlp": (64, 0)}),  # the middle is the MLP's input
        ("gpt_neox", ["attention"] * 2, ("mlp",), {"attention": (64, 2), "mlp": (64, 0)}),  # parallel residual
        ("opt", ["self_attn"] * 2, ("fc1", "fc2"), {"self_attn": (64, 2), "fc1": (128, 0), "fc2": (64, 0)}),  # no MLP child
        ("granitemoehybrid", ["mamba", "self_attn"], ("block_sparse_moe", "shared_mlp"),
         {"mamba": (32, 0), "self_attn": (32, 2), "block_sparse_moe": (32, 0), "shared_mlp": (32, 0)}),
    ],
)  # fmt: skip
def test_the_probe_names_each_branch_child_and_what_it_returns(arch, attention, mlp, outputs):
    model, _ = kit.testing.tiny_model(arch, num_layers=2)
    found = layers.middles(model)
    assert [m.attention for m in found] == attention and all(m.mlp == mlp for m in found)
    assert all(m.output(name) == outputs[name] for m in found for name in (m.attention, *m.mlp))


# ------------------------------------------------------------------------ every architecture


@KINDS
def test_removed_sublayers_equal_the_branches_zeroed(tiny, kind, long_prompt, snapshot):
    """drop_layers and dropped compute what the original does with those branches returning zeros (hooks), and
    generate the same with the KV cache; dropped restores everything."""
    model, tokenizer = tiny
    ids, removal, before = long_prompt(tokenizer), Sublayers(kind, SET), snapshot(model)
    with zeroed_sublayers(model, kind, SET):
        expected, generated = _logits(model, ids), _generate(model, ids)
    pruned = kit.drop_layers(model, removal)
    assert snapshot(model) == before and pruned.config.pruned_sublayers == {kind: sorted(SET), **{k: [] for k in {"attention", "mlp"} - {kind}}}
    assert torch.equal(_logits(pruned, ids), expected)
    assert torch.equal(_generate(pruned, ids), generated)
    with dropped(model, removal):
        assert torch.equal(_logits(model, ids), expected) and torch.equal(_generate(model, ids), generated)
    assert snapshot(model) == before


_RELOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    for path in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.load(path + "/ids.pt")
        with torch.no_grad():
            logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=5, do_sample=False)
        torch.save((logits, generated), path + "/reloaded.pt")
    assert "kit" not in sys.modules
    """
)


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory, long_prompt):
    """Every tiny architecture with the attention, and the MLP, of SET removed and saved, reloaded in ONE
    subprocess without the kit: {(arch, kind): (hooked logits, hooked generation, reloaded's, checkpoint folder)}."""
    root, expected = tmp_path_factory.mktemp("sublayers"), {}
    for arch in kit.testing.TINY_ARCHITECTURES:
        model, tokenizer = kit.testing.tiny_model(arch)
        ids = long_prompt(tokenizer)
        for kind in ("attention", "mlp"):
            with zeroed_sublayers(model, kind, SET):
                hooked = (_logits(model, ids), _generate(model, ids))
            path = kit.save_pruned(kit.drop_layers(model, Sublayers(kind, SET)), tokenizer, root / f"{arch}-{kind}")
            torch.save(ids, path / "ids.pt")
            expected[arch, kind] = (*hooked, path)
    subprocess.run([sys.executable, "-c", _RELOAD, *(str(p) for *_, p in expected.values())], check=True, cwd=root)
    return {key: (logits, generated, *torch.load(path / "reloaded.pt"), path) for key, (logits, generated, path) in expected.items()}


@KINDS
@pytest.mark.parametrize("arch", kit.testing.TINY_ARCHITECTURES)
def test_saved_checkpoint_reloads_without_the_kit_and_computes_the_pruned_network(reloaded, arch, kind):
    logits, generated, again, generated_again, path = reloaded[arch, kind]
    assert list(path.glob("*.safetensors")) and not list(path.parent.glob(f".{path.name}.*"))
    assert torch.equal(again, logits) and torch.equal(generated_again, generated)


@KINDS
@pytest.mark.parametrize("arch", ["llama", "opt", "deepseek_v3", "granitemoehybrid", "qwen3_next"])  # OPT: fc1, fc2; DeepSeek: a buffer
def test_the_checkpoint_holds_zeros_for_removed_children_and_the_rest_as_it_was(arch, kind, tmp_path):
    model, tokenizer = kit.testing.tiny_model(arch)
    pruned = kit.drop_layers(model, Sublayers(kind, SET))
    assert kit.evaluate.inference_cost.parameters(pruned) < kit.evaluate.inference_cost.parameters(model)  # weights freed
    saved = load_file(next(kit.save_pruned(pruned, tokenizer, tmp_path / "pruned").glob("*.safetensors")))
    original = load_file(next(kit.save_pruned(model, tokenizer, tmp_path / "original").glob("*.safetensors")))
    prefix = layers.anatomy(model).layers
    removed = {f"{prefix}.{i}.{name}." for i, layer in enumerate(layers.decoder_layers(pruned))
               for name, child in layer.named_children() if isinstance(child, RemovedSublayer)}  # fmt: skip
    buffers = {name for name, _ in model.named_buffers()}
    assert len(removed) >= len(SET) and saved.keys() == original.keys()
    for name, tensor in saved.items():
        zero = any(name.startswith(p) for p in removed) and name not in buffers
        assert torch.equal(tensor, torch.zeros_like(tensor) if zero else original[name]), name
    assert any(torch.count_nonzero(t) == 0 and t.numel() > 0 for t in saved.values())


# ------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("arch", ["llama", "gpt2", "granitemoehybrid", "qwen3_next"])
@KINDS
def test_every_sublayer_of_a_kind_may_go(arch, kind, long_prompt):
    """All attention (a hybrid's Mamba and linear-attention mixers too) or all MLP sublayers removed: the KV cache
    still counts positions, and generation equals the branches zeroed."""
    model, tokenizer = kit.testing.tiny_model(arch)
    ids = long_prompt(tokenizer)
    with zeroed_sublayers(model, kind, range(6)):
        expected = greedy(model, ids, 5)
    pruned = kit.drop_layers(model, Sublayers(kind, range(6)))
    assert torch.equal(greedy(pruned, ids, 5)[0], expected[0])  # the same arithmetic: a removed branch adds zeros
    assert_same_greedy(greedy(pruned, ids, 5, use_cache=False)[0], expected)  # recomputed: equal up to a near tie


def test_both_sublayers_of_a_layer_removed_equal_the_layer_bypassed(long_prompt):
    model, tokenizer = kit.testing.tiny_model("gemma3")
    ids = long_prompt(tokenizer)
    pruned = kit.drop_layers(kit.drop_layers(model, Sublayers("mlp", {1, 4})), Sublayers("attention", {4, 1}))
    with bypassed(model, [1, 4]):
        assert torch.equal(_logits(pruned, ids), _logits(model, ids))


def test_inplace_frees_the_weights_and_dropped_restores_after_an_exception(snapshot):
    model, _ = kit.testing.tiny_model("qwen3")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with dropped(model, Sublayers("mlp", {1, 2})):
            assert isinstance(layers.decoder_layers(model)[1].mlp, RemovedSublayer)
            raise RuntimeError("boom")
    assert snapshot(model) == before and not hasattr(model.config, "pruned_sublayers")
    assert kit.drop_layers(model, Sublayers("mlp", {1, 2}), inplace=True) is model
    skeleton = layers.decoder_layers(model)[1].mlp.skeleton
    assert all(p.is_meta for p in skeleton.parameters()) and not [n for n, _ in model.named_parameters() if ".1.mlp." in n]


def test_each_removed_child_is_materialised_on_its_layers_device():
    """Layers on two devices (3 to 5 on the meta device, standing in for a second GPU): the zeros a save writes for
    each removed child sit on its own layer's device, not all on the first parameter's (cuda:0 for a dispatched 70B)."""
    pruned = kit.drop_layers(kit.testing.tiny_model("llama")[0], Sublayers("mlp", {1, 4}))
    pruned = kit.drop_layers(pruned, Sublayers("attention", {2, 5}), inplace=True)
    for layer in layers.decoder_layers(pruned)[3:]:
        layer.to("meta")
    with materialised(pruned):
        placed = {(i, name): {str(p.device) for p in getattr(layer, name).parameters()}
                  for i, layer in enumerate(layers.decoder_layers(pruned)) for name in ("self_attn", "mlp")}  # fmt: skip
        zero = all(torch.count_nonzero(p) == 0 for p in layers.decoder_layers(pruned)[1].mlp.parameters())
    assert placed == {(i, name): {"cpu" if i < 3 else "meta"} for i in range(6) for name in ("self_attn", "mlp")} and zero
    assert isinstance(layers.decoder_layers(pruned)[4].mlp, RemovedSublayer)  # restored after the block


def test_load_model_removes_them_again(tmp_path, long_prompt):
    """kit.load_model of a checkpoint with removed sublayers frees their zero weights and keeps no KV cache for
    them again; it computes the same."""
    model, tokenizer = kit.testing.tiny_model("qwen3_next")
    pruned = kit.drop_layers(model, Sublayers("attention", {1, 2, 5}))  # full attention 1 and 5, linear attention 2
    path = kit.save_pruned(pruned, tokenizer, tmp_path / "pruned")
    loaded, _ = kit.load_model(str(path), device="cpu", dtype=torch.float32)
    assert [type(layer.self_attn if i % 2 else layer.linear_attn).__name__ for i, layer in enumerate(layers.decoder_layers(loaded))
            if i in {1, 2, 5}] == ["RemovedSublayer"] * 3  # fmt: skip
    cost = kit.evaluate.inference_cost
    assert cost.parameters(loaded) == cost.parameters(pruned) and cost.kv_cache_bytes(loaded, 50) == cost.kv_cache_bytes(pruned, 50)
    ids = long_prompt(tokenizer)
    assert torch.equal(_logits(loaded, ids), _logits(pruned, ids)) and torch.equal(_generate(loaded, ids), _generate(pruned, ids))


def test_a_copy_through_a_checkpoint_keeps_them_removed(tmp_path, long_prompt):
    """Healing copies a model through a temporary checkpoint (to quantize it): the removed sublayers come back
    removed, not with the fresh random weights a plain save_pretrained would leave them to."""
    model, tokenizer = kit.testing.tiny_model("gpt2")
    pruned = kit.drop_layers(model, Sublayers("mlp", {1, 4}))
    copied = kit.healing.lora.reloaded(pruned, tokenizer, None, tmp_path)
    assert isinstance(layers.decoder_layers(copied)[4].mlp, RemovedSublayer)
    ids = long_prompt(tokenizer)
    assert torch.equal(_logits(copied, ids), _logits(pruned, ids))


def test_healing_a_checkpoint_and_merging_keeps_the_removed_branches_zero(tmp_path):
    model, tokenizer = kit.testing.tiny_model("llama")
    path = kit.save_pruned(kit.drop_layers(model, Sublayers("mlp", {1, 4})), tokenizer, tmp_path / "pruned")
    config = kit.HealConfig(rank=2, lr=1e-2, steps=2, batch_size=2, seq_len=32, quantize=None, save_every=1)
    result = kit.heal(str(path), tokenizer, kit.loaders.data.corpus("train")[:2], config, output_dir=tmp_path / "healed")
    merged = AutoModelForCausalLM.from_pretrained(kit.merge_adapter(path, result.adapter_path, tmp_path / "merged"))
    for index, layer in enumerate(layers.decoder_layers(merged)):
        assert all(torch.count_nonzero(p) == 0 for p in layer.mlp.parameters()) == (index in {1, 4}), index
