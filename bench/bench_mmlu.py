"""5-shot MMLU on the embedded model: the KV-cached, batched path against the naive loop (one full
forward per question), as a speed-up (goal >= 3x) and the agreement of their predictions."""

import time

import numpy as np

import kit
from kit.data import mmlu_questions
from kit.evaluate import mmlu

MODEL = "smollm2-135m"
SUBJECTS, PER_SUBJECT, SHOTS, BATCH_SIZE = ("anatomy", "high_school_geography", "marketing"), 10, 5, 8


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main():
    model, tokenizer = kit.load_model(MODEL)
    questions = mmlu_questions(list(SUBJECTS), per_subject=PER_SUBJECT)
    mmlu(model, tokenizer, questions[:1], shots=SHOTS)  # warm-up
    naive, naive_s = _timed(lambda: mmlu(model, tokenizer, questions, shots=SHOTS, naive=True))
    fast, fast_s = _timed(lambda: mmlu(model, tokenizer, questions, shots=SHOTS, batch_size=BATCH_SIZE))
    agree = np.mean([a == b for a, b in zip(fast.predictions, naive.predictions)])
    gap = np.abs(fast.loglikelihoods - naive.loglikelihoods).max()
    print(f"MMLU {SHOTS}-shot, {MODEL}, {len(SUBJECTS)} subjects x {PER_SUBJECT} questions, batch {BATCH_SIZE}:")
    print(f"  naive loop {naive_s:.1f} s, cached + batched {fast_s:.1f} s   speed-up {naive_s / fast_s:.2f}x (goal >= 3)")
    print(f"  predictions agree {agree:.0%}, max |log-likelihood difference| {gap:.1e}")
    print(f"  accuracy {fast.accuracy:.3f} (mean over questions), {fast.subject_accuracy:.3f} (mean over subjects)")


if __name__ == "__main__":
    main()
