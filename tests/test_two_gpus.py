"""The kit's numbers on a model split over two GPUs, as `device_map="auto"` splits a large one, equal one
device's: inputs on cuda:0, the second half of the layers and the head on cuda:1. Fake GPUs here
(tests/fake_gpus.py): an op mixing the two raises, as CUDA does ("indices should be either on cpu or on
the same device", "Expected all tensors to be on the same device"), so a missing `.to()` fails."""

import numpy as np
import pytest
import torch
from fake_gpus import split_over_two_gpus

import kit
from kit.choose.oracle import ablation_losses
from kit.evaluate import validation_loss

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Lists are mutable sequences.", "x = 1", "a b c d e f g h i j"]
USE_ENCODE = ("kit.choose.oracle", "kit.choose.greedy", "kit.scan.similarity", "kit.evaluate.loss")


def test_the_oracle_and_greedy_removal(monkeypatch):
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=4)
    one = ablation_losses(model, tokenizer, TEXTS, max_length=16, batch_size=3)
    removal = kit.choose.greedy.greedy_removal(model, tokenizer, TEXTS, steps=2, max_length=16, batch_size=3)
    split_over_two_gpus(model, monkeypatch, USE_ENCODE)
    two = ablation_losses(model, tokenizer, TEXTS, max_length=16, batch_size=3)
    np.testing.assert_array_equal(two.loss, one.loss)
    np.testing.assert_array_equal(two.kl, one.kl)
    split = kit.choose.greedy.greedy_removal(model, tokenizer, TEXTS, steps=2, max_length=16, batch_size=3)
    assert split.order == removal.order and np.array_equal(split.losses, removal.losses)


@pytest.mark.parametrize("arch", kit.testing.TINY_ARCHITECTURES)
def test_the_scan_of_layers_and_sublayers_and_the_validation_loss(arch, monkeypatch):
    model, tokenizer = kit.testing.tiny_model(arch, num_layers=4)
    scans = lambda: [kit.angular_distances(model, tokenizer, TEXTS, max_length=16, batch_size=3, metric=metric, sublayers=sublayers)  # noqa: E731
                     for metric in ("angular_last", "angular_all") for sublayers in (False, True)]  # fmt: skip
    one, loss = scans(), validation_loss(model, tokenizer, TEXTS, max_length=16, batch_size=3).loss
    split_over_two_gpus(model, monkeypatch, USE_ENCODE)
    for alone, split in zip(one, scans()):
        assert torch.equal(split.matrix, alone.matrix) and torch.equal(split.group_sums, alone.group_sums)
    assert validation_loss(model, tokenizer, TEXTS, max_length=16, batch_size=3).loss == loss
