"""Healing methods: the linear patch's fit against one forward pass of the unpruned model over the same
calibration texts (goal: about one pass plus a solve), and what each method costs to heal one cut, in CPU
seconds and in such forward passes, with its trained and added parameters.

The embedded model, the cut the similarity scan chooses at n=4 on these texts (layers 12..15). The fit
(a fixed ridge: one pass up to the block's last layer, then the solve) and the forward pass run in turn
REPEATS times; their ratio is taken per repeat and printed as its median with its spread. The methods'
costs are one run each (kit.healing.methods' own record: wall and CPU seconds of heal_cut)."""

import statistics

import torch

import kit
from bench.measure import interleaved, ratios, spread
from kit.healing import linear_patch as lp
from kit.healing.methods import heal_cut

MODEL = "smollm2-135m"
BLOCK = kit.Block(12, 4)
N_TEXTS, MAX_LENGTH, BATCH, REPEATS = 64, 128, 8, 3
METHODS = {  # short trainings: the cost per step is what compares
    "none": "none",
    "linear_patch": lp.LinearPatchConfig(n_texts=N_TEXTS, max_length=MAX_LENGTH, batch_size=BATCH),
    "replacement_layer": kit.ReplacementLayerConfig(n_texts=N_TEXTS, max_length=MAX_LENGTH, batch_size=BATCH, steps=16),
    "last_layers": kit.LastLayersConfig(k=2, steps=4, batch_size=BATCH, seq_len=MAX_LENGTH),
    "qlora": kit.HealConfig(steps=4, batch_size=BATCH, seq_len=MAX_LENGTH, save_every=4, warmup_steps=0),
    "distill": kit.HealConfig(steps=4, batch_size=BATCH, seq_len=MAX_LENGTH, save_every=4, warmup_steps=0, distill_weight=0.5),
}


@torch.no_grad()
def forward(model, tokenizer, texts):
    for batch in kit.core.text.batched(texts, BATCH):
        model(**kit.core.text.encode(tokenizer, batch, max_length=MAX_LENGTH), use_cache=False)


def fit(model, tokenizer, texts):
    config = lp.LinearPatchConfig(n_texts=N_TEXTS, max_length=MAX_LENGTH, batch_size=BATCH, ridge=1.0)
    lp.solve(lp._total(lp.patch_sums(model, tokenizer, BLOCK, texts, config)), 1.0)


def fit_against_forward(texts) -> float:
    """Print the fit / forward-pass ratio; return the median CPU seconds of one forward pass."""
    unpruned, tokenizer = kit.load_model(MODEL)
    runs = {"forward": lambda: forward(unpruned, tokenizer, texts), "fit": lambda: fit(unpruned, tokenizer, texts)}
    seconds = interleaved(runs, REPEATS)
    one_pass = statistics.median(seconds["forward"])
    print(f"linear patch of {MODEL} {BLOCK.label}, {N_TEXTS} texts x {MAX_LENGTH} tokens, medians of {REPEATS} interleaved repeats:")
    print(f"  one forward pass {one_pass:.1f} CPU s, the fit (ridge 1) {statistics.median(seconds['fit']):.1f} CPU s")
    print(f"  fit / forward pass: {spread(ratios(seconds['fit'], seconds['forward']), 2)}")
    return one_pass


def main():
    import tempfile

    texts = kit.loaders.data.corpus("train")[:N_TEXTS]
    one_pass = fit_against_forward(texts)
    print(f"cost of healing {BLOCK.label} (one run each; training methods a few steps, see METHODS):")
    with tempfile.TemporaryDirectory() as tmp:
        for name, method in METHODS.items():
            model, tokenizer = kit.load_model(MODEL)
            healed = heal_cut(method, model, tokenizer, BLOCK, texts, out_dir=f"{tmp}/{name}")
            cost, steps = healed.cost, getattr(healed.config, "steps", None)
            per = f", {cost['cpu_s'] / steps:.2f} CPU s/step over {steps} steps" if steps else ""
            print(f"  {name:<18} {cost['cpu_s']:7.1f} CPU s = {cost['cpu_s'] / one_pass:5.2f} forward passes{per}; "
                  f"trained {cost['trained_parameters']:>10,} added {cost['added_parameters']} parameters")  # fmt: skip
            del model, healed


if __name__ == "__main__":
    main()
