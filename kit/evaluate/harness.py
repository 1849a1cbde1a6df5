"""MMLU through lm-evaluation-harness: its HF wrapper (HFLM) around the in-memory model and its own
MMLU task template, pointed at local jsonl files of our questions. Nothing touches the network."""

import json
import tempfile
from pathlib import Path

import numpy as np

from ..loaders.data import LETTERS, MMLUQuestion, mmlu_fewshot_pool
from .mmlu_task import MMLUResult, fewshot_examples, indices_by_subject, result_from_loglikelihoods, subject_header


def _write_jsonl(path: Path, questions: list[MMLUQuestion]) -> None:
    with open(path, "w") as f:
        for q in questions:
            f.write(json.dumps({"question": q.question, "choices": list(q.choices), "answer": q.answer}) + "\n")


def _task(subject: str, questions, shots, folder: Path) -> dict:
    """lm-eval's MMLU task (installed `mmlu/default` template) on local test and dev files."""
    import lm_eval
    import yaml

    template = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default" / "_default_template_yaml"
    _write_jsonl(folder / f"{subject}_test.jsonl", questions)
    _write_jsonl(folder / f"{subject}_dev.jsonl", shots)
    files = {"test": str(folder / f"{subject}_test.jsonl"), "dev": str(folder / f"{subject}_dev.jsonl")}
    return {
        **yaml.safe_load(template.read_text()),
        "task": f"kit_mmlu_{subject}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files, "cache_dir": str(folder / "cache")},
        "description": subject_header(subject),
    }


def lm_eval_mmlu(model, tokenizer, questions: list[MMLUQuestion], *, shots: int = 5, batch_size: int = 8,
                 fewshot=mmlu_fewshot_pool) -> MMLUResult:  # fmt: skip
    """kit.evaluate.mmlu computed by lm-evaluation-harness instead (same prompts, shots, scoring):
    an independent check, and a bridge to lm-eval's other tasks. Slower than kit's own path."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if not questions:
        raise ValueError("lm_eval_mmlu needs at least one question, e.g. kit.loaders.data.mmlu_questions(per_subject=10)")
    by_subject = indices_by_subject(questions)
    loglik = np.empty((len(questions), len(LETTERS)))
    with tempfile.TemporaryDirectory(prefix="kit-lm-eval-") as tmp:
        tasks = [
            _task(subject, [questions[i] for i in indices], fewshot_examples(fewshot, subject, shots), Path(tmp))
            for subject, indices in by_subject.items()
        ]
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(lm, tasks=tasks, num_fewshot=shots, log_samples=True, bootstrap_iters=0, verbosity="WARNING")
    for subject, indices in by_subject.items():
        for sample in out["samples"][f"kit_mmlu_{subject}"]:
            loglik[indices[sample["doc_id"]]] = [ll for ll, _ in sample["filtered_resps"]]
    return result_from_loglikelihoods(questions, loglik)
