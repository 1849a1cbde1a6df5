"""Shared fixtures: tiny models, the embedded model, hand-written MMLU questions, a prompt past the
tiny sliding windows, model snapshots, and notebooks executed once per session through papermill."""

import ast
import hashlib
import json
import math
import os
import re
from pathlib import Path

# Tests never reach the model or dataset Hub (set before transformers is imported; kernels inherit it).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Tests compare against CPU fp32 references, on a GPU machine too; `make gpu-check` covers the GPU paths.
os.environ["KIT_DEVICE"] = "cpu"
# One thread per process (kernels inherit it): the tests' models are tiny, and two threads that spin-wait for
# each other run ten times slower whenever another process takes a core (tests/test_oracle.py and
# tests/test_prune.py: 204 CPU s on two threads beside another job, 20 on one). A value set by the user stands.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import kit  # noqa: E402
from kit.experiments.reports import NOTEBOOKS, execute  # noqa: E402
from kit.loaders.data import MMLUQuestion  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Smoke parameters: each notebook small enough for a 2-core CPU, on the embedded model.
SMOKE_PARAMETERS = {
    "01_similarity": {"N_TEXTS": 16, "BATCH_SIZE": 8, "MAX_LENGTH": 64},
    "02_select_and_prune": {"N": 4, "N_VAL_TEXTS": 4, "MAX_LENGTH": 64, "BATCH_SIZE": 4},
    "03_heal": {"STEPS": 2, "BATCH_SIZE": 2, "SEQ_LEN": 32, "RANK": 2, "LR": 1e-2, "N_TRAIN_TEXTS": 4,
                "N_VAL_TEXTS": 2, "EVAL_EVERY": 1},
    "04_compare": {"RECALL_ITEMS": 6, "RECALL_FACTS": 3, "MMLU_SUBJECTS": 2, "MMLU_PER_SUBJECT": 2, "SHOTS": 1,
                   "SWEEP_MMLU": True, "N_VAL_TEXTS": 4, "MAX_LENGTH": 64, "SWEEP_STEP": 10,
                   "BOOLQ": str(REPO / "tests" / "fixtures" / "boolq.jsonl"), "N_BOOLQ": 4,
                   "HEAL_NS": [10], "HEAL_STEPS": 2, "HEAL_BATCH_SIZE": 2, "HEAL_SEQ_LEN": 32, "N_HEAL_TEXTS": 4,
                   "COST_PROMPT_TOKENS": 8, "COST_NEW_TOKENS": 3, "COST_REPEATS": 1},
    "05_criteria": {"N_CALIBRATION": 2, "N_HELD_OUT": 2, "MAX_LENGTH": 16, "BATCH_SIZE": 2, "NS": [26, 28],
                    "METRICS": ["angular_last", "block_influence"], "SCATTER_NS": [26]},
    "06_granularity": {"N_CALIBRATION": 2, "N_HELD_OUT": 2, "MAX_LENGTH": 16, "BATCH_SIZE": 2, "BUDGETS": [0.02, 0.03],
                       "RECALL_ITEMS": 4, "RECALL_FACTS": 3, "MMLU_SUBJECTS": 1, "MMLU_PER_SUBJECT": 2, "SHOTS": 1, "SWEEP_MMLU": True,
                       "COST_PROMPT_TOKENS": 8, "COST_NEW_TOKENS": 3, "COST_REPEATS": 1},
}

# Short hand-written MMLU questions with small few-shot pools: fast on the tiny models.
POOL = {
    "high_school_biology": [
        MMLUQuestion("high_school_biology", "Which organelle makes ATP?", ("Ribosome", "Mitochondrion", "Golgi", "Vacuole"), 1),
        MMLUQuestion("high_school_biology", " DNA is made of? ", ("amino acids", "lipids", "nucleotides", "sugars"), 2),
        MMLUQuestion("high_school_biology", "Plants take in", ("CO2", "O3", "N2O", "He"), 0),
    ],
    "astronomy": [
        MMLUQuestion("astronomy", "The Sun is a", ("planet", "moon", "comet", "star"), 3),
        MMLUQuestion("astronomy", "Closest planet to the Sun?", ("Mercury", "Venus", "Mars", "Earth"), 0),
        MMLUQuestion("astronomy", "Saturn has", ("no moons", "rings", "oceans", "a crust of ice"), 1),
    ],
}
QUESTIONS = (
    MMLUQuestion("astronomy", "Which planet is red?", ("Venus", "Mars", "Jupiter", "Neptune"), 1),
    MMLUQuestion("high_school_biology", "Blood cells that fight infection", ("red", "white", "platelets", "plasma"), 1),
    MMLUQuestion("astronomy", "A light-year measures", ("time", "distance", "speed", "mass"), 1),
    MMLUQuestion("high_school_biology", "Genes sit on", ("chromosomes", "membranes", "ribosomes", "cell walls"), 0),
    MMLUQuestion("astronomy", "The Moon orbits", ("Mars", "the Sun only", "the Earth", "Venus"), 2),
)
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 6  # longer than the tiny sliding windows (32)


@pytest.fixture(params=kit.TINY_ARCHITECTURES)
def tiny(request):
    """(model, tokenizer) of every tiny architecture, one test per architecture."""
    return kit.tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M (model, tokenizer), loaded once per session. Tests must leave it as
    they found it (drop_layers copies, dropped restores); cast or quantize a load of your own."""
    return kit.load_model("smollm2-135m")


@pytest.fixture
def questions() -> list[MMLUQuestion]:
    """Five hand-written MMLU questions over two subjects."""
    return list(QUESTIONS)


@pytest.fixture(scope="session")
def fewshot():
    """The few-shot pool of each subject of `questions` (three questions), as mmlu's `fewshot=` takes it."""
    return lambda subject: list(POOL[subject])


@pytest.fixture(scope="session")
def long_prompt():
    """ids(tokenizer): a prompt longer than the tiny models' sliding windows (32), as a batch of one."""
    return lambda tokenizer: tokenizer([LONG_PROMPT], return_tensors="pt").input_ids


@pytest.fixture(scope="session")
def snapshot():
    """snapshot(model): everything pruning or a sweep may touch, comparable with ==: the config, the
    decoder-layer list object, every module's layer_idx, and a digest of every weight."""

    def take(model):
        indices = [(name, m.layer_idx) for name, m in model.named_modules() if isinstance(getattr(m, "layer_idx", None), int)]
        weights = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            weights.update(name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return model.config.to_dict(), id(kit.core.layers.decoder_layers(model)), indices, weights.hexdigest()

    return take


def printed(notebook: Path) -> str:
    """Everything an executed notebook's cells printed (stdout, stderr, warnings)."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    return "".join("".join(out.get("text", "")) for cell in cells for out in cell.get("outputs", []))


def _chain(runs_root: Path, parameters: dict):
    """run(name) executes notebooks 01..name in order (each once) with `parameters` into one run folder."""
    executed = set()

    def run(name: str) -> Path:
        for earlier in NOTEBOOKS[: NOTEBOOKS.index(name) + 1]:
            if earlier not in executed:
                execute(earlier, output_dir=runs_root, parameters={**parameters[earlier], "RUN": "smoke", "RUNS_ROOT": str(runs_root)})
                executed.add(earlier)
        return runs_root / "smoke"

    return run


@pytest.fixture(scope="session")
def notebook_run(tmp_path_factory):
    """run(name) executes notebooks 01..name in order (each once per session) with smoke
    parameters into one run folder, and returns that folder."""
    return _chain(tmp_path_factory.mktemp("runs"), SMOKE_PARAMETERS)


# A second run of every notebook, on a tiny random model with other settings and seeds: other outcomes (recall
# at chance, MMLU not swept by default, no healed blocks in the sweep) for a few seconds of work per notebook.
# The model is a tiny Granite 4 (granitemoehybrid), both an MoE and a hybrid: Mamba 2 and attention layers
# alternate, and every layer's MLP routes over fused experts beside a shared MLP (tests/test_notebook_families.py
# checks its artifacts). Two healing steps: the first one's learning rate is 0 in warmup.
TINY_ARCHITECTURE, TINY_LAYERS = "granitemoehybrid", 8
TINY_PARAMETERS = {
    "01_similarity": {"N_TEXTS": 4, "BATCH_SIZE": 4, "MAX_LENGTH": 32, "SEED": 1},
    "02_select_and_prune": {"N": 2, "N_VAL_TEXTS": 2, "MAX_LENGTH": 32, "BATCH_SIZE": 2, "SEED": 1},
    "03_heal": {"STEPS": 2, "BATCH_SIZE": 2, "SEQ_LEN": 16, "RANK": 2, "N_TRAIN_TEXTS": 2, "N_VAL_TEXTS": 2, "EVAL_EVERY": 2,
                "QUANTIZE": None, "SEED": 1},
    "04_compare": {"RECALL_ITEMS": 6, "RECALL_FACTS": 2, "MMLU_SUBJECTS": 1, "MMLU_PER_SUBJECT": 3, "SHOTS": 1, "N_VAL_TEXTS": 2,
                   "MAX_LENGTH": 32, "SWEEP_STEP": 3, "HEAL_NS": [], "COST_PROMPT_TOKENS": 4, "COST_NEW_TOKENS": 2, "COST_REPEATS": 1, "SEED": 1},
    "05_criteria": {"N_CALIBRATION": 2, "N_HELD_OUT": 2, "MAX_LENGTH": 16, "BATCH_SIZE": 2, "NS": [2, 4], "METRICS": ["angular_last"],
                    "SCATTER_NS": [2], "SEED": 1},
    "06_granularity": {"N_CALIBRATION": 2, "N_HELD_OUT": 2, "MAX_LENGTH": 16, "BATCH_SIZE": 2, "BUDGETS": [0.1, 0.25], "RECALL_ITEMS": 4,
                       "RECALL_FACTS": 2, "MMLU_SUBJECTS": 1, "MMLU_PER_SUBJECT": 3, "SHOTS": 1, "COST_PROMPT_TOKENS": 4,
                       "COST_NEW_TOKENS": 2, "COST_REPEATS": 1, "SEED": 1},
}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> Path:
    """The tiny model of the second run (TINY_ARCHITECTURE, TINY_LAYERS layers), saved as a local checkpoint."""
    folder = tmp_path_factory.mktemp("tiny") / f"tiny-{TINY_ARCHITECTURE}"
    model, tokenizer = kit.tiny_model(TINY_ARCHITECTURE, num_layers=TINY_LAYERS)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_notebook_run(tmp_path_factory, tiny_model_folder):
    """Like notebook_run, on the tiny model passed as MODEL, with TINY_PARAMETERS."""
    model = {"MODEL": str(tiny_model_folder)}
    parameters = {name: {**TINY_PARAMETERS[name], **(model if name in ("01_similarity", "05_criteria", "06_granularity") else {})} for name in NOTEBOOKS}
    return _chain(tmp_path_factory.mktemp("runs"), parameters)


NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?!\w)")
RULE_CONSTANTS = {"0", "1.96", "95"}  # "excludes 0", "1.96 standard errors", "95% interval": the rules, not results


def reading_numbers(markdown: str) -> list[str]:
    """Every number a reading states, outside `code spans` (model and criterion names)."""
    return NUMBER.findall(re.sub(r"`[^`]*`", "", markdown))


def _numbers(value):
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, str) and value.startswith("{"):
        yield from _numbers(ast.literal_eval(value))  # a dict written into a CSV cell (choices.csv's stability)


def artifact_numbers(run: Path, derived=()) -> set[str]:
    """Every way a reading may print a number of the run's CSV and JSON artifacts (or of `derived`,
    values the test computed from them): 3, 2 or 1 decimals, signed, as a percentage, in millions or
    billions, or an integer; plus the rules' own constants."""
    values = [*derived]
    for path in run.glob("*.csv"):
        values += [v for column in pd.read_csv(path).itertuples(index=False) for cell in column for v in _numbers(cell)]
    for path in run.glob("*.json"):
        values += list(_numbers(json.loads(path.read_text())))
    shown = set(RULE_CONSTANTS)
    for v in values:
        if math.isfinite(v):
            shown |= {f"{v:.3f}", f"{v:.2f}", f"{v:.1f}", f"{v:+.3f}", f"{100 * v:.0f}", f"{v / 1e6:.2f}", f"{v / 1e9:.2f}"}
            shown |= {f"{v:g}"} if v == int(v) else set()
    return shown


def assert_redrawn(figure: Path, ax, tmp_path: Path) -> None:
    """The notebook's saved figure equals, byte for byte, the same kit function's drawing of the run's
    saved table (matplotlib's Agg rendering is deterministic): it drew what the artifacts hold."""
    import matplotlib.pyplot as plt

    redrawn = kit.experiments.plots.save(ax, tmp_path / figure.name).read_bytes()
    plt.close("all")
    assert redrawn == figure.read_bytes(), f"{figure.name} is not the drawing of the run's artifacts"
