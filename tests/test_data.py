import pytest

from kit.core import text
from kit.loaders import data


def test_mmlu_rows_and_skipped_headers():
    mmlu = data.load_mmlu()
    assert mmlu.skipped == 2
    assert len(mmlu.by_subject) == 57
    assert sum(len(qs) for qs in mmlu.by_subject.values()) == 14042


def test_mmlu_records():
    questions = data.mmlu_questions()
    assert len(questions) == 14042 - 57 * data.FEWSHOT_POOL_SIZE
    for q in questions[:200]:
        assert len(q.choices) == 4 and q.answer in range(4) and q.question
    assert {q.subject for q in questions} == set(data.mmlu_subjects())
    assert "high_school_biology" in data.mmlu_subjects()


def test_fewshot_pools_are_never_evaluated():
    evaluated = set(data.mmlu_questions())
    for subject in data.mmlu_subjects():
        pool = data.mmlu_fewshot_pool(subject)
        assert len(pool) == 5 and all(q.subject == subject for q in pool)
        assert evaluated.isdisjoint(pool)


def test_mmlu_subset():
    qs = data.mmlu_questions(["anatomy", "virology"], per_subject=3)
    assert [q.subject for q in qs] == ["anatomy"] * 3 + ["virology"] * 3
    assert qs[:3] == data.mmlu_questions("anatomy")[:3]


def test_unknown_subject():
    with pytest.raises(KeyError, match="abstract_algebra"):
        data.mmlu_questions(["astrology"])


def test_corpus_split_is_deterministic_and_disjoint():
    train, val = data.corpus("train"), data.corpus("validation")
    assert len(val) >= 30 and len(train) > 8 * len(val)
    assert set(train).isdisjoint(val)
    assert sum(len(t.split()) for t in train + val) > 55_000
    assert data.corpus("train") == train
    assert data.load_texts("corpus", "validation", n=5) == val[:5]


def test_corpus_bad_split():
    with pytest.raises(ValueError, match="'train' or 'validation'"):
        data.corpus("test")


def test_mmlu_texts_end_with_answer_prompt():
    texts = data.load_texts("mmlu", n=3)
    assert texts == [data.format_mmlu_question(q) for q in data.mmlu_questions()[:3]]
    question = data.MMLUQuestion("anatomy", " Which bone is longest? ", ("femur", "tibia", "ulna", "radius"), 0)
    assert data.format_mmlu_question(question) == "Which bone is longest?\nA. femur\nB. tibia\nC. ulna\nD. radius\nAnswer:"


def test_batched():
    assert list(text.batched(list(range(5)), 2)) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match=">= 1"):
        list(text.batched([1], 0))
