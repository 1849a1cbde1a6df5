"""kit.experiments.readings: every verdict follows its rule on constructed artifacts, flipping when the data does,
and every number a reading states is one of its artifacts' numbers."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SPREAD, artifact_numbers, reading_numbers, write_compare_run

from kit import Distances
from kit.core.stats import wilson
from kit.experiments import curves, readings, results


def test_mmlu_verdict_follows_its_interval_against_chance(tmp_path):
    at_chance = readings.reading(write_compare_run(tmp_path, mmlu_right=12), "04_compare").markdown
    assert "**MMLU is indistinguishable from chance on the unpruned model**: 0.300 of 40 questions (95% interval" in at_chance
    above = readings.reading(write_compare_run(tmp_path, mmlu_right=20), "04_compare").markdown
    low, high = wilson(20, 40)
    assert f"**MMLU is above chance on the unpruned model**: 0.500 of 40 questions (95% interval {low:.3f} to {high:.3f}); " \
           "the interval lies above chance (0.25)." in above  # fmt: skip


def test_collapse_verdicts_name_where_the_curve_reaches_chance(tmp_path):
    text = readings.reading(write_compare_run(tmp_path), "04_compare").markdown
    collapse = pd.read_csv(tmp_path / "collapse.csv").set_index("criterion")
    assert collapse.loc["similarity", "collapse"] == pytest.approx(0.6) and collapse.loc["heuristic", "collapse"] == pytest.approx(0.4)
    assert "similarity blocks: holds until 40% of the layers and collapses at 60% (n = 6); collapse point 60%" in text
    assert "heuristic blocks: holds until 20% of the layers and collapses at 40% (n = 4)" in text
    first = readings.reading(write_compare_run(tmp_path, heuristic={0: 30, 2: 6, 4: 6, 6: 6, 8: 6}), "04_compare").markdown
    assert "heuristic blocks: collapses at the first block size swept, 20% (n = 2); collapse point 20%" in first
    never = readings.reading(write_compare_run(tmp_path, similarity={0: 30, 2: 30, 4: 30, 6: 30, 8: 30}), "04_compare").markdown
    assert "similarity blocks: stays above chance at every block size swept (up to 80%); collapse point beyond the sweep" in never
    dead = readings.reading(write_compare_run(tmp_path, similarity={0: 6, 2: 6, 4: 6, 6: 6, 8: 6}), "04_compare").markdown
    assert "similarity blocks: already at chance before any layer is removed; collapse point 0%" in dead


def test_criterion_loss_verdict_follows_the_paired_interval_over_the_same_texts(tmp_path):
    text = readings.reading(write_compare_run(tmp_path), "04_compare").markdown
    assert "**The similarity blocks cost less loss than the heuristic's at every block size swept**" in text
    mixed = readings.reading(write_compare_run(tmp_path, sim_loss={0: 0.3, 2: 0.505, 4: 0.4, 6: 1.0, 8: 0.6}), "04_compare").markdown
    assert "cost less loss than the heuristic's at n = 4, 8, cost more at n = 6, and cannot be told apart at n = 2**" in mixed
    apart = readings.reading(write_compare_run(tmp_path, sim_loss={0: 0.3, 2: 0.505, 4: 0.705, 6: 0.9, 8: 1.1}), "04_compare").markdown
    assert "**The similarity blocks and the heuristic's cannot be told apart by their loss at any block size swept**" in apart
    assert "| 6 | 60% | 1.000 | 0.900 | +0.100 (0.0" in mixed  # its paired interval: about 0.1 +- 0.017
    assert "| 2 | 20% | 0.505 | 0.500 | +0.005 (-0.0" in mixed  # contains 0: cannot be told apart


def test_paired_and_healing_verdicts(tmp_path):
    text = readings.reading(write_compare_run(tmp_path), "04_compare").markdown
    paired = pd.read_csv(tmp_path / "paired.csv").query("metric == 'recall'").set_index("n")
    higher = [n for n in (2, 4, 6, 8) if paired.loc[n, "ci_low"] > 0]
    assert higher == [2, 4]  # the first k questions right: 25 vs 20 and 20 vs 8 differ on questions one side alone gets
    assert "of the similarity blocks is higher at n = 2, 4, indistinguishable elsewhere**" in text
    assert "**Healing lowers the loss at 2 of 2 healed blocks and changes in-context recall (accuracy) detectably at 1**: " \
           "as the paper finds" in text  # fmt: skip
    assert "| similarity | 4 | 0.400 | 0.310 (-0.090: -0.1" in text  # the paired change: -0.09 +- 0.017
    assert "| 90% | +0.025 (" in text  # (0.40 - 0.31) / (0.40 - 0.30) of the damage
    unhelped = readings.reading(write_compare_run(tmp_path, healed_loss=0.395), "04_compare").markdown
    assert "**Healing lowers the loss at 1 of 2 healed blocks and changes in-context recall (accuracy) detectably at 1**: " \
           "this run does not show the paper's finding" in unhelped  # fmt: skip


def test_every_number_of_the_compare_reading_is_an_artifact_number(tmp_path):
    text = readings.reading(write_compare_run(tmp_path), "04_compare").markdown
    comparison = pd.read_csv(tmp_path / "comparison.csv")
    derived = [*(comparison["weight_bytes"] / comparison["weight_bytes"].iloc[0]), (0.4 - 0.31) / (0.4 - 0.3), (0.7 - 0.6) / (0.7 - 0.3)]
    allowed = artifact_numbers(tmp_path, derived)
    assert reading_numbers(text) and set(reading_numbers(text)) <= allowed
    assert "1.50 M" not in text and "150.00 M parameters" in text and "| pruned | 6 | 67% |" in text


def test_criteria_reading_names_the_lowest_mean_regret(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"05_criteria": {"model": "m", "layers": 8, "parameters": 2.5e9}}))
    rows = [(1, "angular_last", 0.0, 0.9), (2, "angular_last", 0.5, 0.8), (1, "heuristic", 1.0, np.nan), (2, "heuristic", 0.0, np.nan),
            (1, "loss", 0.1, 0.99), (2, "loss", 0.1, 0.97)]  # fmt: skip
    table = pd.DataFrame(rows, columns=["n", "criterion", "regret", "spearman"])
    table.to_csv(tmp_path / "criteria.csv", index=False)
    text = readings.reading(tmp_path, "05_criteria").markdown
    assert "**`m`**: 8 layers, 2.50 B parameters." in text and "**Lowest mean regret: `loss`** (0.100 nats" in text
    assert "| `angular_last` | 1 | 0.000 to 0.500 | 0.80 to 0.90 |" in text and "| `heuristic` | 2 | 0.000 to 1.000 | none |" in text
    table.loc[table["criterion"] == "angular_last", "regret"] = 0.0
    table.to_csv(tmp_path / "criteria.csv", index=False)
    assert "**Lowest mean regret: `angular_last`** (0.000 nats" in readings.reading(tmp_path, "05_criteria").markdown


def test_unknown_notebook_lists_the_readings(tmp_path):
    with pytest.raises(ValueError, match="01_similarity"):
        readings.reading(tmp_path, "06_nothing")


WOBBLE = np.array([0.5, -0.5, 0.25, -0.25] * 5)  # per-text deviations from a loss, mean 0 over 20 texts


def _loss(loss, stderr, changes=np.zeros(20)):
    """losses.json's LossResult fields: 20 texts of 10 tokens whose mean loss is `loss` + the mean of `changes`."""
    per_text = (loss + WOBBLE + changes) * 10
    return {"loss": loss + changes.mean(), "normalized": (loss + changes.mean()) / 10, "tokens": 200, "stderr": stderr,
            "text_losses": per_text.tolist(), "text_tokens": [10] * 20}  # fmt: skip


def test_prune_reading_calls_a_rise_only_when_the_paired_interval_excludes_0(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"02_select_and_prune": {"layers": 30, "parameters": 1.345e8}}))
    block = {"model": "m", "start": 13, "n": 6, "distance": 0.148, "source": "similarity"}

    def read(changes):
        losses = {"original": _loss(3.0, 0.05), "pruned": _loss(3.0, 0.05, np.asarray(changes, float)), "block": block}
        (tmp_path / "losses.json").write_text(json.dumps(losses))
        return readings.reading(tmp_path, "02_select_and_prune").markdown

    text = read([0.2] * 20)  # every text 0.2 worse: the paired interval is 0.2 to 0.2, though the stderrs overlap
    assert "**Removed layers 13 to 18** (n = 6, chosen by similarity; distance 0.148)." in text
    assert "**The validation loss rises**: 3.000 ± 0.050 to 3.200 ± 0.050 nats per token (± one standard error over " \
           "texts), a change of 0.200 (95% interval 0.200 to 0.200); 0.300 to 0.320 divided" in text  # fmt: skip
    assert "**The validation loss does not change beyond the noise**" in read([0.2, -0.2] * 10)  # half better, half worse
    assert "**The validation loss falls**" in read([-0.2] * 20)
    old = json.loads((tmp_path / "losses.json").read_text())
    del old["original"]["text_losses"]
    (tmp_path / "losses.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="rerun notebook 02"):
        readings.reading(tmp_path, "02_select_and_prune")


def test_heal_reading_states_the_share_restored_when_the_interval_is_below(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"03_heal": {"config": {"steps": 20, "quantize": "4bit"}}}))
    (tmp_path / "selection.json").write_text(json.dumps({"model": "m", "start": 13, "n": 6, "distance": 0.1, "source": "similarity"}))
    (tmp_path / "heal_history.json").write_text(json.dumps({"validation": [{"step": 0, "loss": 4.368}, {"step": 20, "loss": 3.751}]}))

    def read(healed, half):
        rows = {name: {"layers": layers, "parameters": 1e8, "val_loss": loss, "val_loss_ci_low": loss - half,
                       "val_loss_ci_high": loss + half, "val_loss_norm": loss / 10}
                for name, layers, loss in (("original", 30, 3.0), ("pruned", 24, 4.0), ("healed", 24, healed))}  # fmt: skip
        (tmp_path / "heal_losses.json").write_text(json.dumps(rows))
        return readings.reading(tmp_path, "03_heal").markdown

    text = read(3.5, 0.1)
    assert "**Healing lowers the loss** (rule: the healed model's 95% interval lies below the pruned model's loss): it restores " \
           "50% of the loss the pruning added." in text  # fmt: skip
    assert "| healed | 24 | 3.500 (95% interval 3.400 to 3.600) | 0.350 |" in text and "on the 4bit base, went from 4.368 to 3.751" in text
    assert "**Healing does not detectably lower the loss**" in read(3.9, 0.2)  # the interval reaches 4.0


def write_scan_run(run, *, deep: bool, stderr: float, noise: float = 0.0, L: int = 6, groups: int = 8):
    """The artifacts notebook 01 writes, from a scan whose block distances grow by 0.1 a layer and by
    0.05 a layer of distance from the layer before the last (`deep`: the best blocks are the heuristic's,
    ending there) or from the first (not `deep`: they start at layer 0); each group of texts adds its own `noise`."""
    i, j = np.triu_indices(L + 1, 1)
    upper = np.zeros((L + 1, L + 1))
    upper[i, j] = 0.1 * (j - i) + 0.05 * np.where(deep, abs(L - 1 - j), j)
    matrix = upper + upper.T
    rng = np.random.default_rng(0)
    shifts = rng.normal(0, noise, (groups, L + 1, L + 1))
    counts = np.full(groups, 10.0)
    sums = (matrix + shifts + shifts.transpose(0, 2, 1)) * counts[:, None, None]
    scan = Distances(torch.tensor(matrix), {"model": "m", "n_texts": 80, "max_length": 64, "metric": "angular_last"},
                     torch.full((L + 1, L + 1), stderr), torch.tensor(sums), torch.tensor(counts))  # fmt: skip
    scan.save(run / "distances.safetensors")
    (run / "choices.csv").write_text(scan.choices(range(1, L)).to_csv())
    (run / "manifest.json").write_text(json.dumps({"01_similarity": {"parameters": 2e6}}))
    return readings.reading(run, "01_similarity").markdown


def test_scan_verdicts_follow_where_the_best_blocks_lie_and_the_noise(tmp_path):
    deep = write_scan_run(tmp_path, deep=True, stderr=0.001)
    assert "**`m`**: 6 layers, 2.00 M parameters. Scanned on 80 texts of at most 64 tokens" in deep
    assert "**The best single layer to drop is layer 4** (distance 0.100 ± 0.001)" in deep
    assert "**The best block is the paper's heuristic block (the n layers before the final one) at 5 of 5 block sizes** " \
           "(n = 1, 2, 3, 4, 5;" in deep  # fmt: skip
    assert "farther than the best block by more than the noise at 0 of 5 sizes" in deep  # they are the same blocks
    assert "**The choice is settled at 5 of 5 sizes**" in deep and "elsewhere" not in deep
    shallow = write_scan_run(tmp_path, deep=False, stderr=0.001)
    assert "**The best single layer to drop is layer 0**" in shallow
    assert "heuristic block (the n layers before the final one) at 1 of 5 block sizes** (n = 5;" in shallow  # both start at 0
    assert "farther than the best block by more than the noise at 4 of 5 sizes" in shallow  # 0.05 x (5 - n) >> 0.0028
    noisy = write_scan_run(tmp_path, deep=False, stderr=0.1)  # 1.96 x 0.14 = 0.28 exceeds every gap, at most n = 1's 0.2
    assert "farther than the best block by more than the noise at 0 of 5 sizes" in noisy
    unsettled = write_scan_run(tmp_path, deep=False, stderr=0.001, noise=0.1)  # groups disagree by more than the slope
    assert "**The choice is settled at 5 of 5 sizes**" not in unsettled and ": elsewhere n = " in unsettled


def write_budget_run(run, *, attention_shift=0.2):
    """The artifacts notebook 06 writes: a budget sweep of the block and attention sublayers at two budgets
    (held-out losses per text), the kit's best_by_budget of it, and the step's manifest."""
    tokens = np.full(20, 10)
    per = {"none": 3.0, "block": 3.5, "attention": 3.0 + attention_shift, "block2": 4.0, "attention2": 4.3}
    rows = []
    for (budget, unit, criterion), key in {(0.0, "none", "none"): "none", (0.1, "block", "similarity"): "block",
                                           (0.1, "attention", "greedy"): "attention", (0.2, "block", "similarity"): "block2",
                                           (0.2, "attention", "greedy"): "attention2"}.items():  # fmt: skip
        sign = 1 if unit == "block" else -1
        texts = np.stack([(per[key] + sign * SPREAD) * tokens, tokens], 1)
        rows.append(dict(budget=budget, unit=unit, criterion=criterion, n=0 if unit == "none" else 2, removed="" if unit == "none" else
                         f"{unit} 1..2", fraction=budget * 0.9, metric="val_loss", value=per[key], ci_low=per[key] - 0.05,
                         ci_high=per[key] + 0.05, chance=np.nan, outcomes=None, per_text=results.encode_per_text(texts)))  # fmt: skip
    table = pd.DataFrame(rows)
    table.to_csv(run / "budget.csv", index=False)
    curves.best_by_budget(table).to_csv(run / "budget_best.csv", index=False)
    (run / "manifest.json").write_text(json.dumps({"06_granularity": {"model": "m", "layers": 10, "parameters": 2e6}}))
    return run


def test_granularity_reading_names_the_winner_at_each_budget_and_its_paired_difference(tmp_path):
    text = readings.reading(write_budget_run(tmp_path), "06_granularity").markdown
    assert "**Lowest held-out loss by granularity: 10%: attention; 20%: block**" in text
    assert "At 10%: `attention / greedy` removes attention 1..2 (9% of the parameters), held-out loss 3.200" in text
    assert "detectably lower than the paper's block (3.500): paired difference -0.300" in text
    assert "At 20%: `block / similarity`" in text and "the paper's block itself wins" in text
    assert "| 10% | 3.500 | 3.200 |" in text
    assert reading_numbers(text) and set(reading_numbers(text)) <= artifact_numbers(tmp_path, [1, 2])  # + the layers removed
    close = readings.reading(write_budget_run(tmp_path, attention_shift=0.49), "06_granularity").markdown
    assert "not distinguishable from the paper's block (3.500): paired difference -0.010" in close
