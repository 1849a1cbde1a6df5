"""kit.evaluate: exact MMLU prompts, KV-cached scoring equal to full forwards, accuracies, BoolQ
and validation loss against independent log-likelihoods computed with HF's `labels=` loss."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import kit
from kit.evaluate import boolq, mmlu, validation_loss
from kit.evaluate.mmlu_task import fewshot_prefix, mmlu_prompt, result_from_loglikelihoods
from kit.evaluate.scoring import encode_request
from kit.loaders.data import LETTERS, BoolQItem, MMLUQuestion, boolq_items, mmlu_questions
from kit.testing import assert_same_choices, reference_loglikelihood

BOOLQ_FIXTURE = Path(__file__).parent / "fixtures" / "boolq.jsonl"

def test_prompt_is_the_original_hendrycks_format(questions, fewshot):
    shots = fewshot("high_school_biology")[:2]
    expected = (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "Which organelle makes ATP?\nA. Ribosome\nB. Mitochondrion\nC. Golgi\nD. Vacuole\nAnswer: B\n\n"
        "DNA is made of?\nA. amino acids\nB. lipids\nC. nucleotides\nD. sugars\nAnswer: C\n\n"
        "Genes sit on\nA. chromosomes\nB. membranes\nC. ribosomes\nD. cell walls\nAnswer:"
    )
    assert mmlu_prompt(questions[3], shots) == expected
    assert expected.startswith(fewshot_prefix("high_school_biology", shots))


def test_cached_batched_equals_one_forward_per_question(tiny, questions, fewshot):
    model, tokenizer = tiny
    fast = mmlu(model, tokenizer, questions, shots=3, batch_size=2, fewshot=fewshot)
    naive = mmlu(model, tokenizer, questions, shots=3, fewshot=fewshot, naive=True)
    assert fast.predictions == naive.predictions
    np.testing.assert_allclose(fast.loglikelihoods, naive.loglikelihoods, atol=1e-4)


def test_loglikelihoods_match_hf_labels_loss_when_letters_split(questions, fewshot):
    model, tokenizer = kit.testing.tiny_model("llama")
    assert len(tokenizer(" B", add_special_tokens=False)["input_ids"]) == 2  # " B" -> " " + "B"
    result = mmlu(model, tokenizer, questions[:2], shots=2, fewshot=fewshot)
    for question, row in zip(questions[:2], result.loglikelihoods):
        prompt = mmlu_prompt(question, fewshot(question.subject)[:2])
        expected = [reference_loglikelihood(model, tokenizer, prompt, f" {letter}") for letter in "ABCD"]
        np.testing.assert_allclose(row, expected, atol=1e-4)


def test_embedded_model_cached_equals_naive(smollm):
    model, tokenizer = smollm
    questions = mmlu_questions(["world_religions", "conceptual_physics"], per_subject=2)  # one batch of 2 per subject
    fast = mmlu(model, tokenizer, questions, shots=2, batch_size=2)
    naive = mmlu(model, tokenizer, questions, shots=2, naive=True)
    np.testing.assert_allclose(fast.loglikelihoods, naive.loglikelihoods, atol=1e-3)
    assert_same_choices(fast.predictions, [LETTERS] * len(questions), naive.loglikelihoods, margin=2e-3)
    # SmolLM2 writes each of " A".." D" as one token: the score is the next-token log-probability
    prompt = mmlu_prompt(questions[0], kit.loaders.data.mmlu_fewshot_pool("world_religions")[:2])
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    letters = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"] for letter in "ABCD"]
    assert all(len(ids_) == 1 for ids_ in letters)
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0, -1].log_softmax(-1)
    np.testing.assert_allclose(fast.loglikelihoods[0], [logprobs[i].item() for (i,) in letters], atol=1e-3)


def test_accuracy_is_mean_over_questions_and_subject_accuracy_mean_over_subjects(questions):
    # astronomy: 3 questions, answers B B C; biology: 2 questions, answers B A
    loglik = np.full((5, 4), -5.0)
    for row, letter in enumerate([1, 1, 0, 0, 2]):  # predicted B, B, A, A, C
        loglik[row, letter] = -1.0
    result = result_from_loglikelihoods(questions, loglik)
    assert result.predictions == ["B", "B", "A", "A", "C"]
    # correct: astronomy Q0 yes, Q2 no, Q4 yes (2/3); biology Q1 yes, Q3 yes (2/2)
    assert result.accuracy == pytest.approx(4 / 5)
    assert result.subject_accuracy == pytest.approx((2 / 3 + 1) / 2)
    table = result.by_subject.set_index("subject")
    assert list(table.index) == ["astronomy", "high_school_biology"]
    assert table.loc["astronomy", "n"] == 3 and table.loc["astronomy", "accuracy"] == pytest.approx(2 / 3)
    assert table.loc["high_school_biology", "accuracy"] == 1.0
    assert result.correct.tolist() == [True, True, False, True, True]
    assert result.ci == kit.core.stats.wilson(4, 5)
    # biology is always right; astronomy's 3 questions resample to 0 of 3 right with chance 1/27 > 2.5%
    assert result.subject_ci == pytest.approx(((0 + 1) / 2, (1 + 1) / 2))


def test_mmlu_accuracy_agrees_with_its_predictions(questions, fewshot):
    model, tokenizer = kit.testing.tiny_model("gpt2")
    result = mmlu(model, tokenizer, questions, shots=1, fewshot=fewshot)
    correct = [p == "ABCD"[q.answer] for p, q in zip(result.predictions, questions)]
    assert result.accuracy == pytest.approx(np.mean(correct))


def test_mmlu_errors_say_what_to_do(questions, fewshot):
    model, tokenizer = kit.testing.tiny_model("llama")
    with pytest.raises(ValueError, match="at least one question"):
        mmlu(model, tokenizer, [])
    with pytest.raises(ValueError, match="holds 3 questions, fewer than shots=5"):
        mmlu(model, tokenizer, questions, shots=5, fewshot=fewshot)
    limit = model.config.max_position_embeddings
    long = MMLUQuestion("astronomy", "word " * limit, ("a", "b", "c", "d"), 0)
    with pytest.raises(ValueError, match=f"exceeds the model's {limit} positions"):
        mmlu(model, tokenizer, [long], shots=1, fewshot=fewshot)


def test_encode_request_moves_trailing_space_to_the_continuation():
    _, tokenizer = kit.testing.tiny_model("llama")
    a, b = encode_request(tokenizer, "Answer: ", "A"), encode_request(tokenizer, "Answer:", " A")
    assert a == b
    assert a.context + a.continuation == tuple(tokenizer("Answer: A")["input_ids"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_boolq_matches_independent_loglikelihoods(arch):
    model, tokenizer = kit.testing.tiny_model(arch)
    items = boolq_items(str(BOOLQ_FIXTURE))
    result = boolq(model, tokenizer, items, batch_size=5)
    contexts = [f"{item.passage}\nQuestion: {item.question}?\nAnswer:" for item in items]
    expected = [[reference_loglikelihood(model, tokenizer, context, choice) for choice in (" no", " yes")] for context in contexts]
    np.testing.assert_allclose(result.loglikelihoods, expected, atol=1e-4)
    assert_same_choices(result.predictions, [(False, True)] * len(items), expected, margin=2e-4)
    correct = [p == item.answer for p, item in zip(result.predictions, items)]
    assert result.correct.tolist() == correct and result.accuracy == pytest.approx(np.mean(correct))
    assert result.ci == kit.core.stats.wilson(sum(correct), len(items))


def test_boolq_items_reads_local_jsonl(tmp_path):
    items = boolq_items(str(BOOLQ_FIXTURE))
    assert len(items) == 12 and {item.answer for item in items} == {True, False}
    assert items[0] == BoolQItem(
        question="is the great wall of china visible from the moon with the naked eye",
        passage=json.loads(BOOLQ_FIXTURE.read_text().splitlines()[0])["passage"],
        answer=False,
    )
    assert boolq_items(str(BOOLQ_FIXTURE), n=3) == items[:3]
    with pytest.raises(FileNotFoundError, match="pass 'hub' or a jsonl file"):
        boolq_items(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": True}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 lacks passage"):
        boolq_items(str(bad))


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "opt", "gemma2"])  # gemma2: final logit soft-capping
def test_validation_loss_is_the_token_weighted_hf_loss(arch, monkeypatch):
    model, tokenizer = kit.testing.tiny_model(arch)
    monkeypatch.setattr(kit.evaluate.loss, "_LOGIT_ELEMENTS", 7 * len(tokenizer))  # chunks of 7 tokens
    texts = kit.loaders.data.corpus("validation")[:3] + ["A short text."]
    result = validation_loss(model, tokenizer, texts, max_length=64, batch_size=3)
    sums, counts = [], []
    for text in texts:
        ids = torch.tensor([tokenizer(text, truncation=True, max_length=64)["input_ids"]])
        with torch.no_grad():
            sums.append(model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1))
        counts.append(ids.shape[1] - 1)
    total, count = sum(sums), sum(counts)
    assert result.tokens == count
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.normalized == pytest.approx(result.loss / math.log(len(tokenizer)), rel=1e-5)
    # standard error over texts of a token-weighted mean (delta method), from the per-text losses
    residuals = np.array(sums) - total / count * np.array(counts)
    expected = math.sqrt(len(texts) / (len(texts) - 1) * np.sum(residuals**2)) / count
    assert result.stderr == pytest.approx(expected, rel=1e-4)
    assert result.text_losses == pytest.approx(sums, rel=1e-5) and result.text_tokens == tuple(counts)  # per text, in order
    with pytest.warns(UserWarning, match="at least 2 texts"):
        assert math.isnan(validation_loss(model, tokenizer, texts[:1], max_length=64).stderr)


def test_validation_loss_of_texts_without_tokens_says_so():
    model, tokenizer = kit.testing.tiny_model("llama")
    with pytest.raises(ValueError, match="hold no tokens to predict"):
        validation_loss(model, tokenizer, ["", ""])
