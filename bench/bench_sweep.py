"""The cost of a pruning sweep relative to evaluating a single model: every block size is a view of
the one loaded model (kit.prune.dropped), so k points should cost less than k evaluations of the
unpruned model (pruned models are smaller) and far less than reloading and copying per point.

The three run in turn REPEATS times (wall-clock); each ratio is taken per repeat and printed as its
median with its spread. Three block sizes (six used to be run once) keep three repeats at about the
time one cost."""

import kit
from bench.measure import interleaved, ratios, spread, wall_seconds
from kit.core.block import heuristic_block
from kit.evaluate import metrics
from kit.experiments import sweep
from kit.loaders import data
from kit.prune import drop_layers

MODEL = "smollm2-135m"
NS, REPEATS = (0, 10, 20), 3


def main():
    model, tokenizer = kit.load_model(MODEL)
    evals = [
        metrics.MMLUAccuracy(data.mmlu_questions(["anatomy", "marketing"], per_subject=5)),
        metrics.ValidationLoss(data.corpus("validation")[:8], max_length=128),
    ]
    metrics.evaluate_all(model, tokenizer, evals)  # warm-up

    def reload_and_copy():
        for n in NS[1:]:  # n = 0 needs no pruning: the single evaluation of the same repeat stands for it
            fresh, tok = kit.load_model(MODEL)
            metrics.evaluate_all(drop_layers(fresh, heuristic_block(30, n)), tok, evals)

    runs = {
        "single": lambda: metrics.evaluate_all(model, tokenizer, evals),
        "sweep": lambda: sweep.sweep(model, tokenizer, ns=NS, evals=evals, criterion="heuristic"),
        "reload": reload_and_copy,
    }
    seconds = interleaved(runs, REPEATS, measure=wall_seconds)
    per_single = ratios(seconds["sweep"], seconds["single"])
    reloaded = [reload + single for reload, single in zip(seconds["reload"], seconds["single"])]
    k = len(NS)
    print(f"sweep of {k} block sizes on {MODEL} (MMLU 2 subjects x 5 + loss on 8 texts per point), "
          f"{REPEATS} interleaved repeats:")  # fmt: skip
    print(f"  sweep / single evaluation: {spread(per_single)} (k = {k}; per point {spread([r / k for r in per_single])})")
    print(f"  sweep / reload-and-copy per point: {spread(ratios(seconds['sweep'], reloaded))}")


if __name__ == "__main__":
    main()
