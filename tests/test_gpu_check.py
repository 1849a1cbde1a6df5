"""`make gpu-check` runs where no test runs (a GPU machine, offline): its code runs here on the CPU
so that it works the first time it gets a GPU."""

import torch

from bench import gpu_check


def test_versions_are_met_here_and_a_missing_package_is_named(monkeypatch, capsys):
    assert gpu_check.versions() == []
    real = gpu_check.importlib.metadata.version
    monkeypatch.setattr(gpu_check.importlib.metadata, "version", lambda name: "5.17.0" if name == "transformers" else real(name))
    assert gpu_check.versions() == ["transformers>=5.24 (found 5.17.0)"]
    assert "transformers   5.17.0         needs >=5.24  <- missing" in capsys.readouterr().out
    assert gpu_check.main(["--device", "cpu"]) == 2  # stops before anything else, saying how to bring wheels


def test_correctness_pipeline_and_figures_run_on_the_cpu(capsys):
    cpu = torch.device("cpu")
    assert gpu_check.check_correctness(cpu, torch.bfloat16, archs=("llama", "gemma3")) == []
    assert gpu_check.check_pipeline(cpu) == []
    gpu_check.figures(cpu, torch.float32, gpu_check.SMALL, texts=1, questions=2, heal_steps=2, length=64)
    out = capsys.readouterr().out
    assert "predictions agree 20/20  ok" in out and "FAIL" not in out
    assert "full MMLU 5-shot (14,042 questions) per sweep point" in out
