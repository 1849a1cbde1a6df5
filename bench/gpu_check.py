"""`make gpu-check`: the kit on one GPU, offline, in a few minutes.

1. Versions: what this machine has against what the kit needs (and what is missing).
2. Correctness: GPU results against CPU fp32 on tiny models of every architecture (scan matrix,
   validation loss, MMLU-style predictions), in fp32 and in the policy's half precision.
3. The pipeline on the GPU: drop a block, save, reload, heal a few steps (4-bit when bitsandbytes
   is there) with the loss falling, merge the adapter.
4. Figures at Llama-2-7B's shape (random weights built on the GPU): scan and plain-forward
   tokens/s, MMLU questions/s, LoRA training tokens/s, peak memory of each step, and the projected
   time of the paper's full workloads on this GPU.

Needs no network and no cached asset. `--device cpu --shape tiny` runs the same code on a CPU
in seconds (the test suite does, so the script cannot rot between GPU sessions).
"""

import argparse
import importlib.metadata
import sys
import tempfile
import time
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)  # fmt: skip
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=512, max_position_embeddings=4096)  # fmt: skip
TOLERANCE = {"fp32": 1e-3, "half": 3e-2}  # max |GPU - CPU fp32| of scan distances (in [0, 1])
NEEDED = ("torch", "transformers", "peft", "accelerate", "safetensors", "numpy", "pandas", "tqdm")  # by this check
OPTIONAL = ("bitsandbytes",)  # without it the pipeline heals with plain LoRA and says so
PAPER = dict(scan_tokens=10_000 * 2048, mmlu_questions=14_042, heal_tokens=5000 * 16 * 2048)


def versions() -> list[str]:
    """Prints what this machine has of the packages this check needs, against pyproject.toml's
    requirements; returns the needed ones that are missing or too old (empty: all there)."""
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = {r.name: r for r in map(Requirement, project["dependencies"])}
    missing = []
    for name in NEEDED + OPTIONAL:
        specifier = requirements[name].specifier if name in requirements else ""
        try:
            found = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found = None
        ok = found is not None and (not specifier or specifier.contains(found, prereleases=True))
        print(f"  {name:14s} {found or 'not installed':14s} needs {specifier or 'any'}{'' if ok else '  <- missing'}")
        if not ok and name in NEEDED:
            missing.append(f"{name}{specifier} (found {found})")
    return missing


def timed(fn, device):
    """(result, seconds, peak GiB) of fn(), synchronised on a GPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return result, time.perf_counter() - start, peak


def synthetic_questions(n: int, subjects: int = 4):
    """MMLU-shaped questions from the offline corpus (no asset): 5 shots per subject, then n questions."""
    from kit.data import MMLUQuestion, corpus

    words = " ".join(corpus("train")[:200]).split()
    questions = [
        MMLUQuestion(f"subject_{i % subjects}", " ".join(words[40 * i : 40 * i + 30]) + "?",
                     tuple(" ".join(words[40 * i + 30 + 2 * k : 40 * i + 32 + 2 * k]) for k in range(4)), i % 4, i)
        for i in range(n + 5 * subjects)
    ]  # fmt: skip
    pool = {q.subject: [p for p in questions[: 5 * subjects] if p.subject == q.subject] for q in questions}
    return questions[5 * subjects :], lambda subject: pool[subject]


def check_correctness(device, half, archs=None) -> list[str]:
    """GPU against CPU fp32 on every tiny architecture; returns the failures."""
    import torch

    import kit
    from kit.evaluate import mmlu, validation_loss

    texts = kit.data.corpus("validation")[:8]
    questions, pool = synthetic_questions(20)
    failures = []
    for arch in archs or kit.TINY_ARCHITECTURES:
        reference, tokenizer = kit.tiny_model(arch, num_layers=4)
        ref_scan = kit.angular_distances(reference, tokenizer, texts, batch_size=4, max_length=128).matrix
        ref_loss = validation_loss(reference, tokenizer, texts, max_length=128).loss
        ref_mmlu = mmlu(reference, tokenizer, questions, shots=2, fewshot=pool).predictions
        for label, dtype in (("fp32", torch.float32), ("half", half)):
            model = kit.tiny_model(arch, num_layers=4)[0].to(device, dtype)
            scan = kit.angular_distances(model, tokenizer, texts, batch_size=4, max_length=128).matrix
            error = (scan - ref_scan).abs().max().item()
            loss = validation_loss(model, tokenizer, texts, max_length=128).loss
            agree = sum(a == b for a, b in zip(mmlu(model, tokenizer, questions, shots=2, fewshot=pool).predictions, ref_mmlu))
            ok = error <= TOLERANCE[label] and (label != "fp32" or (abs(loss / ref_loss - 1) < 1e-4 and agree == 20))
            print(f"  {arch:9s} {label:4s} scan max error {error:.1e}  loss {loss:.4f} vs {ref_loss:.4f}  "
                  f"predictions agree {agree}/20  {'ok' if ok else 'FAIL'}")  # fmt: skip
            if not ok:
                failures.append(f"{arch} {label}")
    return failures


def check_pipeline(device) -> list[str]:
    """Drop, save, reload, heal a few steps, merge: on `device`."""
    import importlib.util

    import torch

    import kit

    failures = []
    model, tokenizer = kit.tiny_model("llama", num_layers=6)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "base")
        tokenizer.save_pretrained(tmp / "base")
        base, _ = kit.load_model(str(tmp / "base"), device=device, dtype=torch.float32)
        pruned = kit.drop_layers(base, kit.Block(2, 2), inplace=True)
        kit.save_pruned(pruned, tokenizer, tmp / "pruned")
        reloaded, _ = kit.load_model(str(tmp / "pruned"), device=device, dtype=torch.float32)
        ids = torch.tensor([tokenizer(kit.data.corpus("train")[0])["input_ids"][:64]], device=device)
        with torch.no_grad():
            same = torch.allclose(pruned(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)
        quantize = "4bit" if device.type == "cuda" and importlib.util.find_spec("bitsandbytes") else None
        config = kit.HealConfig(rank=8, lr=3e-3, steps=12, batch_size=4, seq_len=64, quantize=quantize,
                                log_every=1, eval_every=6, save_every=12)  # fmt: skip
        texts = kit.data.corpus("train")[:40]
        result = kit.heal(tmp / "pruned", tokenizer, texts, config, output_dir=tmp / "healed",
                          val_texts=kit.data.corpus("validation")[:4])  # fmt: skip
        validation = [e["loss"] for e in result.history["validation"]]
        merged = kit.merge_adapter(tmp / "pruned", result.adapter_path, tmp / "merged")
        merged_layers = kit.layers.num_layers(kit.load_model(str(merged), device=device)[0])
    print(f"  drop + save + reload: logits equal {same}; heal ({quantize or 'LoRA, no bitsandbytes'}): "
          f"validation loss {validation[0]:.3f} -> {validation[-1]:.3f}; merged model has {merged_layers} layers")  # fmt: skip
    if not same:
        failures.append("reload after save_pruned")
    if not validation[-1] < validation[0]:
        failures.append("healing did not lower the validation loss")
    if merged_layers != 4:
        failures.append("merged checkpoint")
    return failures


def figures(device, dtype, shape: dict, *, texts: int, questions: int, heal_steps: int, length: int = 2048) -> None:
    """Throughput and peak memory at `shape` (random weights), and the paper's workloads projected."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback

    import kit
    from kit.evaluate import mmlu

    tokenizer = kit.testing.tiny_tokenizer()  # any ids < the vocabulary do for random weights
    config = LlamaConfig(**shape, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.name_or_path = "llama-2-7b-shape"
    print(f"  {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {dtype}")
    long_texts = ["\n\n".join(kit.data.corpus("train")[i : i + 12]) for i in range(0, 12 * texts, 12)]
    tokens = sum(min(length, len(tokenizer(t)["input_ids"])) for t in long_texts)

    def forward():
        with torch.no_grad():
            for batch in kit.text.batched(long_texts, 4):
                model(**kit.text.encode(tokenizer, batch, max_length=length, device=device), logits_to_keep=1)

    scan = lambda: kit.angular_distances(model, tokenizer, long_texts, batch_size=4, max_length=length)  # noqa: E731
    forward()  # warm-up
    _, plain_s, plain_peak = timed(forward, device)
    _, scan_s, scan_peak = timed(scan, device)
    print(f"  scan {tokens / scan_s:,.0f} tokens/s (plain forward {tokens / plain_s:,.0f}; ratio {plain_s / scan_s:.2f}); "
          f"peak {scan_peak:.1f} GiB (forward {plain_peak:.1f} GiB)")  # fmt: skip

    qs, pool = synthetic_questions(questions)
    mmlu(model, tokenizer, qs[:8], shots=5, fewshot=pool, batch_size=16)  # warm-up
    _, mmlu_s, mmlu_peak = timed(lambda: mmlu(model, tokenizer, qs, shots=5, fewshot=pool, batch_size=16), device)
    print(f"  MMLU 5-shot {len(qs) / mmlu_s:.1f} questions/s; peak {mmlu_peak:.1f} GiB")

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    steps = StepTimes()
    heal_config = kit.HealConfig(rank=8, steps=heal_steps, batch_size=4, grad_accum=4, seq_len=length, quantize=None,
                                 save_every=heal_steps, log_every=1)  # fmt: skip
    heal_texts = kit.data.corpus("train")
    with tempfile.TemporaryDirectory() as tmp:
        _, _, heal_peak = timed(lambda: kit.heal(model, tokenizer, heal_texts, heal_config, output_dir=tmp, callbacks=[steps]), device)
    per_step = (steps.times[-1] - steps.times[0]) / (len(steps.times) - 1)
    heal_tps = heal_config.global_batch * length / per_step
    print(f"  LoRA ({dtype} base, gradient checkpointing) {heal_tps:,.0f} tokens/s at global batch 16 x {length}; "
          f"peak {heal_peak:.1f} GiB")  # fmt: skip
    print("  projected on this device, the paper's workloads at this shape (tokens/s measured above):")
    print(f"    scan of 10k texts x 2048 tokens: {PAPER['scan_tokens'] / (tokens / scan_s) / 60:.1f} min")
    print(f"    full MMLU 5-shot (14,042 questions) per sweep point: {PAPER['mmlu_questions'] / (len(qs) / mmlu_s) / 60:.1f} min")
    print(f"    5,000 healing steps at batch 16 x 2048: {PAPER['heal_tokens'] / heal_tps / 3600:.1f} h")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a quick run of the same code)")
    parser.add_argument("--shape", choices=("7b", "tiny"), default="7b", help="model shape of the figures")
    args = parser.parse_args(argv)
    print("== versions")
    missing = versions()
    if missing:
        print("missing: " + "; ".join(missing))
        print("bring wheels: `pip download --no-deps -d wheels 'PACKAGE==VERSION'` where there is network, carry "
              "wheels/, then `pip install --no-deps wheels/*.whl` here.")  # fmt: skip
        return 2
    import torch

    from kit import device as policy

    device = policy.resolve_device(args.device)
    half = policy.resolve_dtype("auto", device) if device.type == "cuda" else torch.bfloat16
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"  {props.name}, {props.total_memory / 2**30:.0f} GiB, native bf16: {policy.native_bf16(device)}")
    print(f"== correctness on {device} against CPU fp32 (half precision: {half})")
    failures = check_correctness(device, half)
    print(f"== pipeline on {device}")
    failures += check_pipeline(device)
    seven_b = args.shape == "7b"
    print(f"== figures at {'Llama-2-7B' if seven_b else 'a small'} shape on {device}")
    figures(device, half if device.type == "cuda" else torch.float32, LLAMA_2_7B if seven_b else SMALL,
            texts=32 if seven_b else 2, questions=400 if seven_b else 8, heal_steps=6 if seven_b else 3,
            length=2048 if seven_b else 256)  # fmt: skip
    print("FAILED: " + ", ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
