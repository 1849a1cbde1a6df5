"""Shared fixtures: tiny models, the embedded model, hand-written MMLU questions, a prompt past the
tiny sliding windows, model snapshots, and notebooks executed once per session through papermill; and the
builders test modules share (they never import one another): reading numbers, a run of notebook 04 by hand."""

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

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import kit  # noqa: E402
from kit.core.stats import Estimate, wilson  # noqa: E402
from kit.experiments import curves, results  # noqa: E402
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
    "07_heal_compare": {"NS": [2, 4], "N_TEXTS": 4, "N_VAL_TEXTS": 2, "MAX_LENGTH": 16, "STEPS": 1, "RECALL_ITEMS": 2, "RECALL_FACTS": 2},
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


@pytest.fixture(params=kit.testing.TINY_ARCHITECTURES)
def tiny(request):
    """(model, tokenizer) of every tiny architecture, one test per architecture."""
    return kit.testing.tiny_model(request.param)


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
    "07_heal_compare": {"NS": [2, 4], "N_TEXTS": 4, "N_VAL_TEXTS": 2, "MAX_LENGTH": 16, "STEPS": 1, "RECALL_ITEMS": 2, "RECALL_FACTS": 2,
                        "SEED": 1},
}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> Path:
    """The tiny model of the second run (TINY_ARCHITECTURE, TINY_LAYERS layers), saved as a local checkpoint."""
    folder = tmp_path_factory.mktemp("tiny") / f"tiny-{TINY_ARCHITECTURE}"
    model, tokenizer = kit.testing.tiny_model(TINY_ARCHITECTURE, num_layers=TINY_LAYERS)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_notebook_run(tmp_path_factory, tiny_model_folder):
    """Like notebook_run, on the tiny model passed as MODEL, with TINY_PARAMETERS."""
    model = {"MODEL": str(tiny_model_folder)}
    parameters = {name: {**TINY_PARAMETERS[name], **(model if name in ("01_similarity", "05_criteria", "06_granularity", "07_heal_compare") else {})} for name in NOTEBOOKS}
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


# A run of notebook 04 built by hand (tests/test_readings.py, tests/test_old_runs.py): per-n recall counts of 40
# questions and losses over 20 texts, for a model of COMPARE_LAYERS layers.
COMPARE_LAYERS = 10


def outcomes(right: int, total: int = 40) -> str:
    return "R" * right + "W" * (total - right)


def accuracy_rows(criterion: str, rights: dict[int, int], *, metric="recall", chance=1 / 6, healed=False) -> list[dict]:
    rows = []
    for n, right in rights.items():
        value = right / 40
        low, high = wilson(right, 40)
        rows.append({"n": n, "fraction": n / COMPARE_LAYERS, "criterion": criterion, "healed": healed, "metric": metric, "value": value,
                     "ci_low": low, "ci_high": high, "chance": chance, "outcomes": outcomes(right)})  # fmt: skip
    return rows


SPREAD = np.array([0.03, -0.03, 0.0, 0.0] * 5)  # per-text deviations, opposite for the two criteria


def per_text(loss: float, sign: int, *, tokens: int = 10) -> str:
    """20 texts of `tokens` tokens whose token-weighted mean loss is `loss` (paired differences between
    the criteria spread by 2 x SPREAD around the difference of the means: +-0.017 for the mean of 20)."""
    return results.encode_per_text(np.stack([(loss + sign * SPREAD) * tokens, np.full(20, tokens)], 1))


def loss_rows(criterion: str, losses: dict[int, float], *, half=0.01, healed=False) -> list[dict]:
    sign = (1 if criterion == "similarity" else -1) * (-1 if healed else 1)
    return [{"n": n, "fraction": n / COMPARE_LAYERS, "criterion": criterion, "healed": healed, "metric": "val_loss_norm", "value": v,
             "ci_low": v - half, "ci_high": v + half, "chance": np.nan, "outcomes": None, "per_text": per_text(v, sign)}
            for n, v in losses.items()]  # fmt: skip


def write_compare_run(run, *, mmlu_right=12, similarity=None, heuristic=None, sim_loss=None, heu_loss=None, healed_loss=0.31):
    """The artifacts notebook 04 writes, built from per-n recall counts (of 40) and losses, with the
    kit's own tables (collapse points, paired differences, healing gains) computed from them."""
    similarity = similarity or {0: 30, 2: 25, 4: 20, 6: 6, 8: 5}
    heuristic = heuristic or {0: 30, 2: 20, 4: 8, 6: 6, 8: 7}
    sim_loss = sim_loss or {0: 0.3, 2: 0.35, 4: 0.4, 6: 0.5, 8: 0.6}
    heu_loss = heu_loss or {0: 0.3, 2: 0.5, 4: 0.7, 6: 0.9, 8: 1.1}
    rows = (accuracy_rows("similarity", similarity) + accuracy_rows("heuristic", heuristic)
            + loss_rows("similarity", sim_loss) + loss_rows("heuristic", heu_loss)
            + accuracy_rows("similarity", {4: similarity[4] + 1}, healed=True) + accuracy_rows("heuristic", {4: heuristic[4] + 9}, healed=True)
            + loss_rows("similarity", {4: healed_loss}, healed=True) + loss_rows("heuristic", {4: 0.6}, healed=True))  # fmt: skip
    swept = pd.DataFrame(rows)
    unhealed = swept[~swept["healed"]]
    swept.to_csv(run / "sweep.csv", index=False)
    curves.by_metric(curves.collapse_points, unhealed, ["recall"]).to_csv(run / "collapse.csv", index=False)
    curves.by_metric(curves.paired_comparison, unhealed, ["recall", "val_loss_norm"], "criterion", "similarity", "heuristic").to_csv(run / "paired.csv", index=False)
    curves.by_metric(curves.healing_gains, swept, ["recall", "val_loss_norm"]).to_csv(run / "healing_gains.csv", index=False)
    low, high = wilson(mmlu_right, 40)
    unpruned = results.table({"mmlu": Estimate(mmlu_right / 40, low, high, np.arange(40) < mmlu_right, 0.25)}, n=0)
    unpruned.to_csv(run / "unpruned.csv", index=False)
    comparison = pd.DataFrame({
        "model": ["original", "pruned", "healed"], "layers": [COMPARE_LAYERS, COMPARE_LAYERS - 4, COMPARE_LAYERS - 4], "parameters": [1.5e8, 1.0e8, 1.0e8],
        "weight_bytes": [6e8, 4e8, 4e8], "decode_tokens_per_s": [15.3, 20.1, 19.8], "recall": [0.75, 0.5, 0.525],
        "recall_ci_low": [0.6, 0.35, 0.37], "recall_ci_high": [0.86, 0.65, 0.67], "val_loss_norm": [0.3, 0.4, 0.33],
        "val_loss_norm_ci_low": [0.29, 0.39, 0.32], "val_loss_norm_ci_high": [0.31, 0.41, 0.34],
    })  # fmt: skip
    comparison.to_csv(run / "comparison.csv", index=False)
    (run / "selection.json").write_text(json.dumps({"model": "my-model", "start": 3, "n": 4, "distance": 0.2, "source": "similarity"}))
    return run


CHAINED = {"notebook_run", "tiny_notebook_run"}  # the session fixtures that execute the notebooks in a chain


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs two workers, `--dist loadgroup`): a test file runs in one worker (its module
    fixtures are built once), and every file reading the notebooks' chained runs in the same worker (each chain runs
    once)."""
    chained = {item.path for item in items if CHAINED & set(getattr(item, "fixturenames", ()))}
    for item in items:
        item.add_marker(pytest.mark.xdist_group("notebook-chains" if item.path in chained else str(item.path.name)))
