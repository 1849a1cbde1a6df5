"""Fault injection: each workload is SIGKILLed at seeded random moments of its run, then rerun to the end.
After every kill whatever lies under a final name is complete; after the rerun no temporary is left
and the result is bit-identical to an uninterrupted run's."""

import json
import os
import random
import shutil
import time
from pathlib import Path

import faults
import pandas as pd
import pytest
from faults import debris, run
from safetensors import safe_open
from safetensors.torch import load_file

import kit

KILLS = 3  # kill points per workload
TINY = "model, tokenizer = kit.tiny_model('llama')\ntexts = kit.data.corpus('validation')[:12]\n"


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
distances = kit.angular_distances(model, tokenizer, texts, batch_size=1, max_length=48, cache_path=out / "scan.cache")
distances.save(out / "distances.safetensors")
"""

HEAL = TINY + """
config = kit.HealConfig(rank=2, lr=1e-2, steps=6, batch_size=2, seq_len=32, quantize=None, save_every=1)
kit.heal(model, tokenizer, kit.data.corpus("train")[:8], config, output_dir=out / "heal")
"""

SWEEP = TINY + """
evals = [kit.metrics.loss_metrics(texts, max_length=48, batch_size=4)]
table = kit.sweep.sweep(model, tokenizer, ns=range(6), evals=evals, strategy="heuristic", cache_path=out / "sweep.json")
kit.artifacts.write_text(out / "sweep.csv", table.to_csv(index=False))
"""

SAVE_PRUNED = TINY + """
for n in (1, 2, 3, 2):  # replacing the folder each time
    kit.save_pruned(kit.drop_layers(model, kit.Block(1, n)), tokenizer, out / "pruned")
"""

MERGE = """
for _ in range(3):
    kit.merge_adapter("{base}", "{adapter}", out / "merged")
"""

NOTEBOOK = """
parameters = dict(MODEL="{deep}", N_TEXTS=12, BATCH_SIZE=2, MAX_LENGTH=32, RUN="r", RUNS_ROOT=str(out / "runs"))
kit.reports.execute("01_similarity", output_dir=out / "executed", parameters=parameters)
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
    assert table is None or sorted(set(pd.read_csv(out / "sweep.csv")["n"])) == list(range(6))
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
    model, tokenizer = kit.tiny_model("llama")
    kit.save_pruned(model, tokenizer, folder / "model")
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=kit.layers.mlp_modules(model), init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(folder / "adapter")
    kit.save_pruned(*kit.tiny_model("llama", num_layers=8), folder / "deep")  # notebook 01 shows n = L // 8 >= 1
    return folder


WORKLOADS = {
    "scan": (SCAN, _scan),
    "heal": (HEAL, _heal),
    "sweep": (SWEEP, _sweep),
    "save_pruned": (SAVE_PRUNED, _save_pruned),
    "merge_adapter": (MERGE, _merge),
    "notebook_01": (NOTEBOOK, _notebook),
}


@pytest.mark.parametrize("name", WORKLOADS)
def test_a_killed_workload_leaves_no_partial_artifact_and_reruns_to_the_same_result(name, base, tmp_path):
    source, result = WORKLOADS[name]
    source = source.format(base=base / "model", adapter=base / "adapter", deep=base / "deep")
    duration = run(source, tmp_path / "uninterrupted")
    expected = result(tmp_path / "uninterrupted")
    assert expected is not None and debris(tmp_path / "uninterrupted") == []
    out, rng = tmp_path / "killed", random.Random(f"issue-14 {name}")
    killed = []
    for _ in range(KILLS):
        at = rng.uniform(0, duration)
        finished = run(source, out, kill_after=at) is not None
        result(out)  # what is there under a final name is whole (a torn file fails to load)
        if finished:  # faster than the measured run: start the next one afresh, not from a finished result
            shutil.rmtree(out)
        else:
            killed.append(round(at, 2))
    print(f"{name}: {duration:.2f} s uninterrupted, killed at {killed} s")
    assert killed, "no kill landed before the workload ended"
    run(source, out)
    assert debris(out) == []
    assert result(out) == expected


def test_a_workload_that_ends_between_the_wait_and_the_kill_counts_as_finished(monkeypatch):
    """The race CI once hit: the wait times out, the workload then ends by itself (the fork server reaps
    it), and only then does the kill come: the run counts as finished, not as an error."""
    kill_tree = faults._kill_tree

    def kill_once_it_has_ended(pid):
        while os.path.exists(f"/proc/{pid}"):
            time.sleep(0.01)
        kill_tree(pid)

    monkeypatch.setattr(faults, "_kill_tree", kill_once_it_has_ended)
    assert run("import time\ntime.sleep(0.3)\n", Path("unused"), kill_after=0.01) >= 0.3
