"""Inference cost: exact counts against hand computation and the real cache, generation with the cache."""

import contextlib
import statistics
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import kit
from kit.core.block import Block, Layers, Sublayers
from kit.evaluate import inference_cost
from kit.prune import drop_layers, dropped, outside_view
from kit.testing import assert_same_greedy


def _hand_parameters(arch: str, config) -> int:
    """Parameter count of the tiny configs, term by term from the architectures' definitions."""
    V, H, I, P = config.vocab_size, config.hidden_size, config.intermediate_size if arch != "gpt2" else 0, 2048
    heads, kv, hd = 4, 2, 16
    attention = H * heads * hd + 2 * H * kv * hd + heads * hd * H  # q, k, v, o (no biases)
    if arch == "llama":  # untied head, GQA, 2 RMSNorms per layer
        return V * H + 6 * (attention + 3 * H * I + 2 * H) + H + V * H
    if arch == "gemma3":  # tied head, GQA, 4 RMSNorms per layer and q/k norms over head_dim
        return V * H + 6 * (attention + 3 * H * I + 4 * H + 2 * hd) + H
    if arch == "gpt2":  # tied head, learned positions, biases everywhere, 2 LayerNorms per layer, MLP 4H
        layer = 2 * H + (H * 3 * H + 3 * H) + (H * H + H) + 2 * H + (H * 4 * H + 4 * H) + (4 * H * H + H)
        return V * H + P * H + 6 * layer + 2 * H
    raise ValueError(arch)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_parameters_and_weight_bytes_by_hand(arch):
    model, _ = kit.testing.tiny_model(arch)
    expected = _hand_parameters(arch, model.config)
    assert inference_cost.parameters(model) == expected
    assert inference_cost.weight_bytes(model) == 4 * expected
    assert inference_cost.weight_bytes(model.to(torch.bfloat16)) == 2 * expected


def test_kv_bytes_by_hand():
    llama, _ = kit.testing.tiny_model("llama")  # 6 full layers, 2 KV heads of 16 dims, float32: 2 * 2 * 16 * 4 bytes per layer
    assert inference_cost.kv_cache_bytes(llama, 100, batch_size=3) == 3 * 100 * 6 * 256
    gemma, _ = kit.testing.tiny_model("gemma3")  # 5 sliding layers (window 32: 31 cached tokens) and 1 full
    assert inference_cost.kv_cache_bytes(gemma, 100) == (5 * 31 + 100) * 256
    assert inference_cost.kv_cache_bytes(gemma, 20) == 6 * 20 * 256
    gpt2, _ = kit.testing.tiny_model("gpt2")  # multi-head: 4 KV heads of 64 / 4 dims
    assert inference_cost.kv_cache_bytes(gpt2.to(torch.float16), 10) == 10 * 6 * 2 * 4 * 16 * 2


def _cache_bytes(cache) -> int:
    """Bytes of keys and values in a cache's layers (recurrent states and shared-KV layers hold none)."""
    tensors = [getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values")]
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor) and t.dim() == 4)


def test_kv_bytes_equal_the_real_cache(tiny):
    model, tokenizer = tiny
    prompt = inference_cost.prompt_ids(tokenizer, 36).expand(2, -1)
    _, _, _, cache = inference_cost.generate(model, prompt, 6)  # 41 tokens cached: past every tiny sliding window (32)
    assert _cache_bytes(cache) == inference_cost.kv_cache_bytes(model, 41, batch_size=2)


# MLA, sliding-window MoE, linear attention, hybrid Mamba, per-layer head sizes with a multimodal wrapper, and
# "hybrid" layers that keep keys and values beside a recurrent state (Falcon-H1; Inkling with sliding windows)
@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "qwen3_next", "granitemoehybrid", "gemma4", "falcon_h1", "inkling_text"])
def test_kv_bytes_count_only_what_each_kept_layer_caches(family):
    model = kit.families.tiny_family_model(family, sliding_window=8)
    prompt = torch.arange(5, 17).unsqueeze(0).expand(2, -1)
    for candidate in (model, drop_layers(model, Block(1, 1))):
        _, _, _, cache = inference_cost.generate(candidate, prompt, 3)  # 14 tokens cached: past the window of 8
        assert _cache_bytes(cache) == inference_cost.kv_cache_bytes(candidate, 14, batch_size=2) > 0


def test_removed_attention_sublayers_keep_one_zero_key_and_value_per_token(tiny):
    """On every tiny architecture the count equals the real cache after generation, in drop_layers and dropped;
    a hybrid's removed Mamba or linear-attention mixers kept no keys before and keep none now."""
    model, tokenizer = tiny
    removal = Sublayers("attention", {0, 1, 3, 5})
    prompt = inference_cost.prompt_ids(tokenizer, 36).expand(2, -1)
    pruned = drop_layers(model, removal)
    _, _, _, cache = inference_cost.generate(pruned, prompt, 6)
    assert _cache_bytes(cache) == inference_cost.kv_cache_bytes(pruned, 41, batch_size=2) < inference_cost.kv_cache_bytes(model, 41, batch_size=2)
    with dropped(model, removal):
        _, _, _, cache = inference_cost.generate(model, prompt, 6)
        assert _cache_bytes(cache) == inference_cost.kv_cache_bytes(model, 41, batch_size=2) == inference_cost.kv_cache_bytes(pruned, 41, batch_size=2)


def test_removed_attention_sublayers_kv_bytes_by_hand(tmp_path):
    llama, tokenizer = kit.testing.tiny_model("llama")  # 256 bytes per token and attention layer; a removed one keeps 2 floats
    pruned = drop_layers(llama, Sublayers("attention", {0, 2, 5}))
    assert inference_cost.kv_cache_bytes(pruned, 100, batch_size=3) == 3 * 100 * (3 * 256 + 3 * 2 * 4)
    kit.save_pruned(pruned, tokenizer, tmp_path / "pruned")  # a plain reload runs (zero-weight) attention again
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert inference_cost.kv_cache_bytes(reloaded, 100) == inference_cost.kv_cache_bytes(llama, 100) == 100 * 6 * 256


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_pruned_models_cache_fewer_layers_exactly(arch):
    model, tokenizer = kit.testing.tiny_model(arch)
    block = Block(3, 2)
    kinds = inference_cost.attention_types(model.config)
    removed = sum(min(50, 31) if kinds[i] == "sliding_attention" else 50 for i in block.layers) * 256
    pruned = drop_layers(model, block)
    assert inference_cost.kv_cache_bytes(model, 50) - inference_cost.kv_cache_bytes(pruned, 50) == removed
    with dropped(model, block):
        assert inference_cost.kv_cache_bytes(model, 50) == inference_cost.kv_cache_bytes(pruned, 50)
        _, _, _, cache = inference_cost.generate(model, inference_cost.prompt_ids(tokenizer, 45), 6)
        assert _cache_bytes(cache) == inference_cost.kv_cache_bytes(pruned, 50)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_generation_feeds_one_token_per_step_and_matches_recomputation(arch):
    model, tokenizer = kit.testing.tiny_model(arch)
    prompt = inference_cost.prompt_ids(tokenizer, 28).expand(2, -1)
    lengths = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    tokens, *_ = inference_cost.generate(model, prompt, 8)
    hook.remove()
    assert lengths == [28] + [1] * 7, "each decode step must feed only the new token and reuse the cache"
    ids, logits = prompt, []
    with torch.no_grad():
        for _ in range(8):  # brute force: the whole sequence again at every step, no cache
            logits.append(model(input_ids=ids, use_cache=False).logits[:, -1])
            ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], dim=1)
    assert_same_greedy(tokens, (ids[:, 28:], torch.stack(logits, dim=1)))


def _view_model(name: str):
    return kit.families.tiny_family_model(name, num_hidden_layers=6) if name == "gemma4_text" else kit.testing.tiny_model(name)[0]


@pytest.mark.parametrize(
    "name, removal",
    [("llama", Block(1, 3)), ("qwen2", Layers({0, 3, 5})), ("llama", Sublayers("mlp", {1, 4})),
     ("gemma4_text", Layers({0, 2}))],  # Gemma 4: the view copies the kept slices of its per-layer input weights
)  # fmt: skip
def test_a_dropped_views_weights_are_those_of_the_model_with_the_layers_removed(name, removal):
    """Its parameters and weight bytes equal drop_layers' on a copy; what it leaves out (outside_view) is all the
    weights the process holds beyond the view's own, and nothing outside the view."""
    model = _view_model(name)
    full, cpu = inference_cost.weight_bytes(model), [torch.device("cpu")]
    original = {id(p) for p in model.parameters()}
    pruned = drop_layers(model, removal)
    with dropped(model, removal):
        assert inference_cost.parameters(model) == inference_cost.parameters(pruned)
        assert inference_cost.weight_bytes(model) == inference_cost.weight_bytes(pruned) < full
        copied = sum(p.nbytes for p in model.parameters() if id(p) not in original)  # per-layer slices, Gemma 3n/4 only
        held = inference_cost._held_outside(model, cpu)
        assert full + copied - held == inference_cost.weight_bytes(pruned) and outside_view(model)
        assert inference_cost._held_outside(model, [torch.device("cuda", 0)]) == 0  # only what sits on the measured devices
    assert outside_view(model) == [] and inference_cost._held_outside(model, cpu) == 0


def test_the_peak_of_a_dropped_view_leaves_out_the_weights_of_the_removed_layers(monkeypatch):
    # The measured peak mocked as a GPU's would be (no GPU here). On a GPU the removed layers' weights stay allocated
    # beside the view, so torch.cuda.max_memory_allocated counted them: a view of half the layers reported about the
    # full model's peak. The CPU's resident set holds them too.
    model, tokenizer = kit.testing.tiny_model("llama")
    monkeypatch.setattr(inference_cost, "_reset_peak", lambda device, devices: True)
    monkeypatch.setattr(inference_cost, "_peak", lambda device, devices: 10**9)
    measure = lambda: inference_cost.cost(model, tokenizer, prompt_tokens=8, new_tokens=2, repeats=1)  # noqa: E731
    full = inference_cost.weight_bytes(model)
    assert measure().peak_memory_bytes == 10**9
    with dropped(model, Block(1, 3)):
        layers_gone = full - inference_cost.weight_bytes(model)
        assert measure().peak_memory_bytes == 10**9 - layers_gone
        with dropped(model, Sublayers("mlp", {0})):  # a view inside a view: what both leave out
            both_gone = full - inference_cost.weight_bytes(model)
            assert both_gone > layers_gone and measure().peak_memory_bytes == 10**9 - both_gone
        assert measure().peak_memory_bytes == 10**9 - layers_gone
    assert measure().peak_memory_bytes == 10**9


def _peak_resettable() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def test_cost_result():
    model, tokenizer = kit.testing.tiny_model("qwen2")
    threads = torch.get_num_threads()
    result = inference_cost.cost(model, tokenizer, prompt_tokens=20, new_tokens=5, batch_size=2, repeats=3, threads=1)
    assert torch.get_num_threads() == threads and result.threads == 1
    assert (result.device, result.dtype, result.context, result.batch_size) == ("cpu", "float32", 24, 2)
    assert result.parameters == sum(p.numel() for p in model.parameters())
    assert result.kv_bytes_per_token == inference_cost.kv_cache_bytes(model, 24) / 24
    assert len(result.prefill_seconds) == len(result.decode_seconds) == 3
    assert result.time_to_first_token_s == statistics.median(result.prefill_seconds)
    assert result.prefill_tokens_per_s == pytest.approx(2 * 20 / statistics.median(result.prefill_seconds))
    assert result.decode_tokens_per_s == pytest.approx(2 * 4 / statistics.median(result.decode_seconds))
    status = Path("/proc/self/status").read_text().splitlines()  # before anything resets the peak again
    high_water = int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
    if _peak_resettable():  # Linux: the peak resident set since cost() reset it
        assert result.weight_bytes < result.peak_memory_bytes <= high_water
    else:
        assert result.peak_memory_bytes is None
    assert set(result.spread) == {"prefill", "decode"} and all(value >= 0 for value in result.spread.values())
    assert result.metrics()["kv_bytes_per_token"] == result.kv_bytes_per_token


def test_unmerged_adapter_counts_and_generates():
    model, tokenizer = kit.testing.tiny_model("llama")
    base = inference_cost.parameters(model)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=kit.core.layers.mlp_modules(model), task_type="CAUSAL_LM")
    adapted = get_peft_model(model, config)
    lora = sum(p.numel() for name, p in adapted.named_parameters() if "lora_" in name)
    assert lora == 6 * 3 * 2 * (64 + 128) and inference_cost.parameters(adapted) == base + lora
    tokens, *_ = inference_cost.generate(adapted, inference_cost.prompt_ids(tokenizer, 10), 3)
    assert tokens.shape == (1, 3)


def test_bad_input():
    model, tokenizer = kit.testing.tiny_model("llama")
    for kwargs, message in [
        (dict(prompt_tokens=0), "prompt_tokens must be an integer >= 1, got 0"),
        (dict(new_tokens=-3), "new_tokens must be an integer >= 2, got -3"),
        (dict(new_tokens=1), "new_tokens must be an integer >= 2"),
        (dict(batch_size=0), "batch_size must be"),
        (dict(repeats=0), "repeats must be"),
        (dict(prompt_tokens=2040, new_tokens=9), "2049 exceeds the model's 2048 positions"),
    ]:
        with pytest.raises(ValueError, match=message):
            inference_cost.cost(model, tokenizer, **kwargs)
    with pytest.raises(ValueError, match="needs a causal LM with a generation head, got LlamaModel"):
        inference_cost.cost(model.model, tokenizer)


def test_on_gpus_the_events_run_on_the_models_gpu_and_the_peaks_of_all_its_gpus_are_summed(monkeypatch):
    # Mocked CUDA (no GPU here). On a GPU: events recorded outside torch.cuda.device(model's GPU) time the
    # current GPU's stream, not the model's; under a device_map one GPU's peak misses the others'.
    current, recorded = [0], []

    @contextlib.contextmanager
    def on(device):
        before, current[0] = current[0], device.index
        yield
        current[0] = before

    class Event:
        def __init__(self, enable_timing):
            self.at = None

        def record(self):
            recorded.append(current[0])
            self.at = len(recorded)

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1000.0 * (other.at - self.at)

    monkeypatch.setattr(torch.cuda, "device", on)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    result, seconds = inference_cost._timed(lambda: "done", torch.device("cuda", 1))
    assert (result, seconds, recorded, current) == ("done", 1.0, [1, 1], [0])

    peaks, reset = {0: 5, 1: 7}, []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: reset.append(device.index))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: peaks[device.index])
    two = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert inference_cost._reset_peak(two[0], two) and reset == [0, 1]
    assert inference_cost._peak(two[0], two) == 12


@pytest.mark.parametrize(
    "kind, caches",
    [("full_attention", True), ("sliding_attention", True), ("chunked_attention", True), ("indexed_attention", True),
     ("hybrid", True), ("hybrid_sliding", True), ("attention", True), ("linear_attention", False), ("conv", False),
     ("dummy", False), ("mamba", False), ("moe", False), ("mlp", False), (None, False)],
)  # fmt: skip
def test_which_layer_kinds_cache_keys_and_values(kind, caches):
    """One predicate for the cost's KV bytes and pruning's "keep an attention layer" rule."""
    assert kit.core.layers.caches_keys(kind) is caches
