"""docs/uncertainty.png: the figure of the kit's intervals on the Uncertainty page (docs/uncertainty.md), on the embedded model (a few
minutes on 2 CPU cores): block distances with 95% bands over calibration texts (left), and the
normalised validation loss of both criteria with 95% bands over validation texts (right).

Run from the repository root: python docs/uncertainty_figure.py"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

import kit  # noqa: E402
from kit.evaluate import metrics  # noqa: E402
from kit.experiments import plots, sweep  # noqa: E402
from kit.loaders import data  # noqa: E402

SCAN_TEXTS, VAL_TEXTS, MAX_LENGTH, STEP = 64, 8, 128, 3

model, tokenizer = kit.load_model("smollm2-135m")
distances = kit.angular_distances(model, tokenizer, data.load_texts("corpus", "train", SCAN_TEXTS), max_length=MAX_LENGTH,
                                  model_name="smollm2-135m")  # fmt: skip
evals = [metrics.ValidationLoss(data.corpus("validation")[:VAL_TEXTS], max_length=MAX_LENGTH)]
ns = list(range(0, distances.num_layers, STEP))
results = pd.concat([sweep.sweep(model, tokenizer, ns=ns, evals=evals, distances=distances, criterion=c) for c in sweep.PAPER_CRITERIA])
print(results[results.metric == "val_loss_norm"][["criterion", "n", "value", "ci_low", "ci_high"]].round(3).to_string(index=False))

fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
plots.distance_curves(distances, ns=[1, 3, 7, 15], ax=left)
left.set_title(f"block distance, 95% bands over {SCAN_TEXTS} calibration texts")
plots.sweep_plot(results, "val_loss_norm", ax=right)
right.set_title(f"validation loss / log(vocab), 95% bands over {VAL_TEXTS} texts")
fig.tight_layout()
plots.save(left, "docs/uncertainty.png", dpi=90)
