"""The streamed merge (kit.healing.merge): the adapter folded into the base shard by shard equals the base plus
alpha / r * B @ A and peft's own merge; an adapter for another base is refused with nothing written."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import kit
from kit.healing.lora import lora_model
from kit.healing.merge import merge_adapter
from kit.loaders.models import load_model


def _trained_looking(model, rank: int = 4):
    """`model` with a LoRA adapter on its MLP projections whose B factors are random (zero at initialisation)."""
    peft_model = lora_model(model, kit.HealConfig(rank=rank, quantize=None, gradient_checkpointing=False))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return peft_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama checkpoint and a LoRA adapter for it."""
    folder = tmp_path_factory.mktemp("merge")
    kit.save_pruned(*kit.testing.tiny_model("llama"), folder / "base")
    base, _ = load_model(str(folder / "base"))
    _trained_looking(base).save_pretrained(folder / "adapter")
    return folder / "base", folder / "adapter"


def test_merged_checkpoint_equals_base_plus_scaled_adapter_product(checkpoints, tmp_path):
    base_path, adapter_path = checkpoints
    out = merge_adapter(base_path, adapter_path, tmp_path / "merged")
    merged, tokenizer = load_model(str(out))
    base, _ = load_model(str(base_path))
    adapter = load_file(adapter_path / "adapter_model.safetensors")
    settings = json.loads((adapter_path / "adapter_config.json").read_text())
    scale = settings["lora_alpha"] / settings["r"]
    merged_state, base_state = merged.state_dict(), base.state_dict()
    assert merged_state.keys() == base_state.keys() and not hasattr(merged.config, "quantization_config")
    adapted = 0
    for name, weight in base_state.items():
        module = name.removesuffix(".weight")
        a = adapter.get(f"base_model.model.{module}.lora_A.weight")
        adapted += a is not None
        expected = weight if a is None else weight + scale * adapter[f"base_model.model.{module}.lora_B.weight"] @ a
        torch.testing.assert_close(merged_state[name], expected, msg=name)
    assert adapted == 3 * kit.core.layers.num_layers(base)  # gate, up and down projection of every layer
    ids = tokenizer(["The merged model computes what the adapter does."], return_tensors="pt").input_ids
    unmerged = PeftModel.from_pretrained(base, str(adapter_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D weights, a fan-in-fan-out adapter
def test_streamed_merge_of_a_sharded_base_equals_peft_merge_and_unload(arch, tmp_path):
    model, tokenizer = kit.testing.tiny_model(arch, num_layers=3)
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size="100KB")  # several shards and an index
    tokenizer.save_pretrained(base)
    assert len(list(base.glob("*.safetensors"))) > 2
    peft_model = _trained_looking(model)
    peft_model.save_pretrained(tmp_path / "adapter")
    out = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged")
    expected = peft_model.merge_and_unload().state_dict()
    merged, _ = load_model(str(out))
    assert merged.state_dict().keys() == expected.keys()
    for name, weight in merged.state_dict().items():
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=1e-6, msg=name)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())


def test_merge_refuses_an_adapter_for_another_base(checkpoints, tmp_path):
    _, adapter_path = checkpoints
    other, _ = kit.testing.tiny_model("llama", num_layers=2)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="adapts weights the base .* lacks"):
        merge_adapter(tmp_path / "other", adapter_path, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.*"))


@pytest.mark.filterwarnings("ignore:LoRA on the fused expert weights")
def test_an_adapter_of_fused_experts_merges_to_the_adapted_model(tmp_path):
    """MoE: the routed experts' fused 3-d weights are adapted through peft's target_parameters, the
    shared experts and dense MLPs as modules; the merged checkpoint computes what the adapted model does."""
    model, tokenizer = kit.testing.tiny_model("deepseek_v3", num_layers=3)  # a dense layer, then routed + shared experts
    kit.save_pruned(model, tokenizer, tmp_path / "base")
    adapted = _trained_looking(model).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    merged, _ = load_model(str(merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")))
    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(load_model(str(tmp_path / "base"))[0](ids).logits, adapted(ids).logits, atol=1e-3)
