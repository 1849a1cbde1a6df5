"""The correctness checks of `make gpu-check`: each compares what the kit computes on the device
(in fp32, half precision or 4-bit) with an independent CPU fp32 computation, against a tolerance
set from a measured error, and prints the error beside its tolerance. Each can fail: a perturbed
weight fails every one (tests/test_gpu_check.py shows it)."""

import sys
import tempfile
import traceback
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

# Largest error each check allows, per precision, set from the errors measured on the tiny models of
# the 13 dense architectures on the CPU (`python -m bench.gpu_checks`; README, "On a GPU"; the MoE, MLA,
# hybrid, linear-attention and multimodal ones measure within them). fp32: about 100 x
# the largest error of fp32 against float64 (scan 9.6e-8, loss 2.4e-9, loglik 9.5e-7, oracle 7.3e-8),
# room for a GPU's other summation order; half: about 4 x the largest error of bf16 or fp16 against
# fp32 (scan 5.2e-3 on gemma bf16, loss 1.8e-5, loglik 5.6e-3, oracle 1.9e-5); 4bit: about 3 x the largest
# error of NF4 (bitsandbytes on the CPU) against fp32 on llama, gemma3, gpt2, phi, qwen2 (scan 1.7e-2,
# loss 5.5e-4, loglik 0.13, oracle 4.8e-4).
# scan: max |D - D_ref| / max D_ref (so an all-zero matrix fails); loss: |loss / ref - 1|;
# loglik: max |log p - log p_ref| of the answers (nats); oracle: max relative error of the
# ablation losses against the CPU validation loss of each pruned model.
TOLERANCE = {
    "fp32": {"scan": 1e-5, "loss": 1e-6, "loglik": 1e-4, "oracle": 1e-5},
    "half": {"scan": 2e-2, "loss": 1e-4, "loglik": 2e-2, "oracle": 1e-4},
    "4bit": {"scan": 5e-2, "loss": 2e-3, "loglik": 0.4, "oracle": 2e-3},
}
COMMON_WORDS = (" the", " and", " of", " to", " in", " is", " for", " that", " a", " on", " with", " as")


def answer_strings(tokenizer) -> tuple[str, ...]:
    """Four answers that are one token each (" A".." D" when they are, else common words), so that
    the model's choice among them depends on its logits, not on how many tokens each answer has."""
    for candidates in ((" A", " B", " C", " D"), COMMON_WORDS):
        single = [a for a in candidates if len(tokenizer(a, add_special_tokens=False)["input_ids"]) == 1]
        if len(single) >= 4:
            return tuple(single[:4])
    raise ValueError("the tokenizer has no four single-token answers among " + ", ".join(map(repr, COMMON_WORDS)))


def mmlu_style(model, tokenizer, questions, fewshot, answers) -> np.ndarray:
    """(questions, 4) log p(answer | 2-shot MMLU prompt), batched with the shared-prefix cache."""
    from kit.evaluate.mmlu_task import fewshot_examples, mmlu_prompt
    from kit.evaluate.scoring import choice_loglikelihoods

    prompts = [mmlu_prompt(q, fewshot_examples(fewshot, q.subject, 2)) for q in questions]
    return choice_loglikelihoods(model, tokenizer, prompts, [answers] * len(prompts), what="MMLU-style", batch_size=4)


class Reference:
    """CPU fp32 results of one tiny model: the scan, the loss, MMLU-style log-likelihoods, the
    validation loss of the model without each single layer, and greedy decoding."""

    def __init__(self, arch: str, texts, questions, fewshot):
        import kit
        from kit.evaluate import validation_loss

        self.arch, self.texts, self.questions, self.fewshot = arch, texts, questions, fewshot
        model, self.tokenizer = kit.tiny_model(arch, num_layers=4)
        self.answers = answer_strings(self.tokenizer)
        self.scan = kit.angular_distances(model, self.tokenizer, texts, batch_size=4, max_length=128).matrix
        self.loss = validation_loss(model, self.tokenizer, texts, max_length=128).loss
        self.loglik = mmlu_style(model, self.tokenizer, questions, fewshot, self.answers)
        self.pruned = []
        for start in range(kit.core.layers.num_layers(model)):
            with kit.prune.dropped(model, kit.Block(start, 1)):
                self.pruned.append(validation_loss(model, self.tokenizer, texts, max_length=128).loss)
        self.prompt = kit.evaluate.inference_cost.prompt_ids(self.tokenizer, 32)
        tokens = kit.evaluate.inference_cost.generate(model, self.prompt, 8)[0]
        with torch.no_grad():  # the logits that chose each token, for the margin of each choice
            logits = model(torch.cat([self.prompt, tokens], dim=1)).logits[:, self.prompt.shape[1] - 1 : -1].float()
        self.greedy = tokens, logits

    def model(self):
        """A fresh copy of the reference model (same seed), in fp32 on the CPU."""
        import kit

        return kit.tiny_model(self.arch, num_layers=4)[0]

    def errors(self, model) -> tuple[dict[str, float], np.ndarray]:
        """Each check's error of `model` (anywhere, any dtype) against this reference, and its log-likelihoods."""
        import kit
        from kit.evaluate import validation_loss

        scan = kit.angular_distances(model, self.tokenizer, self.texts, batch_size=4, max_length=128).matrix
        loss = validation_loss(model, self.tokenizer, self.texts, max_length=128).loss
        loglik = mmlu_style(model, self.tokenizer, self.questions, self.fewshot, self.answers)
        oracle = kit.ablation_losses(model, self.tokenizer, self.texts, ns=[1], max_length=128)
        errors = {
            "scan": ((scan - self.scan).abs().max() / self.scan.abs().max()).item(),
            "loss": abs(loss / self.loss - 1),
            "loglik": float(np.abs(loglik - self.loglik).max()),
            "oracle": float(np.max(np.abs(oracle.loss[1, :4] / np.array(self.pruned) - 1))),
        }
        return errors, loglik

    def compare(self, model, label: str, precision: str) -> list[str]:
        """`model` against this reference within the tolerances of `precision`: prints one line, returns failures."""
        errors, loglik = self.errors(model)
        tolerance = TOLERANCE[precision]
        failed = [name for name, error in errors.items() if not error <= tolerance[name]]  # NaN fails
        # predictions must agree wherever the reference's margin is wider than the error allowed
        top2 = np.sort(self.loglik, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2 * tolerance["loglik"]
        agree = int((loglik.argmax(1) == self.loglik.argmax(1))[clear].sum())
        if agree < clear.sum():
            failed.append("predictions")
        shown = "  ".join(f"{name} {error:.1e}/{tolerance[name]:.0e}" for name, error in errors.items())
        print(f"  {self.arch:9s} {label:9s} {shown}  predictions {agree}/{clear.sum()} (margin > {2 * tolerance['loglik']:.2g})"
              f"  {'FAIL' if failed else 'ok'}")  # fmt: skip
        return [f"{self.arch} {label}: {', '.join(failed)}"] if failed else []


def mmlu_questions(n: int, subjects: int = 4):
    """MMLU-shaped questions from the offline corpus (no asset): 5 shots per subject, then n questions,
    cycling through the corpus so that any n exists."""
    from kit.loaders.data import MMLUQuestion, corpus

    words = " ".join(corpus("train")).split()
    word = lambda k: words[k % len(words)]  # noqa: E731
    questions = [
        MMLUQuestion(f"subject_{i % subjects}", " ".join(word(40 * i + k) for k in range(30)) + "?",
                     tuple(f"{word(40 * i + 30 + 2 * k)} {word(40 * i + 31 + 2 * k)}" for k in range(4)), i % 4, i)
        for i in range(n + 5 * subjects)
    ]  # fmt: skip
    pool = {f"subject_{s}": [p for p in questions[: 5 * subjects] if p.subject == f"subject_{s}"] for s in range(subjects)}
    return questions[5 * subjects :], lambda subject: pool[subject]


@lru_cache(maxsize=None)
def reference_of(arch: str) -> Reference:
    """The CPU fp32 reference of `arch` on 8 validation texts and 20 questions, computed once per run."""
    import kit

    return Reference(arch, kit.loaders.data.corpus("validation")[:8], *mmlu_questions(20))


def guarded(name: str, check, *args, **kwargs) -> list[str]:
    """check(*args, **kwargs)'s failures; an exception is one failure, printed with its traceback, so that
    one check that breaks on a GPU does not hide what the others find."""
    try:
        return check(*args, **kwargs) or []
    except Exception as error:  # anything a GPU path raises, running out of memory included
        traceback.print_exc(file=sys.stdout)  # in order with the check's own lines
        print(f"  {name}: raised {type(error).__name__}: {error}  FAIL")
        return [f"{name}: raised {type(error).__name__}"]


def check_correctness(device, precisions: dict, archs, perturb=None) -> list[str]:
    """Every tiny architecture on `device` in each of `precisions` ({label: dtype}) against CPU fp32.
    perturb(model), when given, alters the model under test (the test that every check can fail)."""
    failures = []
    for arch in archs:
        for label, dtype in precisions.items():
            failures += guarded(f"{arch} {label}", _correctness, arch, device, label, dtype, perturb)
    return failures


def _correctness(arch: str, device, label: str, dtype, perturb) -> list[str]:
    reference = reference_of(arch)
    model = reference.model().to(device, dtype)
    if perturb is not None:
        perturb(model)
    return reference.compare(model, label, "fp32" if dtype == torch.float32 else "half")


def check_cost(device, perturb=None) -> list[str]:
    """kit.evaluate.cost on `device`: greedy decoding equals the CPU's (up to the first near tie), speeds
    are positive, the peak memory holds at least the weights."""
    import kit
    from kit.evaluate import cost
    from kit.testing import greedy_mismatch

    reference = reference_of("llama")
    model = reference.model().to(device)
    if perturb is not None:
        perturb(model)
    result = cost(model, reference.tokenizer, prompt_tokens=32, new_tokens=8, repeats=2)
    tokens = kit.evaluate.inference_cost.generate(model, reference.prompt.to(device), 8)[0].cpu()
    mismatch = greedy_mismatch(tokens, reference.greedy)
    same = mismatch is None
    peak_ok = result.peak_memory_bytes is not None and result.peak_memory_bytes >= result.weight_bytes
    speeds_ok = all(np.isfinite(v) and v > 0 for v in (result.prefill_tokens_per_s, result.decode_tokens_per_s))
    print(f"  cost: prefill {result.prefill_tokens_per_s:,.0f} tokens/s, decode {result.decode_tokens_per_s:,.0f} tokens/s, "
          f"peak {result.peak_memory_bytes or 0:,} bytes >= weights {result.weight_bytes:,}: {peak_ok}; "
          f"greedy tokens equal the CPU's up to a near tie: {mismatch or True}  "
          f"{'ok' if same and peak_ok and speeds_ok else 'FAIL'}")  # fmt: skip
    return [] if same and peak_ok and speeds_ok else ["cost"]


def check_device_map(device, perturb=None) -> list[str]:
    """A checkpoint dispatched by accelerate over `device` and the CPU (on a CPU run: the CPU and the
    disk), scanned, scored and ablated: equal to the undispatched CPU model within fp32 tolerance."""
    import kit

    reference = reference_of("llama")
    with tempfile.TemporaryDirectory() as tmp:
        model = reference.model()
        if perturb is not None:
            perturb(model)
        model.save_pretrained(Path(tmp) / "base")
        reference.tokenizer.save_pretrained(Path(tmp) / "base")
        layer_bytes = sum(p.numel() * 4 for p in kit.core.layers.decoder_layers(model)[0].parameters())
        first = device.index or 0 if device.type == "cuda" else "cpu"
        later = "cpu" if device.type == "cuda" else "disk"
        max_memory = {first: int(2.5 * layer_bytes + sum(p.numel() * 4 for p in model.get_input_embeddings().parameters()))}
        if later == "cpu":
            max_memory["cpu"] = 2**34
        dispatched, _ = kit.load_model(str(Path(tmp) / "base"), dtype=torch.float32, device_map="auto", max_memory=max_memory,
                                       offload_folder=str(Path(tmp) / "offload"))  # fmt: skip
        placed = sorted(set(map(str, dispatched.hf_device_map.values())))
        print(f"  device_map='auto' over {' + '.join(placed)}:")
        failures = reference.compare(dispatched, "dispatched", "fp32")
    if len(placed) < 2:
        failures.append(f"device_map placed everything on {placed}")
    return failures


def measure(archs, precisions: dict) -> dict[tuple[str, str], float]:
    """The largest error of each check over `archs` for each of `precisions` ({label: dtype}) on the CPU,
    against fp32: what TOLERANCE is set from."""
    import kit

    texts = kit.loaders.data.corpus("validation")[:8]
    questions, pool = mmlu_questions(20)
    worst = {}
    for arch in archs:
        reference = Reference(arch, texts, questions, pool)
        for label, dtype in precisions.items():
            model = reference.model().to(dtype)
            if dtype == torch.float64 and any("Experts" in type(m).__name__ for m in model.modules()):
                model.set_experts_implementation("eager")  # torch's grouped_mm has no float64
            errors, _ = reference.errors(model)
            print(f"  {arch:9s} {label:5s} " + "  ".join(f"{name} {error:.1e}" for name, error in errors.items()), flush=True)
            for name, error in errors.items():
                worst[label, name] = max(worst.get((label, name), 0.0), error)
    return worst


if __name__ == "__main__":
    import kit

    found = measure(kit.TINY_ARCHITECTURES, {"fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16})
    print("largest: " + ", ".join(f"{label} {name} {error:.1e}" for (label, name), error in found.items()))
