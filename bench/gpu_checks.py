"""The correctness checks of `make gpu-check`: each compares what the kit computes on the device
(in fp32, half precision or 4-bit) with an independent CPU fp32 computation, or with the same computation
in fp32 on the same device, against a tolerance set from a measured error, and prints the error beside its
tolerance. Each can fail: a perturbed weight fails every one (tests/test_gpu_check.py shows it)."""

import sys
import tempfile
import traceback
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

# Largest error each check allows, per precision, set from the errors measured on the tiny models of
# the 13 dense architectures on the CPU (`python -m bench.gpu_checks`; docs/gpus.md, "The GPU check"; the MoE, MLA,
# hybrid, linear-attention and multimodal ones measure within them). fp32: about 100 x
# the largest error of fp32 against float64 (scan 9.6e-8, loss 2.4e-9, loglik 9.5e-7, oracle 7.3e-8),
# room for a GPU's other summation order; half: about 4 x the largest error of bf16 or fp16 against
# fp32 (scan 5.2e-3 on gemma bf16, loss 1.8e-5, loglik 5.6e-3, oracle 1.9e-5). 4bit (against fp32 on the same
# device, on the trained tiny models of trained_reference): 3 x the largest error of NF4 (bitsandbytes on
# the CPU, fp32 compute) against fp32 over the 13 dense architectures, rounded up (`python -m bench.gpu_checks twins`: scan
# 1.1e-2 on llama, loss 5.1e-3 on llama, loglik 0.44 on olmo2, oracle 1.6e-2 on qwen2; with bf16 compute, as
# on a GPU, llama and olmo2 measure alike: loglik 0.18 and 0.35). A weight of layer 1 scaled by 10 moves them by
# 0.40, 0.13, 1.7 and 0.11 on llama. The other five architectures' weights are too narrow for bitsandbytes'
# CPU kernels: their 4-bit errors are unmeasured.
# scan: max |D - D_ref| / max D_ref (so an all-zero matrix fails); loss: |loss / ref - 1|;
# loglik: max |log p - log p_ref| of the answers (nats); oracle: max relative error of the
# ablation losses against the reference's validation loss of each pruned model.
TOLERANCE = {
    "fp32": {"scan": 1e-5, "loss": 1e-6, "loglik": 1e-4, "oracle": 1e-5},
    "half": {"scan": 2e-2, "loss": 1e-4, "loglik": 2e-2, "oracle": 1e-4},
    "4bit": {"scan": 4e-2, "loss": 2e-2, "loglik": 1.4, "oracle": 5e-2},
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


def greedy_with_logits(model, prompt, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [1, new_tokens] from `prompt` with the KV cache (kit.evaluate.inference_cost.generate),
    and the fp32 logits that chose each, on the CPU: the margin of each choice (kit.testing.greedy_mismatch)."""
    from kit.core.device import model_device
    from kit.evaluate.inference_cost import generate

    prompt = prompt.to(model_device(model))
    tokens = generate(model, prompt, new_tokens)[0]
    with torch.no_grad():
        logits = model(torch.cat([prompt, tokens], dim=1)).logits[:, prompt.shape[1] - 1 : -1].float()
    return tokens.cpu(), logits.cpu()


# The checks on trained models (the 4-bit ones, and those comparing half precision or 4-bit with fp32 on the
# same device) use each architecture's tiny model after TRAINING steps of AdamW on the offline corpus (no asset:
# llama's validation loss goes from 6.3 to 3.2 nats in 11 s on 2 CPU cores). A random tiny model's choices are
# near ties (its MMLU-style answers and greedy tokens win by hundredths of a nat, its layers barely change the
# loss), so a check of its choices compares none, and NF4's rounding (loss 5.5e-4, log-likelihoods 0.13 nats)
# hides a weight scaled by 10 (loss 1.2e-3); on the trained model that weight moves the loss by 0.13 and the
# log-likelihoods by 1.7 nats. Trained on the device under test, in fp32, once per run and architecture.
TRAINING = dict(steps=300, lr=3e-3, warmup=10, batch_size=16, seq_len=64, seed=0)


@lru_cache(maxsize=None)
def trained_weights(arch: str, device: str = "cpu") -> dict:
    """The state dict (on the CPU) of `arch`'s 4-layer tiny model trained TRAINING["steps"] steps on `device`."""
    import kit
    from kit.healing.train import pack

    model, tokenizer = kit.testing.tiny_model(arch, num_layers=4, seed=TRAINING["seed"])
    model.to(device).train()
    blocks = pack(tokenizer, kit.loaders.data.corpus("train"), TRAINING["seq_len"])
    generator = torch.Generator().manual_seed(TRAINING["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAINING["lr"], weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / TRAINING["warmup"]))
    for _ in range(TRAINING["steps"]):
        ids = blocks[torch.randint(len(blocks), (TRAINING["batch_size"],), generator=generator)].to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        warmup.step()
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def spread_answers(model, tokenizer, questions, fewshot) -> tuple[str, ...]:
    """Four one-token words (" " and letters) spread over `model`'s ranking of them after the MMLU-style prompts of
    `questions` (mean log-probability): its 1st, 21st, 41st and 61st. A trained tiny model puts its first 2-4 nats
    above the others on every question, wider than 4-bit rounding moves them (answer_strings' common words lie
    within a nat of each other there, a random model's answers within hundredths)."""
    import re

    from kit.core.device import model_device
    from kit.evaluate.mmlu_task import fewshot_examples, mmlu_prompt

    words = [i for i in range(len(tokenizer)) if re.fullmatch(r" [A-Za-z]+", tokenizer.decode([i]))]
    total = torch.zeros(len(words), dtype=torch.float64)
    with torch.no_grad():
        for question in questions:
            ids = tokenizer(mmlu_prompt(question, fewshot_examples(fewshot, question.subject, 2)), return_tensors="pt")[
                "input_ids"
            ]
            total += model(ids.to(model_device(model)), logits_to_keep=1).logits[0, -1].float().log_softmax(-1)[words].cpu()
    ranked = [words[i] for i in total.argsort(descending=True, stable=True).tolist()]
    return tuple(tokenizer.decode([ranked[min(k, len(ranked) - 1)]]) for k in (0, 20, 40, 60))


class Reference:
    """fp32 results of one tiny model on `device` (the CPU unless given): the scan, the loss, MMLU-style
    log-likelihoods, the validation loss of the model without each single layer, and greedy decoding.
    The model is kit.testing.tiny_model(arch) with random weights, or with `weights` (trained_weights); the MMLU-style
    answers are answer_strings', or with `spread` those spread over the model's ranking (spread_answers)."""

    def __init__(self, arch: str, texts, questions, fewshot, *, weights=None, device="cpu", spread: bool = False):
        import kit
        from kit.evaluate import validation_loss

        self.arch, self.texts, self.questions, self.fewshot = arch, texts, questions, fewshot
        self.weights, self.device = weights, torch.device(device)
        self.tokenizer = kit.testing.tiny_tokenizer()
        model = self.model().to(self.device)
        self.answers = spread_answers(model, self.tokenizer, questions, fewshot) if spread else answer_strings(self.tokenizer)
        self.scan = kit.angular_distances(model, self.tokenizer, texts, batch_size=4, max_length=128).matrix
        self.loss = validation_loss(model, self.tokenizer, texts, max_length=128).loss
        self.loglik = mmlu_style(model, self.tokenizer, questions, fewshot, self.answers)
        self.pruned = []
        for start in range(kit.core.layers.num_layers(model)):
            with kit.prune.dropped(model, kit.Block(start, 1)):
                self.pruned.append(validation_loss(model, self.tokenizer, texts, max_length=128).loss)
        self.prompt = kit.evaluate.inference_cost.prompt_ids(self.tokenizer, 32)
        self.greedy = greedy_with_logits(model, self.prompt, 8)

    def model(self):
        """A fresh copy of the reference model (same seed, same weights), in fp32 on the CPU."""
        import kit

        model = kit.testing.tiny_model(self.arch, num_layers=4)[0]
        if self.weights is not None:
            model.load_state_dict(self.weights)
        return model

    def errors(self, model) -> tuple[dict[str, float], np.ndarray]:
        """Each check's error of `model` (anywhere, any dtype) against this reference, and its log-likelihoods."""
        import kit
        from kit.evaluate import validation_loss

        scan = kit.angular_distances(model, self.tokenizer, self.texts, batch_size=4, max_length=128).matrix
        loss = validation_loss(model, self.tokenizer, self.texts, max_length=128).loss
        loglik = mmlu_style(model, self.tokenizer, self.questions, self.fewshot, self.answers)
        oracle = kit.choose.oracle.ablation_losses(model, self.tokenizer, self.texts, ns=[1], max_length=128)
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
        shown = "  ".join(f"{name} {error:.1e}/{tolerance[name]:.2g}" for name, error in errors.items())
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


@lru_cache(maxsize=None)
def trained_reference(arch: str, device: str = "cpu") -> Reference:
    """The fp32 reference on `device` of `arch`'s trained tiny model (trained_weights), on the texts and questions
    of reference_of, with answers that it tells apart (spread_answers)."""
    import kit

    return Reference(arch, kit.loaders.data.corpus("validation")[:8], *mmlu_questions(20), weights=trained_weights(arch, device),
                     device=device, spread=True)  # fmt: skip


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


# The checks below run a computation twice on the device under test, on the same trained tiny model (under_test):
# in fp32 (the reference) and in half precision or 4-bit (under test). Errors as in TOLERANCE (scan: relative to the
# reference matrix's largest distance; loss: relative), and: greedy: the largest relative error of the greedy
# removal's candidate losses (up to where the two orders may part); logits: the largest |logit - logit_ref| of the
# greedy tokens' logits. Choices (best blocks, least-distance sublayers, greedy orders, greedy tokens) must be
# equal wherever the reference's two best are more than twice the tolerance apart. The tolerances are 3 x the
# largest errors measured on the CPU over the 13 dense architectures, rounded up (`python -m bench.gpu_checks
# twins`). half, the largest of bf16 and fp16: scan 1.6e-3 (qwen2's sublayer scan in bf16), loss 4.8e-4 (gemma's
# budget point, bf16), greedy 5.0e-4 (gemma's attention sublayers, bf16), logits 7.9e-2 (llama, bf16); the MoE,
# MLA, hybrid, linear-attention and multimodal ones within them (scan 1.6e-3, loss 5.9e-4, greedy 7.9e-4) but for
# logits (qwen3_moe 0.44, qwen3_next 0.28 in bf16: a token routed to another expert), which cost checks on llama
# alone. 4bit (NF4, fp32 compute): scan 9.8e-2 (qwen2's sublayer scan), loss 1.5e-2 (qwen2, without two MLP
# sublayers), greedy 2.0e-2 (qwen2, whole layers), logits 0.80 (qwen3). A weight of layer 1 scaled by 10 moves
# them, on llama, by at least 0.54, 0.11, 0.11 and 4.6.
TWIN_TOLERANCE = {
    "half": {"scan": 5e-3, "loss": 1.5e-3, "greedy": 1.5e-3, "logits": 0.25},
    "4bit": {"scan": 0.3, "loss": 5e-2, "greedy": 6e-2, "logits": 2.5},
}
TWIN_TEXTS = 8  # validation texts of every computation compared (max_length 128, batches of 4: two batches)
BUDGET = 0.3  # the budget point: a tiny model's block of 1-2 layers, 2-4 attention or 1-2 MLP sublayers


def under_test(arch: str, device, dtype, perturb=None):
    """(model, tokenizer): `arch`'s trained tiny model (trained on `device`) on `device` in `dtype`, a torch dtype or
    "4bit" (NF4, loaded through a checkpoint); perturb(model), when given, alters it first, in fp32."""
    import kit

    model, tokenizer = kit.testing.tiny_model(arch, num_layers=4, seed=TRAINING["seed"])
    model.load_state_dict(trained_weights(arch, str(device)))
    if perturb is not None:
        perturb(model)
    if dtype != "4bit":
        return model.to(device, dtype).eval(), tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return kit.load_model(tmp, device=device, quantize="4bit")


def precision(dtype) -> str:
    """The label of `dtype` in TWIN_TOLERANCE: "4bit", or "half" for a 16-bit float."""
    return "4bit" if dtype == "4bit" else "half"


def label(dtype) -> str:
    return "4bit" if dtype == "4bit" else str(dtype).removeprefix("torch.")


def same_choice(reference_scores, chosen: int, margin: float) -> tuple[int, int]:
    """(agrees, clear): `chosen` against the reference's choice, the index of its least score (NaN and inf never
    chosen), counted only where its two least scores are more than `margin` apart; (0, 0) elsewhere."""
    scores = np.where(np.isfinite(reference_scores), reference_scores, np.inf)
    low, second = np.sort(scores)[:2]
    return (int(chosen == int(np.argmin(scores))), 1) if second - low > margin else (0, 0)


MEASURED: dict | None = None  # measure_twins sets it to a dict: judge records the largest error per (dtype, name) there


def judge(arch: str, what: str, dtype, errors: dict, choices: dict | None = None, facts: dict | None = None) -> list[str]:
    """Prints one line (each error beside its tolerance, each choice's agreements k/k, each fact) and returns the
    failures: an error over its tolerance (or NaN), a clear choice not agreed, a fact untrue."""
    tolerance = TWIN_TOLERANCE[precision(dtype)]
    for name, error in errors.items() if MEASURED is not None else ():
        MEASURED[label(dtype), name] = max(MEASURED.get((label(dtype), name), 0.0), error)
    choices, facts = choices or {}, facts or {}
    failed = [name for name, error in errors.items() if not error <= tolerance[name]]
    failed += [name for name, (agree, clear) in choices.items() if agree < clear] + [name for name, ok in facts.items() if not ok]
    shown = [f"{name} {error:.1e}/{tolerance[name]:.2g}" for name, error in errors.items()]
    shown += [f"{name} {agree}/{clear}" for name, (agree, clear) in choices.items()] + [
        f"{name} {ok}" for name, ok in facts.items()
    ]
    print(f"  {arch:9s} {what:17s} {label(dtype):9s} {'  '.join(shown)}  {'FAIL' if failed else 'ok'}")
    return [f"{arch} {what} {label(dtype)}: {', '.join(failed)}"] if failed else []


def each_arch(what: str, check, device, dtype, archs, perturb=None) -> list[str]:
    """check(arch, device, dtype, perturb) for every arch, each guarded (one that raises is one failure)."""
    return [
        failure for arch in archs for failure in guarded(f"{arch} {what} {label(dtype)}", check, arch, device, dtype, perturb)
    ]


def check_sublayers(device, dtype, archs, perturb=None) -> list[str]:
    """A sublayer scan (kit.angular_distances(..., sublayers=True)) and the loss without two MLP sublayers
    (kit.drop_layers(model, kit.Sublayers("mlp", [2, 3]))), in `dtype` against fp32 on `device`; the best block of
    each size and the least-distance attention and MLP sublayers equal wherever the fp32 choice is clear."""
    return each_arch("sublayers", _sublayers, device, dtype, archs, perturb)


def _sublayers(arch, device, dtype, perturb) -> list[str]:
    import kit
    from kit.evaluate import validation_loss

    texts, runs = kit.loaders.data.corpus("validation")[:TWIN_TEXTS], []
    for model, tokenizer in (under_test(arch, device, torch.float32), under_test(arch, device, dtype, perturb)):
        scan = kit.angular_distances(model, tokenizer, texts, sublayers=True, batch_size=4, max_length=128)
        pruned = kit.drop_layers(model, kit.Sublayers("mlp", [2, 3]), inplace=True)
        runs.append((scan, validation_loss(pruned, tokenizer, texts, max_length=128, batch_size=4).loss))
    (reference, reference_loss), (scan, loss) = runs
    scale = reference.matrix.abs().max().item()
    margin = 2 * TWIN_TOLERANCE[precision(dtype)]["scan"] * scale
    blocks = [same_choice(np.diagonal(reference.layers().matrix.numpy(), offset=n), scan.layers().best_block(n).start, margin)
              for n in range(1, reference.num_layers)]  # fmt: skip
    table, reference_table = scan.sublayers(), reference.sublayers()
    sublayers = [
        same_choice(reference_table[kind].to_numpy(), int(np.argmin(table[kind].to_numpy())), margin)
        for kind in ("attention", "mlp")
    ]
    errors = {"scan": (scan.matrix - reference.matrix).abs().max().item() / scale, "loss": abs(loss / reference_loss - 1)}
    choices = {"best blocks": tuple(map(sum, zip(*blocks))), "least sublayers": tuple(map(sum, zip(*sublayers)))}
    return judge(arch, "sublayers", dtype, errors, choices)


def check_greedy(device, dtype, archs, perturb=None) -> list[str]:
    """kit.choose.greedy.greedy_removal, 2 steps of whole layers and 2 of attention sublayers, in `dtype` against
    fp32 on `device`: the candidate losses, and the order wherever the fp32 winner's lead is clear."""
    return each_arch("greedy", _greedy, device, dtype, archs, perturb)


def greedy_errors(reference, greedy, tolerance: float) -> tuple[float, tuple[int, int]]:
    """(the largest relative error of `greedy`'s candidate losses against `reference`'s, (agrees, clear)): steps
    compared in order up to the first where the two orders part (from there on they remove other units), a
    step's winner counted where the reference's lead is more than twice the tolerance (relative to its loss)."""
    error, agree, clear = 0.0, 0, 0
    for step, winner in enumerate(reference.order):
        row, got = reference.candidates[step], greedy.candidates[step]
        left = np.isfinite(row)
        error = max(error, float(np.max(np.abs(got[left] / row[left] - 1))))
        ok, counted = same_choice(row, greedy.order[step], 2 * tolerance * np.nanmin(row))
        agree, clear = agree + ok, clear + counted
        if greedy.order[step] != winner:
            break
    return error, (agree, clear)


def _greedy(arch, device, dtype, perturb) -> list[str]:
    import kit
    from kit.choose.greedy import greedy_removal

    texts, failures = kit.loaders.data.corpus("validation")[:TWIN_TEXTS], []
    (reference_model, tokenizer), (model, _) = under_test(arch, device, torch.float32), under_test(arch, device, dtype, perturb)
    for unit in ("layers", "attention"):
        reference, greedy = (greedy_removal(m, tokenizer, texts, unit=unit, steps=2, max_length=128, batch_size=4)
                             for m in (reference_model, model))  # fmt: skip
        error, order = greedy_errors(reference, greedy, TWIN_TOLERANCE[precision(dtype)]["greedy"])
        failures += judge(arch, f"greedy {unit}", dtype, {"greedy": error}, {"order": order})
    return failures


def check_budget(device, dtype, archs, perturb=None) -> list[str]:
    """One budget point of notebook 06 (kit.experiments.budget.budget_sweep at BUDGET: the paper's block by the
    scan, attention sublayers by LLM-Drop, MLP sublayers by the greedy removal; validation loss and inference
    cost), in `dtype` against fp32 on `device`, for the removals the fp32 scan and greedy removal choose: the
    same points, the loss of each within tolerance, the cost measured."""
    return each_arch("budget", _budget, device, dtype, archs, perturb)


def _budget(arch, device, dtype, perturb) -> list[str]:
    import kit
    from kit.choose.greedy import greedy_removal
    from kit.evaluate.metrics import InferenceCost, ValidationLoss
    from kit.experiments.budget import POINT, Choice, budget_sweep

    texts = kit.loaders.data.corpus("validation")[:TWIN_TEXTS]
    (reference_model, tokenizer), (model, _) = under_test(arch, device, torch.float32), under_test(arch, device, dtype, perturb)
    L = kit.core.layers.num_layers(reference_model)
    scan = kit.angular_distances(reference_model, tokenizer, texts, sublayers=True, batch_size=4, max_length=128)
    greedy = greedy_removal(reference_model, tokenizer, texts, unit="mlp", steps=2, max_length=128, batch_size=4)
    pick = lambda criterion, **evidence: lambda n: kit.choose.criteria.choose_units(criterion, L, n, **evidence)  # noqa: E731
    choices = [Choice("block", "similarity", pick("similarity", distances=scan.layers())),
               Choice("attention", "llm_drop_attention", pick("llm_drop_attention", distances=scan)),
               Choice("mlp", "greedy_mlp", pick("greedy_mlp", greedy=greedy))]  # fmt: skip
    evals = [ValidationLoss(tuple(texts), max_length=128, batch_size=4), InferenceCost(prompt_tokens=16, new_tokens=4, repeats=1)]
    reference, table = (
        budget_sweep(m, tokenizer, choices=choices, budgets=[BUDGET], evals=evals) for m in (reference_model, model)
    )
    loss, reference_loss = (t[t.metric == "val_loss"].set_index(list(POINT)).value for t in (table, reference))
    speeds = table[table.metric == "decode_tokens_per_s"].value.to_numpy()
    same = list(loss.index) == list(reference_loss.index) and len(loss) == 1 + len(choices)
    errors = {"loss": float(np.max(np.abs(loss.to_numpy() / reference_loss.to_numpy() - 1))) if same else float("nan")}
    facts = {"same points": same, "cost measured": len(speeds) == len(loss) and bool(np.all(np.isfinite(speeds) & (speeds > 0)))}
    return judge(arch, "budget point", dtype, errors, facts=facts)


def check_cost_twin(device, dtype, perturb=None, arch: str = "llama") -> list[str]:
    """kit.evaluate.cost of the trained `arch` in `dtype` on `device`, against fp32 there: greedy tokens equal up to
    the first step whose two best fp32 logits are within twice the logits tolerance, the logits within it; the
    parameters counted alike, the weights in fewer bytes (half: exactly half; 4-bit: packed), the KV cache
    per token half fp32's (half precision), the peak holding the weights, speeds positive."""
    return guarded(f"{arch} cost {label(dtype)}", _cost_twin, arch, device, dtype, perturb)


def _cost_twin(arch, device, dtype, perturb) -> list[str]:
    from kit.evaluate import cost
    from kit.evaluate.inference_cost import kv_cache_bytes, parameters, prompt_ids, weight_bytes
    from kit.testing import greedy_mismatch

    (reference_model, tokenizer), (model, _) = under_test(arch, device, torch.float32), under_test(arch, device, dtype, perturb)
    prompt = prompt_ids(tokenizer, 32).to(device)
    reference = greedy_with_logits(reference_model, prompt, 16)
    tokens, _ = greedy_with_logits(model, prompt, 16)
    with torch.no_grad():  # the model under test's logits on the reference's tokens
        logits = model(torch.cat([prompt, reference[0].to(device)], dim=1)).logits[:, prompt.shape[1] - 1 : -1].float().cpu()
    margin = 2 * TWIN_TOLERANCE[precision(dtype)]["logits"]
    result = cost(model, tokenizer, prompt_tokens=32, new_tokens=8, repeats=2)
    ties = [step for step in range(reference[1].shape[1]) if np.subtract(*reference[1][0, step].topk(2).values.tolist()) < margin]
    clear = ties[0] if ties else reference[1].shape[1]
    mismatch = greedy_mismatch(tokens, reference, margin)
    ratio = result.weight_bytes / weight_bytes(reference_model)
    facts = {
        "parameters": result.parameters == parameters(reference_model),
        f"weights x{ratio:.2f}": ratio == 0.5 if dtype != "4bit" else ratio < 1,  # 4-bit: packed, as stored
        "peak >= weights": result.peak_memory_bytes is not None and result.peak_memory_bytes >= result.weight_bytes,
        "speeds": all(np.isfinite(v) and v > 0 for v in (result.prefill_tokens_per_s, result.decode_tokens_per_s)),
    }
    if dtype != "4bit":
        facts["KV cache x0.5"] = kv_cache_bytes(model, 39) * 2 == kv_cache_bytes(reference_model, 39)
    errors = {"logits": float((logits - reference[1]).abs().max())}
    return judge(arch, "cost", dtype, errors, {"greedy tokens": (clear - (mismatch is not None), clear)}, facts)


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


def _measure_4bit(arch: str) -> None:
    reference = trained_reference(arch)
    errors, loglik = reference.errors(under_test(arch, "cpu", "4bit")[0])
    top2 = np.sort(reference.loglik, axis=1)[:, -2:]
    print(f"  {arch:9s} 4bit reference " + "  ".join(f"{name} {error:.1e}" for name, error in errors.items()) +
          f"  answers {reference.answers}, margins {np.min(top2[:, 1] - top2[:, 0]):.2f} or more", flush=True)  # fmt: skip
    for name, error in errors.items():
        MEASURED["4bit reference", name] = max(MEASURED.get(("4bit reference", name), 0.0), error)


def measure_twins(archs, dtypes) -> dict[tuple[str, str], float]:
    """The largest error of each check on trained models over `archs` for each of `dtypes` (torch dtypes, "4bit")
    on the CPU against fp32 there, and of a 4-bit load against the trained model's Reference: what TWIN_TOLERANCE
    and TOLERANCE["4bit"] are set from."""
    global MEASURED
    MEASURED, cpu = {}, torch.device("cpu")
    try:
        for arch in archs:
            for dtype in dtypes:
                for check in (check_sublayers, check_greedy, check_budget):
                    check(cpu, dtype, [arch])
                check_cost_twin(cpu, dtype, arch=arch)
            guarded(f"{arch} 4bit reference", _measure_4bit, arch)
        return MEASURED
    finally:
        MEASURED = None


if __name__ == "__main__":
    import kit

    if sys.argv[1:2] == ["twins"]:
        found = measure_twins(sys.argv[2:] or kit.testing.TINY_ARCHITECTURES, [torch.bfloat16, torch.float16, "4bit"])
    else:
        found = measure(kit.testing.TINY_ARCHITECTURES, {"fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16})
    print("largest: " + ", ".join(f"{label} {name} {error:.1e}" for (label, name), error in found.items()))
