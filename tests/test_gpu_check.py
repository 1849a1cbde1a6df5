"""`make gpu-check` runs where no test runs (a GPU machine, offline): every part of it runs here on
the CPU at its real text counts, so that it works the first time it gets a GPU; and every check it
makes fails on a model with one perturbed weight, so that passing means something."""

import ast
import importlib.metadata
import re
import subprocess
from pathlib import Path

import pytest
import torch

import kit
from bench import gpu_check, gpu_checks, gpu_nccl

CPU = torch.device("cpu")


def perturb(model):
    """One weight matrix of the model under test scaled by 10: layer 1's MLP output projection (its last matrix)."""
    weight = [p for p in kit.core.layers.decoder_layers(model)[1].parameters() if p.dim() == 2][-1]
    with torch.no_grad():
        weight.mul_(10)


def test_versions_name_every_missing_or_too_old_package(monkeypatch, capsys):
    assert gpu_check.versions("full") == [] and gpu_check.versions("4bit") == []
    real = importlib.metadata.version

    def version(name):
        if name in ("pandas", "bitsandbytes"):
            raise importlib.metadata.PackageNotFoundError(name)
        return {"transformers": "5.17.0", "huggingface-hub": "0.30.0"}.get(name) or real(name)

    monkeypatch.setattr(gpu_check.importlib.metadata, "version", version)
    missing = gpu_check.versions("full")
    assert [re.match(r"[\w-]+", m).group() for m in missing] == ["transformers", "huggingface-hub", "pandas"]
    assert "transformers>=5.24 (found 5.17.0)" in missing and "pandas (found None)" in missing
    hub = next(m for m in missing if m.startswith("huggingface-hub"))  # transformers' own requirement on it
    assert hub.endswith("(found 0.30.0)") and ">=" in hub
    assert gpu_check.versions("4bit") == ["bitsandbytes>=0.48 (found None)"]
    assert "<- missing" in capsys.readouterr().out
    assert gpu_check.main(["--device", "cpu"]) == 2  # stops before anything else, saying how to install the wheels


def test_a_part_that_cannot_run_says_so_and_fails_the_check_unless_left_out(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(gpu_check, "part_full", lambda device, half, args: ran.append("full") or [])
    monkeypatch.setattr(gpu_check, "part_4bit", lambda device, half, args: ran.append("4bit") or [])
    real = gpu_check.versions
    monkeypatch.setattr(gpu_check, "versions", lambda part: ["bitsandbytes>=0.48 (found None)"] if part == "4bit" else real(part))
    assert gpu_check.main(["--device", "cpu"]) == 1 and ran == ["full"]
    out = capsys.readouterr().out
    assert "NOT RUN: 4bit: bitsandbytes>=0.48 (found None)" in out and "passed" not in out
    assert gpu_check.main(["--device", "cpu", "--part", "full"]) == 0 and ran == ["full", "full"]
    assert "all checks of part full passed" in capsys.readouterr().out


def test_the_parts_compare_ieee_fp32_and_leave_the_tf32_settings_as_they_were(monkeypatch):
    # On an Ampere or later GPU, PyTorch's default (cuDNN convolutions in TF32) would put 5e-4 errors into
    # the fp32 results of Mamba and linear-attention layers; these settings change nothing on a CPU
    seen, conv = [], torch.backends.cudnn.conv
    monkeypatch.setattr(gpu_check, "part_full", lambda device, half, args: seen.append(conv.fp32_precision) or [])
    settings = lambda: [torch.backends.fp32_precision, conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision]  # noqa: E731
    old, conv.fp32_precision = conv.fp32_precision, "tf32"  # PyTorch's default
    try:
        before = settings()
        assert gpu_check.main(["--device", "cpu", "--part", "full"]) == 0 and seen == ["ieee"]
        assert settings() == before and before[1] == "tf32"
    finally:
        conv.fp32_precision = old


def test_a_check_that_raises_is_one_failure_and_the_others_still_run(monkeypatch, capsys):
    def breaks_llama(model):
        if type(model).__name__.startswith("Llama"):
            raise RuntimeError("CUDA out of memory")

    failures = gpu_checks.check_correctness(CPU, {"fp32": torch.float32}, ["llama", "gpt2"], perturb=breaks_llama)
    out = capsys.readouterr().out
    assert failures == ["llama fp32: raised RuntimeError"] and "llama fp32: raised RuntimeError: CUDA out of memory  FAIL" in out
    assert re.search(r"gpt2 +fp32 .* ok", out)
    ran = []
    for module, name in [(gpu_checks, "check_correctness"), (gpu_checks, "check_sublayers"), (gpu_checks, "check_greedy"),
                         (gpu_checks, "check_budget"), (gpu_checks, "check_cost_twin"), (gpu_checks, "check_device_map"),
                         (gpu_nccl, "check"), (gpu_check, "check_pipeline"), (gpu_check, "part_figures")]:  # fmt: skip
        monkeypatch.setattr(module, name, lambda *args, name=name, **kwargs: ran.append(name) or [])
    monkeypatch.setattr(gpu_checks, "check_cost", lambda device: 1 / 0)
    assert gpu_check.main(["--device", "cpu", "--part", "full"]) == 1
    assert ran == ["check_correctness", "check_sublayers", "check_greedy", "check_budget", "check_cost_twin", "check_device_map",
                   "check", "check_pipeline", "part_figures"]  # fmt: skip
    assert "FAILED: cost: raised ZeroDivisionError" in capsys.readouterr().out


def test_a_check_on_trained_models_that_raises_on_one_architecture_is_one_failure(monkeypatch, capsys):
    monkeypatch.setattr(gpu_checks, "_greedy", lambda arch, *args: 1 / 0 if arch == "llama" else [])
    assert gpu_checks.check_greedy(CPU, torch.bfloat16, ["llama", "gpt2"]) == ["llama greedy bfloat16: raised ZeroDivisionError"]
    assert "llama greedy bfloat16: raised ZeroDivisionError: division by zero  FAIL" in capsys.readouterr().out


def test_every_part_runs_on_the_cpu_at_its_real_text_counts(capsys):
    assert gpu_check.main(["--device", "cpu", "--shape", "tiny", "--archs", "llama"]) == 0
    out = capsys.readouterr().out
    assert "all checks of part full, 4bit passed" in out and "FAIL" not in out and "NOT RUN" not in out
    assert f"scan of {gpu_check.FIGURES['texts']} texts x 64 tokens" in out  # the 7B shape's count of corpus texts
    assert f"MMLU 5-shot, {gpu_check.TINY_FIGURES['questions']} questions" in out  # synthetic: any number exists
    assert "heal (QLoRA, 4-bit base)" in out and "heal (LoRA)" in out
    assert "device_map='auto' over cpu + disk" in out and "skipped: a CPU run; NCCL needs two GPUs" in out
    for dtype in ("bfloat16", "4bit"):  # half precision in part full, 4-bit in part 4bit, each against fp32
        for what in ("sublayers", "greedy layers", "greedy attention", "budget point", "cost"):
            assert re.search(rf"^  llama +{what} +{dtype} .*  ok$", out, re.M), (what, dtype)
    # the checks of choices compare some: the trained models' margins are wider than the tolerances
    for what, choice in [("sublayers", "best blocks"), ("greedy layers", "order"), ("cost", "greedy tokens")]:
        agree, clear = re.search(rf"llama +{what} +bfloat16 .*{choice} (\d+)/(\d+)", out).groups()
        assert agree == clear != "0", (what, choice)
    agree, clear = re.search(r"llama +4bit +scan .* predictions (\d+)/(\d+)", out).groups()
    assert agree == clear != "0"


def test_every_correctness_check_fails_on_a_perturbed_model(capsys):
    every = "scan, loss, loglik, oracle"  # predictions fail too where a margin was wider than the tolerance
    failures = gpu_checks.check_correctness(CPU, {"fp32": torch.float32, "bfloat16": torch.bfloat16}, ["llama"], perturb=perturb)
    failures += gpu_checks.check_device_map(CPU, perturb=perturb) + gpu_check.check_4bit(CPU, ["llama"], perturb=perturb)
    assert [f.split(": ")[0] for f in failures] == ["llama fp32", "llama bfloat16", "llama dispatched", "llama 4bit"]
    # in 4-bit too, on a trained model: NF4's own error there (loss 5e-3, log-likelihoods 0.19 nats) is below what
    # the perturbed weight does (loss 0.13, log-likelihoods 1.7 nats); on a random model it hid the loss and
    # log-likelihoods' change (5.5e-4 and 0.13 nats against 1.2e-3)
    assert all(f.split(": ")[1].startswith(every) for f in failures), failures
    assert gpu_checks.check_cost(CPU, perturb=perturb) == ["cost"]
    assert "FAIL" in capsys.readouterr().out


def test_every_check_against_fp32_on_the_device_fails_on_a_perturbed_model(capsys):
    failures = []
    for dtype in (torch.bfloat16, "4bit"):
        for check in (gpu_checks.check_sublayers, gpu_checks.check_greedy, gpu_checks.check_budget):
            failures += check(CPU, dtype, ["llama"], perturb=perturb)
        failures += gpu_checks.check_cost_twin(CPU, dtype, perturb=perturb)
    found = dict(f.split(": ") for f in failures)
    for dtype in ("bfloat16", "4bit"):
        assert found.pop(f"llama sublayers {dtype}").startswith("scan, loss")
        assert found.pop(f"llama greedy layers {dtype}").startswith("greedy")
        assert found.pop(f"llama greedy attention {dtype}").startswith("greedy")
        assert found.pop(f"llama budget point {dtype}") == "loss"
        assert found.pop(f"llama cost {dtype}").startswith("logits")
    assert found == {} and "FAIL" in capsys.readouterr().out


def test_the_answers_are_single_tokens_so_the_predictions_can_differ():
    tokenizer = kit.testing.tiny_tokenizer()
    answers = gpu_checks.answer_strings(tokenizer)
    assert all(len(tokenizer(a)["input_ids"]) == 1 for a in answers) and len(set(answers)) == 4
    assert answers != (" A", " B", " C", " D")  # " B" is two tokens here: letters would always lose to " A"


def test_the_7b_shape_fits_the_gpu_and_texts_always_exist():
    t4, h200 = 15.6 * 2**30, 139.8 * 2**30
    assert gpu_check.fitted_shape(h200, 2)["num_hidden_layers"] == 32
    layers = gpu_check.fitted_shape(t4, 2)["num_hidden_layers"]
    per_layer = (4 * 4096**2 + 3 * 4096 * 11008) * 2
    assert 2 <= layers < 32 and 2 * 32000 * 4096 * 2 + layers * per_layer <= gpu_check.WEIGHT_SHARE * t4
    with pytest.raises(ValueError, match="use --shape tiny"):
        gpu_check.fitted_shape(2**30, 2)
    tokenizer = kit.testing.tiny_tokenizer()
    texts = gpu_check.long_texts(tokenizer, 2 * len(kit.loaders.data.corpus("train")), 16)  # more texts than corpus chunks
    assert all(len(tokenizer(t)["input_ids"]) >= 16 for t in texts)


def test_the_two_process_worker_runs_alone_and_its_comparison_can_fail(tmp_path, capsys):
    one = gpu_nccl.worker(tmp_path)
    assert one["world_size"] == 1 and (tmp_path / "world1.json").exists()
    assert gpu_nccl.compare(one, {**one, "world_size": 2}) == []
    assert gpu_nccl.compare(one, {**one, "world_size": 2, "loss": one["loss"] * 1.001}) == ["two processes on NCCL"]


def test_the_two_process_run_under_torchrun_equals_one_process_on_gloo(tmp_path, monkeypatch, capsys):
    """The GPU check's launcher path itself, on CPU processes: gloo where the GPU machine has NCCL."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU processes also on a GPU machine (_launch drops KIT_DEVICE)
    one, two = gpu_nccl._launch(tmp_path, 1), gpu_nccl._launch(tmp_path, 2)
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["backend"] == "gloo"
    assert gpu_nccl.compare(one, two) == [], capsys.readouterr().out


DEVICE_ARGUMENT = {"synchronize", "reset_peak_memory_stats", "max_memory_allocated", "memory_allocated", "memory_reserved",
                   "max_memory_reserved", "memory_stats", "mem_get_info", "get_device_properties", "get_device_name",
                   "get_device_capability", "reset_max_memory_allocated"}  # fmt: skip


def test_no_cuda_call_of_the_gpu_check_falls_back_on_the_current_gpu():
    """With --device cuda:1 a torch.cuda call without its device would read or time cuda:0 (the current GPU, or
    whichever a library made current): every one that takes a device is given it, and none sets or reads the current."""
    bare = []
    for path in sorted(Path(gpu_check.__file__).parent.glob("gpu_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name, owner = node.func.attr, ast.unparse(node.func.value)
                if owner == "torch.cuda" and (
                    name in ("current_device", "set_device") or name in DEVICE_ARGUMENT and not node.args
                ):
                    bare.append(f"{path.name}:{node.lineno} torch.cuda.{name}")
                if name == "cuda" and not node.args:
                    bare.append(f"{path.name}:{node.lineno} .cuda()")
    assert bare == []


def test_the_figures_and_healing_on_a_second_gpu_measure_it_and_run_where_the_trainer_can(monkeypatch):
    gpu, seen = torch.device("cuda", 1), []
    for name in ("synchronize", "reset_peak_memory_stats", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, name=name: seen.append((name, device)) or 0)
    assert gpu_check.timed(lambda: "done", gpu)[0] == "done"
    assert {name for name, _ in seen} == {"synchronize", "reset_peak_memory_stats", "max_memory_allocated"}
    assert {device for _, device in seen} == {gpu}
    # the HF Trainer trains on cuda:0 without a launcher (kit.heal refuses a model on cuda:1, advising
    # CUDA_VISIBLE_DEVICES): healing, and the figures' LoRA, run in a process that sees GPU 1 alone
    runs = []
    monkeypatch.setattr(
        gpu_check.subprocess,
        "run",
        lambda command, env, cwd: runs.append((command, env)) or subprocess.CompletedProcess(command, 3),
    )
    assert gpu_check.check_pipeline(gpu, quantize="4bit") == ["check_pipeline in its own process on cuda:1: exited with 3"]
    assert gpu_check.part_figures(gpu, torch.bfloat16, "7b") == ["part_figures in its own process on cuda:1: exited with 3"]
    assert [(command[-3:], env["CUDA_VISIBLE_DEVICES"]) for command, env in runs] == [
        (["check_pipeline", "cuda:0", '["4bit"]'], "1"),
        (["part_figures", "cuda:0", '[{"dtype": "bfloat16"}, "7b"]'], "1"),
    ]


def reports(device, *args):
    """What tests/test_gpu_check.py runs in a process of its own: a line, and failures naming its arguments."""
    print(f"in its own process on {device}", flush=True)
    return [f"{device} {args!r}"]


def test_a_check_in_its_own_process_prints_in_line_and_returns_its_failures(capfd):
    print("before", flush=True)
    assert gpu_check.in_own_process(CPU, "tests.test_gpu_check:reports", "4bit", torch.bfloat16) == [
        "cpu ('4bit', torch.bfloat16)"
    ]
    assert capfd.readouterr().out.splitlines()[-2:] == ["before", "in its own process on cpu"]
