"""kit's MMLU agrees with lm-evaluation-harness (HFLM on the in-memory model, lm-eval's own MMLU
template on local files), with the network blocked."""

import socket
from pathlib import Path

import lm_eval
import numpy as np
import pytest
import yaml

import kit
from kit.evaluate import lm_eval_mmlu, mmlu
from kit.evaluate.mmlu_task import subject_header
from kit.loaders.data import LETTERS, mmlu_questions
from kit.testing import assert_same_choices


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_agrees_with_lm_eval_when_letters_split_into_tokens(questions, fewshot):
    model, tokenizer = kit.testing.tiny_model("llama")  # its tokenizer writes " B" as " " + "B"
    ours = mmlu(model, tokenizer, questions, shots=2, fewshot=fewshot)
    theirs = lm_eval_mmlu(model, tokenizer, questions, shots=2, batch_size=4, fewshot=fewshot)
    assert ours.predictions == theirs.predictions
    np.testing.assert_allclose(ours.loglikelihoods, theirs.loglikelihoods, atol=1e-4)
    assert ours.accuracy == theirs.accuracy


def test_embedded_model_agrees_with_lm_eval_5_shot(smollm):
    model, tokenizer = smollm
    questions = mmlu_questions(["world_religions", "conceptual_physics"], per_subject=2)
    ours = mmlu(model, tokenizer, questions)
    theirs = lm_eval_mmlu(model, tokenizer, questions)
    np.testing.assert_allclose(ours.loglikelihoods, theirs.loglikelihoods, atol=1e-3)
    assert_same_choices(ours.predictions, [LETTERS] * len(questions), theirs.loglikelihoods, margin=2e-3)
    assert list(theirs.by_subject["subject"]) == ["conceptual_physics", "world_religions"]


@pytest.mark.parametrize("subject", ["anatomy", "high_school_biology"])
def test_subject_header_is_lm_evals(subject):
    config = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default" / f"mmlu_{subject}.yaml"
    assert yaml.safe_load(config.read_text())["description"] == subject_header(subject)
