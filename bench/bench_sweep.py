"""The cost of a pruning sweep relative to evaluating a single model: every block size is a view of
the one loaded model (kit.prune.dropped), so k points should cost less than k evaluations of the
unpruned model (pruned models are smaller) and far less than reloading and copying per point."""

import time

import kit
from kit import data, metrics, sweep
from kit.prune import drop_layers, heuristic_block

MODEL = "smollm2-135m"
NS = (0, 5, 10, 15, 20, 25)


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    model, tokenizer = kit.load_model(MODEL)
    evals = [
        metrics.mmlu_metrics(data.mmlu_questions(["anatomy", "marketing"], per_subject=5)),
        metrics.loss_metrics(data.corpus("validation")[:8], max_length=128),
    ]
    metrics.evaluate_all(model, tokenizer, evals)  # warm-up
    single = _timed(lambda: metrics.evaluate_all(model, tokenizer, evals))
    swept = _timed(lambda: sweep.sweep(model, tokenizer, ns=NS, evals=evals, strategy="heuristic"))

    def reload_and_copy():
        for n in NS[1:]:
            fresh, tok = kit.load_model(MODEL)
            metrics.evaluate_all(drop_layers(fresh, heuristic_block(30, n)), tok, evals)

    reloaded = _timed(reload_and_copy) + single  # n = 0 needs no pruning
    k = len(NS)
    print(f"sweep of {k} block sizes on {MODEL} (MMLU 2 subjects x 5 + loss on 8 texts per point):")
    print(f"  sweep / single evaluation: {swept / single:.2f} (k = {k}; per point {swept / single / k:.2f})")
    print(f"  sweep / reload-and-copy per point: {swept / reloaded:.2f}")


if __name__ == "__main__":
    main()
