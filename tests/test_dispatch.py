"""Models spread over devices by accelerate: with part of the layers (and the embeddings, the final
norm, the LM head) offloaded to disk or to the CPU, accelerate hooks them exactly as it hooks layers on
other GPUs. The scan (of layers and of sublayers), every evaluation, dropped / drop_layers and the sweep give the undispatched
model's results, and pruning keeps accelerate's device map in step with the layers."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import kit
from kit import prune
from kit.core.artifacts import save_checkpoint
from kit.core.device import model_device
from kit.evaluate import boolq, metrics, mmlu, validation_loss
from kit.experiments import sweep
from kit.loaders import data
from kit.prune.sublayers import RemovedSublayer

BLOCK = kit.Block(1, 2)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny model, and the same weights loaded with layers 1-2, the embeddings, the final norm and the
    LM head offloaded to disk, layers 0 and 3 on the CPU."""
    tmp = tmp_path_factory.mktemp("dispatch")
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=4)
    save_checkpoint(tmp / "tiny", model, tokenizer)
    device_map = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "disk", "lm_head": "disk"}  # fmt: skip
    dispatched, _ = kit.load_model(str(tmp / "tiny"), device_map=device_map, offload_folder=tmp / "offload")
    return model, dispatched, tokenizer


def test_the_model_is_really_offloaded(pair):
    _, dispatched, _ = pair
    assert dispatched.get_input_embeddings().weight.device.type == "meta"  # its weights wait on disk
    assert model_device(dispatched) == torch.device("cpu")  # where accelerate's hook runs them
    assert {str(p.device) for p in kit.core.layers.decoder_layers(dispatched)[1].parameters()} == {"meta"}


def test_scan_equals_the_undispatched_model(pair):
    model, dispatched, tokenizer = pair
    texts = data.corpus("validation")[:5]
    for metric, sublayers in (("angular_last", False), ("angular_all", False), ("angular_all", True)):
        plain, spread = (kit.angular_distances(m, tokenizer, texts, batch_size=2, max_length=32, metric=metric, sublayers=sublayers)
                         for m in (model, dispatched))  # fmt: skip
        torch.testing.assert_close(spread.matrix, plain.matrix, atol=1e-6, rtol=0)
        torch.testing.assert_close(spread.group_sums, plain.group_sums, atol=1e-9, rtol=1e-9)


def test_evaluations_equal_the_undispatched_model(pair):
    model, dispatched, tokenizer = pair
    questions = data.mmlu_questions(["anatomy", "marketing"], per_subject=2)
    plain, spread = (mmlu(m, tokenizer, questions, shots=1, batch_size=3) for m in (model, dispatched))
    assert spread.predictions == plain.predictions
    np.testing.assert_allclose(spread.loglikelihoods, plain.loglikelihoods, atol=1e-5)
    items = data.boolq_items(str(Path(__file__).parent / "fixtures" / "boolq.jsonl"), n=3)
    plain, spread = (boolq(m, tokenizer, items, batch_size=2) for m in (model, dispatched))
    assert spread.predictions == plain.predictions
    texts = data.corpus("validation")[:5]
    plain, spread = (validation_loss(m, tokenizer, texts, max_length=32, batch_size=2) for m in (model, dispatched))
    assert spread.loss == pytest.approx(plain.loss, rel=1e-6) and spread.tokens == plain.tokens


@pytest.mark.parametrize("removal, kept", [(BLOCK, ["cpu", "cpu"]), (kit.Layers({0, 2}), ["disk", "cpu"])], ids=["block", "set"])
def test_dropped_and_drop_layers_keep_the_device_map_in_step(pair, removal, kept):
    model, dispatched, tokenizer = pair
    texts = data.corpus("validation")[:4]
    before = dict(dispatched.hf_device_map)
    with prune.dropped(model, removal), prune.dropped(dispatched, removal):
        assert dispatched.hf_device_map == {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "disk",
                                            "lm_head": "disk", **{f"model.layers.{i}": d for i, d in enumerate(kept)}}  # fmt: skip
        loss = validation_loss(model, tokenizer, texts, max_length=32).loss
        assert validation_loss(dispatched, tokenizer, texts, max_length=32).loss == pytest.approx(loss, rel=1e-6)
    assert dispatched.hf_device_map == before
    pruned = prune.drop_layers(dispatched, removal)
    assert [pruned.hf_device_map[f"model.layers.{i}"] for i in range(2)] == kept and "model.layers.2" not in pruned.hf_device_map
    assert validation_loss(pruned, tokenizer, texts, max_length=32).loss == pytest.approx(loss, rel=1e-6)
    prompt = tokenizer(texts[0], return_tensors="pt")["input_ids"][:, :8]
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = prune.drop_layers(model, removal).generate(prompt, **greedy)  # the KV cache indexed by the renumbered layers
    assert torch.equal(pruned.generate(prompt, **greedy), expected)


def test_sweep_equals_the_undispatched_model(pair):
    model, dispatched, tokenizer = pair
    evals = [metrics.ValidationLoss(data.corpus("validation")[:4], max_length=32, batch_size=2)]
    plain, spread = (sweep.sweep(m, tokenizer, ns=[0, 2], evals=evals, criterion="heuristic") for m in (model, dispatched))
    np.testing.assert_allclose(spread["value"], plain["value"], rtol=1e-6)
    assert kit.core.layers.num_layers(dispatched) == 4


def test_embedded_model_with_a_third_of_its_layers_on_disk(tmp_path):
    """SmolLM2-135M (30 layers) with layers 10-19 offloaded to disk: the scan and the loss, also with a block dropped."""
    model, tokenizer = kit.load_model("smollm2-135m")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" if 10 <= i < 20 else "cpu" for i in range(30)}}  # fmt: skip
    dispatched, _ = kit.load_model("smollm2-135m", device_map=device_map, offload_folder=tmp_path)
    assert {str(p.device) for p in kit.core.layers.decoder_layers(dispatched)[15].parameters()} == {"meta"}
    texts = data.corpus("validation")[:3]
    plain, spread = (kit.angular_distances(m, tokenizer, texts, batch_size=3, max_length=24) for m in (model, dispatched))
    torch.testing.assert_close(spread.matrix, plain.matrix, atol=1e-6, rtol=0)
    block = kit.Block(12, 6)  # across the offloaded layers and out of them
    with prune.dropped(model, block), prune.dropped(dispatched, block):
        plain, spread = (validation_loss(m, tokenizer, texts, max_length=24) for m in (model, dispatched))
        assert spread.loss == pytest.approx(plain.loss, rel=1e-6)
        kept = dispatched.hf_device_map  # old layers 18, 19 (disk) and 20 (cpu) are now 12, 13 and 14
        assert (kept["model.layers.12"], kept["model.layers.13"], kept["model.layers.14"]) == ("disk", "disk", "cpu")
        assert "model.layers.24" not in kept


def test_ablation_oracle_equals_the_undispatched_model(pair):
    model, dispatched, tokenizer = pair
    texts = data.corpus("validation")[:5]
    ablation_losses = kit.choose.oracle.ablation_losses
    plain, spread = (ablation_losses(m, tokenizer, texts, ns=[1, 2], max_length=32, batch_size=2) for m in (model, dispatched))
    np.testing.assert_allclose(spread.loss, plain.loss, rtol=1e-6)
    np.testing.assert_allclose(spread.kl, plain.kl, rtol=1e-5, atol=1e-9)


def test_removed_sublayers_of_offloaded_layers_are_saved_as_zeros(pair, tmp_path, long_prompt):
    """A removed child of a layer offloaded to disk (its weights wait on the meta device) is materialised on the
    CPU, as accelerate's device map says, not on the meta device: the saved checkpoint computes the pruned model."""
    model, dispatched, tokenizer = pair
    removed = kit.Sublayers("mlp", {1, 3})  # layer 1 on disk, layer 3 on the CPU
    with prune.dropped(dispatched, removed):
        with kit.prune.sublayers.materialised(dispatched):
            assert {str(p.device) for p in kit.core.layers.decoder_layers(dispatched)[1].mlp.parameters()} == {"cpu"}
        kit.save_pruned(dispatched, tokenizer, tmp_path / "pruned")
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32)
    ids = long_prompt(tokenizer)
    with torch.no_grad(), kit.testing.zeroed_sublayers(model, "mlp", removed.layers):
        torch.testing.assert_close(written(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_a_copy_through_a_checkpoint_is_dispatched_as_the_model(pair, tmp_path, long_prompt):
    """Healing copies a model through a checkpoint (to quantize it): a dispatched model's copy keeps its device map,
    its offloaded layers offloaded (on GPUs: a 70B over its GPUs, not whole on cuda:0) and its removed sublayers
    removed; a 4-bit copy of an offloaded model, which bitsandbytes cannot offload, is placed by accelerate."""
    model, dispatched, tokenizer = pair
    removed = kit.Sublayers("mlp", {1, 3})
    with prune.dropped(dispatched, removed):
        copied = kit.healing.lora.reloaded(dispatched, tokenizer, None, tmp_path)
        quantized = kit.healing.lora.reloaded(dispatched, tokenizer, "4bit", tmp_path)  # the same map would be refused
    assert copied.hf_device_map == dispatched.hf_device_map
    assert {str(p.device) for p in kit.core.layers.decoder_layers(copied)[2].parameters()} == {"meta"}  # on disk
    ids = long_prompt(tokenizer)
    with torch.no_grad(), kit.testing.zeroed_sublayers(model, "mlp", removed.layers):
        torch.testing.assert_close(copied(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    assert quantized.is_loaded_in_4bit and isinstance(kit.core.layers.decoder_layers(quantized)[3].mlp, RemovedSublayer)
