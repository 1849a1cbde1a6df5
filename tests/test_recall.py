"""kit.evaluate.recall_task: generated items well formed and deterministic; log-likelihoods equal to an independent
computation with HF's `labels=` loss, one item and one candidate at a time; the sweep metric with
its chance level."""

import matplotlib

matplotlib.use("Agg")

import math  # noqa: E402
import re  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kit  # noqa: E402
from kit.core.block import heuristic_block  # noqa: E402
from kit.core.stats import wilson  # noqa: E402
from kit.evaluate import (  # noqa: E402
    RecallResult,
    metrics,  # noqa: E402
    recall,
)
from kit.evaluate.recall_task import RecallItem, recall_items  # noqa: E402
from kit.experiments import curves, plots, results, sweep  # noqa: E402
from kit.prune import drop_layers  # noqa: E402
from kit.testing import assert_same_choices, reference_loglikelihood  # noqa: E402


def check_against_reference(model, tokenizer, items, result: RecallResult):
    assert result.loglikelihoods.shape == (len(items), len(items[0].candidates))
    for item, row, prediction in zip(items, result.loglikelihoods, result.predictions):
        expected = [reference_loglikelihood(model, tokenizer, item.context + item.query, f" {c}") for c in item.candidates]
        np.testing.assert_allclose(row, expected, atol=1e-4)
        assert_same_choices([prediction], [item.candidates], [expected], margin=2e-4)
    correct = [p == item.answer for p, item in zip(result.predictions, items)]
    assert result.correct.tolist() == correct and result.accuracy == pytest.approx(np.mean(correct))
    assert result.ci == wilson(sum(correct), len(items))
    assert result.chance == 1 / len(items[0].candidates)


def test_items_are_deterministic_and_well_formed():
    items = recall_items(40, facts=6, seed=3)
    assert items == recall_items(40, facts=6, seed=3) and items != recall_items(40, facts=6, seed=4)
    for item in items:
        lines = item.context.splitlines()
        facts = [re.fullmatch(r"The code for (\w+) is (\w+)\.", line).groups() for line in lines]
        names, codes = zip(*facts)
        assert len(set(names)) == len(set(codes)) == 6 and item.candidates == codes
        assert item.answer in item.candidates and item.context.endswith("\n")
        asked = re.fullmatch(r"The code for (\w+) is", item.query).group(1)
        assert dict(facts)[asked] == item.answer and item.prompt == item.context + item.query
    positions = Counter(item.candidates.index(item.answer) for item in items)
    assert sorted(positions) == list(range(6)) and max(positions.values()) - min(positions.values()) <= 1
    assert [len(item.candidates) for item in recall_items(3, facts=2)] == [2, 2, 2]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recall_matches_independent_loglikelihoods(arch):
    model, tokenizer = kit.testing.tiny_model(arch)
    items = recall_items(5, facts=3)
    assert any(len(tokenizer(f" {c}")["input_ids"]) > 1 for item in items for c in item.candidates)  # multi-token codes
    check_against_reference(model, tokenizer, items, recall(model, tokenizer, items, batch_size=2))


def test_embedded_model_matches_independent_loglikelihoods():
    model, tokenizer = kit.load_model("smollm2-135m")
    items = recall_items(4)
    check_against_reference(model, tokenizer, items, recall(model, tokenizer, items, batch_size=3))


def test_recall_errors_say_what_to_do():
    model, tokenizer = kit.testing.tiny_model("llama")
    with pytest.raises(ValueError, match="n must be >= 1"):
        recall_items(0)
    with pytest.raises(ValueError, match="facts must be between 2 and"):
        recall_items(4, facts=1)
    with pytest.raises(ValueError, match="facts must be between 2 and"):
        recall_items(4, facts=100)
    with pytest.raises(ValueError, match=r"recall_items\(40\)"):
        recall(model, tokenizer, [])
    mixed = recall_items(2, facts=2) + recall_items(2, facts=3)
    with pytest.raises(ValueError, match=r"different numbers of candidates \[2, 3\]"):
        recall(model, tokenizer, mixed)
    wrong = RecallItem("The code for Anna is apple.\n", "The code for Anna is", "pear", ("apple",))
    with pytest.raises(ValueError, match=r"items \[0\] have an answer that is not among their candidates"):
        recall(model, tokenizer, [wrong])


def test_recall_metrics_in_a_sweep_carry_their_chance():
    model, tokenizer = kit.testing.tiny_model("llama")
    items = recall_items(12, facts=4)
    table = sweep.sweep(model, tokenizer, ns=[0, 2, 4], evals=[metrics.RecallAccuracy(items)], criterion="heuristic")
    for n, row in table.set_index("n").iterrows():
        direct = recall(drop_layers(model, heuristic_block(6, n)) if n else model, tokenizer, items)
        assert (row.metric, row.value, (row.ci_low, row.ci_high), row.chance) == ("recall", direct.accuracy, direct.ci, 0.25)
        assert results.outcomes(row).tolist() == direct.correct.tolist()
    assert results.chance_level(table, "recall") == 0.25
    # collapse_point reads the rows' chance: the same as passing it, unlike the 1 / 6 of six facts
    right = np.stack([results.outcomes(row) for _, row in table.iterrows()]).sum(1)
    low = wilson(right, len(items))[0]
    first = np.flatnonzero(low <= 0.25)
    expected = table["fraction"].iloc[first[0]] if len(first) else math.inf
    assert curves.collapse_point(table, "recall")[0] == expected == curves.collapse_point(table, "recall", chance=0.25)[0]
    chance_lines = [line for line in plots.sweep_plot(table, "recall").get_lines() if line.get_label() == "chance"]
    assert [tuple(line.get_ydata()) for line in chance_lines] == [(0.25, 0.25)]
