"""The evaluate and sweep steps (notebook 04): the run's checkpoints side by side, and the evaluations at every
block size for each criterion, with healed twins."""

from dataclasses import dataclass

import pandas as pd

from ..choose.criteria import Selection
from ..core import distributed
from ..core.config import EvaluateConfig, HealConfig, SweepConfig
from ..core.device import provenance, release_memory
from ..core.ledger import plan
from ..core.stats import Estimate
from ..evaluate import metrics
from ..evaluate.recall_task import recall_items
from ..experiments import curves, results
from ..experiments import sweep as sweeping
from ..loaders import data
from ..loaders.models import load_model
from ..run import Run
from ..scan.distances import Distances


@dataclass
class Sweep:
    """What the sweep step measured (each table also in the run folder)."""

    table: pd.DataFrame  # sweep.csv: one row per criterion, n, healed and metric
    unpruned: pd.DataFrame  # unpruned.csv: the unpruned model's MMLU
    mmlu: bool  # whether MMLU was swept (the unpruned model above chance, or forced by config.mmlu)
    paired: pd.DataFrame | None  # paired.csv: the first two criteria on the same questions and texts
    collapse: pd.DataFrame  # collapse.csv: each criterion's collapse point per accuracy
    gains: pd.DataFrame | None  # healing_gains.csv: healed minus unhealed at config.heal_ns

    @property
    def accuracies(self) -> list[str]:
        """The question-answering metrics of the figures, collapse points and paired comparisons: recall, and MMLU
        where it was swept (BoolQ, when set, is in the table and the comparison)."""
        return ["recall"] + (["mmlu"] if self.mmlu else [])


def quality(config: EvaluateConfig) -> list[metrics.Evaluation]:
    """The evaluations of quality `config` asks for, MMLU aside: recall, validation loss, and BoolQ when set."""
    evals = [metrics.RecallAccuracy(recall_items(n=config.recall_items, facts=config.recall_facts, seed=config.seed), batch_size=config.batch_size),
             metrics.ValidationLoss(data.corpus("validation")[: config.n_val_texts], max_length=config.max_length, batch_size=config.batch_size)]  # fmt: skip
    if config.boolq is not None:
        evals.append(metrics.BoolQAccuracy(data.boolq_items(config.boolq, n=config.n_boolq), batch_size=config.batch_size))
    return evals


def mmlu(config: EvaluateConfig) -> metrics.MMLUAccuracy:
    questions = data.mmlu_questions(data.mmlu_subjects()[: config.mmlu_subjects], per_subject=config.mmlu_per_subject)
    return metrics.MMLUAccuracy(questions, shots=config.shots, batch_size=config.batch_size)


def cost(config: EvaluateConfig) -> metrics.InferenceCost:
    return metrics.InferenceCost(prompt_tokens=config.cost_prompt_tokens, new_tokens=config.cost_new_tokens, repeats=config.cost_repeats)


def _unpruned_mmlu(run: Run) -> Estimate:
    row = run.read_csv("unpruned").set_index("metric").loc["mmlu"]
    return Estimate(row["value"], row["ci_low"], row["ci_high"], chance=row["chance"])


def evaluate(run: Run, config: EvaluateConfig):
    """The original model and every checkpoint the run has (pruned/, the healed adapter unmerged, healed_merged/),
    loaded one at a time, on the evaluations of `config` and inference cost: writes comparison.csv (one row per
    checkpoint, 95% intervals beside each accuracy). MMLU (config.mmlu None) is in it unless the run's sweep found
    the unpruned model at chance."""
    selection = Selection.load(run.require("selection"))
    with_mmlu = config.mmlu if config.mmlu is not None else (not run.has("unpruned") or metrics.above_chance(_unpruned_mmlu(run)))
    evals = quality(config) + ([mmlu(config)] if with_mmlu else []) + [cost(config)]
    checkpoints = {"original": selection.model, "pruned": run.require("pruned")}
    lora = run.has("heal_history") and run.read_json("heal_history").get("method", "qlora") in ("qlora", "distill")
    if lora and run.has("adapter"):  # the adapter of the run's last healing
        checkpoints["healed (unmerged)"] = (run.file("pruned"), run.file("adapter"))
    if run.has("healed_merged"):
        checkpoints["healed"] = run.file("healed_merged")
    comparison = sweeping.compare(checkpoints, evals, **run.load_kwargs(config.quantize))
    if distributed.is_main():
        run.write_csv("comparison", comparison)
        run.record("evaluate", config, checkpoints={k: str(v) for k, v in checkpoints.items()},
                   evaluations={e.name: e.settings() for e in evals})  # fmt: skip
    return comparison


def sweep(run: Run, config: SweepConfig):
    """The scanned model with the block of every size n removed, for each criterion, on the evaluations of `config`
    (MMLU where the unpruned model is above chance), and LoRA-healed twins at config.heal_ns: writes unpruned.csv,
    sweep.csv (one row per point and metric), paired.csv (the first two criteria on the same questions and texts),
    collapse.csv and healing_gains.csv. Finished points are cached (sweep-{criterion}.json): a rerun resumes."""
    distances = Distances.load(run.require("distances"))
    model, tokenizer = load_model(distances.meta["model"], **run.load_kwargs(config.quantize))
    heal = config.heal_config()
    lora = isinstance(heal, HealConfig)  # another method's memory is its own: planned for LoRA only
    plan(model, loss=dict(batch_size=config.batch_size, max_length=config.max_length),
         **({"heal": dict(batch_size=heal.batch_size, seq_len=heal.seq_len, rank=heal.rank, checkpointing=heal.gradient_checkpointing)}
            if config.heal_ns and lora else {}))  # fmt: skip
    unpruned = metrics.evaluate_all(model, tokenizer, [mmlu(config)])
    with_mmlu = metrics.above_chance(unpruned["mmlu"], force=config.mmlu)
    evals = quality(config) + ([mmlu(config)] if with_mmlu else []) + [cost(config)]
    ns = list(config.ns) if config.ns is not None else list(range(0, distances.num_layers, config.step))
    table = sweeping.sweeps(model, tokenizer, ns=ns, evals=evals, distances=distances, folder=run.path, criteria=config.criteria,
                            heal_ns=config.heal_ns, heal_config=heal, heal_texts=data.corpus("train")[: config.n_heal_texts])  # fmt: skip
    placement = provenance(model)
    model = None
    release_memory()
    swept = _readings(config, table, results.table(unpruned, n=0), with_mmlu)
    if distributed.is_main():
        for name, frame in (("unpruned", swept.unpruned), ("sweep", table), ("paired", swept.paired), ("collapse", swept.collapse),
                            ("healing_gains", swept.gains)):  # fmt: skip
            if frame is not None:
                run.write_csv(name, frame, index=False)
        run.record("sweep", config, ns=ns, mmlu=with_mmlu, evaluations={e.name: e.settings() for e in evals}, placement=placement)
    return swept


def _readings(config: SweepConfig, table, unpruned, with_mmlu: bool) -> Sweep:
    """The sweep's table and what notebook 04 reads from it: paired comparisons, collapse points, healing gains."""
    swept = Sweep(table, unpruned, with_mmlu, None, None, None)
    unhealed = table[~table["healed"]]
    if len(config.criteria) >= 2:
        swept.paired = curves.by_metric(curves.paired_comparison, unhealed, swept.accuracies + ["val_loss_norm"], "criterion",
                                        *config.criteria[:2])  # fmt: skip
    swept.collapse = curves.by_metric(curves.collapse_points, unhealed, swept.accuracies)
    if config.heal_ns:
        swept.gains = curves.by_metric(curves.healing_gains, table, swept.accuracies + ["val_loss_norm"])
    return swept
