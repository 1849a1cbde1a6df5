import matplotlib

matplotlib.use("Agg")

import json  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import kit  # noqa: E402
from kit import evaluate  # noqa: E402
from kit.core import layers  # noqa: E402
from kit.core.block import Block, heuristic_block  # noqa: E402
from kit.evaluate import metrics  # noqa: E402
from kit.experiments import results, sweep  # noqa: E402
from kit.loaders import data  # noqa: E402
from kit.prune import drop_layers  # noqa: E402
from kit.testing import random_distances  # noqa: E402

TEXTS = data.corpus("validation")[:3]


@pytest.mark.parametrize("criterion", sweep.PAPER_CRITERIA)
def test_sweep_equals_evaluating_each_pruned_copy(criterion, snapshot):
    model, tokenizer = kit.testing.tiny_model("qwen2")
    distances = random_distances(6)
    before = snapshot(model)
    evals = [metrics.ValidationLoss(TEXTS, max_length=64)]
    table = sweep.sweep(model, tokenizer, ns=[0, 1, 3], evals=evals, distances=distances, criterion=criterion)

    assert list(table.columns) == [
        "criterion", "n", "fraction", "start", "distance", "healed", "metric", "value", "ci_low", "ci_high", "chance",
        "outcomes", "per_text",
    ]  # fmt: skip
    assert set(table["metric"]) == {"val_loss", "val_loss_norm"} and len(table) == 6
    for n in (0, 1, 3):
        row = table[(table.n == n) & (table.metric == "val_loss")].iloc[0]
        assert row.fraction == n / 6 and not row.healed
        if n == 0:
            reference = model
        else:
            block = distances.best_block(n) if criterion == "similarity" else heuristic_block(6, n)
            assert row.start == block.start
            reference = drop_layers(model, block)
        expected = evaluate.validation_loss(reference, tokenizer, TEXTS, max_length=64)
        assert row.value == pytest.approx(expected.loss, abs=1e-6)
        assert (row.ci_low, row.ci_high) == pytest.approx((expected.loss - 1.96 * expected.stderr, expected.loss + 1.96 * expected.stderr), abs=1e-3)
        assert row.outcomes is None and math.isnan(row.chance)
        assert results.per_text(row).tolist() == [[s, t] for s, t in zip(expected.text_losses, expected.text_tokens)]
    assert snapshot(model) == before and layers.num_layers(model) == 6


def test_sweep_heals_chosen_sizes_from_the_pruned_view():
    model, tokenizer = kit.testing.tiny_model("llama")
    seen = []

    def heal(pruned, tok, block):
        seen.append((layers.num_layers(pruned), block))
        assert pruned is model  # the view, never a copy
        return pruned

    probe = lambda m, t: {"layers": float(layers.num_layers(m))}  # noqa: E731
    table = sweep.sweep(model, tokenizer, ns=[0, 2], evals=[probe], criterion="heuristic", heal=heal, heal_ns=[2])
    assert seen == [(4, Block(3, 2))]
    assert table[["n", "healed", "value"]].values.tolist() == [[0, False, 6.0], [2, False, 4.0], [2, True, 4.0]]
    assert layers.num_layers(model) == 6


@pytest.mark.parametrize("quantize", ["4bit", None])
def test_healer_leaves_the_swept_model_untouched(quantize, tmp_path):
    model, tokenizer = kit.testing.tiny_model("llama")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    config = kit.HealConfig(rank=2, lr=1e-2, steps=2, batch_size=2, seq_len=32, quantize=quantize, save_every=2)
    heal = sweep.healer(kit.loaders.data.corpus("train")[:4], config, output_root=tmp_path)
    probe = lambda m, t: {"layers": float(layers.num_layers(m))}  # noqa: E731
    table = sweep.sweep(model, tokenizer, ns=[2], evals=[probe], criterion="heuristic", heal=heal, heal_ns=[2])
    assert table[["healed", "value"]].values.tolist() == [[False, 4.0], [True, 4.0]]
    assert (tmp_path / "n2" / "adapter" / "adapter_model.safetensors").exists()
    assert model.state_dict().keys() == weights.keys() and layers.num_layers(model) == 6
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert not any("lora" in name for name, _ in model.named_modules()) and not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters()) and not model.training and model.config.use_cache


def test_a_healed_point_holds_no_second_copy_of_the_weights(smollm, tmp_path):
    """LoRA on the pruned view itself (quantize=None), taken off after its evaluation: the point's peak stays
    far below the weights (measured: 0.04 x; with a deep copy of the pruned model, as before: 0.94 x)."""
    from kit.core.memory import measure

    model, tokenizer = smollm
    config = kit.HealConfig(rank=2, lr=1e-3, steps=1, batch_size=1, seq_len=32, quantize=None, save_every=1)
    heal = sweep.healer(kit.loaders.data.corpus("train")[:2], config, output_root=tmp_path)
    probe = lambda m, t: {"layers": float(layers.num_layers(m))}  # noqa: E731
    with measure() as memory:
        table = sweep.sweep(model, tokenizer, ns=[4], evals=[probe], criterion="heuristic", heal=heal, heal_ns=[4])
    assert table["value"].tolist() == [26.0, 26.0]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert memory.in_weights(weights) < 0.5, memory.in_weights(weights)
    assert all(p.requires_grad for p in model.parameters()) and not any("lora" in n for n, _ in model.named_modules())


def test_healing_a_4bit_model_in_a_sweep_leaves_it_untouched(tmp_path):
    # peft's prepare_model_for_kbit_training casts the norms to fp32 and get_peft_model injects LoRA in place:
    # on the loaded 4-bit model itself, every later point of the sweep would be measured on a modified model.
    # (Its values are not compared: on CPUs with AVX512-BF16 bitsandbytes repacks NF4 weights between
    # forwards, and two evaluations of one untouched 4-bit model differ by 1e-4 nats.)
    kit.testing.tiny_model("llama")[0].save_pretrained(tmp_path / "base")
    kit.testing.tiny_tokenizer().save_pretrained(tmp_path / "base")
    model, tokenizer = kit.load_model(str(tmp_path / "base"), device="cpu", dtype=torch.bfloat16, quantize="4bit")
    before = {k: v.dtype for k, v in model.state_dict().items()}
    config = kit.HealConfig(rank=2, lr=1e-2, steps=1, batch_size=2, seq_len=32, quantize="4bit", save_every=1)
    heal = sweep.healer(kit.loaders.data.corpus("train")[:4], config, output_root=tmp_path / "healed")
    probe = lambda m, t: {"layers": float(layers.num_layers(m))}  # noqa: E731
    table = sweep.sweep(model, tokenizer, ns=[2], evals=[probe], criterion="heuristic", heal=heal, heal_ns=[2])
    assert table[["healed", "value"]].values.tolist() == [[False, 4.0], [True, 4.0]]
    assert not any("lora" in name for name, _ in model.named_modules()) and not hasattr(model, "peft_config")
    assert {k: v.dtype for k, v in model.state_dict().items()} == before  # bf16 norms stay bf16


def test_a_healed_4bit_point_computes_in_the_dtype_of_its_base(tmp_path):
    """peft's prepare_model_for_kbit_training trains a 4-bit base with its embeddings, norms and head in fp32;
    the healed model is measured as users run it, in the base's dtype (its residual stream and KV cache in
    bf16 here), not in fp32 beside bf16 rows."""
    kit.testing.tiny_model("llama")[0].save_pretrained(tmp_path / "base")
    kit.testing.tiny_tokenizer().save_pretrained(tmp_path / "base")
    model, tokenizer = kit.load_model(str(tmp_path / "base"), device="cpu", dtype=torch.bfloat16, quantize="4bit")
    config = kit.HealConfig(rank=2, lr=1e-2, steps=1, batch_size=2, seq_len=32, quantize="4bit", save_every=1)
    heal = sweep.healer(kit.loaders.data.corpus("train")[:4], config, output_root=tmp_path / "healed")
    ids = tokenizer("The code for the lamp is", return_tensors="pt").input_ids

    def dtypes(m, t):
        with torch.no_grad():
            stream = m(ids, output_hidden_states=True).hidden_states[-2].dtype  # a layer's output, before the final norm
        fp32 = [name for name, p in m.named_parameters() if p.dtype == torch.float32 and "lora_" not in name]
        return {"bf16_stream": float(stream == torch.bfloat16), "fp32_parameters": float(len(fp32))}

    table = sweep.sweep(model, tokenizer, ns=[2], evals=[dtypes], criterion="heuristic", heal=heal, heal_ns=[2])
    healed = table[table["healed"]].set_index("metric")["value"]
    assert healed["bf16_stream"] == 1.0 and healed["fp32_parameters"] == 0.0


def test_sweep_restores_the_model_after_an_error():
    model, tokenizer = kit.testing.tiny_model("gemma3")
    layer_types = list(model.config.layer_types)

    def broken(m, t):
        if layers.num_layers(m) < 6:
            raise RuntimeError("evaluation failed")
        return {}

    with pytest.raises(RuntimeError, match="evaluation failed"):
        sweep.sweep(model, tokenizer, ns=[0, 2], evals=[broken], criterion="heuristic")
    assert layers.num_layers(model) == 6 and model.config.layer_types == layer_types


def test_mmlu_metrics_in_a_sweep(smollm):
    # The embedded model: tiny models answer "A" to everything (their tokenizer has " A" as one token but
    # splits " B".." D" in two), so no pruning could change their row. SmolLM2 changes its answers.
    model, tokenizer = smollm
    questions = data.mmlu_questions(["anatomy", "world_religions"], per_subject=2)
    table = sweep.sweep(model, tokenizer, ns=[0, 8], evals=[metrics.MMLUAccuracy(questions, shots=0)], criterion="heuristic")
    predictions = {}
    for n, reference in ((0, model), (8, drop_layers(model, heuristic_block(30, 8)))):
        direct = evaluate.mmlu(reference, tokenizer, questions, shots=0)
        predictions[n] = direct.predictions
        correct = np.array([p == "ABCD"[q.answer] for p, q in zip(direct.predictions, questions)])
        rows = table[table.n == n].set_index("metric")
        assert rows.loc["mmlu", "value"] == correct.mean()
        assert rows.loc["mmlu_subjects", "value"] == pytest.approx((correct[:2].mean() + correct[2:].mean()) / 2)
        assert tuple(rows.loc["mmlu", ["ci_low", "ci_high"]]) == kit.core.stats.wilson(correct.sum(), len(correct))
        assert tuple(rows.loc["mmlu_subjects", ["ci_low", "ci_high"]]) == direct.subject_ci
        assert rows["chance"].tolist() == [0.25, 0.25]
        assert results.outcomes(table[(table.n == n) & (table.metric == "mmlu")].iloc[0]).tolist() == correct.tolist()
    assert predictions[0] != predictions[8]  # the rows tell the pruned model from the unpruned one
    with pytest.raises(ValueError, match="'mmlu_subjects' has no per-question outcomes"):
        results.outcomes(table[table.metric == "mmlu_subjects"].iloc[0])


def test_sweep_bad_input():
    model, tokenizer = kit.testing.tiny_model("llama")
    with pytest.raises(ValueError, match="needs the distances"):
        sweep.sweep(model, tokenizer, ns=[1], evals=[], criterion="similarity")
    with pytest.raises(ValueError, match="similarity, heuristic"):
        sweep.sweep(model, tokenizer, ns=[1], evals=[], criterion="random")
    with pytest.raises(ValueError, match="the model has 6"):
        sweep.sweep(model, tokenizer, ns=[1], evals=[], distances=random_distances(4))
    with pytest.raises(ValueError, match="also in ns"):
        sweep.sweep(model, tokenizer, ns=[1], evals=[], criterion="heuristic", heal=lambda *a: a[0], heal_ns=[2])
    with pytest.raises(ValueError, match="choose 1 <= n <= 5"):
        sweep.sweep(model, tokenizer, ns=[6], evals=[], criterion="heuristic")


def test_compare_loads_each_checkpoint(tmp_path):
    model, tokenizer = kit.testing.tiny_model("llama")
    for name, m in {"full": model, "pruned": drop_layers(model, Block(1, 2))}.items():
        m.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    evals = [metrics.ValidationLoss(TEXTS, max_length=64)]
    table = sweep.compare({"original": tmp_path / "full", "pruned": tmp_path / "pruned"}, evals)
    assert table.index.tolist() == ["original", "pruned"] and table["layers"].tolist() == [6, 4]
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert table.loc["original", "parameters"] - table.loc["pruned", "parameters"] == 2 * per_layer
    expected = evaluate.validation_loss(model, tokenizer, TEXTS, max_length=64)
    assert table.loc["original", "val_loss"] == pytest.approx(expected.loss, abs=1e-6)
    half = 1.959964 * expected.stderr  # the interval beside the value, as the sweep's rows carry it
    assert table.loc["original", ["val_loss_ci_low", "val_loss_ci_high"]].tolist() == pytest.approx([expected.loss - half, expected.loss + half])


COST = metrics.InferenceCost(prompt_tokens=8, new_tokens=3, repeats=1, threads=1)


def test_cost_metrics_in_a_sweep():
    model, tokenizer = kit.testing.tiny_model("llama")
    table = sweep.sweep(model, tokenizer, ns=[0, 2], evals=[COST], criterion="heuristic")
    values = table.pivot(index="n", columns="metric", values="value")
    assert values.loc[2, "kv_bytes_per_token"] == values.loc[0, "kv_bytes_per_token"] * 4 / 6
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert values.loc[0, "parameters"] - values.loc[2, "parameters"] == 2 * per_layer
    assert values.loc[0, "weight_bytes"] == 4 * values.loc[0, "parameters"]
    assert (values[["prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s"]] > 0).all().all()


def test_compare_an_unmerged_adapter_against_its_merged_checkpoint(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = kit.testing.tiny_model("llama")
    config = LoraConfig(r=2, lora_alpha=2, target_modules=layers.mlp_modules(model), init_lora_weights=False)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapted = get_peft_model(model, config)
    adapted.save_pretrained(tmp_path / "adapter")
    lora = sum(p.numel() for name, p in adapted.named_parameters() if "lora_" in name)
    adapted.merge_and_unload().save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    evals = [metrics.ValidationLoss(TEXTS, max_length=64), COST]
    table = sweep.compare({"merged": tmp_path / "merged", "adapter": (tmp_path / "base", tmp_path / "adapter")}, evals)
    merged, unmerged = table.loc["merged"], table.loc["adapter"]
    assert unmerged["parameters"] - merged["parameters"] == lora > 0 and (table["layers"] == 6).all()
    assert unmerged["weight_bytes"] - merged["weight_bytes"] == 4 * lora
    assert unmerged["kv_bytes_per_token"] == merged["kv_bytes_per_token"]
    assert unmerged["val_loss"] == pytest.approx(merged["val_loss"], abs=1e-5)


def test_an_interrupted_sweep_resumes_from_its_cache_with_an_identical_table(tmp_path):
    model, tokenizer = kit.testing.tiny_model("llama")
    distances, cache = random_distances(6), tmp_path / "sweep.json"
    calls, stop_at = [], [None]

    def probe(m, t):
        calls.append(layers.num_layers(m))
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt  # the process dies here
        return {"loss": evaluate.validation_loss(m, t, TEXTS[:2], max_length=32).loss, "layers": layers.num_layers(m)}

    def heal(pruned, tok, block):
        return pruned

    def run(**kwargs):
        return sweep.sweep(model, tokenizer, ns=[0, 1, 3], evals=[probe], distances=distances, heal=heal, heal_ns=[3],
                           settings={"texts": 2}, **kwargs)  # fmt: skip

    reference = run()
    assert len(calls) == 4
    calls.clear()
    stop_at[0] = 3
    with pytest.raises(KeyboardInterrupt):
        run(cache_path=cache)
    stop_at[0] = None
    calls.clear()
    resumed = run(cache_path=cache)
    assert calls == [3, 3]  # only the points not finished before: n=3, then n=3 healed
    pd.testing.assert_frame_equal(resumed, reference)
    calls.clear()
    pd.testing.assert_frame_equal(run(cache_path=cache), reference)
    assert calls == [] and [p.name for p in tmp_path.iterdir()] == ["sweep.json"]


def test_a_sweep_cache_of_other_settings_is_refused(tmp_path):
    model, tokenizer = kit.testing.tiny_model("llama")
    probe = lambda m, t: {"layers": float(layers.num_layers(m))}  # noqa: E731
    cache = tmp_path / "sweep.json"
    sweep.sweep(model, tokenizer, ns=[0, 2], evals=[probe], distances=random_distances(6), cache_path=cache, settings={"shots": 5})
    with pytest.raises(ValueError, match=r"other settings \(ns: \[0, 2\] -> \[0, 3\]\); delete it or pass another cache_path"):
        sweep.sweep(model, tokenizer, ns=[0, 3], evals=[probe], distances=random_distances(6), cache_path=cache, settings={"shots": 5})
    with pytest.raises(ValueError, match=r"settings.shots: 5 -> 0"):
        sweep.sweep(model, tokenizer, ns=[0, 2], evals=[probe], distances=random_distances(6), cache_path=cache, settings={"shots": 0})
    with pytest.raises(ValueError, match=r"distances: '\w+' -> '\w+'"):
        sweep.sweep(model, tokenizer, ns=[0, 2], evals=[probe], distances=random_distances(6, seed=1), cache_path=cache, settings={"shots": 5})
    with pytest.raises(ValueError, match="criterion: 'similarity' -> 'heuristic'"):
        sweep.sweep(model, tokenizer, ns=[0, 2], evals=[probe], criterion="heuristic", cache_path=cache, settings={"shots": 5})
    with pytest.raises(ValueError, match="num_layers: 6 -> 4"):
        sweep.sweep(drop_layers(model, Block(0, 2)), tokenizer, ns=[0, 2], evals=[probe], criterion="similarity",
                    distances=random_distances(4), cache_path=cache, settings={"shots": 5})  # fmt: skip
    cache.write_text("{not json")
    with pytest.raises(ValueError, match="is not a sweep cache"):
        sweep.sweep(model, tokenizer, ns=[0, 2], evals=[probe], distances=random_distances(6), cache_path=cache)


def test_sweeps_concatenates_each_criterion_and_evaluates_n0_once(tmp_path):
    model, tokenizer = kit.testing.tiny_model("llama")
    distances = random_distances(layers.num_layers(model))
    calls = []

    def probe(m, t):
        calls.append(layers.num_layers(m))
        return {"loss": evaluate.validation_loss(m, t, TEXTS, max_length=32).loss}

    table = sweep.sweeps(model, tokenizer, ns=[0, 2], evals=[probe], distances=distances, folder=tmp_path)
    assert calls == [6, 4, 4]  # n = 0 once, then n = 2 for each criterion
    for criterion in sweep.PAPER_CRITERIA:
        alone = sweep.sweep(model, tokenizer, ns=[0, 2], evals=[probe], distances=distances, criterion=criterion)
        mine = table[table["criterion"] == criterion].reset_index(drop=True)
        numeric = lambda t: t.assign(distance=pd.to_numeric(t["distance"]))  # noqa: E731  (heuristic blocks: None)
        pd.testing.assert_frame_equal(numeric(mine), numeric(alone), check_exact=False, rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"sweep-{s}.json" for s in sorted(sweep.PAPER_CRITERIA)]
    with pytest.raises(ValueError, match="heal_texts and heal_config"):
        sweep.sweeps(model, tokenizer, ns=[0, 2], evals=[probe], distances=distances, folder=tmp_path, heal_ns=[2])


def test_sweeps_heal_the_blocks_of_each_criterion_into_their_own_folders(tmp_path):
    model, tokenizer = kit.testing.tiny_model("llama")
    config = kit.HealConfig(rank=2, lr=1e-2, steps=1, batch_size=2, seq_len=32, quantize=None, save_every=1)
    probe = lambda m, t: {"layers": float(layers.num_layers(m))}  # noqa: E731
    table = sweep.sweeps(model, tokenizer, ns=[0, 2], evals=[probe], distances=random_distances(6), folder=tmp_path,
                         heal_ns=[2], heal_config=config, heal_texts=data.corpus("train")[:4])  # fmt: skip
    assert table[["criterion", "n", "healed"]].values.tolist() == [
        [s, n, h] for s in sweep.PAPER_CRITERIA for n, h in ((0, False), (2, False), (2, True))
    ]
    for criterion in sweep.PAPER_CRITERIA:
        assert (tmp_path / "sweep_healed" / criterion / "n2" / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "sweep-similarity.json").read_text())["settings"]["settings"]["heal"] == config.digest()


def test_compare_warns_when_an_earlier_model_is_still_held(tmp_path):
    """A model a notebook cell still references stays in memory while compare loads the next: said, with the fix.
    (That notebooks 03 and 04 free theirs is checked on their executed outputs.)"""
    kit.testing.tiny_model("llama")[0].save_pretrained(tmp_path / "tiny")
    kit.testing.tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    probe = lambda m, t: {"layers": float(layers.num_layers(m))}  # noqa: E731
    held = kit.testing.tiny_model("llama")[0]
    with pytest.warns(UserWarning, match=r"still referenced while compare loads 'tiny'.*del model; kit.core.device.release_memory"):
        sweep.compare({"tiny": tmp_path / "tiny"}, [probe], device="cpu")
    del held
