"""bench.measure's interleaving and the ratio it prints with its spread, and `make bench`'s pin to the CPU
(no model runs)."""

import os
import pkgutil

import pytest
import torch

from bench import __main__ as bench_main
from bench.measure import interleaved, ratios, spread
from kit.core import device


def test_interleaved_calls_each_run_once_per_repeat_in_turn():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    measured = interleaved(runs, 3, measure=lambda fn: (fn(), len(calls))[1])
    assert calls == ["a", "b", "c"] * 3
    assert measured == {"a": [1, 4, 7], "b": [2, 5, 8], "c": [3, 6, 9]}


def test_ratios_are_per_repeat():
    assert ratios([2.0, 3.0, 8.0], [1.0, 2.0, 4.0]) == [2.0, 1.5, 2.0]
    with pytest.raises(ValueError):
        ratios([1.0, 2.0], [1.0])


def test_spread_prints_median_min_and_max():
    assert spread([1.07, 1.02, 1.04]) == "1.04 (1.02-1.07 over 3 repeats)"
    assert spread([0.5, 0.25, 0.75, 1.0], digits=3) == "0.625 (0.250-1.000 over 4 repeats)"


def test_make_bench_runs_on_the_cpu_on_a_machine_with_a_gpu(monkeypatch):
    # Mocked GPU (none here). On a GPU machine the kit's policy put the models on the GPU while the benchmarks
    # timed CPU seconds and resident memory: ratios of nothing. Only the setup runs: no benchmark module is found.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("KIT_DEVICE", "cuda")  # even where the user's shell pins a GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(pkgutil, "iter_modules", lambda path: [])
    bench_main.main()
    assert device.resolve_device("auto") == torch.device("cpu") and device.resolve_dtype("auto") == torch.float32
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # the HF Trainer of bench_heal's baseline, and torchrun's processes
