"""Evaluations as values: each registered evaluation's digest covers every parameter and its data, a
resumed sweep with any parameter changed is refused naming it, and the old builder functions still work."""

import dataclasses

import pytest

import kit
from kit import evaluate
from kit.core.stats import Estimate
from kit.evaluate import metrics
from kit.evaluate.recall_task import recall_items
from kit.experiments import sweep
from kit.loaders import data
from kit.loaders.data import BoolQItem

QUESTIONS = data.mmlu_questions(data.mmlu_subjects()[:2], per_subject=2)
TEXTS = data.corpus("validation")[:3]
BOOLQ = [BoolQItem("is the sky blue", "The sky is blue on a clear day.", True),
         BoolQItem("is snow black", "Fresh snow is white.", False)]  # fmt: skip

# One small instance of every registered evaluation (the test below fails if one is missing).
EXAMPLES = {
    "mmlu": metrics.MMLUAccuracy(QUESTIONS, shots=1, batch_size=2),
    "boolq": metrics.BoolQAccuracy(BOOLQ, batch_size=2),
    "recall": metrics.RecallAccuracy(recall_items(n=4, facts=3), batch_size=2),
    "loss": metrics.ValidationLoss(TEXTS, max_length=32, batch_size=2),
    "cost": metrics.InferenceCost(prompt_tokens=8, new_tokens=2, repeats=1, threads=1),
}


def _changed(value):
    """Another value of a parameter: one item fewer of data, one more of a number, 1 for None."""
    return value[:-1] if isinstance(value, tuple) else 1 if value is None else value + 1


def _every_change():
    return [(name, field.name) for name, e in EXAMPLES.items() for field in dataclasses.fields(e)]


def test_every_registered_evaluation_has_an_example():
    assert set(EXAMPLES) == set(metrics.EVALUATIONS)
    for name, example in EXAMPLES.items():
        assert type(example) is metrics.EVALUATIONS[name] and example.name == name


@pytest.mark.parametrize("name, field", _every_change())
def test_every_parameter_changes_the_digest(name, field):
    example = EXAMPLES[name]
    other = dataclasses.replace(example, **{field: _changed(getattr(example, field))})
    assert other.digest() != example.digest()
    assert dataclasses.replace(example).digest() == example.digest()  # an equal evaluation, an equal digest


def test_data_given_as_a_list_or_a_tuple_is_the_same_evaluation():
    as_list, as_tuple = metrics.ValidationLoss(list(TEXTS)), metrics.ValidationLoss(tuple(TEXTS))
    assert as_list == as_tuple and as_list.digest() == as_tuple.digest() and isinstance(as_list.texts, tuple)
    assert metrics.ValidationLoss([t + " " for t in TEXTS]).digest() != as_list.digest()  # the data's content counts
    assert as_list.settings()["texts"].startswith("3 items, sha256 ")


def test_the_few_shot_examples_are_part_of_mmlus_identity(monkeypatch):
    example = EXAMPLES["mmlu"]
    before = example.settings()["fewshot"]
    pool = data.mmlu_fewshot_pool
    monkeypatch.setattr(data, "mmlu_fewshot_pool", lambda subject: pool(subject)[::-1])  # other examples, same questions
    assert example.settings()["fewshot"] != before


@pytest.fixture(scope="module")
def cached_sweeps(tmp_path_factory):
    """Per evaluation: a finished sweep's cache (n = 0 on a tiny model) and the function that resumes it."""
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=2)
    folder = tmp_path_factory.mktemp("sweeps")

    def resume(evaluation):
        return sweep.sweep(model, tokenizer, ns=[0], evals=[evaluation], criterion="heuristic",
                           cache_path=folder / f"{evaluation.name}.json")  # fmt: skip

    first = {name: resume(e) for name, e in EXAMPLES.items()}
    return resume, first


@pytest.mark.parametrize("name, field", _every_change())
def test_a_resumed_sweep_with_a_changed_parameter_is_refused_naming_it(cached_sweeps, name, field):
    resume, first = cached_sweeps
    example = EXAMPLES[name]
    if name != "cost":  # timings differ from run to run; everything else resumes to the same rows
        assert resume(example).equals(first[name])
    changed = dataclasses.replace(example, **{field: _changed(getattr(example, field))})
    with pytest.raises(ValueError, match=rf"other settings \(evals\.{name}\.{field}: .* -> .*\); delete it"):
        resume(changed)


def test_runs_report_what_the_evaluators_compute():
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=2)
    found = metrics.evaluate_all(model, tokenizer, [EXAMPLES["recall"], EXAMPLES["loss"]])
    assert set(found) == {*EXAMPLES["recall"].metrics, *EXAMPLES["loss"].metrics}
    direct = evaluate.recall(model, tokenizer, list(EXAMPLES["recall"].items), batch_size=2)
    assert (found["recall"].value, found["recall"].chance) == (direct.accuracy, 1 / 3)
    assert found["recall"].outcomes.tolist() == direct.correct.tolist()
    loss = evaluate.validation_loss(model, tokenizer, list(TEXTS), max_length=32, batch_size=2)
    assert found["val_loss"].value == loss.loss and found["val_loss_norm"].value == loss.normalized
    with pytest.raises(ValueError, match=r"two evaluations report \['val_loss', 'val_loss_norm'\]"):
        metrics.evaluate_all(model, tokenizer, [EXAMPLES["loss"], EXAMPLES["loss"]])


def test_the_registry_builds_by_name_and_names_what_it_has():
    assert metrics.evaluation("loss", texts=TEXTS, max_length=32, batch_size=2) == EXAMPLES["loss"]
    with pytest.raises(ValueError, match="no evaluation 'hellaswag'; registered: boolq, cost, loss, mmlu, recall"):
        metrics.evaluation("hellaswag")
    with pytest.raises(ValueError, match="'loss' is taken"):
        metrics.register(type("Again", (metrics.ValidationLoss,), {}))
    with pytest.raises(TypeError, match="cannot digest a function"):
        metrics.ValidationLoss([lambda: 0]).digest()


def test_a_plain_function_in_a_cached_sweep_is_warned_about(tmp_path):
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=2)
    probe = lambda m, t: {"layers": 2.0}  # noqa: E731
    with pytest.warns(FutureWarning, match=r"evaluations \['0: .*<lambda>', '1: .*<lambda>'\] are plain functions: a resumed"):
        sweep.sweep(model, tokenizer, ns=[0], evals=[probe, lambda m, t: {}], criterion="heuristic", cache_path=tmp_path / "s.json")
    with pytest.raises(ValueError, match="two evaluations named 'loss'"):
        sweep.sweep(model, tokenizer, ns=[0], evals=[EXAMPLES["loss"]] * 2, criterion="heuristic")


def test_above_chance_reads_the_interval_against_the_chance_level():
    assert metrics.above_chance(Estimate(0.6, 0.3, 0.9, chance=0.25))
    assert not metrics.above_chance(Estimate(0.3, 0.2, 0.4, chance=0.25))
    assert not metrics.above_chance(Estimate(2.0, 1.0, 3.0))  # no chance level: nothing to be above
    assert metrics.above_chance(Estimate(0.3, 0.2, 0.4, chance=0.25), force=True)
