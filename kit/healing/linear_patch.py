"""The training-free linear patch (ReplaceMe, Shopkhoev et al. 2025): after removing a block, the MLP of
the layer before it learns, by least squares, to add what the block added. On calibration texts the
ORIGINAL model gives, at every token, M = that MLP's output and D = h[start+n] - (h[start] - M), what
it would have to add for the residual after it to be the residual after the block; T (hidden x hidden)
solves M T ~ D, ridge-regularised toward the identity (T = I is the cut alone), and is merged into the
MLP's down projection (W' = T^T W, b' = T^T b): a plain checkpoint, no new parameters."""

import time
import warnings
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core import layers
from ..core.block import Block
from ..core.config import _Settings
from ..core.device import model_device
from ..core.layers import EndOfLayers, UnsupportedArchitectureError, layer_output
from ..core.sums import SCAN_TOKENS, chunk_size
from ..core.text import batched, encode
from ..evaluate.loss import validation_loss
from ..prune import drop_layers

RIDGES = (0.0, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)  # "auto": the ridges searched, relative to mean eig(M^T M)
INSTEAD = "heal this cut with method 'replacement_layer', 'last_layers' or 'qlora' instead"


@dataclass(frozen=True)
class LinearPatchConfig(_Settings):
    """Settings of the linear patch: calibration texts and the ridge toward the identity map."""

    n_texts: int = 64  # calibration texts used (the first n_texts of those given)
    max_length: int = 128  # tokens per calibration text
    batch_size: int = 8  # texts per forward pass
    ridge: float | str = "auto"  # "auto": chosen on held-out calibration texts; a number: lambda / mean eig(M^T M) (0: plain least squares)
    val_fraction: float = 0.25  # "auto": share of the calibration texts held out to choose the ridge (then refit on all)

    def __post_init__(self):
        self._require_positive("n_texts", "max_length", "batch_size")
        if self.ridge != "auto" and not (isinstance(self.ridge, (int, float)) and self.ridge >= 0):
            raise ValueError(f"ridge must be 'auto' or a number >= 0, got {self.ridge!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def down_projection(model: nn.Module, index: int) -> nn.Module:
    """The linear map whose output is the whole MLP branch that decoder layer `index` adds to its residual
    stream, as a plain term (checked on a probe: adding d to its output adds d to the layer's output).
    UnsupportedArchitectureError names why otherwise (an MoE's routed sum, a norm after the MLP)."""
    layer, middle = layers.decoder_layers(model)[index], layers.middles(model)[index]
    where = f"layer {index} ({type(layer).__name__})"
    children = [getattr(layer, name) for name in middle.mlp]
    if children and all(isinstance(c, (nn.Linear, Conv1D)) for c in children):  # projections on the layer (OPT)
        mlp, candidates = children[-1], [children[-1]]
    elif len(children) == 1:
        mlp = children[0]
        candidates = [m for name, m in mlp.named_modules() if isinstance(m, (nn.Linear, Conv1D))
                      and not set(name.split(".")) & set(layers.ROUTERS)]  # fmt: skip
    else:
        experts = " (a mixture of experts among them)" if any(map(_experts, children)) else ""
        raise UnsupportedArchitectureError(f"{where} has {len(children)} MLP branches ({', '.join(middle.mlp)}){experts}: "
                                           f"no one down projection to patch; {INSTEAD}.")  # fmt: skip
    seen, handles = {}, []
    record = lambda key, module, args, out: seen.__setitem__(key, layer_output(out))  # noqa: E731
    handles += [m.register_forward_hook(partial(record, id(m))) for m in candidates]
    handles += [mlp.register_forward_hook(partial(record, "mlp")), layer.register_forward_hook(partial(record, "layer"))]
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]], device=model_device(model))
    try:
        with torch.no_grad():
            _until(model, index, input_ids=ids)
            down = next((m for m in reversed(candidates) if id(m) in seen and seen[id(m)].shape == seen["mlp"].shape
                         and torch.equal(seen[id(m)], seen["mlp"])), None)  # fmt: skip
            if down is None:
                why = ("is a mixture of experts: its output is a routed sum of the experts' down projections, not one linear map's "
                       "output" if _experts(mlp) else "returns no linear map's output unchanged")  # fmt: skip
                raise UnsupportedArchitectureError(f"The MLP of {where} ({type(mlp).__name__}) {why}, so T has no one weight to merge into; {INSTEAD}.")
            before = seen["layer"].clone()
            noise = torch.randn(seen["mlp"].shape, generator=torch.Generator().manual_seed(0))
            delta = (noise * before.float().std().clamp_min(1e-3)).to(before.device, seen["mlp"].dtype)
            handles.append(down.register_forward_hook(lambda m, a, out: out + delta))
            _until(model, index, input_ids=ids)
            change = (seen["layer"] - before).float().reshape(-1, before.shape[-1])
            tolerance = 1e-2 * delta.float().abs().max() + 1e-5 * before.float().abs().max()  # rounding of the sums
            if (change - delta.float().reshape(change.shape)).abs().max() > tolerance:
                norms = [n for n, c in layer.named_children() if "norm" in type(c).__name__.lower() and ("post" in n or "ff" in n)]
                raise UnsupportedArchitectureError(
                    f"{where} does not add its MLP's output to the residual stream as it is"
                    + (f" (it normalises it first: {', '.join(norms)})" if norms else "")
                    + f": a linear map of the MLP output is then no linear term of the residual stream; {INSTEAD}."
                )
    finally:
        for handle in handles:
            handle.remove()
    return down


def _experts(mlp: nn.Module) -> bool:
    return any("expert" in name for name, _ in mlp.named_modules()) or "moe" in type(mlp).__name__.lower()


def _until(model: nn.Module, last: int, **inputs) -> None:
    """Run `model` on `inputs` up to decoder layer `last` (its output), skipping the rest."""
    stop = layers.decoder_layers(model)[last].register_forward_hook(lambda *a: (_ for _ in ()).throw(EndOfLayers()))
    try:
        model(**inputs, use_cache=False)
    except EndOfLayers:
        pass
    finally:
        stop.remove()


@torch.no_grad()
def patch_sums(model: nn.Module, tokenizer, block: Block, texts: list[str], config: LinearPatchConfig) -> list[dict]:
    """Per text batch, the float64 sums {"MM": M^T M, "MD": M^T D, "DD": sum of D*D, "tokens"} over its
    non-padding tokens, from one pass of the ORIGINAL model up to the block's last layer."""
    down = down_projection(model, block.start - 1)
    decoder_layers, kept = layers.decoder_layers(model), {}
    hooks = [down.register_forward_hook(lambda m, a, out: kept.__setitem__("M", out)),
             decoder_layers[block.start - 1].register_forward_hook(lambda m, a, out: kept.__setitem__("before", layer_output(out))),
             decoder_layers[block.end - 1].register_forward_hook(lambda m, a, out: kept.__setitem__("after", layer_output(out)))]  # fmt: skip
    device, sums = model_device(model), []
    try:
        for batch in batched(texts, config.batch_size, desc="linear patch: activations"):
            enc = encode(tokenizer, batch, max_length=config.max_length, device=device)
            _until(model, block.end - 1, **enc)
            width = kept["after"].shape[-1]
            mask = enc["attention_mask"].reshape(-1).bool()
            m = kept["M"].reshape(-1, width)[mask].float()
            d = kept["after"].reshape(-1, width)[mask].float() - kept["before"].reshape(-1, width)[mask].float() + m
            step = chunk_size(SCAN_TOKENS, len(m), width)
            part = {"MM": torch.zeros(width, width, dtype=torch.float64, device=device), "DD": 0.0, "tokens": len(m)}
            part["MD"] = torch.zeros_like(part["MM"])
            for i in range(0, len(m), step):
                mc, dc = m[i : i + step].double(), d[i : i + step].double()
                part["MM"] += mc.T @ mc
                part["MD"] += mc.T @ dc
                part["DD"] += float((dc * dc).sum())
            sums.append(part)
    finally:
        for hook in hooks:
            hook.remove()
    return sums


def _total(parts: list[dict]) -> dict:
    return {key: sum(p[key] for p in parts) for key in ("MM", "MD", "DD", "tokens")}


def solve(sums: dict, ridge: float) -> torch.Tensor:
    """T minimising |M T - D|^2 + lam |T - I|^2, lam = ridge * trace(M^T M) / hidden (float64); ridge 0:
    plain least squares (the minimum-norm solution where M^T M is singular)."""
    mm, md = sums["MM"], sums["MD"]
    eye = torch.eye(len(mm), dtype=mm.dtype, device=mm.device)
    if ridge == 0:
        return torch.linalg.lstsq(mm.cpu(), md.cpu(), driver="gelsd").solution.to(mm.device)
    lam = ridge * float(torch.trace(mm)) / len(mm)
    return torch.linalg.solve(mm + lam * eye, md + lam * eye)


def residual_error(sums: dict, t: torch.Tensor) -> float:
    """Mean squared |M T - D| per token from the sums alone."""
    err = torch.trace(t.T @ sums["MM"] @ t) - 2 * torch.trace(t.T @ sums["MD"]) + sums["DD"]
    return float(err) / max(1, sums["tokens"])


def applied(down: nn.Module, t: torch.Tensor):
    """A forward hook on `down` putting T on its output (out @ T): the patch without merging. Returns the handle."""
    return down.register_forward_hook(lambda m, a, out: (out.double() @ t.to(out.device)).to(out.dtype))


@torch.no_grad()
def merge_patch(down: nn.Module, t: torch.Tensor) -> None:
    """Merge T into `down`'s weights in place: out @ T = a (W^T T) + b T."""
    t = t.to(down.weight.device)
    if isinstance(down, Conv1D):  # weight (in, out): out = a W + b
        down.weight.copy_((down.weight.double() @ t).to(down.weight.dtype))
    else:  # nn.Linear, weight (out, in): out = a W^T + b
        down.weight.copy_((t.T @ down.weight.double()).to(down.weight.dtype))
    if down.bias is not None:
        down.bias.copy_((down.bias.double() @ t).to(down.bias.dtype))


def _descend(loss, start: int, count: int) -> dict[int, float]:
    """{index: loss} along a descent over indices 0..count-1 from `start` to a local minimum of `loss`
    (the held-out loss of the ridges, which falls then rises with the ridge): a few evaluations, not all."""
    losses = {start: loss(start)}
    for step in (1, -1):  # stronger ridges first, then weaker if stronger did not help
        i = start
        while 0 <= i + step < count:
            losses[i + step] = loss(i + step)
            if losses[i + step] >= losses[i]:
                break
            i += step
        if i != start:
            break
    return losses


def linear_patch(model, tokenizer, block: Block, texts: list[str], config: LinearPatchConfig, **_) -> tuple[nn.Module, dict]:
    """Cut `block` from `model` in place and merge the fitted patch into the layer before it. Returns the
    model and the record: the ridge chosen, each candidate's held-out loss and error, the CPU seconds of
    the activation sums and of the ridge search (the held-out losses), and "patched"
    (False: no ridge beat the cut alone on the held-out texts, and the cut is returned as it is)."""
    if block.start == 0:
        raise ValueError(f"The linear patch changes the MLP of the layer before the block, and block {block.label} starts at "
                         f"layer 0: there is none. Choose a block with start >= 1, or {INSTEAD}.")  # fmt: skip
    texts = list(texts)[: config.n_texts]
    down = down_projection(model, block.start - 1)
    if config.ridge != "auto":
        total = _total(patch_sums(model, tokenizer, block, texts, config))
        drop_layers(model, block, inplace=True)
        merge_patch(down, solve(total, float(config.ridge)))
        return model, {"tokens": total["tokens"], "ridge": float(config.ridge), "patched": True}
    n_val = round(len(texts) * config.val_fraction)
    if not 1 <= n_val < len(texts):
        raise ValueError(f"ridge='auto' holds out {config.val_fraction:.0%} of the calibration texts to choose the ridge: "
                         f"{len(texts)} texts leave {n_val} held out. Pass more texts, or a fixed ridge.")  # fmt: skip
    fit_texts, val_texts = texts[:-n_val], texts[-n_val:]
    started = time.process_time()
    fit = _total(patch_sums(model, tokenizer, block, fit_texts, config))
    val = _total(patch_sums(model, tokenizer, block, val_texts, config))
    fitted = time.process_time()
    drop_layers(model, block, inplace=True)
    score = partial(validation_loss, model, tokenizer, val_texts, max_length=config.max_length, batch_size=config.batch_size)
    cut = score().loss
    errors = {r: residual_error(val, solve(fit, r)) for r in RIDGES}
    record = {"tokens": fit["tokens"] + val["tokens"], "val_texts": n_val, "cut_val_loss": cut, "candidates": []}

    def loss(i: int) -> float:
        handle = applied(down, solve(fit, RIDGES[i]))
        try:
            value = score().loss
        finally:
            handle.remove()
        record["candidates"].append({"ridge": RIDGES[i], "val_loss": value, "val_error": errors[RIDGES[i]]})
        return value

    losses = _descend(loss, RIDGES.index(min(errors, key=errors.get)), len(RIDGES))
    best = min(losses, key=losses.get)
    chosen = RIDGES[best] if losses[best] < cut else None
    record.update(ridge=chosen, patched=chosen is not None, val_errors={str(r): e for r, e in errors.items()},
                  sums_cpu_s=fitted - started, search_cpu_s=time.process_time() - fitted)  # fmt: skip
    if chosen is None:
        record["note"] = (f"no ridge beat the cut alone on the {n_val} held-out calibration texts (cut {cut:.4f} nats, best "
                          f"{losses[best]:.4f} at ridge {RIDGES[best]}): the checkpoint is the cut alone, unpatched")  # fmt: skip
        warnings.warn(f"linear patch of {block.label}: {record['note']}.", stacklevel=3)  # at heal_cut's caller
    if chosen is not None:
        merge_patch(down, solve(_total([fit, val]), chosen))
    return model, record
