"""5-shot MMLU on the embedded model: the KV-cached, batched path against the naive loop (one full
forward per question), as a speed-up (goal >= 3x) and the agreement of their predictions.

The two run in turn REPEATS times (wall-clock); the speed-up is taken per repeat and printed as its
median with its spread. One subject of 10 questions (three used to be run once) keeps three repeats at
about the time one cost, with as many questions per few-shot prefix as before."""

import statistics

import numpy as np

import kit
from bench.measure import interleaved, ratios, spread, wall_seconds
from kit.evaluate import mmlu
from kit.loaders.data import mmlu_questions

MODEL = "smollm2-135m"
SUBJECTS, PER_SUBJECT, SHOTS, BATCH_SIZE, REPEATS = ("anatomy",), 10, 5, 8, 3


def main():
    model, tokenizer = kit.load_model(MODEL)
    questions = mmlu_questions(list(SUBJECTS), per_subject=PER_SUBJECT)
    mmlu(model, tokenizer, questions[:1], shots=SHOTS)  # warm-up
    results = {}
    runs = {
        "naive": lambda: results.update(naive=mmlu(model, tokenizer, questions, shots=SHOTS, naive=True)),
        "fast": lambda: results.update(fast=mmlu(model, tokenizer, questions, shots=SHOTS, batch_size=BATCH_SIZE)),
    }
    seconds = interleaved(runs, REPEATS, measure=wall_seconds)
    naive, fast = results["naive"], results["fast"]
    agree = np.mean([a == b for a, b in zip(fast.predictions, naive.predictions)])
    gap = np.abs(fast.loglikelihoods - naive.loglikelihoods).max()
    naive_s, fast_s = statistics.median(seconds["naive"]), statistics.median(seconds["fast"])
    print(f"MMLU {SHOTS}-shot, {MODEL}, {', '.join(SUBJECTS)} x {PER_SUBJECT} questions, batch {BATCH_SIZE}, "
          f"medians of {REPEATS} interleaved repeats:")  # fmt: skip
    print(f"  naive loop {naive_s:.1f} s, cached + batched {fast_s:.1f} s   "
          f"speed-up {spread(ratios(seconds['naive'], seconds['fast']))} (goal >= 3)")  # fmt: skip
    print(f"  predictions agree {agree:.0%}, max |log-likelihood difference| {gap:.1e}")
    print(f"  accuracy {fast.accuracy:.3f} (mean over questions), {fast.subject_accuracy:.3f} (mean over subjects)")


if __name__ == "__main__":
    main()
