"""What pruning buys at inference, on the embedded model: prefill and decode speed-up with half the
layers dropped (against the layer ratio), parameter and KV-cache ratios (exact), and what an
unmerged LoRA adapter costs against the same adapter merged into the weights.

Models are timed in interleaved rounds, one CPU thread, and each speed is the best round's median."""

import copy

from peft import LoraConfig, get_peft_model

import kit
from kit import layers
from kit.evaluate import cost
from kit.prune import drop_layers, heuristic_block

MODEL = "smollm2-135m"
SETTINGS = dict(prompt_tokens=64, new_tokens=17, batch_size=1, repeats=3, threads=1)
ROUNDS, RANK = 2, 8


def _best(results, name: str) -> float:
    return max(getattr(result, name) for result in results)


def main():
    model, tokenizer = kit.load_model(MODEL)
    num = layers.num_layers(model)
    lora = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=layers.mlp_modules(model), init_lora_weights=False)
    unmerged = get_peft_model(copy.deepcopy(model), lora).eval()
    models = {
        "original": model,
        "half": drop_layers(model, heuristic_block(num, num // 2)),  # which half does not change the cost
        "unmerged": unmerged,
        "merged": copy.deepcopy(unmerged).merge_and_unload(),
    }
    runs = {name: [] for name in models}
    for _ in range(ROUNDS):
        for name, m in models.items():
            runs[name].append(cost(m, tokenizer, **SETTINGS))
    first = runs["original"][0]

    def ratio(a: str, b: str, name: str) -> float:
        return _best(runs[a], name) / _best(runs[b], name)

    print(
        f"inference cost of {MODEL} on {first.device} ({first.dtype}, {first.threads} thread, load {first.load:.1f}): "
        f"prompt {SETTINGS['prompt_tokens']} + {SETTINGS['new_tokens'] - 1} decoded tokens, batch {SETTINGS['batch_size']}, "
        f"best of {ROUNDS} interleaved rounds of median-of-{SETTINGS['repeats']}"
    )
    half = layers.num_layers(models["half"])
    print(f"  half the layers dropped ({num - half} of {num}): layers {half / num:.3f} of the original")
    print(f"    parameters ratio       {ratio('half', 'original', 'parameters'):.3f} (exact)")
    print(f"    KV bytes / token ratio {ratio('half', 'original', 'kv_bytes_per_token'):.3f} (exact)")
    print(f"    prefill speed-up       {ratio('half', 'original', 'prefill_tokens_per_s'):.2f} (layer ratio {num / half:.2f})")
    print(f"    decode speed-up        {ratio('half', 'original', 'decode_tokens_per_s'):.2f}")
    extra = runs["unmerged"][0].parameters - runs["merged"][0].parameters
    print(f"  LoRA rank {RANK} on the MLP projections, unmerged / merged ({extra:,} adapter parameters):")
    print(f"    prefill speed          {ratio('unmerged', 'merged', 'prefill_tokens_per_s'):.2f}")
    print(f"    decode speed           {ratio('unmerged', 'merged', 'decode_tokens_per_s'):.2f}")
    spread = max(result.spread["decode"] for results in runs.values() for result in results)
    print(f"  largest decode spread (max - min) / median over repeats: {spread:.2f}")


if __name__ == "__main__":
    main()
