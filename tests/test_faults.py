"""Fault injection: each workload is SIGKILLed just before each of its write points (tests/faults.py),
and once at a random moment, then rerun to the end. After every kill whatever lies under a final name
is complete; after the rerun no temporary is left and the result is bit-identical to an uninterrupted
run's. Crash points are writes, not moments: a loaded machine cannot make a kill miss."""

import json
import os
import random
import shutil
import time
from pathlib import Path

import faults
import pandas as pd
import pytest
from faults import debris, point, run, timed_kill, write_points
from safetensors import safe_open
from safetensors.torch import load_file

import kit

TINY = "model, tokenizer = kit.testing.tiny_model('llama')\ntexts = kit.loaders.data.corpus('validation')[:12]\n"


def _tensors(path: Path) -> bytes:
    """Every tensor of a safetensors file, as bytes (bit-identical comparison); fails on a torn file."""
    tensors = load_file(path)
    return b"".join(name.encode() + tensors[name].numpy().tobytes() for name in sorted(tensors))


def _checkpoint(folder: Path, layers: int) -> bytes:
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == layers
    assert (folder / "tokenizer_config.json").exists()
    return _tensors(folder / "model.safetensors")


def _if_there(path: Path, read):
    return read(path) if path.exists() else None


SCAN = TINY + """
distances = kit.angular_distances(model, tokenizer, texts, batch_size=4, max_length=48, cache_path=out / "scan.cache")
distances.save(out / "distances.safetensors")
"""

HEAL = TINY + """
config = kit.HealConfig(rank=2, lr=1e-2, steps=3, batch_size=2, seq_len=32, quantize=None, save_every=1)
kit.heal(model, tokenizer, kit.loaders.data.corpus("train")[:8], config, output_dir=out / "heal")
"""

SWEEP = TINY + """
evals = [kit.evaluate.metrics.ValidationLoss(texts, max_length=48, batch_size=4)]
table = kit.experiments.sweep.sweep(model, tokenizer, ns=range(3), evals=evals, criterion="heuristic", cache_path=out / "sweep.json")
kit.core.artifacts.write_text(out / "sweep.csv", table.to_csv(index=False))
"""

SAVE_PRUNED = TINY + """
for n in (1, 2):  # the second replaces the folder
    kit.save_pruned(kit.drop_layers(model, kit.Block(1, n)), tokenizer, out / "pruned")
"""

MERGE = """
for _ in range(2):  # the second replaces the folder
    kit.merge_adapter("{base}", "{adapter}", out / "merged")
"""

NOTEBOOK = """
import faults
parameters = dict(MODEL="{deep}", N_TEXTS=8, BATCH_SIZE=4, MAX_LENGTH=32, RUN="r", RUNS_ROOT=str(out / "runs"))
faults.run_notebook(kit.experiments.reports.find_notebooks() / "01_similarity.ipynb", parameters)
"""


def _scan(out):
    _if_there(out / "scan.cache", lambda p: int(safe_open(p, framework="pt").metadata()["batches"]))
    return _if_there(out / "distances.safetensors", lambda p: kit.Distances.load(p).matrix.numpy().tobytes())


def _heal(out):
    _if_there(out / "heal" / "heal_config.json", lambda p: json.loads(p.read_text()))
    return _if_there(out / "heal" / "adapter", lambda p: _tensors(p / "adapter_model.safetensors"))


def _sweep(out):
    _if_there(out / "sweep.json", lambda p: json.loads(p.read_text()))
    table = _if_there(out / "sweep.csv", lambda p: p.read_text())
    assert table is None or sorted(set(pd.read_csv(out / "sweep.csv")["n"])) == list(range(3))
    return table


def _save_pruned(out):
    return _if_there(out / "pruned", lambda p: _checkpoint(p, json.loads((p / "config.json").read_text())["num_hidden_layers"]))


def _merge(out):
    return _if_there(out / "merged", lambda p: _checkpoint(p, 6))


def _notebook(out):
    run_dir = out / "runs" / "r"
    _if_there(run_dir / "manifest.json", lambda p: json.loads(p.read_text()))
    return _if_there(run_dir / "distances.safetensors", lambda p: kit.Distances.load(p).matrix.numpy().tobytes())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny checkpoint, a LoRA adapter with random factors for it, and a tiny 8-layer checkpoint."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("base")
    model, tokenizer = kit.testing.tiny_model("llama")
    kit.save_pruned(model, tokenizer, folder / "model")
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=kit.core.layers.mlp_modules(model), init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(folder / "adapter")
    kit.save_pruned(*kit.testing.tiny_model("llama", num_layers=8), folder / "deep")  # notebook 01 shows n = L // 8 >= 1
    return folder


WORKLOADS = {  # name: (source, result, the folder whose writes are crash points)
    "scan": (SCAN, _scan, "."),
    "heal": (HEAL, _heal, "."),
    "sweep": (SWEEP, _sweep, "."),
    "save_pruned": (SAVE_PRUNED, _save_pruned, "."),
    "merge_adapter": (MERGE, _merge, "."),
    "notebook_01": (NOTEBOOK, _notebook, "runs"),
}


@pytest.mark.parametrize("name", WORKLOADS)
def test_a_workload_killed_before_each_write_point_leaves_no_partial_artifact_and_reruns_to_the_same_result(name, base, tmp_path):
    """Killed before each of its write points in turn, each run resuming from what the killed one left (as
    a user reruns a crashed notebook), then once at a random moment: what lies under a final name is always
    whole, and the run that finishes leaves no temporary and the uninterrupted run's result. A resumed run
    that finishes without reaching its write point is checked alike, and the chain starts afresh."""
    source, result, watched = WORKLOADS[name]
    source = source.format(base=base / "model", adapter=base / "adapter", deep=base / "deep")
    clean = tmp_path / "uninterrupted"
    began = time.monotonic()
    finished, writes = run(source, clean, watch=clean / watched)
    duration = time.monotonic() - began
    expected = result(clean)
    assert finished and expected is not None and debris(clean) == []

    def finished_as_expected(out: Path) -> None:
        assert debris(out) == [] and result(out) == expected

    chains, runs = [tmp_path / "chain-0"], 1
    for target in write_points(writes):
        for fresh in (False, True):
            runs += 1
            finished, reached = run(source, chains[-1], crash_before=target, watch=chains[-1] / watched)
            result(chains[-1])  # what lies under a final name is whole (a torn file fails to load)
            if not finished:
                assert point(reached[-1]) == target
                break
            assert not fresh, f"a fresh run did not reach the write point {target!r}"
            finished_as_expected(chains[-1])  # resumed from there, it had no more to write at that point
            chains.append(tmp_path / f"chain-{len(chains)}")
    assert run(source, chains[-1])[0]
    finished_as_expected(chains[-1])

    at = timed_kill(source, tmp_path / "timed", within=duration, rng=random.Random(name))
    result(tmp_path / "timed")
    assert run(source, tmp_path / "timed")[0]
    finished_as_expected(tmp_path / "timed")
    print(f"{name}: {len(writes)} writes at {len(write_points(writes))} write points, killed before each in {runs} runs "
          f"({len(chains)} chains); {duration:.2f} s uninterrupted, a timed kill at {at:.2f} s")  # fmt: skip


def test_a_crash_point_stops_the_run_just_before_that_write(tmp_path):
    """Killed before a write point, a run has made the writes before it and none after; an existing
    folder made again is no write."""
    workload = """
    for name in "abc":
        (out / name).write_text("x")
        out.mkdir(exist_ok=True)
    """
    out = tmp_path / "out"
    out.mkdir()
    finished, writes = run(workload, out)
    assert finished and writes == [f"open\t{name}" for name in "abc"] and write_points(writes) == writes
    for k, target in enumerate(writes):
        shutil.rmtree(out), out.mkdir()
        assert run(workload, out, crash_before=target) == (False, writes[: k + 1])
        assert sorted(p.name for p in out.iterdir()) == list("abc"[:k])


def test_write_points_leave_out_numbers_and_the_random_part_of_temporaries():
    steps = [f"open\tcheckpoint-{step}/optimizer.pt" for step in (1, 2, 3)]
    temporaries = ["open\t.cache.tmp-12-ab3c", "os.rename\t.cache.tmp-12-ab3c", "open\t.cache.tmp-13-x9", "os.rename\t.cache.tmp-13-x9"]
    assert write_points(steps) == ["open\tcheckpoint-N/optimizer.pt"]
    assert write_points(temporaries) == ["open\t.cache.tmp-*", "os.rename\t.cache.tmp-*"]
    assert write_points(["open\ta", "open\tb"] * 3) == ["open\ta", "open\tb"]


def test_a_workload_that_ends_between_the_wait_and_the_kill_counts_as_finished(monkeypatch):
    """The race CI once hit: the wait times out, the workload then ends by itself (the fork server reaps
    it), and only then does the kill come: the run counts as finished, not as an error."""
    kill_tree = faults.kill_tree

    def kill_once_it_has_ended(pid):
        while os.path.exists(f"/proc/{pid}"):
            time.sleep(0.01)
        kill_tree(pid)

    monkeypatch.setattr(faults, "kill_tree", kill_once_it_has_ended)
    assert run("import time\ntime.sleep(0.3)\n", Path("unused"), kill_after=0.01)[0]
