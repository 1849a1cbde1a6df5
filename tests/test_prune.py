"""Blocks and sets of layers, removing them (temporarily and for good), pruned checkpoints, mergekit recipes."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, PretrainedConfig

import kit
from kit.choose.criteria import Selection
from kit.core import layers
from kit.core.artifacts import MissingArtifactError
from kit.core.block import Block, Layers, heuristic_block
from kit.prune import dropped
from kit.testing import assert_same_greedy, bypassed, greedy

BLOCK = Block(2, 2)  # in the middle of a 6-layer tiny model
SET = Layers({0, 2, 5})  # not consecutive: the first layer, one in the middle and the last
RUNS = {BLOCK: [[2, 2]], SET: [[0, 1], [2, 1], [5, 1]]}  # pruned_blocks of each: maximal runs [start, n]
REMOVALS = pytest.mark.parametrize("removal", list(RUNS), ids=["block", "set"])


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


# --------------------------------------------------------------------------------------- blocks


def test_heuristic_block_keeps_the_final_layer():
    block = heuristic_block(30, 5)
    assert (block.start, block.n, block.end) == (24, 5, 29)
    assert list(block.layers) == [24, 25, 26, 27, 28]
    assert heuristic_block(2, 1) == Block(0, 1)


def test_a_set_of_layers_is_sorted_and_split_into_runs():
    chosen = Layers([7, 2, 3, 4, 0])
    assert chosen.layers == (0, 2, 3, 4, 7) and chosen == Layers({0, 2, 3, 4, 7})  # a set: order does not matter
    assert chosen.blocks == [Block(0, 1), Block(2, 3), Block(7, 1)]
    assert chosen.label == "layers 0, 2..4, 7" and Layers({3}).label == "layer 3" and Block(3, 1).label == "layer 3" and Block(2, 3).label == "layers 2..4"
    assert Layers(()).blocks == []


@pytest.mark.parametrize(
    "block, message",
    [
        (Block(0, 0), "choose 1 <= n <= 5 for 6 layers"),
        (Block(0, 6), "choose 1 <= n <= 5 for 6 layers"),
        (Block(-1, 2), "choose 0 <= start <= 4 for 6 layers"),
        (Block(3, 4), "choose 0 <= start <= 2 for 6 layers"),
        ([], r"No layers to remove: name at least one of the layers 0 <= i <= 5\."),
        ({0, 6, -1}, r"Layer indices \[-1, 6\] are out of range: choose 0 <= i <= 5 for 6 layers"),
        ([2, 0, 2, 5, 5], r"Layers \[2, 5\] are named more than once in \[2, 0, 2, 5, 5\]: name each layer once"),
        (range(6), "Removing all 6 layers leaves no model: remove at most 5"),
    ],
)
def test_bad_removals_say_what_is_allowed(block, message):
    model, _ = kit.testing.tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        kit.drop_layers(model, block)
    with pytest.raises(ValueError, match=message):
        with dropped(model, block):
            pass
    with pytest.raises(ValueError, match=message):
        kit.prune.mergekit_config("m", block, 6)


def test_unsupported_architecture_is_named():
    model = torch.nn.Linear(2, 2)
    model.config = PretrainedConfig()
    model.config.model_type = "bert"
    with pytest.raises(layers.UnsupportedArchitectureError, match="'bert' is not supported"):
        kit.drop_layers(model, BLOCK)


def test_layer_index_scaled_attention_is_refused_unless_the_indices_stay():
    model = kit.families.tiny_family_model("gpt2", scale_attn_by_inverse_layer_idx=True)  # attention scaled by 1/(layer_idx+1)
    with pytest.raises(ValueError, match=r"rebuild layer 3 \(then layer 1\) differently: submodule 'attn' gets scaling"):
        kit.drop_layers(model, Block(1, 2))
    assert layers.num_layers(kit.drop_layers(model, Block(2, 2))) == 2  # the last layers: no index changes


# ------------------------------------------------------------------------------ sweep view


@REMOVALS
def test_dropped_equals_drop_layers_and_restores_exactly(tiny, removal, long_prompt, snapshot):
    model, tokenizer = tiny
    ids = long_prompt(tokenizer)
    before, full, left = snapshot(model), _logits(model, ids), 6 - len(removal.layers)
    with dropped(model, removal) as view:
        assert view is model and layers.num_layers(model) == left and layers.text_config(model.config).num_hidden_layers == left
        inside = _logits(model, ids)
    assert snapshot(model) == before
    assert torch.equal(_logits(model, ids), full)
    assert torch.equal(inside, _logits(kit.drop_layers(model, removal), ids))


def test_dropped_restores_after_an_exception(snapshot):
    model, _ = kit.testing.tiny_model("gemma3")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with dropped(model, Block(1, 3)):
            raise RuntimeError("boom")
    assert snapshot(model) == before
    assert not hasattr(model.config, "pruned_blocks")


# ------------------------------------------------------------------------------ drop_layers


def test_drop_layers_leaves_the_original_untouched(tiny, long_prompt, snapshot):
    model, tokenizer = tiny
    ids = long_prompt(tokenizer)
    before, full = snapshot(model), _logits(model, ids)
    pruned = kit.drop_layers(model, BLOCK)
    with torch.no_grad():
        for p in pruned.parameters():
            p.add_(1.0)
    assert snapshot(model) == before and layers.num_layers(model) == 6  # config, layers, indices, weights
    assert torch.equal(_logits(model, ids), full)
    assert kit.drop_layers(model, BLOCK, inplace=True) is model and layers.num_layers(model) == 4


@REMOVALS
def test_per_layer_config_is_shortened_consistently(tiny, removal):
    model, _ = tiny
    kept = [i for i in range(6) if i not in removal.layers]
    per_layer = {k: v for k, v in vars(layers.text_config(model.config)).items() if isinstance(v, list) and len(v) == 6}
    originals = [layers.decoder_layers(model)[i] for i in kept]
    pruned = kit.drop_layers(model, removal)
    config = layers.text_config(pruned.config)  # a multimodal model's per-layer facts sit in its text config
    assert config.num_hidden_layers == layers.num_layers(pruned) == len(kept)
    assert config.to_dict().get("n_layer", len(kept)) == len(kept)  # GPT-2's own name for it
    assert pruned.config.pruned_blocks == RUNS[removal]
    for name, values in per_layer.items():
        assert getattr(config, name) == [values[i] for i in kept], name
    for index, layer in enumerate(layers.decoder_layers(pruned)):
        assert {m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")} == {index}
        assert layer.state_dict().keys() == originals[index].state_dict().keys()


@REMOVALS
def test_drop_layers_equals_the_layers_bypassed(tiny, removal, long_prompt):
    """The pruned model computes what the original does with the removed layers returning their input (hooks)."""
    model, tokenizer = tiny
    ids = long_prompt(tokenizer)
    with bypassed(model, removal.layers):
        expected = _logits(model, ids)
    assert torch.equal(_logits(kit.drop_layers(model, removal), ids), expected)


@REMOVALS
def test_kv_cache_generation_equals_recompute(tiny, removal, long_prompt):
    model, tokenizer = tiny
    pruned = kit.drop_layers(model, removal)
    ids = long_prompt(tokenizer)
    assert ids.shape[1] > 32  # past the sliding window
    cached, _ = greedy(pruned, ids, 8, use_cache=True)
    assert_same_greedy(cached, greedy(pruned, ids, 8, use_cache=False))


def test_qwen2_sliding_layers_stay_sliding():
    model, _ = kit.testing.tiny_model("qwen2")  # layers 0-2 full attention, 3-5 sliding
    pruned = kit.drop_layers(model, Block(1, 3))
    assert pruned.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert pruned.config.max_window_layers == 1
    for removal in (BLOCK, Layers({0, 4})):  # keeps 0 1 4 5; keeps 1 2 3 5
        pruned = kit.drop_layers(model, removal)
        assert pruned.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
        assert pruned.config.max_window_layers == 2


def test_index_lists_and_thresholds_follow_the_kept_layers():
    model = kit.families.tiny_family_model("qwen3_moe", mlp_only_layers=[0, 3])  # layers 0 and 3 dense, 1 and 2 MoE
    pruned = kit.drop_layers(model, Block(1, 1))
    assert pruned.config.mlp_only_layers == [0, 2]
    assert [type(layer.mlp).__name__ for layer in layers.decoder_layers(pruned)] == ["Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock", "Qwen3MoeMLP"]
    pruned = kit.drop_layers(model, Layers({0, 2}))
    assert pruned.config.mlp_only_layers == [1]
    assert [type(layer.mlp).__name__ for layer in layers.decoder_layers(pruned)] == ["Qwen3MoeSparseMoeBlock", "Qwen3MoeMLP"]
    model = kit.families.tiny_family_model("deepseek_v3", first_k_dense_replace=2)
    assert kit.drop_layers(model, Block(0, 1)).config.first_k_dense_replace == 1
    assert kit.drop_layers(model, Block(2, 2)).config.first_k_dense_replace == 2
    assert kit.drop_layers(model, {1, 3}).config.first_k_dense_replace == 1  # any iterable of indices is a set


def test_a_depth_scaled_residual_is_rescaled_for_the_layers_that_stay(tmp_path):
    """MiniCPM3 scales each residual branch by scale_depth / sqrt(num_hidden_layers): pruning rescales
    scale_depth so every kept layer keeps its scale, pruned twice and after a reload."""
    model = kit.families.tiny_family_model("minicpm3", num_hidden_layers=6)
    scale = layers.decoder_layers(model)[0].residual_scale
    pruned = kit.drop_layers(kit.drop_layers(model, Block(1, 2)), Block(0, 1))
    assert pruned.config.scale_depth / (3**0.5) == pytest.approx(model.config.scale_depth / (6**0.5), rel=1e-15)
    kit.save_pruned(pruned, kit.testing.tiny_tokenizer(), tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    for layer in [*layers.decoder_layers(pruned), *layers.decoder_layers(reloaded)]:
        assert layer.residual_scale == pytest.approx(scale, rel=1e-15)


@pytest.mark.parametrize(
    "refused, label, allowed",
    [(Block(1, 3), r"layers 1\.\.3", Block(0, 3)), (Layers({1, 3}), "layers 1, 3", Layers({0, 2}))],
    ids=["block", "set"],
)
def test_a_hybrid_keeps_an_attention_layer(refused, label, allowed):
    model, _ = kit.testing.tiny_model("granitemoehybrid", num_layers=4)  # Mamba, attention, Mamba, attention
    with pytest.raises(ValueError, match=label + r" leaves no attention layer \(layers \[1, 3\]"):
        kit.drop_layers(model, refused, inplace=True)
    assert layers.num_layers(model) == 4  # untouched
    kept = [kind for i, kind in enumerate(model.config.layer_types) if i not in allowed.layers]
    assert kit.drop_layers(model, allowed).config.layer_types == kept and "full_attention" in kept


def test_a_removal_the_config_cannot_express_is_refused_with_the_reason():
    model = kit.families.tiny_family_model("qwen2_moe", decoder_sparse_step=2)  # layers 1 and 3 MoE: a periodic rule
    before = kit.core.layers.num_layers(model)
    with pytest.raises(ValueError, match=r"layer 1 cannot be expressed.*rebuild layer 2 \(then layer 1\) differently"):
        kit.drop_layers(model, Block(1, 1), inplace=True)
    assert kit.core.layers.num_layers(model) == before == model.config.num_hidden_layers  # untouched
    assert kit.core.layers.num_layers(kit.drop_layers(model, Block(1, 2))) == 2  # the rule still holds for 0 and 3
    model = kit.families.tiny_family_model("qwen2_moe", decoder_sparse_step=2, num_hidden_layers=6)  # 1, 3, 5 MoE
    with pytest.raises(ValueError, match=r"layers 0, 2 cannot be expressed.*rebuild layer 1 \(then layer 0\) differently"):
        kit.drop_layers(model, Layers({0, 2}), inplace=True)
    assert kit.core.layers.num_layers(model) == 6
    assert kit.core.layers.num_layers(kit.drop_layers(model, Layers({0, 1, 4, 5}))) == 2  # 2 dense, 3 MoE: the rule holds
    model = kit.families.tiny_family_model("gemma4_text")  # sliding attention, then full; the config's class makes
    with pytest.raises(ValueError, match=r"layer 3 cannot be expressed"):  # its last layer full on creation,
        kit.drop_layers(model, Block(3, 1))  # so a reload would turn layer 2 into full attention


def test_pruning_twice_records_original_indices(long_prompt):
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=8)
    ids = long_prompt(tokenizer)
    once = kit.drop_layers(model, Block(5, 2))  # keeps original 0 1 2 3 4 7
    twice = kit.drop_layers(once, Block(1, 2))  # removes original 1 2
    assert twice.config.pruned_blocks == [[1, 2], [5, 2]]
    thrice = kit.drop_layers(twice, Block(1, 2))  # removes original 3 4: one run 1..6 now
    assert thrice.config.pruned_blocks == [[1, 6]]
    assert torch.equal(_logits(thrice, ids), _logits(kit.drop_layers(model, Block(1, 6)), ids))
    sets = kit.drop_layers(kit.drop_layers(model, Layers({0, 5})), Layers({1, 4}))  # original 0 5, then 2 6
    assert sets.config.pruned_blocks == [[0, 1], [2, 1], [5, 2]]
    assert torch.equal(_logits(sets, ids), _logits(kit.drop_layers(model, Layers({0, 2, 5, 6})), ids))


@pytest.mark.parametrize(
    "family, six_layers",
    [("gemma4_text", {"num_hidden_layers": 6}), ("gemma4", {"text_config": {"num_hidden_layers": 6}})],  # multimodal
    ids=["gemma4_text", "gemma4"],
)
def test_a_set_keeps_the_per_layer_inputs_of_its_layers(family, six_layers, tmp_path):
    """Gemma 4 feeds each layer its own slice of the per-layer input weights (as Gemma 3n does): the pruned model, and its
    reloaded checkpoint, compute what the original does with the removed layers bypassed."""
    model, ids = kit.families.tiny_family_model(family, **six_layers), torch.tensor([[5, 17, 42, 99, 7, 300]])
    assert layers.num_layers(model) == 6
    with bypassed(model, [0, 2]):
        expected = _logits(model, ids)
    pruned = kit.drop_layers(model, Layers({0, 2}))
    assert torch.equal(_logits(pruned, ids), expected)
    path = kit.save_pruned(pruned, kit.testing.tiny_tokenizer(), tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- saved checkpoints

_RELOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    for path in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(torch.load(path + "/ids.pt")).logits
        torch.save(logits, path + "/reloaded.pt")
    assert "kit" not in sys.modules
    """
)


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory, long_prompt):
    """Every tiny architecture pruned of BLOCK and of SET and saved, then reloaded in ONE subprocess without
    the kit: {(arch, removal): (in-memory logits, reloaded logits, checkpoint folder)}."""
    root = tmp_path_factory.mktemp("pruned")
    expected = {}
    for arch in kit.testing.TINY_ARCHITECTURES:
        model, tokenizer = kit.testing.tiny_model(arch)
        for number, removal in enumerate(RUNS):
            pruned = kit.drop_layers(model, removal)
            path = kit.save_pruned(pruned, tokenizer, root / f"{arch}-{number}")
            torch.save(long_prompt(tokenizer), path / "ids.pt")
            expected[arch, removal] = (_logits(pruned, long_prompt(tokenizer)), path)
    subprocess.run([sys.executable, "-c", _RELOAD, *(str(p) for _, p in expected.values())], check=True, cwd=root)
    return {key: (logits, torch.load(path / "reloaded.pt"), path) for key, (logits, path) in expected.items()}


@REMOVALS
@pytest.mark.parametrize("arch", kit.testing.TINY_ARCHITECTURES)
def test_saved_checkpoint_reloads_without_the_kit(reloaded, arch, removal):
    logits, again, path = reloaded[arch, removal]
    assert list(path.glob("*.safetensors")) and not list(path.glob("*.bin"))
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temporary folder left behind
    assert torch.allclose(logits, again, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- mergekit


@pytest.mark.parametrize(
    "block, ranges",
    [
        (Block(0, 3), [[3, 10]]),
        (Block(4, 3), [[0, 4], [7, 10]]),
        (Block(7, 3), [[0, 7]]),
        (Layers({0, 4, 5, 9}), [[1, 4], [6, 9]]),
        (Layers({2, 7}), [[0, 2], [3, 7], [8, 10]]),
    ],
)
def test_mergekit_config_ranges(block, ranges):
    config = yaml.safe_load(kit.prune.mergekit_config("org/model", block, 10))
    assert config["merge_method"] == "passthrough"
    assert [s["sources"] for s in config["slices"]] == [[{"model": "org/model", "layer_range": r}] for r in ranges]
    kept = [i for a, b in ranges for i in range(a, b)]  # upper bounds exclusive
    assert kept == [i for i in range(10) if i not in block.layers]


def _scan(metric: str, argmin: dict[int, int], L: int = 6):
    """A Distances whose argmin start for each n is `argmin[n]` (every other block 0.9)."""
    from kit.scan.distances import Distances

    matrix = torch.full((L + 1, L + 1), 0.9)
    for n, start in argmin.items():
        matrix[start, start + n] = matrix[start + n, start] = 0.1
    return Distances(matrix, {"metric": metric})


def test_every_criterion_picks_its_block():
    from kit.choose.criteria import CRITERIA, choose_block
    from kit.choose.oracle import Ablation

    scans = {"angular_last": _scan("angular_last", {2: 1}), "angular_all": _scan("angular_all", {2: 3}),
             "block_influence": _scan("block_influence", {2: 0})}  # fmt: skip
    loss = np.full((7, 7), np.nan)
    loss[2, :5] = [3.0, 2.5, 2.9, 2.0, 4.0]
    oracle = Ablation(loss, loss)
    evidence = dict(distances=scans, oracle=oracle, start=4)
    expected = {"angular_last": 1, "angular_all": 3, "block_influence": 0, "heuristic": 3, "loss": 3, "manual": 4}
    assert {name: choose_block(name, 6, 2, **evidence).start for name in expected} == expected
    assert choose_block("similarity", 6, 2, distances=scans["angular_all"]) == Block(3, 2, pytest.approx(0.1))
    assert {name for name, rule in CRITERIA.items() if rule.unit == "block"} == set(expected) | {"similarity"}


def test_criteria_bad_input():
    from kit.choose.criteria import choose_block

    scan = _scan("angular_last", {2: 1})
    with pytest.raises(ValueError, match="Unknown criterion 'random'; choose one of: angular_last"):
        choose_block("random", 6, 2, distances=scan)
    with pytest.raises(ValueError, match="'loss' needs the oracle: pass oracle=, kit.choose.oracle.ablation_losses"):
        choose_block("loss", 6, 2, distances=scan)
    with pytest.raises(ValueError, match=r"'angular_all' needs a scan with metric='angular_all'; given: \['angular_last'\]"):
        choose_block("angular_all", 6, 2, distances=scan)
    with pytest.raises(ValueError, match="the distances describe 6 layers, the model has 8"):
        choose_block("heuristic", 8, 2, distances=scan)
    with pytest.raises(ValueError, match="choose 0 <= start <= 4"):
        choose_block("manual", 6, 2, start=5)


def test_save_pruned_over_a_file_says_so_and_writes_nothing(tmp_path):
    model, tokenizer = kit.testing.tiny_model("llama")
    (tmp_path / "pruned").write_text("notes")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        kit.save_pruned(model, tokenizer, tmp_path / "pruned")
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"] and (tmp_path / "pruned").read_text() == "notes"


def test_a_missing_or_foreign_selection_names_notebook_02(tmp_path):
    with pytest.raises(MissingArtifactError, match="02_select_and_prune.ipynb"):
        Selection.load(tmp_path / "selection.json")
    (tmp_path / "selection.json").write_text('{"start": 3, "n": 2}')
    with pytest.raises(ValueError, match="not a block selection.*found \\['n', 'start'\\].*02_select_and_prune"):
        Selection.load(tmp_path / "selection.json")
