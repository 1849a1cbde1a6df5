"""Healing methods compared (notebook 07): every method heals the same cut at each block size; each healed
model's held-out loss, KL to the unpruned model and in-context recall, with paired 95% intervals against
the unhealed cut (method "none") on the same texts and questions, beside what the method cost."""

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.block import Block
from ..core.stats import Estimate, paired_difference, paired_ratio_difference, ratio_stderr
from ..core.text import encode
from ..evaluate.metrics import RecallAccuracy, ValidationLoss
from ..healing.methods import heal_cut
from ..healing.train import distillation_kl
from ..loaders.models import load_model
from .results import encode_per_text, outcomes, per_text

METRICS = ("val_loss", "kl", "recall")  # lower, lower, higher is better
COST = ("cpu_s", "wall_s", "trained_parameters", "added_parameters")


@torch.no_grad()
def reference_logits(reference, tokenizer, texts: Sequence[str], *, max_length: int) -> list[torch.Tensor]:
    """The unpruned model's logits on each text (one [1, tokens, vocab] tensor per text, on the CPU), kept for
    every healed model's KL: the reference runs once, not once per model."""
    return [reference(**encode(tokenizer, [t], max_length=max_length).to(reference.device), use_cache=False).logits.float().cpu()
            for t in texts]  # fmt: skip


@torch.no_grad()
def kl_to(reference: list[torch.Tensor], model, tokenizer, texts: Sequence[str], *, max_length: int) -> Estimate:
    """KL(reference || model) of the next-token distributions, in nats per token over the texts (one at a
    time), from the reference's logits (reference_logits), with each text's sum and tokens for pairing."""
    rows = []
    for teacher, text in zip(reference, texts):
        student = model(**encode(tokenizer, [text], max_length=max_length).to(model.device), use_cache=False).logits
        kl = distillation_kl(student.float(), teacher.to(student.device), 1.0)
        rows.append((float(kl.sum()), kl.numel()))
    sums = np.array(rows, dtype=np.float64)
    value, stderr = sums[:, 0].sum() / sums[:, 1].sum(), ratio_stderr(sums[:, 0], sums[:, 1])
    return Estimate(float(value), value - 1.96 * stderr, value + 1.96 * stderr, per_text=sums)


def compare_methods(model_name: str, blocks: dict[int, Block], methods: dict, *, texts, val_texts, recall_items, folder,
                    max_length: int = 64, batch_size: int = 8, device="auto", dtype="auto") -> tuple[pd.DataFrame, dict[str, str]]:  # fmt: skip
    """Heal each block with each method (a fresh copy of the model each time, its checkpoint in
    folder/n{n}/{method}) and evaluate it beside the unpruned model. Returns the table, one row per (n, method,
    metric): value, ci_low, ci_high, per_text or outcomes (for pairing), and the method's cost columns; and
    the refusals, {"n=4 linear_patch": why}, of the methods that do not apply to a cut. device, dtype: load_model's."""
    reference, tokenizer = load_model(model_name, device=device, dtype=dtype)
    reference = reference_logits(reference, tokenizer, val_texts, max_length=max_length)  # the model itself freed
    evaluations = [ValidationLoss(tuple(val_texts), max_length=max_length, batch_size=batch_size),
                   RecallAccuracy(tuple(recall_items), batch_size=batch_size)]  # fmt: skip
    rows, refused = [], {}
    for n, block in blocks.items():
        for name, method in methods.items():
            model = load_model(model_name, device=device, dtype=dtype)[0]
            try:
                healed = heal_cut(method, model, tokenizer, block, texts, out_dir=Path(folder) / f"n{n}" / name)
            except ValueError as refusal:  # e.g. the linear patch of a block at layer 0, or of an MoE (UnsupportedArchitectureError)
                refused[f"n={n} {name}"] = str(refusal)
                continue
            estimates = {k: v for e in evaluations for k, v in e(healed.model, tokenizer).items() if k in METRICS}
            estimates["kl"] = kl_to(reference, healed.model, tokenizer, val_texts, max_length=max_length)
            cost = {k: healed.cost[k] for k in COST}
            for metric, e in estimates.items():
                rows.append({"n": n, "start": block.start, "method": name, "metric": metric, "value": e.value, "ci_low": e.low,
                             "ci_high": e.high, "per_text": encode_per_text(e.per_text) if e.per_text is not None else None,
                             "outcomes": None if e.outcomes is None else "".join("R" if o else "W" for o in e.outcomes),
                             **cost})  # fmt: skip
            del model, healed
    return pd.DataFrame(rows), refused


def paired_to_cut(table: pd.DataFrame, *, resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Each method minus the unhealed cut ("none") at the same n, per metric, with a paired bootstrap 95%
    interval (texts or questions resampled together); negative is better for val_loss and kl."""
    out = []
    for (n, metric), group in table.groupby(["n", "metric"], sort=True):
        cut = group[group["method"] == "none"]
        if cut.empty:
            continue
        base = cut.iloc[0]
        for _, row in group[group["method"] != "none"].iterrows():
            if metric == "recall":
                d = paired_difference(outcomes(row), outcomes(base), resamples=resamples, seed=seed)
            else:
                d = paired_ratio_difference(per_text(row), per_text(base), resamples=resamples, seed=seed)
            out.append({"n": n, "metric": metric, "method": row["method"], "value": row["value"], "cut": base["value"],
                        "difference": d.value, "ci_low": d.low, "ci_high": d.high, "cpu_s": row["cpu_s"]})  # fmt: skip
    return pd.DataFrame(out)


def best_methods(table: pd.DataFrame, metric: str = "val_loss") -> pd.DataFrame:
    """Per n, the method with the lowest `metric` (val_loss or kl; the highest for recall), its value and cost."""
    rows = table[table["metric"] == metric]
    pick = rows.groupby("n")["value"].idxmax() if metric == "recall" else rows.groupby("n")["value"].idxmin()
    return rows.loc[pick, ["n", "start", "method", "value", "cpu_s", "trained_parameters"]].reset_index(drop=True)


def restored(table: pd.DataFrame, unpruned_loss: float) -> pd.Series:
    """Per (n, method), the share of the held-out loss the cut added that healing took back."""
    loss = table[table["metric"] == "val_loss"].set_index(["n", "method"])["value"]
    cut = loss.xs("none", level="method")
    return pd.Series({(n, m): (cut[n] - v) / (cut[n] - unpruned_loss) if cut[n] != unpruned_loss else math.nan
                      for (n, m), v in loss.items()})  # fmt: skip
