"""Removing whole decoder layers from a model, a block of consecutive layers or any set of them: for a
moment (`dropped`, for sweeps), for good (`drop_layers`), as a plain HF checkpoint (`save_pruned`), or as
a mergekit recipe; the attention or MLP sublayers of some layers the same way (kit.prune.sublayers, which
`dropped`, `drop_layers` and `save_pruned` call for a Sublayers). Which layers to remove is kit.choose.criteria's job."""

import copy
import math
import weakref
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..core import layers
from ..core.artifacts import save_checkpoint
from ..core.block import Block, Layers, Removal, Sublayers, as_layers
from . import sublayers

PRUNED_BLOCKS = "pruned_blocks"  # config attribute: removed layers as [[start, n], ...] in ORIGINAL indices
_MISSING = object()


def pruned_before(config) -> set[int]:
    """Original-model indices of the layers removed by earlier pruning (config.pruned_blocks)."""
    return {start + k for start, n in getattr(config, PRUNED_BLOCKS, None) or [] for k in range(n)}


def _renumbered(device_map: dict, prefix: str, kept: list[int]) -> dict:
    """accelerate's device map of a model dispatched over devices (hf_device_map) after its layer list
    became `kept`: each kept layer's entries under its new index, the removed layers' entries gone.
    The dispatch hooks stay on the layer modules themselves, so they keep working unchanged."""
    new_index = {old: new for new, old in enumerate(kept)}
    renamed = {}
    for name, device in device_map.items():
        index, _, rest = name.removeprefix(prefix + ".").partition(".")
        if not name.startswith(prefix + ".") or not index.isdigit():
            renamed[name] = device  # not one layer's entry (embeddings, norm, or all layers at once)
        elif int(index) in new_index:
            renamed[".".join(filter(None, [prefix, str(new_index[int(index)]), rest]))] = device
    return renamed


def _depth_scaled(value: float, num: int, new: int) -> float:
    """`value` / sqrt(num) re-expressed over `new` layers: the number v with v / sqrt(new) equal to
    value / sqrt(num), exactly where a float a few ulps away gives it, else the nearest."""
    scale, root = value / math.sqrt(num), math.sqrt(new)
    candidates, up, down = [scale * root], scale * root, scale * root
    for _ in range(4):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    return min(candidates, key=lambda v: abs(v / root - scale))


def _config_edits(config, removed: Block | Layers, num: int) -> list[tuple[object, str, object]]:
    """The text config's per-layer facts for the layers that stay: num_hidden_layers (aliases such as
    GPT-2's n_layer follow through attribute_map; copies such as xLSTM's num_blocks are set), every
    number read as value / sqrt(num_hidden_layers) (layers.DEPTH_SCALED) rescaled, every
    list or pattern string with one entry per layer indexed, transformers' per-layer overrides
    (per_layer_config) and every list of layer indices (layers.LAYER_INDEX_LISTS) renumbered, every
    threshold (layers.LAYER_THRESHOLDS) moved."""
    kept = [i for i in range(num) if i not in removed.layers]
    new_index = {old: new for new, old in enumerate(kept)}
    edits: list[tuple[object, str, object]] = [(config, "num_hidden_layers", len(kept))]
    edits += [(config, name, len(kept)) for name in layers.DEPTH_ALIASES if vars(config).get(name) == num]
    for name in layers.DEPTH_SCALED:
        value = vars(config).get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            edits.append((config, name, _depth_scaled(value, num, len(kept))))
    for name, value in list(vars(config).items()):
        if name in layers.LAYER_INDEX_LISTS and isinstance(value, (list, tuple)):
            edits.append((config, name, type(value)(new_index[i] for i in value if i in new_index)))
        elif isinstance(value, (list, tuple)) and len(value) == num and name != PRUNED_BLOCKS:
            edits.append((config, name, type(value)(value[i] for i in kept)))
        elif isinstance(value, str) and len(value) == num and ("pattern" in name or "layer" in name):
            edits.append((config, name, "".join(value[i] for i in kept)))
        elif name in layers.LAYER_THRESHOLDS and isinstance(value, int):
            edits.append((config, name, value - sum(i < value for i in removed.layers)))
    spec = vars(config).get("_heterogeneity_spec")  # transformers' per-layer overrides (per_layer_config)
    if spec is not None:
        overrides = {new_index[i]: o for i, o in spec.per_layer_overrides.items() if i in new_index}
        edits.append((config, "_heterogeneity_spec", replace(spec, per_layer_overrides=overrides)))
    return edits


def _per_layer_weight_edits(decoder: nn.Module, num: int, kept: list[int]) -> list[tuple[object, str, object]]:
    """The kept layers' slices of weights that pack one slice per layer (layers.PER_LAYER_WEIGHTS): new
    parameters, so the original weights stay untouched (a `dropped` view copies these)."""
    edits: list[tuple[object, str, object]] = []
    for name, dim in layers.PER_LAYER_WEIGHTS.items():
        module = getattr(decoder, name, None)
        if module is None:
            continue
        slices = module.weight.detach().chunk(num, dim)
        weight = nn.Parameter(torch.cat([slices[i] for i in kept], dim), requires_grad=module.weight.requires_grad)
        size = "embedding_dim" if isinstance(module, nn.Embedding) else "out_features" if dim == 0 else "in_features"
        edits += [(module, "weight", weight), (module, size, weight.shape[dim])]
    return edits


def _removal(model: nn.Module, removed: Block | Layers) -> tuple[nn.ModuleList, list[tuple[object, str, object]]]:
    """What removing the layers `removed` means: the new layer list, and every (object, attribute, value) to set.

    This is the one place that knows the bookkeeping: the per-layer facts of the text config
    (_config_edits), config.pruned_blocks, the layer index of every module inside the kept layers
    (layers.LAYER_INDEX_ATTRIBUTES: the KV cache is indexed by it), the kept slices of weights packing
    one slice per layer, and the device map of a model dispatched by accelerate (hf_device_map).
    """
    old = layers.decoder_layers(model)
    num = len(old)
    removed.check(num)
    config = model.config
    kept = [i for i in range(num) if i not in removed.layers]
    before = pruned_before(config)
    original = [i for i in range(num + len(before)) if i not in before]  # original index of each layer

    edits = _config_edits(layers.text_config(config), removed, num)
    runs = Layers(before | {original[i] for i in removed.layers}).blocks
    edits.append((config, PRUNED_BLOCKS, [[run.start, run.n] for run in runs]))
    for new_index, old_index in enumerate(kept):
        for module in old[old_index].modules():
            for name in layers.LAYER_INDEX_ATTRIBUTES:
                if isinstance(getattr(module, name, None), int) and not isinstance(getattr(module, name), bool):
                    edits.append((module, name, new_index))
    edits += _per_layer_weight_edits(layers.decoder(model), num, kept)
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        edits.append((model, "hf_device_map", _renumbered(device_map, layers.anatomy(model).layers, kept)))
    return nn.ModuleList(old[i] for i in kept), edits


_NOT_STRUCTURE = {"training", "gradient_checkpointing", *layers.LAYER_INDEX_ATTRIBUTES}  # module attributes a reload may differ in


def _structure(layer: nn.Module) -> dict[str, tuple]:
    """{submodule name: (class, scalar attributes, parameter names)} of one decoder layer."""
    scalar = (bool, int, float, str, type(None))
    skip = lambda m, k: k.startswith("_") or k in _NOT_STRUCTURE or k in layers.BUFFER_SEEDS.get(type(m).__name__, ())  # noqa: E731
    return {
        name: (type(m), {k: v for k, v in vars(m).items() if isinstance(v, scalar) and not skip(m, k)},
               {n for n, _ in m.named_parameters(recurse=False)})
        for name, m in layer.named_modules()
    }  # fmt: skip


def _same(a, b) -> bool:
    """Equal scalar attributes; floats within rounding (1e-12 relative: a scale recomputed from a
    rescaled config, such as MiniCPM3's residual scale, may land one ulp away)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


def _difference(kept: nn.Module, twin: nn.Module) -> str | None:
    """How `twin` (built from the edited config) differs from the `kept` layer, or None."""
    mine, theirs = _structure(kept), _structure(twin)
    for name in sorted(set(mine) ^ set(theirs)):
        return f"{'it lacks' if name in mine else 'it gains'} the submodule {name!r}"
    for name, (cls, attributes, parameters) in theirs.items():
        where = f"submodule {name!r}" if name else "the layer"
        if not isinstance(kept.get_submodule(name), cls):
            return f"{where} becomes a {cls.__name__} (it is a {type(kept.get_submodule(name)).__name__})"
        if parameters != mine[name][2]:
            return f"{where} gets the parameters {sorted(parameters)} instead of {sorted(mine[name][2])}"
        for key, value in attributes.items():
            if not _same(mine[name][1].get(key, value), value):  # a state that is no longer a scalar (a cache) is no fact
                return f"{where} gets {key}={value!r} instead of {mine[name][1][key]!r}"
    return None


def _check_expressible(model: nn.Module, removed: Block | Layers, kept: nn.ModuleList, edits) -> None:
    """Refuse removing `removed` when the edited config would rebuild any kept layer differently: build the
    model the saved checkpoint reloads into (on the meta device, no memory) and compare it layer by layer.
    The edited config is rebuilt from its dict, as config.json reloads, so the rules its class applies on
    creation (Gemma 4 makes its last layer full attention) apply too."""
    base = layers._base(model)
    if hasattr(base, "peft_config"):
        return  # adapters sit inside the layers; a pruned checkpoint is saved after merging them
    config = copy.deepcopy(model.config)
    twins = {id(model.config): config, id(layers.text_config(model.config)): layers.text_config(config)}
    for obj, name, value in edits:
        if id(obj) in twins:
            setattr(twins[id(obj)], name, value)
    refused = f"Removing {removed.label} cannot be expressed in the {config.model_type!r} config"
    try:
        config = type(config).from_dict(config.to_dict())
    except Exception as err:  # the config class's own validation, whatever it raises
        raise ValueError(f"{refused}: a saved checkpoint's config would not load: {err}") from err
    with torch.device("meta"):
        twin = type(base)(config)
    original = [i for i in range(len(kept) + len(removed.layers)) if i not in removed.layers]
    for index, (layer, rebuilt) in enumerate(zip(kept, layers.decoder_layers(twin), strict=True)):
        difference = _difference(layer, rebuilt)
        if difference:
            raise ValueError(
                f"{refused}: a saved checkpoint would rebuild layer {original[index]} (then "
                f"layer {index}) differently: {difference}. A per-layer rule of the config (such as every k-th "
                "layer being MoE) no longer holds for the layers that stay; choose other layers."
            )


def _check_attention_kept(model: nn.Module, removed: Block | Layers) -> None:
    """Refuse removing the last attention layers of a hybrid: transformers' caches of hybrid models
    count positions on their attention layers, so a model of recurrent layers only cannot generate."""
    kinds = getattr(layers.text_config(model.config), "layer_types", None)
    if not isinstance(kinds, (list, tuple)) or len(kinds) != layers.num_layers(model):
        return
    kept = [kind for i, kind in enumerate(kinds) if i not in removed.layers]
    if any(map(layers.caches_keys, kinds)) and not any(map(layers.caches_keys, kept)):
        attention = [i for i, kind in enumerate(kinds) if layers.caches_keys(kind)]
        raise ValueError(
            f"Removing {removed.label} leaves no attention layer (layers {attention} are the "
            f"attention layers of this hybrid; the others are {sorted(set(kinds) - set(filter(layers.caches_keys, kinds)))}): "
            "transformers' cache of a hybrid counts positions on its attention layers, so the pruned model could not "
            "generate. Keep at least one of them."
        )


_OUTSIDE = weakref.WeakKeyDictionary()  # model in a `dropped` view -> the parameters the view leaves out


def outside_view(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that the `dropped` views `model` (or a module inside it) is in leave out yet keep
    allocated: the removed layers' and sublayers', and the whole per-layer weights whose kept slices the
    view copies. What kit.evaluate.cost takes off a view's measured peak memory; [] outside a view."""
    return [p for module in model.modules() for p in _OUTSIDE.get(module, [])]


@contextmanager
def _noting_outside(model: nn.Module, before: list[nn.Parameter]):
    """For the block, record which of the parameters `before` (the model's before the view) the view
    leaves out, after those of any view it sits in."""
    kept = {id(p) for p in model.parameters()}
    enclosing = _OUTSIDE.get(model)
    _OUTSIDE[model] = [*(enclosing or []), *(p for p in before if id(p) not in kept)]
    try:
        yield
    finally:
        if enclosing is None:
            del _OUTSIDE[model]
        else:
            _OUTSIDE[model] = enclosing


@contextmanager
def dropped(model: nn.Module, block: Removal | Sublayers):
    """Remove the layers `block` names from `model` for the duration of a `with` block, without copying
    anything (but the per-layer slices of Gemma 3n/4's per-layer input weights).

    Swaps in a ModuleList of the kept layers (the same module objects) and updates the config and
    the layer indices as `drop_layers` does; on exit, even on an exception, everything is restored
    exactly. Meant for sweeps that evaluate many blocks on one loaded model. The kept modules compute
    what they computed before, so layers whose removal the config cannot express (drop_layers
    refuses them) are still measured here. The removed layers' weights stay in memory: outside_view
    names them.

    Args:
        model: the causal LM (possibly dispatched by accelerate).
        block: the layers to remove: a Block, Layers, or any iterable of layer indices such as {0, 2};
            or Sublayers, the attention or MLP sublayers of some layers (kit.prune.sublayers).
    """
    before = list(model.parameters())
    view = sublayers.dropped_sublayers(model, block) if isinstance(block, Sublayers) else _dropped_layers(model, block)
    with view, _noting_outside(model, before):
        yield model


@contextmanager
def _dropped_layers(model: nn.Module, block: Removal):
    sublayers.refuse_whole_layers(model)
    original = layers.decoder_layers(model)
    kept, edits = _removal(model, as_layers(block))
    saved = [(obj, name, getattr(obj, name, _MISSING)) for obj, name, _ in edits]
    try:
        for obj, name, value in edits:
            setattr(obj, name, value)
        layers.set_decoder_layers(model, kept)
        yield
    finally:
        layers.set_decoder_layers(model, original)
        for obj, name, value in reversed(saved):
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


def drop_layers(model: nn.Module, block: Removal | Sublayers, *, inplace: bool = False) -> nn.Module:
    """`model` without the layers `block` names, ready for generation and saving.

    Layers whose removal the config cannot express (a saved checkpoint would rebuild a kept layer
    differently), or that would leave a hybrid without attention layers, are refused with the reason,
    before anything changes. The config records the removed layers as `pruned_blocks = [[start, n], ...]`
    in the indices of the ORIGINAL model, as maximal runs of consecutive layers, so pruning twice, or
    removing a set, still says which original layers are gone (one block is `[[start, n]]`).

    Args:
        model: the causal LM (possibly dispatched by accelerate, or pruned before).
        block: the layers to remove: a Block (start, n), Layers, or any iterable of layer indices such as
            {0, 2}; at least one, not all, each named once. Or Sublayers, the attention or MLP sublayers of
            some layers (kit.prune.sublayers.drop_sublayers); whole layers are then no longer removed.
        inplace: prune `model` itself; without it a deep copy is pruned and the original stays untouched
            (memory is needed for both).
    """
    if isinstance(block, Sublayers):
        return sublayers.drop_sublayers(model, block, inplace=inplace)
    sublayers.refuse_whole_layers(model)
    removed = as_layers(block).check(layers.num_layers(model))
    _check_attention_kept(model, removed)
    if not inplace:
        model = copy.deepcopy(model)
    kept, edits = _removal(model, removed)
    _check_expressible(model, removed, kept, edits)
    for obj, name, value in edits:
        setattr(obj, name, value)
    layers.set_decoder_layers(model, kept)
    return model


def save_pruned(model: nn.Module, tokenizer, path: str | Path) -> Path:
    """Write `model` and `tokenizer` to `path` atomically as a plain HF checkpoint (safetensors):
    `AutoModelForCausalLM.from_pretrained(path)` loads it without the kit. A 4-bit model is refused:
    its checkpoint could not be healed and merged; kit.healing.merge.save_pruned_full_precision writes it.
    Removed sublayers are written as their children with zero parameters (kit.prune.sublayers.materialised)."""
    if getattr(model, "is_loaded_in_4bit", False):
        raise ValueError(
            "the model is loaded 4-bit: its pruned checkpoint would be 4-bit, which merge_adapter refuses. Write it "
            "from the full-precision weights instead: kit.healing.merge.save_pruned_full_precision(model, tokenizer, path)."
        )
    with sublayers.materialised(model):
        return save_checkpoint(path, model, tokenizer)


def mergekit_config(model_name: str, block: Removal, num_layers: int) -> str:
    """A mergekit passthrough YAML that rebuilds the pruned model from the original weights: one slice per
    run of consecutive kept layers.

    mergekit's `layer_range: [a, b]` takes layers a .. b-1: the upper bound is EXCLUSIVE. A block
    at the start or the end of the model leaves one slice, a block in the middle two.

    Args:
        model_name: the original model, as mergekit names it (a Hub id or a folder).
        block: the layers to remove: a Block, Layers, or any iterable of layer indices.
        num_layers: the original model's number of layers.
    """
    import yaml

    if isinstance(block, Sublayers):
        raise ValueError(
            f"mergekit's passthrough merge copies whole layers, so no recipe removes the {block.label}: "
            "write the pruned model with save_pruned(drop_layers(model, sublayers), tokenizer, path) instead."
        )
    removed = as_layers(block).check(num_layers)
    kept = Layers(i for i in range(num_layers) if i not in removed.layers).blocks
    config = {
        "slices": [{"sources": [{"model": model_name, "layer_range": [run.start, run.end]}]} for run in kept],
        "merge_method": "passthrough",
    }
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)  # layer_range: [a, b]
