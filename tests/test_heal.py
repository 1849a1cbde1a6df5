"""QLoRA healing on tiny models: the 4-bit path against an fp32 twin, training, adapters,
resume, distillation and the paper's settings."""

import warnings

import bitsandbytes as bnb
import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

import kit
from kit.healing.lora import lora_model
from kit.healing.train import Blocks, HealTrainer, distillation_kl, heal, pack, training_arguments
from kit.loaders.models import load_model

TINY = dict(rank=4, lr=3e-2, batch_size=16, seq_len=32, log_every=1, dropout=0.0)  # one text = one fixed batch


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    """A tiny Llama saved as a plain checkpoint."""
    model, tokenizer = kit.testing.tiny_model("llama")
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def texts():
    return kit.loaders.data.corpus("train")[:1]


@pytest.fixture(scope="module")
def val_texts():
    return kit.loaders.data.corpus("validation")[:1]


@pytest.fixture(scope="module")
def healed(base_path, texts, val_texts, tmp_path_factory):
    """An in-memory fp32 tiny Llama healed 4-bit on a few blocks, with validation."""
    model, tokenizer = load_model(str(base_path))
    config = kit.HealConfig(**TINY, steps=8, eval_every=4, save_every=4)
    result = heal(model, tokenizer, texts, config, output_dir=tmp_path_factory.mktemp("healed"), val_texts=val_texts)
    return result, tokenizer, config


def blocks_of(tokenizer, texts, config, n):
    return pack(tokenizer, texts, config.seq_len)[:n]


def lm_loss(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


# ------------------------------------------------------------------------------------ config


# ------------------------------------------------------------------------------------ data


def test_pack_concatenates_texts_with_eos_and_drops_the_remainder():
    _, tokenizer = kit.testing.tiny_model("llama")
    texts = kit.loaders.data.corpus("train")[:4]
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = pack(tokenizer, texts, 64)
    assert blocks.shape == (len(stream) // 64, 64)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert Blocks(blocks)[1]["labels"].tolist() == stream[64:128]
    with pytest.raises(ValueError, match="less than one block of seq_len=100000"):
        pack(tokenizer, texts[:1], 100_000)


# ------------------------------------------------------------------------------------ model


def test_lora_targets_the_mlp_projections(tiny):
    model, _ = tiny
    fused = kit.core.layers.mlp_parameters(model)  # MoE: fused routed experts, peft's target_parameters (no dropout)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore" if fused else "error", "LoRA on the fused expert weights")
        peft_model = lora_model(model, kit.HealConfig(quantize=None))
    adapted = {name.removesuffix(".base_layer") for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    suffixes = tuple("." + name for name in kit.core.layers.mlp_modules(model))
    owners = tuple("." + name.rpartition(".")[0] for name in fused)  # the module holding each fused weight
    expected = {name for name, _ in peft_model.named_modules() if name.endswith(suffixes + owners) and ".lora_" not in name}
    assert adapted == expected
    if not fused and len({type(layer.mlp) for layer in kit.core.layers.decoder_layers(model) if hasattr(layer, "mlp")}) <= 1:
        assert len(adapted) == kit.core.layers.num_layers(model) * len(suffixes)  # a dense model: every target in every layer
    prefix = "base_model.model." + kit.core.layers.anatomy(model).layers + "."
    assert {int(name.removeprefix(prefix).partition(".")[0]) for name in adapted} == set(range(kit.core.layers.num_layers(model)))


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])  # shared and routed experts; fused routed experts only
def test_lora_on_moe_targets_shared_and_routed_experts_and_trains_them(family):
    model = kit.families.tiny_family_model(family)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        before = model(ids).logits
    with pytest.warns(UserWarning, match="lora_dropout=0"):  # peft's target_parameters take no dropout
        peft_model = lora_model(model, kit.HealConfig(quantize=None))
    adapted = {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    mlp = {f"model.layers.{i}.{name}" for i in range(4) for name in kit.core.layers.mlp_modules(model)}
    experts = {f"model.layers.{i}.mlp.experts" for i in range(4)}
    assert {name.removesuffix(".base_layer") for name in adapted} == mlp | experts  # no router, no attention
    assert peft_model.peft_config["default"].target_parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    out = peft_model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, before)  # LoRA B starts at zero: the base model's output
    out.loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in grads)
    assert all(grads[n].abs().sum() > 0 for n in grads if "experts" in n and "lora_B" in n)


def test_lora_all_linear_adapts_attention_too():
    model, _ = kit.testing.tiny_model("llama")
    peft_model = lora_model(model, kit.HealConfig(quantize=None, target_modules="all-linear"))
    adapted = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_4bit_lora_gradients_match_an_fp32_twin_of_the_dequantized_weights(base_path, texts):
    quantized, tokenizer = load_model(str(base_path), quantize="4bit")
    twin, _ = load_model(str(base_path), dtype=torch.float32)
    linear4bit = {name: m for name, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(linear4bit) == 7 * kit.core.layers.num_layers(twin)  # every linear layer of every block is NF4
    for name, module in linear4bit.items():
        twin.get_submodule(name).weight.data = bnb.functional.dequantize_4bit(
            module.weight.data, module.weight.quant_state
        ).float()
    config = kit.HealConfig(rank=4, dropout=0.0)
    quantized, twin = lora_model(quantized, config), lora_model(twin, config)
    torch.manual_seed(1)
    lora = {n: torch.randn_like(p) * 0.1 for n, p in quantized.named_parameters() if "lora_" in n}
    for model in (quantized, twin):
        model.load_state_dict(lora, strict=False)  # non-zero B so that A gets gradients too
    ids = blocks_of(tokenizer, texts, config.replace(seq_len=32), 2)
    grads = []
    for model in (quantized, twin):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() == lora.keys()
    for name in lora:
        assert F.cosine_similarity(grads[0][name], grads[1][name], dim=0) > 0.999, name


# ------------------------------------------------------------------------------------ training


def test_training_lowers_the_loss_and_changes_only_lora(healed, base_path, texts):
    result, tokenizer, config = healed
    fresh, _ = load_model(str(base_path), quantize="4bit")  # what quantizing the in-memory model must give
    # state dicts first: on AVX512-BF16 CPUs an inference forward repacks NF4 weights, and
    # state_dict() unpacks them lossily (bitsandbytes 0.50)
    trained = {
        name.replace(".base_layer", ""): value
        for name, value in result.model.get_base_model().state_dict().items()
        if "lora_" not in name
    }
    reference = fresh.state_dict()
    assert trained.keys() == reference.keys()
    assert [n for n in reference if not torch.equal(trained[n], reference[n])] == []
    ids = pack(tokenizer, texts, config.seq_len)
    assert len(ids) <= config.batch_size  # every step saw this same batch
    assert lm_loss(result.model, ids) < lm_loss(fresh, ids) - 0.2
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero


def test_history_records_train_and_validation_losses(healed, val_texts):
    result, tokenizer, config = healed
    assert [e["step"] for e in result.history["train"]] == list(range(1, config.steps + 1))
    assert [e["step"] for e in result.history["validation"]] == [0, 4, 8]
    val = pack(tokenizer, val_texts, config.seq_len)  # equal-length blocks: the mean over all their tokens
    # rel 1e-4: after training, bitsandbytes' CPU inference kernel sums in another order
    assert result.history["validation"][-1]["loss"] == pytest.approx(lm_loss(result.model, val), rel=1e-4)


def test_adapter_round_trip_gives_equal_logits(healed, base_path, texts):
    result, tokenizer, config = healed
    base, _ = load_model(str(base_path), quantize="4bit")
    reloaded = PeftModel.from_pretrained(base, str(result.adapter_path)).eval()
    ids = blocks_of(tokenizer, texts, config, 2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)


class Interrupt(TrainerCallback):
    """Crash right after the checkpoint of step `at` is written."""

    def __init__(self, at):
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


class Steps(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(state.global_step)


def test_resume_continues_from_the_checkpoint_and_ends_at_the_same_weights(base_path, texts, val_texts, tmp_path):
    _, tokenizer = kit.testing.tiny_model("llama")
    # fp32 base: resuming is the Trainer's checkpoints and RNG state, the same for a 4-bit base (tested above)
    config = kit.HealConfig(**{**TINY, "dropout": 0.1}, steps=4, save_every=2, eval_every=2, quantize=None)
    run = dict(val_texts=val_texts)
    straight = heal(base_path, tokenizer, texts, config, output_dir=tmp_path / "straight", **run)
    with pytest.raises(KeyboardInterrupt):
        heal(base_path, tokenizer, texts, config, output_dir=tmp_path / "resumed", callbacks=[Interrupt(at=2)], **run)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-2"]
    cut_short = tmp_path / "resumed" / "checkpoint-3"  # killed while the Trainer wrote it
    cut_short.mkdir()
    (cut_short / "trainer_state.json").write_text('{"global_step": 3, "log_hist')
    steps = Steps()
    resumed = heal(base_path, tokenizer, texts, config, output_dir=tmp_path / "resumed", callbacks=[steps], **run)
    assert steps.seen == [3, 4]
    assert resumed.history == straight.history
    a = load_file(straight.adapter_path / "adapter_model.safetensors")
    b = load_file(resumed.adapter_path / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="checkpoints of a healing run with different settings"):
        heal(base_path, tokenizer, texts, config.replace(lr=1e-3), output_dir=tmp_path / "resumed")


def test_healing_again_a_finished_run_trains_no_further_step(tmp_path):
    config = kit.HealConfig(rank=2, lr=1e-2, steps=6, batch_size=2, seq_len=32, quantize=None, save_every=1)
    runs = []
    for _ in range(3):
        model, tokenizer = kit.testing.tiny_model("llama")
        result = heal(model, tokenizer, kit.loaders.data.corpus("train")[:8], config, output_dir=tmp_path, callbacks=[steps := Steps()])
        runs.append((steps.seen, result.history, load_file(result.adapter_path / "adapter_model.safetensors")))
    assert [seen for seen, _, _ in runs] == [[1, 2, 3, 4, 5, 6], [], []]
    assert runs[0][1] == runs[1][1] == runs[2][1]
    assert all(torch.equal(runs[0][2][k], later[2][k]) for later in runs[1:] for k in runs[0][2])


# ------------------------------------------------------------------------------------ distillation


def test_distillation_kl_is_the_temperature_scaled_kl_divergence():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    expected = F.kl_div(
        F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1), log_target=True, reduction="none"
    ).sum(-1) * 4
    torch.testing.assert_close(distillation_kl(student, teacher, 2.0), expected)
    assert distillation_kl(student, student, 2.0).abs().max() < 1e-6


def test_distillation_loss_mixes_lm_loss_and_kl(texts, tmp_path):
    student, tokenizer = kit.testing.tiny_model("llama", num_layers=2)
    teacher, _ = kit.testing.tiny_model("llama", num_layers=4, seed=1)
    config = kit.HealConfig(quantize=None, gradient_checkpointing=False, dropout=0.0, distill_weight=0.25)
    model = lora_model(student, config)
    trainer = HealTrainer(
        model=model,
        args=training_arguments(config, tmp_path, evaluate=False),
        teacher=teacher,
        distill_weight=0.25,
        temperature=1.0,
    )
    ids = blocks_of(tokenizer, texts, config.replace(seq_len=32), 2)
    with torch.no_grad():
        lm = model(input_ids=ids, labels=ids).loss
        kl = distillation_kl(model(input_ids=ids).logits[:, :-1], teacher(input_ids=ids).logits[:, :-1], 1.0).mean()
        model.train()
        loss = trainer.compute_loss(model, {"input_ids": ids, "labels": ids})
        # under gradient accumulation both terms are normalised by the whole batch's label count
        assert trainer.model_accepts_loss_kwargs
        half = trainer.compute_loss(model, {"input_ids": ids, "labels": ids}, num_items_in_batch=2 * ids[:, 1:].numel())
        model.eval()
        eval_loss = trainer.compute_loss(model, {"input_ids": ids, "labels": ids})
    torch.testing.assert_close(loss, 0.75 * lm + 0.25 * kl)
    torch.testing.assert_close(half, loss / 2)
    torch.testing.assert_close(eval_loss, lm)  # validation reports the plain LM loss


def test_distillation_needs_teacher_and_weight_together(base_path, texts, tmp_path):
    _, tokenizer = kit.testing.tiny_model("llama")
    teacher, _ = kit.testing.tiny_model("llama")
    with pytest.raises(ValueError, match="needs both a teacher model and config.distill_weight > 0"):
        heal(base_path, tokenizer, texts, kit.HealConfig(), output_dir=tmp_path, teacher=teacher)
    with pytest.raises(ValueError, match="needs both a teacher model and config.distill_weight > 0"):
        heal(base_path, tokenizer, texts, kit.HealConfig(distill_weight=0.5), output_dir=tmp_path)


def test_heal_curve_draws_the_history():
    history = {"train": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}], "validation": [{"step": 2, "loss": 2.7}]}
    ax = kit.experiments.plots.heal_curve(history)
    lines = {line.get_label(): line.get_xydata().tolist() for line in ax.lines}
    assert lines == {"train": [[1, 3.0], [2, 2.5]], "validation": [[2, 2.7]]}
    plt.close(ax.figure)


# ------------------------------------------------------------------------------------ scale


def test_distillation_kl_in_chunks_equals_the_whole_and_its_gradient(monkeypatch):
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 7, 13, requires_grad=True), torch.randn(3, 7, 13)
    whole = distillation_kl(student, teacher, 1.5)
    (grad_whole,) = torch.autograd.grad(whole.sum(), student)
    monkeypatch.setattr(kit.healing.train, "_KL_TOKENS", 4)  # 21 positions in 6 chunks
    chunked = distillation_kl(student, teacher, 1.5)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), student)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad_chunked, grad_whole)


def test_several_visible_gpus_without_a_launcher_keep_the_global_batch(tmp_path):
    config = kit.HealConfig(batch_size=4, grad_accum=2)
    args = training_arguments(config, tmp_path, evaluate=False)
    args._n_gpu = 4  # as the Trainer counts them on a 4-GPU machine started without torchrun / accelerate
    assert args.train_batch_size == 16  # what the Trainer would silently train with
    assert kit.healing.train.single_gpu(args).train_batch_size * config.grad_accum == config.global_batch


def test_healing_a_model_on_a_second_gpu_without_a_launcher_says_how(monkeypatch, tmp_path):
    # Mocked placement (no GPU here). On a GPU machine the Trainer would train on cuda:0: accelerate refuses
    # a 4-bit model on cuda:1, a full-precision one is moved there silently.
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=2)
    monkeypatch.setattr(kit.healing.train, "model_device", lambda model: torch.device("cuda", 1))
    with pytest.raises(ValueError, match="run with CUDA_VISIBLE_DEVICES=1"):
        kit.heal(model, tokenizer, ["a text"], kit.HealConfig(steps=1, quantize=None), output_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # stopped before anything was written


def test_a_4bit_copy_of_a_model_over_gpus_is_loaded_over_the_same_gpus(monkeypatch, tmp_path):
    # Mocked loading (no GPU here; tests/test_dispatch.py copies a model dispatched over CPU and disk for real). On
    # GPUs, the 4-bit copy of a 70B dispatched over several was loaded whole on cuda:0.
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=2)
    over_gpus = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1, "lm_head": 1}
    model.hf_device_map = dict(over_gpus)
    placements = []
    monkeypatch.setattr(kit.healing.lora, "load_model", lambda path, **kwargs: placements.append(kwargs) or (model, tokenizer))
    kit.healing.lora.reloaded(model, tokenizer, "4bit", tmp_path)
    model.hf_device_map["model.layers.1"] = "cpu"  # bitsandbytes offloads no 4-bit weights: accelerate plans the copy
    kit.healing.lora.reloaded(model, tokenizer, "4bit", tmp_path)
    assert [p.get("device_map") for p in placements] == [over_gpus, "auto"] and "device" not in placements[0]


def test_a_pruned_4bit_model_is_written_from_its_full_precision_weights(tmp_path):
    model, tokenizer = kit.testing.tiny_model("llama")
    model.save_pretrained(tmp_path / "base", max_shard_size="100KB")  # several shards, streamed one by one
    tokenizer.save_pretrained(tmp_path / "base")
    quantized, _ = load_model(str(tmp_path / "base"), device="cpu", quantize="4bit")
    pruned = kit.drop_layers(quantized, kit.Block(2, 2), inplace=True)
    with pytest.raises(ValueError, match="save_pruned_full_precision"):
        kit.save_pruned(pruned, tokenizer, tmp_path / "refused")
    kit.healing.merge.save_pruned_full_precision(pruned, tokenizer, tmp_path / "pruned")
    written, _ = load_model(str(tmp_path / "pruned"), device="cpu", dtype=torch.float32)
    expected = kit.drop_layers(model, kit.Block(2, 2))
    assert "quantization_config" not in written.config.to_dict() and written.config.pruned_blocks == [[2, 2]]
    assert written.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in written.state_dict().items())


@torch.no_grad()
def test_a_4bit_model_without_mlps_is_written_computing_without_them(tmp_path, smollm):
    """SmolLM2 loaded 4-bit without the MLPs of layers 3, 10 and 20, written from its full-precision weights: plain
    transformers (as lm-eval or vLLM load it) computes the fp32 model without those MLPs, not the unpruned one."""
    model, tokenizer = smollm
    removed = kit.Sublayers("mlp", [3, 10, 20])
    quantized, _ = load_model("smollm2-135m", quantize="4bit")
    kit.healing.merge.save_pruned_full_precision(kit.drop_layers(quantized, removed, inplace=True), tokenizer, tmp_path / "out")
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with kit.testing.zeroed_sublayers(model, "mlp", removed.layers):  # the branches' outputs zeroed by hooks
        expected = model(ids).logits
    torch.testing.assert_close(written(ids).logits, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_a_4bit_model_without_a_block_and_sublayers_is_written_with_them_zero(tmp_path, long_prompt):
    """Whole layers removed, then sublayers named by the pruned model's indices: the written checkpoint zeroes the
    children of the renumbered layers, not of the base's layers of those indices."""
    model, tokenizer = kit.testing.tiny_model("llama")  # 6 layers
    model.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path / "base")
    pruned, _ = load_model(str(tmp_path / "base"), device="cpu", quantize="4bit")
    for removal in (kit.Block(1, 2), kit.Sublayers("mlp", [0, 2]), kit.Sublayers("attention", [3])):  # 2, 3 = base 4, 5
        pruned = kit.drop_layers(pruned, removal, inplace=True)
    kit.healing.merge.save_pruned_full_precision(pruned, tokenizer, tmp_path / "out")
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    zero = [[bool(torch.count_nonzero(p) == 0) for p in m.parameters()] for layer in kit.core.layers.decoder_layers(written)
            for m in (layer.self_attn, layer.mlp)]  # fmt: skip
    assert [all(z) for z in zero] == [False, True, False, False, False, True, True, False]  # (attention, mlp) per layer
    ids = long_prompt(tokenizer)
    with kit.prune.dropped(model, kit.Block(1, 2)), kit.testing.zeroed_sublayers(model, "mlp", [0, 2]):
        with kit.testing.zeroed_sublayers(model, "attention", [3]):
            expected = model(ids).logits
    torch.testing.assert_close(written(ids).logits, expected, atol=1e-5, rtol=0)
