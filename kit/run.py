"""A run: the folder one pipeline writes, and the one place that names what is in it.

Every step (kit.steps, `python -m kit STEP`, the notebooks) reads and writes its artifacts through a
`Run`: by name (`run.require("pruned")`), so a missing input fails at once and names the step to run
first, and every write is atomic."""

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .core import artifacts


@dataclass(frozen=True)
class Artifact:
    """One file or folder of a run."""

    file: str  # its path inside the run folder
    step: str  # the step that writes it: kit.steps.<step>, `python -m kit <step>`
    notebook: str  # the notebook that writes it


ARTIFACTS = {
    "distances": Artifact("distances.safetensors", "scan", "01_similarity"),
    "scan_cache": Artifact("scan-{digest}.safetensors", "scan", "01_similarity"),
    "sublayer_distances": Artifact("sublayer_distances.safetensors", "scan", "01_similarity"),
    "choices": Artifact("choices.csv", "scan", "01_similarity"),
    "selection": Artifact("selection.json", "prune", "02_select_and_prune"),
    "pruned": Artifact("pruned", "prune", "02_select_and_prune"),
    "mergekit": Artifact("mergekit.yaml", "prune", "02_select_and_prune"),
    "losses": Artifact("losses.json", "prune", "02_select_and_prune"),
    "healed": Artifact("healed", "heal", "03_heal"),
    "adapter": Artifact("healed/adapter", "heal", "03_heal"),
    "healed_merged": Artifact("healed_merged", "heal", "03_heal"),
    "heal_history": Artifact("heal_history.json", "heal", "03_heal"),
    "heal_losses": Artifact("heal_losses.json", "heal", "03_heal"),
    "unpruned": Artifact("unpruned.csv", "sweep", "04_compare"),
    "sweep": Artifact("sweep.csv", "sweep", "04_compare"),
    "paired": Artifact("paired.csv", "sweep", "04_compare"),
    "collapse": Artifact("collapse.csv", "sweep", "04_compare"),
    "healing_gains": Artifact("healing_gains.csv", "sweep", "04_compare"),
    "comparison": Artifact("comparison.csv", "evaluate", "04_compare"),
    "sweep_cache": Artifact("sweep-{criterion}.json", "sweep", "04_compare"),
    "criteria": Artifact("criteria.csv", "criteria", "05_criteria"),
    "metric_distances": Artifact("distances_{metric}.safetensors", "criteria", "05_criteria"),
    "oracle": Artifact("oracle_{split}.safetensors", "criteria", "05_criteria"),
    "greedy": Artifact("greedy_{unit}.safetensors", "budget", "06_granularity"),
    "budget": Artifact("budget.csv", "budget", "06_granularity"),
    "budget_best": Artifact("budget_best.csv", "budget", "06_granularity"),
    "heal_compare": Artifact("heal_compare.csv", "heal_compare", "07_heal_compare"),
    "heal_refused": Artifact("heal_refused.json", "heal_compare", "07_heal_compare"),
    "heal_paired": Artifact("heal_paired.csv", "heal_compare", "07_heal_compare"),
    "heal_best": Artifact("heal_best.csv", "heal_compare", "07_heal_compare"),
    "heal_compare_models": Artifact("heal_compare", "heal_compare", "07_heal_compare"),
    "report": Artifact("report.md", "report", "-"),
}
# The manifest records each step under its notebook's name; notebook 04 runs two steps, each its own entry.
MANIFEST_KEYS = {"scan": "01_similarity", "prune": "02_select_and_prune", "heal": "03_heal", "sweep": "sweep",
                 "evaluate": "evaluate", "criteria": "05_criteria", "budget": "06_granularity",
                 "heal_compare": "07_heal_compare"}


class Run:
    """The folder of one run: `Run("runs/llama")` (a path), or `Run("demo")` (a name under ./runs, $KIT_RUNS, or
    a Google Drive folder in Colab: kit.core.artifacts.runs_root). The folder is created if needed.

    Args:
        folder: a path (anything with a "/"), or a run name under `root`.
        root: where named runs live ("auto": see above).
        device: where the steps load models: "auto" (the GPU if there is one), "cpu", "cuda", "cuda:1".
        dtype: "auto" (bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU), "float32", "bfloat16", "float16".
        seed: seeds Python's, NumPy's and torch's generators now (None: leaves them).
        device_map: accelerate's dispatch of a model bigger than one device ("auto"; None: the whole model on `device`).
        offload_folder: where a device_map offloads weights to disk.
    """

    def __init__(self, folder: str | Path = "demo", root: str | Path = "auto", *, device: str = "auto", dtype: str = "auto",
                 seed: int | None = None, device_map: str | None = None, offload_folder: str | None = None):  # fmt: skip
        if seed is not None:
            artifacts.seed_everything(seed)
        self.seed = seed
        if isinstance(folder, Run):
            folder = folder.path
        named = isinstance(folder, str) and "/" not in folder and folder not in (".", "..")
        self.path = artifacts.run_dir(folder, root) if named else Path(folder)
        self.path.mkdir(parents=True, exist_ok=True)
        self.device, self.dtype, self.device_map, self.offload_folder = device, dtype, device_map, offload_folder

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        """`run / "heatmap.png"`: a path inside the run folder."""
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    def file(self, name: str, **fields) -> Path:
        """The path of the artifact `name` (a key of kit.run.ARTIFACTS), whether or not it exists yet; `fields`
        fill a name's blanks, e.g. run.file("greedy", unit="mlp")."""
        if name not in ARTIFACTS:
            raise KeyError(f"A run has no artifact {name!r}; its artifacts: {', '.join(ARTIFACTS)}")
        return self.path / ARTIFACTS[name].file.format(**fields)

    def has(self, name: str, **fields) -> bool:
        return self.file(name, **fields).exists()

    def require(self, name: str, **fields) -> Path:
        """The path of the artifact `name`; if it is missing, an error naming the step that writes it."""
        path = self.file(name, **fields)
        if not path.exists():
            made = ARTIFACTS[name]
            raise artifacts.MissingArtifactError(
                f"{path} does not exist: run the {made.step} step first, on this run "
                f"(`python -m kit {made.step} --run {self.path}`, kit.steps.{made.step}, or notebooks/{made.notebook}.ipynb)"
            )
        return path

    def read_json(self, name: str):
        return json.loads(self.require(name).read_text())

    def read_csv(self, name: str, **kwargs) -> pd.DataFrame:
        return pd.read_csv(self.require(name), **kwargs)

    def write_json(self, name: str, obj) -> Path:
        return artifacts.write_json(self.file(name), obj)

    def write_text(self, name: str, text: str) -> Path:
        return artifacts.write_text(self.file(name), text)

    def write_csv(self, name: str, table: pd.DataFrame, **kwargs) -> Path:
        return artifacts.write_text(self.file(name), table.to_csv(**kwargs))

    def record(self, step: str, config=None, **extra) -> Path:
        """Record `step` in the run's manifest.json (settings, their hash, seed, versions, machine, time, `extra`)."""
        extra.setdefault("seed", getattr(config, "seed", self.seed))
        return artifacts.write_manifest(self.path, MANIFEST_KEYS.get(step, step), config=config, **extra)

    def manifest(self, step: str | None = None) -> dict:
        """The whole manifest, or the entry of one step (its name or its notebook's)."""
        path = self.path / "manifest.json"
        manifest = json.loads(path.read_text()) if path.exists() else {}
        if step is None:
            return manifest
        key = MANIFEST_KEYS.get(step, step)
        if key not in manifest:
            raise artifacts.MissingArtifactError(f"{self.path} has no {step} step in its manifest: run it first")
        return manifest[key]

    def load_kwargs(self, quantize="auto") -> dict:
        """The placement every step loads its models with (kit.load_model's device, dtype, quantize, device_map)."""
        placement = dict(device=self.device, dtype=self.dtype, quantize=quantize)
        return placement | (dict(device_map=self.device_map, offload_folder=self.offload_folder) if self.device_map else {})
