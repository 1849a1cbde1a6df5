"""Re-running part of a model from stored layer inputs, which the ablation oracle and the greedy removal
share: one pass keeps each decoder layer's call (`Inputs`), `run_layer` calls a layer again on other
hidden states, and `head` / `scored_chunks` / `loss_sum` score a residual stream in chunks of tokens."""

import torch
import torch.nn.functional as F

from ..core import layers
from ..core.sums import REPLAY_TOKENS, chunk_size

TOKEN_CHUNK = REPLAY_TOKENS  # tokens per LM-head chunk: bounds the [tokens, vocab] logits of a pruned model


class Inputs(layers.LayerTap):
    """Keeps, for one pass, each layer's (args, kwargs) and the last layer's output."""

    def __init__(self, model):
        super().__init__(model)
        self.calls, self.output = [], None

    def on_input(self, args, kwargs):
        self.calls.append((args, kwargs))

    def on_output(self, hidden):
        self.output = hidden


def run_layer(layer, call, hidden: torch.Tensor) -> torch.Tensor:
    """Call `layer` as the recorded pass did, on `hidden` instead of its recorded input."""
    args, kwargs = call
    if "hidden_states" in kwargs:
        output = layer(*args, **{**kwargs, "hidden_states": hidden})
    else:
        output = layer(hidden, *args[1:], **kwargs)
    return layers.layer_output(output)


def head(model):
    """Residual stream after the last layer -> float32 logits (final norm, projection, LM head, soft-capping)."""
    return lambda residual: layers.logits(model, layers.readout(model, residual)).float()


def scored_chunks(hidden: torch.Tensor, scored: torch.Tensor):
    """The hidden states of the scored positions, in chunks of TOKEN_CHUNK tokens."""
    states = hidden[:, :-1][scored.to(hidden.device)]  # under a device_map: the last layer's device
    return states.split(chunk_size(TOKEN_CHUNK, len(states), states.shape[-1]))


def loss_sum(score, hidden: torch.Tensor, scored: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed next-token loss (nats) of the residual stream `hidden` after the last layer.

    Args:
        score: `head(model)`.
        scored: [batch, tokens - 1] bool, the positions that predict a token.
        targets: the predicted tokens, in the order of `hidden[:, :-1][scored]`.
    """
    total, done = 0.0, 0
    for chunk in scored_chunks(hidden, scored):
        logp = score(chunk).log_softmax(-1)
        total += F.nll_loss(logp, targets[done : done + len(chunk)].to(logp.device), reduction="sum").item()
        done += len(chunk)
        del logp  # before the next chunk's logits: one chunk's at a time
    return total
