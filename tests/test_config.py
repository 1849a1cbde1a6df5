"""The settings dataclasses (kit.core.config): checks with messages that name the setting, digests that
cover every field, the paper's healing recipes."""

import dataclasses
import hashlib
import json

import pytest

import kit
from kit.core.config import PAPER_HEALING, PruneConfig, ScanConfig


def test_paper_recipe_per_model():
    assert recipe("meta-llama/Llama-2-7b-hf") == (2, 2.0, 3e-4)
    assert recipe("meta-llama/Llama-2-70b-hf") == (8, 8.0, 3e-5)
    assert recipe("mistralai/Mistral-7B-v0.1") == (4, 4.0, 3e-6)
    assert recipe("Qwen/Qwen-14B") == (64, 64.0, 3e-4)
    assert recipe("microsoft/phi-2") == (64, 64.0, 2e-4)
    config = kit.HealConfig.paper("meta-llama/Llama-2-13b-hf")
    assert (config.dropout, config.scheduler, config.warmup_steps, config.steps, config.global_batch) == (
        0.05, "cosine", 100, 5000, 16,
    )  # fmt: skip
    assert config.target_modules == "mlp" and config.quantize == "4bit"
    assert hash(config) == hash(kit.HealConfig.paper("meta-llama/Llama-2-13b-hf"))
    assert kit.HealConfig.paper("microsoft/phi-2", lr=1e-4, steps=10).lr == 1e-4


def recipe(name):
    config = kit.HealConfig.paper(name)
    return config.rank, config.alpha, config.lr


def test_paper_recipe_unknown_model_lists_the_papers_models():
    with pytest.raises(ValueError, match="No paper healing recipe for 'gpt2'") as err:
        kit.HealConfig.paper("gpt2")
    assert all(name in str(err.value) for name in PAPER_HEALING)


def test_config_warmup_is_capped_and_bad_values_are_refused():
    assert kit.HealConfig(steps=5000).effective_warmup == 100
    assert kit.HealConfig(steps=50).effective_warmup == 5
    assert kit.HealConfig(steps=3).effective_warmup == 1
    assert kit.HealConfig(target_modules=["fc1", "fc2"]).target_modules == ("fc1", "fc2")
    with pytest.raises(ValueError, match="quantize must be '4bit' or None"):
        kit.HealConfig(quantize="8bit")
    with pytest.raises(ValueError, match=r"distill_weight must be in \[0, 1\]"):
        kit.HealConfig(distill_weight=2.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        kit.HealConfig(steps=0)
    with pytest.raises(ValueError, match="lr must be > 0, got -1"):
        kit.HealConfig(lr=-1)
    with pytest.raises(ValueError, match="0 <= dropout < 1"):
        kit.HealConfig(dropout=1.5)


def test_prune_config_checks_its_settings_and_names_each_in_its_digest():
    config = PruneConfig(n=6, criterion="heuristic")
    assert config.to_dict() == {"n": 6, "start": None, "criterion": "heuristic", "n_val_texts": 32, "max_length": 256, "batch_size": 8,
                                "quantize": "auto"}
    assert len({config.digest(), config.replace(n=7).digest(), config.replace(start=3).digest(), config.replace(n_val_texts=8).digest()}) == 4
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        PruneConfig(n=0)
    with pytest.raises(ValueError, match="start must be >= 0 or None"):
        PruneConfig(start=-1)


def test_a_setting_added_later_leaves_older_digests_alone_until_it_is_set():
    """Notebook 01 names its scan cache scan-{digest}: a scan begun before `sublayers` existed still resumes."""
    config = ScanConfig(n_texts=64, metric="angular_all")
    before = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("sublayers", "quantize")}  # the fields of kit 0.1
    assert config.digest() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]
    assert config.replace(sublayers=True).digest() != config.digest()


def test_the_step_configs_take_lists_for_their_tuples_and_stay_hashable():
    config = kit.SweepConfig(ns=[0, 4], heal_ns=[4], criteria=["similarity", "heuristic"])
    assert (config.ns, config.heal_ns) == ((0, 4), (4,)) and hash(config) == hash(kit.SweepConfig(ns=(0, 4), heal_ns=(4,)))
    assert kit.BudgetConfig(budgets=[0.1]).budgets == (0.1,) and kit.CriteriaConfig(ns=None).ns is None
    with pytest.raises(ValueError, match="n_calibration must be >= 1, got 0"):
        kit.CriteriaConfig(n_calibration=0)
    assert kit.SweepConfig(heal_rank=4, heal_steps=3).heal_config() == kit.HealConfig(rank=4, steps=3, lr=2e-3, batch_size=4,
                                                                                      seq_len=128, quantize=None, save_every=3,
                                                                                      gradient_checkpointing=False)  # fmt: skip
    assert kit.SweepConfig(heal_method="linear_patch").heal_config() == "linear_patch"  # a method at its defaults
