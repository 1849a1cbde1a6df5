"""The memory ledger: what each step of the pipeline holds at its peak, predicted from a model's config
alone (no weights loaded), for a precision and a GPU, in bytes and in multiples of the weight bytes;
and a refusal, before the work starts, of a step that will not fit, naming the parameter to change.

A step's peak is the weights plus what the step adds: activations of one batch, the states it keeps
(the scan's residual stream, the oracle's and the greedy removal's layer inputs), chunks of logits, and
for healing the LoRA adapters with their gradients and Adam moments and the activations kept for the
backward pass. The activation counts per token were measured on the CPU with kit.core.memory.measure
(tests/test_ledger.py holds every step to its prediction there); on a GPU the same counts are taken in
the compute dtype, and fused kernels (flash attention) can only hold less."""

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from . import layers
from .sums import HIDDEN_SLICE, LOGIT_ELEMENTS, REPLAY_TOKENS, SCAN_TOKENS

GIB = 2**30
# The memory CUDA reports for one GPU (GiB), as torch.cuda.get_device_properties(i).total_memory gives it
GPUS = {"T4": 14.6, "L4": 22.0, "A100-40GB": 39.4, "A100-80GB": 79.1, "H100": 79.1, "H200": 139.8}
HEADROOM = 1.0 * GIB  # the CUDA context, the allocator's fragmentation: kept free when judging a fit
NF4_BITS = 4.127  # bits per parameter of a 4-bit NF4 Linear weight, its double-quantized scales included
SHARD = 50 * 10**9  # transformers' default max_shard_size: the largest shard save_pretrained writes


@dataclass(frozen=True)
class Shape:
    """What the ledger needs of a model: its sizes and its parameter counts (Linear weights of the
    decoder layers apart: those are what 4-bit quantizes)."""

    layers: int
    hidden: int
    intermediate: int  # per token through the MLP: the dense MLP's width, or an MoE's routed experts' times top-k plus its shared experts'
    gated: bool  # a gated MLP (SwiGLU: gate and up projections) or a plain one
    routed: int  # experts per token of an MoE MLP (0: dense)
    vocab: int
    kv_width: int  # key and value features per token and layer (KV heads x head size)
    parameters: int
    linear_parameters: int  # in the decoder layers' nn.Linear modules
    lora_parameters_per_rank: int  # LoRA on the MLP projections: parameters per unit of rank
    mlp_parameters: int  # in those projections (what a LoRA merge rewrites)
    fused_parameters: int  # in an MoE's fused expert weights (3-d parameters, adapted through peft's target_parameters)

    @classmethod
    def of(cls, model: nn.Module) -> "Shape":
        """The shape of a model, real or built on the meta device (Shape.from_config)."""
        c = model.config.get_text_config()
        moe = getattr(c, "num_experts_per_tok", None) and getattr(c, "moe_intermediate_size", None)
        shared = getattr(c, "shared_expert_intermediate_size", 0) or 0
        width = c.moe_intermediate_size * c.num_experts_per_tok + shared if moe else c.intermediate_size
        decoder = layers.decoder_layers(model)
        linears = [m for layer in decoder for m in layer.modules() if isinstance(m, nn.Linear)]
        targets = tuple(layers.mlp_modules(model))
        fused = tuple(layers.mlp_parameters(model)) or ("\0",)  # no parameter name ends so
        projections = [m for layer in decoder for name, m in layer.named_modules() if isinstance(m, nn.Linear) and name.endswith(targets)]
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return cls(
            layers=len(decoder), hidden=c.hidden_size, intermediate=width,
            gated=any(name.endswith(("gate_proj", "gate_up_proj", "w1")) for name, _ in model.named_modules()) or bool(moe),
            routed=c.num_experts_per_tok if moe else 0,
            vocab=c.vocab_size, kv_width=kv_heads * head_dim, parameters=sum(p.numel() for p in model.parameters()),
            linear_parameters=sum(m.weight.numel() for m in linears),
            lora_parameters_per_rank=sum(m.in_features + m.out_features for m in projections),
            mlp_parameters=sum(m.weight.numel() for m in projections),
            fused_parameters=sum(p.numel() for name, p in model.named_parameters() if name.endswith(fused)),
        )  # fmt: skip

    @classmethod
    def from_config(cls, config) -> "Shape":
        """From a transformers config (any Hub id's config.json), counted on the meta device: nothing loaded."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config)
        empty.tie_weights()  # as loading does: a tied head is the embeddings, counted once
        return cls.of(empty)

    def weight_bytes(self, precision: str) -> int:
        """The weights in "fp32", "bf16", "fp16", or "4bit" (NF4 Linear weights, the rest in bf16/fp16)."""
        if precision == "4bit":
            return int(self.linear_parameters * NF4_BITS / 8) + (self.parameters - self.linear_parameters) * 2
        return self.parameters * BYTES[precision]

    @cached_property
    def activation_width(self) -> int:
        """Values per token of one decoder layer's forward at its peak, without gradients: the residual
        stream, its norm, attention's output and projection (4 hidden widths), and the MLP's gate, up and
        their product (3 of its widths; 2 for a plain MLP); an MoE layer also copies each token to and
        from its experts (2 hidden widths per expert). Measured on the CPU: 12.0 hidden widths for SmolLM2
        (4 + 3 x 2.67), 10.1 for a tiny Llama (4 + 3 x 2), 14.8 for a tiny Qwen3-MoE (4 + 3 x 2 + 2 x 2)."""
        return 4 * self.hidden + (3 if self.gated else 2) * self.intermediate + 2 * self.hidden * self.routed


BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "4bit": 2}  # bytes of an activation (4-bit: its bf16/fp16 compute dtype)


@dataclass(frozen=True)
class Step:
    """One step's peak: the weights it holds and what it adds, in bytes."""

    name: str
    weights: int
    extra: int
    note: str = ""

    @property
    def peak(self) -> int:
        return self.weights + self.extra

    def in_weights(self) -> float:
        return self.peak / self.weights


def _forward(shape: Shape, tokens: int, d: int) -> int:
    return tokens * shape.activation_width * d


def _logits(tokens: int, vocab: int, d: int) -> int:
    """A chunk of logits in the compute dtype, its fp32 copy (none in fp32) and its log-softmax."""
    return tokens * vocab * (d + 4 + (4 if d != 4 else 0))


def scan(shape: Shape, precision: str, *, batch_size: int, max_length: int, metric: str = "angular_last",
         sublayers: bool = False) -> Step:  # fmt: skip
    """kit.angular_distances: one batch's forward while the residual stream of the selected tokens is kept
    at every position in the compute dtype (the last token of each text, or every token for the all-token
    metrics), then the pairwise cosines of a chunk of tokens in float64."""
    d, tokens = BYTES[precision], batch_size * max_length
    positions = shape.layers * (2 if sublayers else 1) + 1
    selected = batch_size if metric == "angular_last" else tokens
    states = positions * selected * shape.hidden * d
    chunk = min(SCAN_TOKENS, selected)
    cosines = chunk * positions * (shape.hidden * 4 + min(shape.hidden, HIDDEN_SLICE) * 8) + 3 * positions**2 * chunk * 8
    note = "" if metric == "angular_last" else f"the all-token states: {states / GIB:.2f} GiB (BATCH_SIZE, MAX_LENGTH)"
    return Step("scan", shape.weight_bytes(precision), states + max(_forward(shape, tokens, d), cosines), note)


def loss(shape: Shape, precision: str, *, batch_size: int, max_length: int) -> Step:
    """kit.evaluate.validation_loss: a forward, then the LM head over chunks of tokens."""
    d, tokens = BYTES[precision], batch_size * max_length
    chunk = min(tokens, max(1, LOGIT_ELEMENTS // shape.vocab))
    extra = max(_forward(shape, tokens, d), tokens * shape.hidden * d + _logits(chunk, shape.vocab, d))
    return Step("validation loss", shape.weight_bytes(precision), extra)


def loglikelihoods(shape: Shape, precision: str, *, batch_size: int, tokens: int) -> Step:
    """MMLU, BoolQ and recall (kit.evaluate.scoring): at most a forward over `batch_size` rows of `tokens`
    tokens with their KV cache, the logits of the answers' positions only. An upper bound: a few-shot
    prefix the rows share is computed once (measured: 0.2 to 0.7 of this on 5-shot MMLU)."""
    d, rows = BYTES[precision], batch_size * tokens
    cache = 2 * shape.layers * shape.kv_width * d * (tokens + rows)
    return Step("log-likelihoods", shape.weight_bytes(precision), _forward(shape, rows, d) + cache)


def oracle(shape: Shape, precision: str, *, batch_size: int, max_length: int) -> Step:
    """kit.choose.oracle.ablation_losses: one batch's input to every layer and last output, one replayed layer, and for
    one chunk of tokens the log-probs of the pruned and the unpruned model with the KL's pointwise terms
    (5 [chunk, vocab] fp32 tensors at once, measured)."""
    d, tokens = BYTES[precision], batch_size * max_length
    stored = (shape.layers + 1) * tokens * shape.hidden * d
    work = max(_forward(shape, tokens, d), 5 * REPLAY_TOKENS * shape.vocab * 4)
    return Step("oracle", shape.weight_bytes(precision), stored + work)


def greedy(shape: Shape, precision: str, *, batch_size: int, max_length: int) -> Step:
    """kit.choose.greedy.greedy_removal: one batch's residual stream at every position, one candidate's state, the
    logits of one chunk of tokens."""
    d, tokens = BYTES[precision], batch_size * max_length
    stored = (shape.layers + 2) * tokens * shape.hidden * d
    work = max(_forward(shape, tokens, d), _logits(REPLAY_TOKENS, shape.vocab, d))
    return Step("greedy removal", shape.weight_bytes(precision), stored + work)


def heal(shape: Shape, precision: str, *, batch_size: int, seq_len: int, rank: int, checkpointing: bool) -> Step:
    """kit.heal: LoRA on the MLP projections with its gradients and Adam moments (fp32), the activations
    the backward pass needs (every layer's, or with gradient checkpointing each layer's input and one
    layer's), and the logits of every token with their log-softmax and gradient (fp32). Measured on
    the CPU: 8 hidden and 5.3 MLP widths per token and layer kept for the backward pass (SmolLM2, Llama)."""
    d, tokens = BYTES[precision], batch_size * seq_len
    adapters = shape.lora_parameters_per_rank * rank * 4 * 4  # weights, gradients, two Adam moments
    per_layer = shape.hidden if checkpointing else 8 * shape.hidden + 5.3 * shape.intermediate
    kept = int(tokens * shape.layers * per_layer * d) + (_forward(shape, tokens, d) if checkpointing else 0)
    return Step("heal", shape.weight_bytes(precision), adapters + kept + 3 * tokens * shape.vocab * 4)


def load(shape: Shape, precision: str) -> Step:
    """kit.load_model: the weights, nothing beside them once loaded (safetensors are read in place)."""
    return Step("load", shape.weight_bytes(precision), 0)


def save(shape: Shape, precision: str, *, attention: int = 0, mlp: int = 0) -> Step:
    """kit.drop_layers then kit.save_pruned: layers are dropped in place; `attention` and `mlp` removed
    sublayers are written as children with zero weights, made for the save (measured: an MoE's fused
    experts are copied once more as they are written, 3 x the zeros of two MLPs on a tiny Qwen3-MoE)."""
    d = BYTES[precision]
    attention_weights = 2 * shape.hidden * (shape.hidden + shape.kv_width)  # query and output; key and value
    zeros = (attention * attention_weights + mlp * shape.mlp_parameters // shape.layers) * d
    converted = shape.fused_parameters * d  # transformers writes fused experts split per expert: a copy of each, zeros included
    return Step("prune and save", shape.weight_bytes(precision), zeros + converted)


def merge(shape: Shape, precision: str) -> Step:
    """kit.merge_adapter, streamed in host memory (no GPU): one shard of the base read in, its adapted
    weights again once merged, and one weight's update B @ A in fp32 and in the weights' dtype. An MoE's
    fused experts are merged by peft in the memory of the whole model: every expert weight again, merged,
    and the fp32 updates of the gate and up projections (2/3 of the experts; measured on a tiny Qwen3-MoE)."""
    d = BYTES[precision]
    if shape.fused_parameters:
        return Step("merge", shape.weight_bytes(precision), shape.fused_parameters * d + shape.fused_parameters * 2 // 3 * 4)
    shard = min(shape.weight_bytes(precision), SHARD)
    adapted = shard * shape.mlp_parameters // shape.parameters
    update = shape.mlp_parameters // (3 if shape.gated else 2) // shape.layers * (4 + d)
    return Step("merge", shard, adapted + update)


def compare(steps: list[Step]) -> Step:
    """kit.experiments.sweep.compare: one checkpoint at a time, so its largest evaluation of its largest checkpoint."""
    worst = max(steps, key=lambda step: step.peak)
    return Step("compare", worst.weights, worst.extra, worst.note)


def fits(step: Step, gpu: str | float, count: int = 1) -> bool:
    """Whether the step's peak fits `count` GPUs of a kind (a name of GPUS, or GiB) split by device_map,
    with HEADROOM kept free on each."""
    capacity = (GPUS[gpu] if isinstance(gpu, str) else gpu) * GIB
    return step.peak <= count * (capacity - HEADROOM)


def require_fit(step: Step, capacity: int, change: str) -> None:
    """Stop before `step` starts when its predicted peak exceeds `capacity` bytes (less HEADROOM),
    saying what to change."""
    if step.peak > capacity - HEADROOM:
        raise MemoryError(
            f"{step.name} would hold {step.peak / GIB:.1f} GiB at its peak ({step.weights / GIB:.1f} GiB of weights + "
            f"{step.extra / GIB:.1f} GiB{' (' + step.note + ')' if step.note else ''}); the GPU has "
            f"{capacity / GIB:.1f} GiB: {change}"
        )


def table(steps: list[Step]) -> str:
    """A Markdown table of steps: weights, what each adds, the peak in GiB and in multiples of the weights."""
    rows = [f"| {s.name} | {s.weights / GIB:.2f} | {s.extra / GIB:.2f} | {s.peak / GIB:.2f} | {s.in_weights():.2f} |" for s in steps]
    return "\n".join(["| step | weights (GiB) | adds (GiB) | peak (GiB) | x weights |", "| --- | ---: | ---: | ---: | ---: |", *rows])


def on_device(model: nn.Module, device=None) -> tuple[Shape, str, int | None]:
    """(shape, precision, capacity in bytes or None on the CPU) of a loaded model where it runs."""
    from .device import compute_dtype, model_device

    device = torch.device(device) if device is not None else model_device(model)
    precision = "4bit" if getattr(model, "is_loaded_in_4bit", False) else str(compute_dtype(model)).removeprefix("torch.")
    precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(precision, precision)
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return Shape.of(model), precision, capacity


STEPS = {"load": load, "scan": scan, "loss": loss, "loglikelihoods": loglikelihoods, "oracle": oracle, "greedy": greedy,
         "save": save, "heal": heal, "merge": merge}


def plan(model: nn.Module, **steps: dict) -> list[Step]:
    """The predicted peaks of the steps a notebook is about to run on `model` where it is loaded, printed
    as a table; on a GPU a step that will not fit stops here, before any work, with what to change.

    Args:
        steps: a step of STEPS by name, with its settings, e.g. scan=dict(batch_size=8, max_length=256).
    """
    shape, precision, capacity = on_device(model)
    planned = [STEPS[name](shape, precision, **settings) for name, settings in steps.items()]
    print(f"memory ({precision}{'' if capacity is None else f', GPU of {capacity / GIB:.1f} GiB'}):")
    print(table(planned))
    for step in planned if capacity is not None else ():
        require_fit(step, capacity, "lower the batch size or the tokens per text (or sequence), turn on gradient "
                                    "checkpointing for healing, or load the model in 4-bit (QUANTIZE='4bit')")  # fmt: skip
    return planned
