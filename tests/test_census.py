"""The census: every model type of transformers' causal-LM auto mapping, built offline as a tiny random
model, through the kit: the scan against the brute-force reference, drop_layers against the original
model with the same layer bypassed by a hook, the saved pruned checkpoint reloaded by plain
transformers, and greedy generation with the KV cache against generation without it. Types that are
no decoder-only text model are skipped with the reason; families that cannot pass are expected to
fail (strictly: one that starts passing fails the census), each with its reason in kit.families."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import kit
from kit import families
from kit.core.block import Block
from kit.core.config import HealConfig
from kit.healing.lora import lora_model
from kit.testing import assert_same_greedy, bypassed, greedy, reference_distances, tiny_tokenizer

FAMILIES_PAGE = Path(__file__).resolve().parents[1] / "docs" / "families.md"  # the census table, docs/census_table.py --write
TEXTS = ["The quick brown fox jumps over", "A tiny model of every family, built offline"]
MAX_LENGTH = 8
IDS = torch.tensor([[5, 17, 42, 99, 7, 300]])
# The first block the config can express is checked: a middle layer; two (a periodic rule of period 2
# holds again); the last two (a rule on the layer index holds for the layers before them).
BLOCKS = (Block(1, 1), Block(1, 2), Block(2, 2))


def _cases():
    for model_type in families.causal_lm_types():
        why = families.not_decoder_text(model_type)
        reason = families.NO_TINY_MODEL.get(model_type) or families.CANNOT_PASS.get(model_type)
        if why:
            marks = [pytest.mark.skip(reason=why)]
        elif model_type not in families.CENSUS_TYPES:  # new in a later transformers: tried, reported, never failing
            marks = [pytest.mark.xfail(reason=families.status(model_type), strict=False)]
        else:
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        yield pytest.param(model_type, marks=marks, id=model_type)


def _census_decoders() -> list[str]:
    """The decoder-only text families of the census that the installed transformers has."""
    installed = set(families.causal_lm_types())
    return [t for t in families.CENSUS_TYPES if t in installed and families.not_decoder_text(t) is None]


def _drop(model):
    """(block, pruned model) for the first of BLOCKS the config can express; a refusal says why."""
    for block in BLOCKS:
        try:
            return block, kit.drop_layers(model, block)
        except ValueError as err:
            if "cannot be expressed" not in str(err) or block == BLOCKS[-1]:
                raise


@pytest.mark.parametrize("model_type", list(_cases()))
def test_family(model_type, tmp_path):
    model = families.tiny_family_model(model_type)
    tokenizer = tiny_tokenizer()
    expected = reference_distances(model, tokenizer, TEXTS, MAX_LENGTH)["angular_last"]
    scan = kit.angular_distances(model, tokenizer, TEXTS, max_length=MAX_LENGTH, batch_size=2)
    np.testing.assert_allclose(scan.matrix.numpy(), expected, atol=2e-5)

    block, pruned = _drop(model)
    with torch.no_grad():
        logits = pruned(IDS, use_cache=False).logits
        with bypassed(model, block.layers):
            expected = model(IDS, use_cache=False).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)

    kit.save_pruned(pruned, tokenizer, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS, use_cache=False).logits, logits, atol=1e-5, rtol=1e-4)

    cached, _ = greedy(pruned, IDS, 3, use_cache=True, pad_token_id=0)
    assert_same_greedy(cached, greedy(pruned, IDS, 3, use_cache=False, pad_token_id=0))

    _check_lora(model)


# Families whose layers have no MLP, and the LoRA targets the kit's error tells their users to take instead.
NO_MLP = {"git": "all-linear", "mamba": ("in_proj",), "mamba2": ("in_proj",), "falcon_mamba": ("in_proj",)}


def _check_lora(model):
    """LoRA on the family's MLP (routed and shared experts included), or where it has none on the targets the
    error names, wraps the model, and its adapters reach the output (their B matrices made non-zero)."""
    settings = dict(rank=2, quantize=None, gradient_checkpointing=False)
    model_type = model.config.model_type
    if model_type in NO_MLP:
        with pytest.raises(ValueError, match="no MLP the kit recognises"):
            lora_model(model, HealConfig(**settings))
        settings["target_modules"] = NO_MLP[model_type]
    adapted = lora_model(model, HealConfig(**settings))
    with torch.no_grad():
        before = adapted(IDS, use_cache=False).logits
        for name, weight in adapted.named_parameters():
            if "lora_B" in name:
                weight.normal_()
        assert not torch.allclose(adapted(IDS, use_cache=False).logits, before)


def test_census_passes_for_90_percent_of_the_families():
    built = [t for t in _census_decoders() if t not in families.NO_TINY_MODEL]
    passing = [t for t in built if t not in families.CANNOT_PASS]
    assert len(passing) >= 0.9 * len(built), f"{len(passing)} of {len(built)} families pass"


def test_census_passes_for_every_family_the_issue_names():
    named = [t for t in families.NAMED if t in families.causal_lm_types()]
    assert len(named) == len(families.NAMED)  # every one exists in the installed transformers
    failing = {t: families.status(t) for t in named if families.status(t) != "passes"}
    assert not failing, failing


def test_families_page_table_lists_every_family():
    """The census table of docs/families.md is the census of the pinned transformers; under another version, its families."""
    table, page = families.census_table(), FAMILIES_PAGE.read_text()
    assert len(re.findall(r"^\| `", table, re.M)) == len(families.CENSUS_TYPES)
    if transformers.__version__ != families.CENSUS_VERSION:
        assert all(f"| `{t}` |" in page for t in families.CENSUS_TYPES)
        return
    assert families.causal_lm_types() == sorted(families.CENSUS_TYPES), (
        f"transformers {transformers.__version__} is pinned: set kit.families.CENSUS_VERSION to it and CENSUS_TYPES to "
        "kit.families.census_types(), then check the new families")  # fmt: skip
    assert table in page, "run `python docs/census_table.py --write`"
