"""Text and benchmark loaders: embedded offline assets by default, the Hub (datasets) by name."""

import json
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..core.progress import progress
from . import assets

LETTERS = "ABCD"
FEWSHOT_POOL_SIZE = 5  # offline MMLU has no dev split: each subject's first 5 questions are its shots


@dataclass(frozen=True)
class MMLUQuestion:
    subject: str  # e.g. "high_school_biology"
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index of the correct choice, 0-3
    row: int = -1  # position in the source file: tells duplicated questions apart


@dataclass(frozen=True)
class MMLU:
    """MMLU questions per subject (file order), and how many malformed rows were skipped."""

    by_subject: dict[str, list[MMLUQuestion]]
    skipped: int


def _parse_row(line: str, row_number: int) -> MMLUQuestion | None:
    try:
        row = json.loads(line)
        choices = tuple(str(row[f"answer_{c}"]) for c in "abcd")
        answer = LETTERS.index(row["correct_answer"].strip())
        subject = row["topic"].strip().replace(" ", "_")
        question = row["question"]
    except (ValueError, KeyError, AttributeError, TypeError):
        return None
    if not subject or not question:
        return None
    return MMLUQuestion(subject, question, choices, answer, row_number)


@lru_cache(maxsize=1)
def load_mmlu() -> MMLU:
    """The embedded MMLU test split (14,042 questions, 57 subjects), parsed once."""
    by_subject: dict[str, list[MMLUQuestion]] = defaultdict(list)
    skipped = 0
    with open(assets.fetch_file(assets.MMLU_JSONL)) as f:
        for row_number, line in enumerate(f):
            if not line.strip():
                continue
            record = _parse_row(line, row_number)
            if record is None:
                skipped += 1
            else:
                by_subject[record.subject].append(record)
    if skipped:
        warnings.warn(f"MMLU: skipped {skipped} malformed rows (stray CSV headers) in {assets.MMLU_JSONL.name}")
    return MMLU(dict(sorted(by_subject.items())), skipped)


def mmlu_subjects() -> list[str]:
    return list(load_mmlu().by_subject)


def mmlu_fewshot_pool(subject: str) -> list[MMLUQuestion]:
    """The few-shot examples of `subject`: its first 5 questions, never evaluated."""
    by_subject = load_mmlu().by_subject
    if subject not in by_subject:
        raise KeyError(f"Unknown MMLU subject {subject!r}; subjects: {', '.join(by_subject)}")
    return by_subject[subject][:FEWSHOT_POOL_SIZE]


def mmlu_questions(subjects=None, *, per_subject: int | None = None) -> list[MMLUQuestion]:
    """Evaluation questions (few-shot pools excluded), optionally a subset of subjects and a
    maximum number per subject (the first ones in file order, so subsets are reproducible)."""
    by_subject = load_mmlu().by_subject
    chosen = list(by_subject) if subjects is None else [subjects] if isinstance(subjects, str) else subjects
    questions = []
    for subject in chosen:
        mmlu_fewshot_pool(subject)  # validates the name
        rest = by_subject[subject][FEWSHOT_POOL_SIZE:]
        questions += rest[:per_subject] if per_subject is not None else rest
    return questions


def mmlu_hub(split: str = "test") -> list[MMLUQuestion]:
    """MMLU from the Hub (`cais/mmlu`, all subjects); use split="dev" for the original shots."""
    from datasets import load_dataset

    rows = load_dataset("cais/mmlu", "all", split=split)
    return [MMLUQuestion(r["subject"], r["question"], tuple(r["choices"]), int(r["answer"]), i) for i, r in enumerate(rows)]


def format_mmlu_question(q: MMLUQuestion) -> str:
    """A question as calibration text: the Hendrycks layout without the answer."""
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    return f"{q.question.strip()}{options}\nAnswer:"


@lru_cache(maxsize=1)
def _corpus_chunks() -> tuple[str, ...]:
    """CPython's documentation topics, cut at paragraph breaks into chunks of >= 150 words,
    without repeats (topics share passages; a repeat could leak validation text into training)."""
    from pydoc_data.topics import topics

    chunks = []
    for key in sorted(topics):
        current: list[str] = []
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            if paragraph.strip():
                current.append(paragraph.strip("\n"))
            if sum(len(p.split()) for p in current) >= 150:
                chunks.append("\n\n".join(current))
                current = []
        if current:
            chunks.append("\n\n".join(current))
    return tuple(dict.fromkeys(chunks))


def corpus(split: str = "train") -> list[str]:
    """The offline English corpus (Python's documentation text): every 10th chunk is validation."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
    is_validation = split == "validation"
    return [c for i, c in enumerate(_corpus_chunks()) if (i % 10 == 9) == is_validation]


def load_texts(source: str = "corpus", split: str = "train", n: int | None = None, *, text_field="text") -> list[str]:
    """Texts for calibration, healing or validation loss.

    source: "corpus" (offline), "mmlu" (offline questions), "c4" (allenai/c4 en, streamed), or any
    `datasets` dataset name (streamed, `text_field` column).
    """
    if source == "corpus":
        texts = corpus(split)
    elif source == "mmlu":
        texts = [format_mmlu_question(q) for q in mmlu_questions()]
    else:
        from datasets import load_dataset

        name, config = ("allenai/c4", "en") if source == "c4" else (source, None)
        stream = load_dataset(name, config, split=split, streaming=True)
        texts = []
        for row in progress(stream, total=n, desc=f"{name} {split}"):
            texts.append(row[text_field])
            if n is not None and len(texts) >= n:
                break
    return texts[:n] if n is not None else texts


@dataclass(frozen=True)
class BoolQItem:
    question: str  # as in google/boolq: lower case, no question mark
    passage: str
    answer: bool


def _boolq_item(row: dict, where: str) -> BoolQItem:
    missing = {"question", "passage", "answer"} - set(row)
    if missing:
        raise ValueError(f"BoolQ row {where} lacks {', '.join(sorted(missing))}: rows need question, passage, answer")
    return BoolQItem(str(row["question"]), str(row["passage"]), bool(row["answer"]))


def boolq_items(source: str = "hub", n: int | None = None) -> list[BoolQItem]:
    """BoolQ items: "hub" reads `google/boolq`'s validation split (needs the Hub); any other
    source is a local jsonl file with google/boolq's fields (question, passage, answer)."""
    if source == "hub":
        from datasets import load_dataset

        rows = load_dataset("google/boolq", split="validation")
        rows = rows.select(range(min(n, len(rows)))) if n is not None else rows
        return [_boolq_item(row, f"{i} of google/boolq") for i, row in enumerate(rows)]
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"BoolQ file {path} does not exist: pass 'hub' or a jsonl file of question, passage, answer")
    with open(path) as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    return [_boolq_item(json.loads(line), f"{path}:{number}") for number, line in lines[:n]]
