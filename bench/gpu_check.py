"""`make gpu-check` (or `python -m bench.gpu_check`): the kit on one GPU, offline, in two parts.

Part "full" (no bitsandbytes): versions; every tiny architecture's scan, validation loss, MMLU-style
log-likelihoods and ablation oracle on the GPU in fp32 and in the policy's half precision against
CPU fp32 within measured tolerances (bench/gpu_checks.py); on the same architectures trained a few hundred
steps, a sublayer scan and removal, the greedy removal, a budget point and kit.evaluate.cost in half
precision against the same computation in fp32 on the GPU; kit.evaluate.cost against the CPU; a
device_map="auto" dispatch over the GPU and the CPU; two processes on NCCL when two GPUs are visible; drop /
save / reload / LoRA healing with the loss falling / merge; figures at Llama-2-7B's shape (cut to fit the
GPU's memory): scan, MMLU and LoRA throughput, peak memory, the paper's workloads projected.
Part "4bit" (bitsandbytes): 4-bit NF4 loads of the trained tiny models scanned, scored and ablated against
fp32 on the GPU, their sublayer scan and removal, greedy removal, budget point and cost likewise, QLoRA steps
with the loss falling, the merge.

A part that cannot run prints `NOT RUN: <why>` and the check exits non-zero, unless that part was
left out with --part. A check that raises (out of memory, a kernel missing on this GPU) is one failure,
printed with its traceback, and the others still run. fp32 is IEEE fp32 throughout (no TF32). Needs
no network and no cached asset (it sets HF_HUB_OFFLINE=1 itself), and no `make`. `--device cuda:1` runs
on that GPU: every CUDA call is given the device, and healing and the figures (the HF Trainer trains on
cuda:0 without a launcher) run in a process that sees that GPU alone. `--device cpu --shape tiny` runs the
same code on a CPU (tests/test_gpu_check.py does).
"""

import argparse
import importlib
import importlib.metadata
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)  # fmt: skip
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=512, max_position_embeddings=4096)  # fmt: skip
FIGURES = dict(texts=32, questions=400, heal_steps=6)  # the figures' sizes at 7B shape
TINY_FIGURES = dict(FIGURES, questions=40)  # the same texts (the corpus bounds them); MMLU rows cost ~0.3 CPU s each here
WEIGHT_SHARE = 0.45  # of the GPU's memory, for the 7B-shape weights (the rest: activations, LoRA training)
PARTS = {  # part: the packages it needs (the kit's own imports included)
    "full": ("torch", "transformers", "huggingface-hub", "tokenizers", "safetensors", "peft", "accelerate", "numpy",
             "pandas", "tqdm", "packaging", "pyyaml"),
    "4bit": ("bitsandbytes",),
}  # fmt: skip
PAPER = dict(scan_tokens=10_000 * 2048, mmlu_questions=14_042, heal_tokens=5000 * 16 * 2048)


def requirements() -> dict[str, list]:
    """Every version requirement on the packages of PARTS: the kit's (pyproject.toml) and those of
    the installed packages themselves (transformers' on huggingface-hub and tokenizers, ...)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wanted = {canonicalize_name(n) for names in PARTS.values() for n in names}
    found = {name: [] for name in wanted}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    installed = []
    for name in wanted:
        try:
            installed += importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            pass
    for line in project + installed:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if canonicalize_name(requirement.name) in wanted:
            found[canonicalize_name(requirement.name)].append(requirement.specifier)
    return found


def versions(part: str) -> list[str]:
    """Prints what this machine has of `part`'s packages against every requirement on them; returns
    the missing or too old ones (empty: all there)."""
    from packaging.utils import canonicalize_name

    needed, missing = requirements(), []
    for name in PARTS[part]:
        specifiers = needed[canonicalize_name(name)]
        wanted = ",".join(sorted({str(one) for s in specifiers for one in s})) or "any"
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        ok = have is not None and all(s.contains(have, prereleases=True) for s in specifiers)
        print(f"  {name:16s} {have or 'not installed':14s} needs {wanted}{'' if ok else '  <- missing'}")
        if not ok:
            missing.append(f"{name}{'' if wanted == 'any' else wanted} (found {have})")
    return missing


def timed(fn, device):
    """(result, seconds, peak GiB) of fn(), synchronised on a GPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return result, time.perf_counter() - start, peak


@contextmanager
def ieee_fp32():
    """fp32 as IEEE fp32 on a GPU, as on the CPU: no TF32 in matrix products or convolutions. PyTorch's
    default lets cuDNN round the inputs of fp32 convolutions (Mamba's, linear attention's) to TF32's 10
    bits, and a process may have allowed it for matrix products: rounding errors near 5e-4, far above
    the fp32 checks' tolerances. Restored after."""
    import torch

    backends = torch.backends
    if hasattr(backends, "fp32_precision"):  # torch >= 2.9: the global setting, then each backend's
        owners, name, value = (backends, backends.cuda.matmul, backends.cudnn, backends.cudnn.conv, backends.cudnn.rnn), "fp32_precision", "ieee"
    else:
        owners, name, value = (backends.cuda.matmul, backends.cudnn), "allow_tf32", False
    saved = [getattr(owner, name) for owner in owners]
    for owner in owners:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, old in zip(owners, saved):
            setattr(owner, name, old)


def needs_own_process(device) -> bool:
    """Whether healing on `device` needs a process of its own: without a launcher the HF Trainer trains on cuda:0
    (and makes it the current GPU), so kit.heal refuses a model on another GPU, advising CUDA_VISIBLE_DEVICES."""
    return device.type == "cuda" and (device.index or 0) != 0


def in_own_process(device, function: str, *args) -> list[str]:
    """function(device, *args) ("module:name", or a name in this module) in a child process that sees `device`'s GPU
    alone, as cuda:0 (CUDA_VISIBLE_DEVICES: the kit's advice for healing on another GPU; a CPU device is passed as
    it is), under ieee_fp32, its output in line with this one's; returns its failures. Arguments: JSON, dtypes."""
    visible = {"CUDA_VISIBLE_DEVICES": str(device.index)} if device.type == "cuda" else {}
    encoded = [{"dtype": str(a).removeprefix("torch.")} if type(a).__name__ == "dtype" else a for a in args]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "failures.json"
        code = "import sys; from bench.gpu_check import child; child(*sys.argv[1:])"
        sys.stdout.flush()
        done = subprocess.run([sys.executable, "-c", code, str(out), function, "cuda:0" if visible else str(device), json.dumps(encoded)],
                              env={**os.environ, **visible}, cwd=REPO)  # fmt: skip
        if not out.exists():
            return [f"{function} in its own process on {device}: exited with {done.returncode}"]
        return json.loads(out.read_text())


def child(out: str, function: str, device: str, args: str) -> None:
    """The child's side of in_own_process: runs `function` on `device`, writes its failures (JSON) to `out`."""
    import torch

    module, _, name = function.rpartition(":")
    target = getattr(importlib.import_module(module) if module else sys.modules[__name__], name)
    decoded = [getattr(torch, a["dtype"]) if isinstance(a, dict) and set(a) == {"dtype"} else a for a in json.loads(args)]
    with ieee_fp32():
        failures = target(torch.device(device), *decoded)
    Path(out).write_text(json.dumps(failures or []))


def check_pipeline(device, quantize: str | None) -> list[str]:
    """Drop, save, reload, heal a few steps (LoRA on fp32, or QLoRA on 4-bit), merge: on `device` (on a GPU other
    than cuda:0, in a process that sees it alone: needs_own_process)."""
    import torch

    import kit

    if needs_own_process(device):
        return in_own_process(device, "check_pipeline", quantize)
    failures = []
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=6)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "base")
        tokenizer.save_pretrained(tmp / "base")
        base, _ = kit.load_model(str(tmp / "base"), device=device, dtype=torch.float32)
        pruned = kit.drop_layers(base, kit.Block(2, 2), inplace=True)
        kit.save_pruned(pruned, tokenizer, tmp / "pruned")
        reloaded, _ = kit.load_model(str(tmp / "pruned"), device=device, dtype=torch.float32)
        ids = torch.tensor([tokenizer(kit.loaders.data.corpus("train")[0])["input_ids"][:64]], device=device)
        with torch.no_grad():
            same = torch.allclose(pruned(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)
        config = kit.HealConfig(rank=8, lr=3e-3, steps=12, batch_size=4, seq_len=64, quantize=quantize,
                                log_every=1, eval_every=6, save_every=12)  # fmt: skip
        # loaded as kit.heal would load it, but on `device` (kit.heal loads on the policy's device)
        healed, _ = kit.load_model(str(tmp / "pruned"), device=device, quantize=quantize)
        result = kit.heal(healed, tokenizer, kit.loaders.data.corpus("train")[:40], config, output_dir=tmp / "healed",
                          val_texts=kit.loaders.data.corpus("validation")[:4])  # fmt: skip
        quantized = getattr(result.model.get_base_model(), "is_loaded_in_4bit", False)
        validation = [e["loss"] for e in result.history["validation"]]
        merged = kit.merge_adapter(tmp / "pruned", result.adapter_path, tmp / "merged")
        merged_layers = kit.core.layers.num_layers(kit.load_model(str(merged), device=device)[0])
    print(f"  drop + save + reload: logits equal {same}; heal ({'QLoRA, 4-bit base' if quantized else 'LoRA'}): "
          f"validation loss {validation[0]:.3f} -> {validation[-1]:.3f}; merged model has {merged_layers} layers")  # fmt: skip
    if not same:
        failures.append("reload after save_pruned")
    if quantized != (quantize == "4bit"):
        failures.append(f"healing base {'is' if quantized else 'is not'} 4-bit, asked {quantize}")
    if not validation[-1] < validation[0]:
        failures.append("healing did not lower the validation loss")
    if merged_layers != 4:
        failures.append("merged checkpoint")
    return failures


def check_4bit(device, archs, perturb=None) -> list[str]:
    """4-bit NF4 loads of trained tiny models (bench.gpu_checks.trained_reference) on `device`, against the same
    models in fp32 there (bench.gpu_checks.TOLERANCE["4bit"]); perturb(model) alters the checkpoint (the test
    that the check can fail)."""
    from bench.gpu_checks import guarded

    return [failure for arch in archs for failure in guarded(f"{arch} 4bit", _check_4bit, device, arch, perturb)]


def _check_4bit(device, arch: str, perturb) -> list[str]:
    from bench.gpu_checks import trained_reference, under_test

    reference = trained_reference(arch, str(device))
    return reference.compare(under_test(arch, device, "4bit", perturb)[0], "4bit", "4bit")


def fitted_shape(total_bytes: int, itemsize: int) -> dict:
    """Llama-2-7B's shape, with fewer layers where its weights would take more than WEIGHT_SHARE of the GPU."""
    h, inner, vocab = LLAMA_2_7B["hidden_size"], LLAMA_2_7B["intermediate_size"], LLAMA_2_7B["vocab_size"]
    per_layer, fixed = (4 * h * h + 3 * h * inner) * itemsize, 2 * vocab * h * itemsize
    layers = min(LLAMA_2_7B["num_hidden_layers"], int((WEIGHT_SHARE * total_bytes - fixed) // per_layer))
    if layers < 2:
        raise ValueError(f"a GPU of {total_bytes / 2**30:.1f} GiB holds fewer than 2 layers of Llama-2-7B's shape: use --shape tiny")
    return {**LLAMA_2_7B, "num_hidden_layers": layers}


def long_texts(tokenizer, n: int, length: int) -> list[str]:
    """n texts of at least `length` tokens each, from the offline corpus read round and round (so
    that any n exists, whatever the corpus's size on this Python)."""
    from kit.loaders.data import corpus

    chunks, texts = itertools.cycle(corpus("train")), []
    for _ in range(n):
        parts, tokens = [], 0
        while tokens < length:
            parts.append(next(chunks))
            tokens += len(tokenizer(parts[-1])["input_ids"])
        texts.append("\n\n".join(parts))
    return texts


def figures(device, dtype, shape: dict, *, texts: int, questions: int, heal_steps: int, length: int = 2048) -> None:
    """Throughput and peak memory at `shape` (random weights), and the paper's workloads projected
    (at Llama-2-7B's 32 layers when `shape` has fewer)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback

    import kit
    from bench.gpu_checks import mmlu_questions
    from kit.evaluate import mmlu

    tokenizer = kit.testing.tiny_tokenizer()  # any ids < the vocabulary do for random weights
    config = LlamaConfig(**shape, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.name_or_path = "llama-2-7b-shape"
    scale = LLAMA_2_7B["num_hidden_layers"] / shape["num_hidden_layers"] if shape["hidden_size"] == LLAMA_2_7B["hidden_size"] else 1
    print(f"  {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {dtype}, {shape['num_hidden_layers']} layers")
    scan_texts = long_texts(tokenizer, texts, length)
    tokens = sum(min(length, len(tokenizer(t)["input_ids"])) for t in scan_texts)

    def forward():
        with torch.no_grad():
            for batch in kit.core.text.batched(scan_texts, 4):
                model(**kit.core.text.encode(tokenizer, batch, max_length=length, device=device), logits_to_keep=1)

    scan = lambda: kit.angular_distances(model, tokenizer, scan_texts, batch_size=4, max_length=length)  # noqa: E731
    forward()  # warm-up
    _, plain_s, plain_peak = timed(forward, device)
    _, scan_s, scan_peak = timed(scan, device)
    print(f"  scan of {texts} texts x {length} tokens: {tokens / scan_s:,.0f} tokens/s (plain forward {tokens / plain_s:,.0f}; "
          f"ratio {plain_s / scan_s:.2f}); peak {scan_peak:.1f} GiB (forward {plain_peak:.1f} GiB)")  # fmt: skip

    qs, pool = mmlu_questions(questions)
    mmlu(model, tokenizer, qs[:8], shots=5, fewshot=pool, batch_size=16)  # warm-up
    _, mmlu_s, mmlu_peak = timed(lambda: mmlu(model, tokenizer, qs, shots=5, fewshot=pool, batch_size=16), device)
    print(f"  MMLU 5-shot, {len(qs)} questions: {len(qs) / mmlu_s:.1f} questions/s; peak {mmlu_peak:.1f} GiB")

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter())

    steps = StepTimes()
    heal_config = kit.HealConfig(rank=8, steps=heal_steps, batch_size=4, grad_accum=4, seq_len=length, quantize=None,
                                 save_every=heal_steps, log_every=1)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        heal = lambda: kit.heal(model, tokenizer, kit.loaders.data.corpus("train"), heal_config, output_dir=tmp, callbacks=[steps])  # noqa: E731
        _, _, heal_peak = timed(heal, device)
    per_step = (steps.times[-1] - steps.times[0]) / (len(steps.times) - 1)
    heal_tps = heal_config.global_batch * length / per_step
    print(f"  LoRA ({dtype} base, gradient checkpointing) {heal_tps:,.0f} tokens/s at global batch 16 x {length}; "
          f"peak {heal_peak:.1f} GiB")  # fmt: skip
    print(f"  projected on this device, the paper's workloads{' at 32 layers' if scale != 1 else ''} (rates measured above):")
    print(f"    scan of 10k texts x 2048 tokens: {scale * PAPER['scan_tokens'] / (tokens / scan_s) / 60:.1f} min")
    print(f"    full MMLU 5-shot (14,042 questions) per sweep point: {scale * PAPER['mmlu_questions'] / (len(qs) / mmlu_s) / 60:.1f} min")
    print(f"    5,000 healing steps at batch 16 x 2048: {scale * PAPER['heal_tokens'] / heal_tps / 3600:.1f} h")


def part_full(device, half, args) -> list[str]:
    import torch

    from bench import gpu_checks, gpu_nccl
    from bench.gpu_checks import guarded

    print(f"== correctness on {device} against CPU fp32 (half precision: {half}), error/tolerance per check")
    failures = gpu_checks.check_correctness(device, {"fp32": torch.float32, str(half).removeprefix("torch."): half}, args.archs)
    failures += twins(device, half, args.archs)
    print(f"== kit.evaluate.cost on {device}")
    failures += guarded("cost", gpu_checks.check_cost, device)
    print(f"== device_map='auto' on {device} and beyond")
    failures += guarded("device_map", gpu_checks.check_device_map, device)
    print("== two processes on NCCL")
    failures += guarded("NCCL", gpu_nccl.check, device)
    print(f"== pipeline on {device}, full precision")
    failures += guarded("pipeline", check_pipeline, device, quantize=None)
    return failures + guarded("figures", part_figures, device, half, args.shape)


def twins(device, dtype, archs) -> list[str]:
    """The computations beyond the scan, loss, log-likelihoods and oracle (a sublayer scan and removal, the greedy
    removal, a budget point, kit.evaluate.cost) in `dtype` (a half precision, or "4bit") against fp32 on `device`,
    on trained tiny models (bench.gpu_checks.TWIN_TOLERANCE); each architecture's check guarded on its own."""
    from bench import gpu_checks

    print(f"== {gpu_checks.label(dtype)} against fp32 on {device}, trained tiny models: sublayer scan and removal, greedy "
          "removal, a budget point, cost")  # fmt: skip
    failures = []
    for check in (gpu_checks.check_sublayers, gpu_checks.check_greedy, gpu_checks.check_budget):
        failures += check(device, dtype, archs)
    return failures + gpu_checks.check_cost_twin(device, dtype)


def part_figures(device, half, shape: str) -> list[str]:
    """The figures at Llama-2-7B's shape (cut to the GPU's memory), or at a small one (`shape` "tiny"); on a GPU
    other than cuda:0 in a process that sees it alone, for LoRA's throughput (needs_own_process)."""
    import torch

    if needs_own_process(device):
        return in_own_process(device, "part_figures", half, shape)

    if shape == "7b":
        fitted = fitted_shape(torch.cuda.get_device_properties(device).total_memory, half.itemsize)
        print(f"== figures at Llama-2-7B's shape on {device}: {fitted['num_hidden_layers']} of 32 layers "
              f"(weights at most {WEIGHT_SHARE:.0%} of the GPU's memory)")  # fmt: skip
        figures(device, half, fitted, **FIGURES, length=2048)
    else:
        print(f"== figures at a small shape on {device}")
        figures(device, half if device.type == "cuda" else torch.float32, SMALL, **TINY_FIGURES, length=64)
    return []


def part_4bit(device, half, args) -> list[str]:
    from bench.gpu_checks import guarded

    print(f"== 4-bit NF4 on {device} against fp32 there, trained tiny models")
    failures = check_4bit(device, args.archs)
    failures += twins(device, "4bit", args.archs)
    print(f"== pipeline on {device}, 4-bit base (QLoRA)")
    return failures + guarded("pipeline 4bit", check_pipeline, device, quantize="4bit")


def main(argv=None) -> int:
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported: nothing asks the Hub
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu (a run of the same code)")
    parser.add_argument("--shape", choices=("7b", "tiny"), default="7b", help="model shape of the figures")
    parser.add_argument("--part", choices=("all", *PARTS), default="all", help="run only this part (the other is left out)")
    parser.add_argument("--archs", nargs="+", help="tiny architectures of the correctness checks (default: all of kit.testing)")
    args = parser.parse_args(argv)
    parts = list(PARTS) if args.part == "all" else [args.part]
    print("== versions")
    missing = {part: versions(part) for part in parts}
    if missing.get("full"):
        print("missing: " + "; ".join(missing["full"]))
        print("install the wheel sets (docs/gpus.md, 'The GPU check'): `make wheelhouse` where there is network, then here "
              "`pip install --no-index --no-deps --target deps wheelhouse/full/*.whl` and PYTHONPATH=deps.")  # fmt: skip
        return 2
    import torch

    from kit.core import device as policy
    from kit.testing import TINY_ARCHITECTURES

    if unknown := set(args.archs or ()) - set(TINY_ARCHITECTURES):
        parser.error(f"no tiny model for {', '.join(sorted(unknown))}; choose among {', '.join(TINY_ARCHITECTURES)}")
    args.archs = args.archs or list(TINY_ARCHITECTURES)
    device = policy.resolve_device(args.device)
    half = policy.resolve_dtype("auto", device) if device.type == "cuda" else torch.bfloat16
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"  {props.name}, {props.total_memory / 2**30:.0f} GiB, native bf16: {policy.native_bf16(device)}")
    failures, not_run = [], []
    for part in parts:
        print(f"==== part {part}")
        if missing.get(part):
            not_run.append(f"{part}: {'; '.join(missing[part])}: install wheelhouse/{part} (docs/gpus.md, 'The GPU check')")
            print(f"NOT RUN: {not_run[-1]}")
            continue
        with ieee_fp32():  # fp32 on the GPU is compared with the CPU's within fp32's tolerances
            failures += {"full": part_full, "4bit": part_4bit}[part](device, half, args)
    for reason in not_run:
        print(f"NOT RUN: {reason}")
    if failures:
        print("FAILED: " + "; ".join(failures))
    elif not not_run:
        print(f"all checks of part {', '.join(parts)} passed")
    return 1 if failures or not_run else 0


if __name__ == "__main__":
    sys.exit(main())
