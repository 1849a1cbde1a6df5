"""What pruning buys at inference, on the embedded model: prefill and decode speed-up with half the
layers dropped (against the layer ratio), parameter and KV-cache ratios (exact), and what an
unmerged LoRA adapter costs against the same adapter merged into the weights.

Models are timed on one CPU thread in REPEATS interleaved repeats, each the median of SETTINGS'
repeats generations; every speed ratio is taken per repeat and printed as its median with its spread
(three repeats of median-of-2 cost what two of median-of-3 did)."""

import copy

from peft import LoraConfig, get_peft_model

import kit
from bench.measure import interleaved, ratios, spread
from kit.core import layers
from kit.core.block import heuristic_block
from kit.evaluate import cost
from kit.prune import drop_layers

MODEL = "smollm2-135m"
SETTINGS = dict(prompt_tokens=64, new_tokens=17, batch_size=1, repeats=2, threads=1)
REPEATS, RANK = 3, 8


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
    runs = interleaved({name: lambda m=m: cost(m, tokenizer, **SETTINGS) for name, m in models.items()}, REPEATS,
                       measure=lambda fn: fn())  # fmt: skip
    first = runs["original"][0]

    def exact(a: str, b: str, name: str) -> float:
        return getattr(runs[a][0], name) / getattr(runs[b][0], name)

    def speed(a: str, b: str, name: str) -> str:
        return spread(ratios([getattr(r, name) for r in runs[a]], [getattr(r, name) for r in runs[b]]))

    print(
        f"inference cost of {MODEL} on {first.device} ({first.dtype}, {first.threads} thread, load {first.load:.1f}): "
        f"prompt {SETTINGS['prompt_tokens']} + {SETTINGS['new_tokens'] - 1} decoded tokens, batch {SETTINGS['batch_size']}, "
        f"{REPEATS} interleaved repeats of median-of-{SETTINGS['repeats']}"
    )
    half = layers.num_layers(models["half"])
    print(f"  half the layers dropped ({num - half} of {num}): layers {half / num:.3f} of the original")
    print(f"    parameters ratio       {exact('half', 'original', 'parameters'):.3f} (exact)")
    print(f"    KV bytes / token ratio {exact('half', 'original', 'kv_bytes_per_token'):.3f} (exact)")
    print(f"    prefill speed-up       {speed('half', 'original', 'prefill_tokens_per_s')} (layer ratio {num / half:.2f})")
    print(f"    decode speed-up        {speed('half', 'original', 'decode_tokens_per_s')}")
    extra = runs["unmerged"][0].parameters - runs["merged"][0].parameters
    print(f"  LoRA rank {RANK} on the MLP projections, unmerged / merged ({extra:,} adapter parameters):")
    print(f"    prefill speed          {speed('unmerged', 'merged', 'prefill_tokens_per_s')}")
    print(f"    decode speed           {speed('unmerged', 'merged', 'decode_tokens_per_s')}")

if __name__ == "__main__":
    main()
