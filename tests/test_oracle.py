"""The ablation oracle against rebuilt models, its artifact, and its errors."""

from contextlib import nullcontext
from copy import deepcopy

import numpy as np
import pytest
import torch

import kit
from kit.choose.oracle import Ablation, ablation_losses, compare_criteria
from kit.core.block import Block
from kit.core.text import encode
from kit.evaluate import validation_loss
from kit.loaders.data import corpus
from kit.prune import drop_layers
from kit.scan.distances import Distances
from kit.testing import bypassed

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Lists are mutable sequences.", "x = 1", "a b c d e f g h i j"]


def _brute_kl(model, pruned, tokenizer, texts, max_length, batch_size) -> float:
    """Token-weighted mean KL(unpruned || pruned) from two full forwards per batch."""
    total, count = 0.0, 0
    for first in range(0, len(texts), batch_size):
        enc = encode(tokenizer, texts[first : first + batch_size], max_length=max_length)
        p, q = (m(**enc, use_cache=False).logits[:, :-1].float().log_softmax(-1) for m in (model, pruned))
        scored = enc["attention_mask"][:, 1:].bool()
        total += (p.exp() * (p - q)).sum(-1)[scored].sum().item()
        count += int(scored.sum())
    return total / count


@pytest.mark.parametrize("arch", kit.testing.TINY_ARCHITECTURES)  # MoE, MLA, hybrid Mamba, linear attention, multimodal too
def test_equals_validation_loss_of_the_rebuilt_model(arch):
    _assert_equals_rebuilt_models(*kit.testing.tiny_model(arch, num_layers=4))  # every block of 4 layers: 9 rebuilt models


def _rebuilt(model, block: Block):
    """A context manager giving `model` without `block`: drop_layers, or where it refuses the block (the last
    attention layers of a hybrid, which could not generate) a copy whose layers in `block` are bypassed."""
    try:
        return nullcontext(drop_layers(model, block))
    except ValueError as err:
        assert "leaves no attention layer" in str(err)
    return bypassed(deepcopy(model), block.layers)


def _assert_equals_rebuilt_models(model, tokenizer):
    L = kit.core.layers.num_layers(model)
    oracle = ablation_losses(model, tokenizer, TEXTS, max_length=16, batch_size=3)
    assert oracle.loss.shape == oracle.kl.shape == (L + 1, L + 1)
    unpruned = validation_loss(model, tokenizer, TEXTS, max_length=16, batch_size=3)
    np.testing.assert_allclose(oracle.loss[0], unpruned.loss, rtol=1e-5)
    assert (oracle.kl[0] == 0).all() and oracle.meta["tokens"] == unpruned.tokens
    for n in range(1, L):
        for start in range(L + 1):
            if start + n > L:
                assert np.isnan(oracle.loss[n, start]) and np.isnan(oracle.kl[n, start])
                continue
            with _rebuilt(model, Block(start, n)) as pruned:
                expected = validation_loss(pruned, tokenizer, TEXTS, max_length=16, batch_size=3).loss
                assert oracle.loss[n, start] == pytest.approx(expected, rel=1e-5), (n, start)
                if n == 2:  # KL brute-forced on one row (two full forwards per block)
                    assert oracle.kl[n, start] == pytest.approx(_brute_kl(model, pruned, tokenizer, TEXTS, 16, 3), rel=1e-4, abs=1e-7)
    assert np.isnan(oracle.loss[L]).all()
    assert oracle.best_block(2) == Block(int(np.nanargmin(oracle.loss[2])), 2)


def test_embedded_model_selected_sizes(smollm):
    model, tokenizer = smollm
    texts = [text[:200] for text in corpus("validation")[:3]]
    oracle = ablation_losses(model, tokenizer, texts, ns=[27, 29], max_length=24, batch_size=2, model_name="smollm2-135m")
    assert oracle.ns == [27, 29] and np.isnan(oracle.loss[28]).all()
    for block in (Block(0, 27), Block(2, 27), Block(3, 27), Block(1, 29)):
        pruned = drop_layers(model, block)
        expected = validation_loss(pruned, tokenizer, texts, max_length=24, batch_size=2).loss
        assert oracle.loss[block.n, block.start] == pytest.approx(expected, rel=1e-5), block
        assert oracle.kl[block.n, block.start] > 0
    assert oracle.meta["model"] == "smollm2-135m" and oracle.meta["ns"] == [27, 29]


def test_save_load_round_trip(tmp_path):
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=4)
    oracle = ablation_losses(model, tokenizer, TEXTS[:2], ns=[1, 3], max_length=12)
    loaded = Ablation.load(oracle.save(tmp_path / "oracle.safetensors"))
    np.testing.assert_array_equal(loaded.loss, oracle.loss)
    np.testing.assert_array_equal(loaded.kl, oracle.kl)
    assert loaded.meta == {**oracle.meta, "versions": loaded.meta["versions"]} and loaded.ns == [1, 3]
    Distances(torch.zeros(5, 5)).save(tmp_path / "scan.safetensors")
    with pytest.raises(ValueError, match="is not an Ablation file"):
        Ablation.load(tmp_path / "scan.safetensors")


def test_bad_input_says_what_to_do():
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=4)
    with pytest.raises(ValueError, match=r"n=4 is out of range: choose 1 <= n <= 3"):
        ablation_losses(model, tokenizer, TEXTS, ns=[1, 4])
    with pytest.raises(ValueError, match=r"texts \[1\] have fewer than 2 tokens"):
        ablation_losses(model, tokenizer, ["long enough text", "x"], ns=[1])
    with pytest.raises(ValueError, match="non-empty list"):
        ablation_losses(model, tokenizer, "one string")
    oracle = ablation_losses(model, tokenizer, TEXTS[:1], ns=[1], max_length=8)
    with pytest.raises(ValueError, match=r"n=2 was not measured; measured: \[1\]"):
        oracle.best_block(2)


def _table(rows: dict[int, list[float]], L: int = 4) -> np.ndarray:
    table = np.full((L + 1, L + 1), np.nan)
    for n, values in rows.items():
        table[n, : len(values)] = values
    return table


def test_compare_criteria_exact_on_hand_made_tables():
    held = Ablation(_table({1: [5.0, 2.0, 3.0, 4.0], 2: [6.0, 7.0, 4.5]}), _table({1: [0.5, 0.2, 0.3, 0.4], 2: [1, 2, 3]}))
    calibration = Ablation(_table({1: [5.0, 3.0, 2.0, 4.0], 2: [7.0, 6.0, 5.0]}), _table({1: [0] * 4, 2: [0] * 3}))
    matrix = torch.full((5, 5), 0.5)
    matrix[0, 1] = matrix[1, 0] = 0.1  # n=1: start 0 ranks first; n=2 all tie but for (2, 4)
    matrix[2, 4] = matrix[4, 2] = 0.2
    scan = Distances(matrix, {"metric": "angular_last"})
    table = compare_criteria(held, distances=[scan], calibration=calibration).set_index(["n", "criterion"])
    assert table.loc[(1, "angular_last"), ["start", "loss", "kl", "best_start", "regret"]].tolist() == [0, 5.0, 0.5, 1, 3.0]
    assert table.loc[(1, "heuristic"), ["start", "regret"]].tolist() == [2, 1.0]  # keep layer 3, drop layer 2
    assert table.loc[(1, "loss"), ["start", "regret"]].tolist() == [2, 1.0]
    assert table.loc[(2, "angular_last"), ["start", "regret"]].tolist() == [2, 0.0]
    assert table.loc[(2, "heuristic"), ["start", "regret"]].tolist() == [1, 2.5]
    # Spearman over starts: brute force from ranks
    assert table.loc[(1, "loss"), "spearman"] == pytest.approx(np.corrcoef([4, 2, 1, 3], [4, 1, 2, 3])[0, 1])
    assert table.loc[(1, "angular_last"), "spearman"] == pytest.approx(np.corrcoef([1, 3, 3, 3], [4, 1, 2, 3])[0, 1])
    assert np.isnan(table.loc[(1, "heuristic"), "spearman"]) and (table["regret"] >= 0).all()


def test_compare_criteria_on_a_tiny_model():
    model, tokenizer = kit.testing.tiny_model("qwen2")
    texts = corpus("validation")[:4]
    calibration = ablation_losses(model, tokenizer, texts[:2], ns=[1, 2], max_length=16)
    held = ablation_losses(model, tokenizer, texts[2:], ns=[1, 2], max_length=16)
    scans = [kit.angular_distances(model, tokenizer, texts[:2], max_length=16, metric=m) for m in ("angular_last", "block_influence")]
    table = compare_criteria(held, distances=scans, calibration=calibration)
    assert set(table["criterion"]) == {"angular_last", "block_influence", "heuristic", "loss"} and set(table["n"]) == {1, 2}
    assert (table["regret"] >= 0).all()
    assert table.groupby("n")["best_loss"].nunique().eq(1).all()
    assert (compare_criteria(held, calibration=held).query("criterion == 'loss'")["regret"] == 0).all()


def test_compare_criteria_bad_input():
    L4 = Ablation(_table({1: [1.0, 2, 3, 4]}), _table({1: [0.0] * 4}), {"model": "a"})
    L5 = Ablation(np.zeros((6, 6)), np.zeros((6, 6)), {"model": "a"})
    with pytest.raises(ValueError, match=r"different layers \(held_out: 4, calibration: 5\)"):
        compare_criteria(L4, calibration=L5)
    other = Distances(torch.zeros(5, 5), {"model": "b", "metric": "angular_last"})
    with pytest.raises(ValueError, match=r"different model \(held_out: a, angular_last: b\)"):
        compare_criteria(L4, distances=[other])
    with pytest.raises(ValueError, match=r"block sizes \[2\] were not measured on the held-out texts; measured: \[1\]"):
        compare_criteria(L4, ns=[1, 2])


def test_never_holds_the_unpruned_log_probs_of_every_token():
    """32 texts x 32 tokens (992 scored): the unpruned model's log-probs are computed again per chunk of 256
    tokens, never kept as one [scored tokens, vocab] fp32 table (2 GiB at 16 x 256 tokens and a 128k vocabulary)."""
    from kit.core.memory import measure

    model, tokenizer = kit.testing.tiny_model("llama", num_layers=4)
    texts = [text[:400] for text in kit.loaders.data.corpus("validation")[:32]]
    with measure() as memory:
        ablation_losses(model, tokenizer, texts, ns=[1], max_length=32, batch_size=32)
    vocab = model.config.vocab_size
    assert memory.largest <= kit.choose.replay.TOKEN_CHUNK * vocab * 4 < 992 * vocab * 4, memory.largest


def test_a_block_whose_loss_overflowed_never_wins():
    loss = np.full((5, 5), np.nan)
    loss[0, 0], loss[2, :3] = 3.0, [np.nan, 3.5, np.inf]  # block (0, 2) came out NaN, block (2, 2) inf
    oracle = Ablation(loss, np.zeros((5, 5)))
    assert oracle.best_block(2) == kit.Block(1, 2)
    loss[2, 1] = np.nan
    with pytest.raises(FloatingPointError, match="every block of 2 layers came out inf or NaN.*float32 or bfloat16"):
        Ablation(loss, np.zeros((5, 5))).best_block(2)
