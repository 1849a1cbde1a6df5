"""Shared fixtures: tiny models, and notebooks executed once per session through papermill."""

import os
from pathlib import Path

# Tests never reach the model or dataset Hub (set before transformers is imported; kernels inherit it).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Tests compare against CPU fp32 references, on a GPU machine too; `make gpu-check` covers the GPU paths.
os.environ["KIT_DEVICE"] = "cpu"

import pytest  # noqa: E402

import kit  # noqa: E402
from kit.reports import NOTEBOOKS, execute  # noqa: E402

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
}


@pytest.fixture(params=kit.TINY_ARCHITECTURES)
def tiny(request):
    """(model, tokenizer) of every tiny architecture, one test per architecture."""
    return kit.tiny_model(request.param)


@pytest.fixture(scope="session")
def notebook_run(tmp_path_factory):
    """run(name) executes notebooks 01..name in order (each once per session) with smoke
    parameters into one run folder, and returns that folder."""
    runs_root = tmp_path_factory.mktemp("runs")
    executed = set()

    def run(name: str) -> Path:
        for earlier in NOTEBOOKS[: NOTEBOOKS.index(name) + 1]:
            if earlier not in executed:
                parameters = {**SMOKE_PARAMETERS[earlier], "RUN": "smoke", "RUNS_ROOT": str(runs_root)}
                execute(earlier, output_dir=runs_root, parameters=parameters)
                executed.add(earlier)
        return runs_root / "smoke"

    return run
