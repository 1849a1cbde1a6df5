"""The replacement layer (LLM-Streamline, Chen et al., ICLR 2025): the block of n layers gives way to ONE
decoder layer of the family, initialised from a layer of the block and trained (Adam, everything else
frozen) so that its output matches the original model's hidden state after the block, by mean squared
error on calibration texts. In practice the other n - 1 layers of the block are dropped and the kept one
trained: the checkpoint is a plain one of L - n + 1 layers, its config's per-layer facts those of the kept layer."""

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import layers
from ..core.block import Block, Layers
from ..core.config import _Settings
from ..core.device import model_device
from ..core.layers import EndOfLayers, layer_output
from ..core.text import batched, encode
from ..prune import drop_layers


@dataclass(frozen=True)
class ReplacementLayerConfig(_Settings):
    """Settings of the replacement layer: its initialisation, the calibration texts and the training."""

    init: int = 0  # the layer of the block it starts from, counted from the block's first (0: the first)
    n_texts: int = 64  # calibration texts (the first n_texts of those given)
    max_length: int = 128  # tokens per text
    batch_size: int = 8  # texts per step
    steps: int = 200  # Adam steps (a batch each, cycling over the texts in a seeded order)
    lr: float = 1e-4  # Adam's learning rate (constant)
    seed: int = 0

    def __post_init__(self):
        self._require_positive("n_texts", "max_length", "batch_size", "steps")
        if self.init < 0 or not self.lr > 0:
            raise ValueError(f"need init >= 0 and lr > 0, got init={self.init}, lr={self.lr}")


class _Output:
    """A forward hook keeping a decoder layer's output and stopping the pass there."""

    def __init__(self, layer, stop: bool = True):
        self.stop, self.handle = stop, layer.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.hidden = layer_output(output)
        if self.stop:
            raise EndOfLayers

    def run(self, model, **inputs) -> torch.Tensor:
        try:
            model(**inputs, use_cache=False)
        except EndOfLayers:
            pass
        return self.hidden


def _mse(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per hidden feature over the non-padding tokens, in float32."""
    keep = mask.bool()
    return F.mse_loss(hidden[keep].float(), target[keep].float())


@torch.no_grad()
def _targets(model, tokenizer, block: Block, texts: list[str], config) -> list[tuple[dict, torch.Tensor]]:
    """(encoded batch, the original's hidden state after the block) for each batch of texts, the targets on the CPU."""
    device, out = model_device(model), _Output(layers.decoder_layers(model)[block.end - 1])
    try:
        return [(enc, out.run(model, **enc).float().cpu()) for enc in
                (encode(tokenizer, b, max_length=config.max_length, device=device) for b in
                 batched(texts, config.batch_size, desc="replacement layer: targets"))]  # fmt: skip
    finally:
        out.handle.remove()


def _evaluate(model, layer, data) -> float:
    """The mean over batches of the MSE between `layer`'s output and the targets."""
    out, device = _Output(layer), model_device(model)
    try:
        with torch.no_grad():
            return sum(float(_mse(out.run(model, **enc), t.to(device), enc["attention_mask"])) for enc, t in data) / len(data)
    finally:
        out.handle.remove()


def replacement_layer(model, tokenizer, block: Block, texts, config: ReplacementLayerConfig, *, val_texts=None, **_):
    """Cut `block` from `model` in place but for its layer start + config.init, and train that layer on the
    original's hidden states after the block. Returns the model and the record (MSE before and after
    training, on the training texts and on val_texts if given)."""
    if block.n < 2:
        raise ValueError(f"A replacement layer takes the place of a block of several layers; {block.label} is one layer, "
                         "which it would only reproduce: heal this cut with method 'none', or choose n >= 2.")  # fmt: skip
    if config.init >= block.n:
        raise ValueError(f"init={config.init} is not a layer of {block.label}: choose 0 <= init <= {block.n - 1}.")
    keep = block.start + config.init
    train = _targets(model, tokenizer, block, list(texts)[: config.n_texts], config)
    val = _targets(model, tokenizer, block, list(val_texts), config) if val_texts else []
    drop_layers(model, Layers(i for i in block.layers if i != keep), inplace=True)
    layer = layers.decoder_layers(model)[block.start]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    trained = list(layer.parameters())
    for p in trained:
        p.requires_grad_(True)
    record = {"kept_layer": keep, "train_mse_before": _evaluate(model, layer, train)}
    if val:
        record["val_mse_before"] = _evaluate(model, layer, val)
    optimizer = torch.optim.Adam(trained, lr=config.lr)
    order, rng, losses, out = [], random.Random(config.seed), [], _Output(layer)
    was_training = model.training
    model.eval()  # no dropout: the layer learns the original's deterministic states
    try:
        for _step in range(config.steps):
            if not order:
                order = rng.sample(range(len(train)), len(train))
            enc, target = train[order.pop()]
            loss = _mse(out.run(model, **enc), target.to(model_device(model)), enc["attention_mask"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        out.handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    record.update(train_mse_after=_evaluate(model, layer, train), losses=losses[:: max(1, len(losses) // 20)])
    if val:
        record["val_mse_after"] = _evaluate(model, layer, val)
    return model.eval(), {**record, "trained_parameters": sum(p.numel() for p in trained), "added_parameters": 0}
