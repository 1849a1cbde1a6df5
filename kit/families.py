"""Every causal-LM family of the installed transformers, for the census test and its table in docs/families.md:
which model types are decoder-only text models (and why the others are not), a tiny random model
of any family built offline from its own config class, and the one list of families the kit cannot
handle, each with its reason."""

import textwrap

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# Sizes of a tiny text decoder, set wherever a family's config has the field (names vary by family).
TINY_SIZES = dict(
    vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, n_embd=32, n_layer=4, n_head=4, n_positions=256,
    n_inner=64, ffn_dim=64, d_model=32, rotary_dim=4, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    # MoE: routed and shared experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, shared_intermediate_size=32, shared_experts_intermediate_size=32,
    moe_shared_expert_intermediate_size=32, n_shared_experts=1, n_group=1, topk_group=1, moe_topk=2,
    # MLA (DeepSeek): compressed queries and keys, a rope part and a no-rope part per head
    q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    # Mamba and linear-attention layers
    mamba_n_heads=4, mamba_d_head=16, mamba_d_ssm=64, mamba_expand=2, mamba_d_state=8, mamba_n_groups=1,
    mamba_chunk_size=16, state_size=8, expand=2, num_heads=8, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_heads=4, linear_head_dim=8,
    # DeepSeek sparse attention's indexer
    index_n_heads=4, index_head_dim=8, index_topk=4,
    # per-layer input embeddings (Gemma 3n and 4) and a wider global head
    vocab_size_per_layer_input=512, hidden_size_per_layer_input=8, global_head_dim=16,
    # sliding-window layers with heads of their own (Inkling)
    swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
    # BLT's hashed byte n-gram embeddings (500,002 rows by default: 96M parameters)
    encoder_hash_byte_group_vocab=512,
)  # fmt: skip
HEAD_DIM = 8  # where the config has head_dim and no MLA rope split

# Families whose config needs more than TINY_SIZES to build a tiny decoder of 4 layers.
TINY_OVERRIDES: dict[str, dict] = {
    "bamba": dict(attn_layer_indices=[1, 3]),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"] * 2),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "kimi_linear": dict(layer_types=["linear_attention", "full_attention"] * 2),
    "bailing_hybrid": dict(layer_types=["linear_attention", "full_attention"] * 2),
    "reformer": dict(is_decoder=True),
    "gpt_neo": dict(attention_types=[[["global", "local"], 2]]),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    "gemma3n_text": dict(num_kv_shared_layers=0),
    "gemma3n": dict(text_config=dict(num_kv_shared_layers=0)),
    "zaya": dict(num_experts_per_tok=1),
    # its sliding-window layers (2 and 3 of 4) have attention shapes of their own: small ones (default: 76M parameters)
    "dots3_note_text": dict(per_layer_config={str(i): dict(
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=8, kv_lora_rank=8, head_dim=8, qk_nope_head_dim=4,
        v_head_dim=4, qk_rope_head_dim=4) for i in (2, 3)}),
    "dory": dict(n_input_layers=1, n_recurrent_layers=2, n_output_layers=1),  # 4 layers, the middle two looped
    # its cache rounds the key and value widths up to multiples of 64, its layers do not: widths of 64 agree
    "xlstm": dict(qk_dim_factor=2.0, v_dim_factor=2.0),
}

NOT_DECODER_TEXT: dict[str, str] = {  # model_type -> why it is no decoder-only text model (beyond the generic rules)
    "musicgen": "audio: a text-conditioned decoder over audio codebooks",
    "musicgen_melody": "audio: a text- and melody-conditioned decoder over audio codebooks",
    "moshi": "audio: a speech-text model whose causal LM runs over audio codebooks too",
    "moss_transcribe_diarize": "audio: speech transcription",
    "xlm": "encoder: a masked-language model (XLM) with an optional causal mode",
    "xlnet": "permutation language model with two-stream attention, no causal decoder stack",
    "gemma4_assistant": "a draft model that reads the target model's shared KV states; it does not run alone",
    "gemma4_unified_assistant": "a draft model that reads the target model's shared KV states; it does not run alone",
}

# The one place for the families that cannot pass the census, each with its reason: those whose tiny
# model does not build offline, and those that build but fail a check.
NO_TINY_MODEL: dict[str, str] = {
    "cohere_compass_text": "its config does not build with 4 layers (KeyError 'full_attention' in its rope setup)",
    "dbrx": "its attention sub-config does not build from the tiny sizes (DbrxAttentionConfig has no rope_theta)",
    "dots3_note": "its default per_layer_config names layers 25-32, which a 4-layer config rejects",
    "gemma3n": "its vision tower needs the timm package, which is not installed",
    "lfm2_moe": "its config does not build with 4 layers (a default per-layer list is None)",
    "qwen4_exp": "its config does not build from the tiny sizes (a head size it derives is None)",
    "qwen4_exp_text": "its config does not build from the tiny sizes (a head size it derives is None)",
    "reformer": "its axial position embeddings must sum to the hidden size (64 + 192 by default)",
    "zamba": "its tied shared-transformer weights are declared for the default layer pattern: a 4-layer model fails to tie",
    "zamba2": "its default layer_types lists 54 layers",
}
CANNOT_PASS: dict[str, str] = {
    "blt": "byte-level model: its layers sit in local encoder, global and local decoder transformers, none a ModuleList "
    "of num_hidden_layers modules",
    "cpmant": "it prepends prompt tokens inside the model, so its hidden states are longer than the input",
    "deepseek_v4": "several residual streams per position (hyper-connections): no single stream to scan",
    "dory": "a looped model: its recurrent layers run n_recurrent_loops times in one pass, so a layer has no one "
    "input to scan (the scan captures 7 positions for 4 layers and says so)",
    "emu3": "transformers cannot reload its saved Emu3ForCausalLM with AutoModelForCausalLM (the text config's type is "
    "not in the causal-LM mapping)",
    "gemma3n_text": "AltUp keeps several residual streams per position: no single stream to scan",
    "hrm_text": "hierarchical reasoning model: its layers sit in two recurrent modules, no ModuleList of num_hidden_layers",
    "hy_v4": "several residual streams per position (hyper-connections): no single stream to scan",
    "inkling2_loop_text": "its final norm reads an attention-weighted mix of every layer's output (final_input), so "
    "position L is not the last layer's output",
    "inkling2_text": "its final norm reads an attention-weighted mix of every layer's output (final_input), so "
    "position L is not the last layer's output",
    "longcat_flash": "each decoder layer holds two attention sublayers: num_hidden_layers counts sublayers, not layers",
    "mllama": "without an image its cross-attention layers are skipped, so their inputs are never seen",
    "zaya": "dropping layers differs from bypassing them (logits up to 4e-3 apart): state passes between layers "
    "beside the residual stream",
}

# The families issue 20 names (Qwen3 and 3.5 dense and MoE, Qwen3-Next, Gemma 3 and 4, Llama 4, gpt-oss,
# DeepSeek-V3, Mixtral, OLMo 3, OLMoE, SmolLM3, Granite 4, GLM-4.5, MiniMax-M2, Nemotron-H, Falcon-H1).
NAMED = (
    "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next", "gemma3",
    "gemma3_text", "gemma4", "gemma4_text", "llama4", "llama4_text", "gpt_oss", "deepseek_v3", "mixtral", "olmo3",
    "olmoe", "smollm3", "granitemoehybrid", "glm4_moe", "minimax_m2", "nemotron_h", "falcon_h1",
)  # fmt: skip


# The census was taken with transformers CENSUS_VERSION (constraints.txt pins it), whose causal-LM model
# types are CENSUS_TYPES. A type that a later release adds is built and tried, but reported as not yet
# checked: it never fails a user's test run. When the pin moves, `print(kit.families.census_types())`
# gives the new list (tests/test_census.py says so).
CENSUS_VERSION = "5.24.0"
CENSUS_TYPES = tuple("""
afmoe apertus apertus1p5_text arcee aria_text axk1 axk2 bailing_hybrid bamba bart beam bert bert-generation big_bird
bigbird_pegasus biogpt bitnet blenderbot blenderbot-small bloom blt camembert codegen cohere cohere2 cohere2_moe
cohere_compass_text cpmant ctrl cwm data2vec-text dbrx deepseek_v2 deepseek_v3 deepseek_v32 deepseek_v4 diffllama
doge dory dots1 dots3_note dots3_note_text electra emu3 ernie ernie4_5 ernie4_5_moe exaone exaone4 exaone_moe falcon
falcon_h1 falcon_mamba flex_olmo flint fuyu gemma gemma2 gemma3 gemma3_text gemma3n gemma3n_text gemma4
gemma4_assistant gemma4_text gemma4_unified gemma4_unified_assistant gemma4_unified_text git glm glm4 glm4_moe
glm4_moe_lite glm_moe_dsa got_ocr2 gpt-sw3 gpt2 gpt_bigcode gpt_neo gpt_neox gpt_neox_japanese gpt_oss gptj granite
granite_swa granitemoe granitemoe_swa granitemoehybrid granitemoeshared helium hrm_text hunyuan_v1_dense
hunyuan_v1_moe hy_v3 hy_v4 hyperclovax inkling2_loop_text inkling2_text inkling_text internlm3 iquestcoder jais2
jamba jetmoe kimi_linear kolibri1 laguna lara_mini lfm2 lfm2_moe lfm3 llama llama4 llama4_text longcat_flash mamba
mamba2 marian mbart megatron-bert mellum mimo_v2_flash minicpm3 minimax minimax_m2 minimax_m3_vl_text ministral
ministral3 mistral mixtral mllama modernbert-decoder moshi moss_transcribe_diarize mpt musicgen musicgen_melody mvp
nanochat nemotron nemotron_h olmo olmo2 olmo3 olmo_hybrid olmoe openai-gpt opt pegasus persimmon phi phi3
phi4_multimodal phimoe plbart prophetnet qwen2 qwen2_moe qwen3 qwen3_5 qwen3_5_moe qwen3_5_moe_text qwen3_5_text
qwen3_moe qwen3_next qwen4_exp qwen4_exp_text recurrent_gemma reformer rembert roberta roberta-prelayernorm roc_bert
roformer rwkv sarvam_mla sarvam_moe seed_oss smollm3 solar_open stablelm starcoder2 trocr vaultgemma whisper xglm
xlm xlm-roberta xlm-roberta-xl xlnet xlstm xmod youtu zamba zamba2 zaya
""".split())


def causal_lm_types() -> list[str]:
    """Every model type of the installed transformers' causal-LM auto mapping, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def census_types() -> str:
    """CENSUS_TYPES for the installed transformers, as the source writes it."""
    return textwrap.fill(" ".join(causal_lm_types()), 116)


def not_decoder_text(model_type: str) -> str | None:
    """Why `model_type` is not a decoder-only text model, or None when it is one."""
    if model_type in NOT_DECODER_TEXT:
        return NOT_DECODER_TEXT[model_type]
    fields = transformers.CONFIG_MAPPING[model_type].__dataclass_fields__
    if fields["is_encoder_decoder"].default is True:
        return "encoder-decoder: its causal LM is the decoder of a sequence-to-sequence model"
    if "is_decoder" in fields and "add_cross_attention" in fields:
        return "encoder: a bidirectional model that runs as a decoder only with is_decoder=True"
    return None


def _shrunk(default, overrides: dict) -> dict:
    """TINY_SIZES (and head_dim) restricted to the fields the config `default` has, then `overrides`."""
    fields = {*default.to_dict(), *getattr(type(default), "__dataclass_fields__", {}), *default.attribute_map}
    sizes = {k: v for k, v in TINY_SIZES.items() if k in fields}
    if "kv_lora_rank" in fields:  # MLA: as many key-value heads as query heads
        sizes["num_key_value_heads"] = TINY_SIZES["num_attention_heads"]
    if "head_dim" in fields:  # with an MLA rope split, head_dim means the rope part
        sizes["head_dim"] = TINY_SIZES["qk_rope_head_dim"] if "qk_rope_head_dim" in fields else HEAD_DIM
    return {**sizes, **overrides}


def tiny_config(model_type: str, **fields):
    """A tiny config of `model_type`: its own config class with small sizes (then `fields`); a multimodal
    config gets a tiny text config and small sub-configs (its other towers are built but never run)."""
    config_class = transformers.CONFIG_MAPPING[model_type]
    overrides = {**TINY_OVERRIDES.get(model_type, {}), **fields}
    try:
        default = config_class()
    except ValueError:  # a family whose defaults do not validate: its overrides make them valid
        default = config_class(**{k: v for k, v in overrides.items() if not isinstance(v, dict)})
    subs = {name: sub for name, sub in vars(default).items() if isinstance(sub, transformers.PreTrainedConfig)}
    kwargs = _shrunk(default, {k: v for k, v in overrides.items() if k not in subs})
    for name, sub in subs.items():
        kwargs[name] = {"model_type": sub.model_type, **_shrunk(sub, overrides.get(name, {}))}
    return config_class(**kwargs)


def status(model_type: str) -> str:
    """The census verdict on `model_type`: "passes", or why not."""
    if model_type not in CENSUS_TYPES:
        return f"not yet checked: new after transformers {CENSUS_VERSION}, the version of the census"
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"not in the installed transformers {transformers.__version__}"
    why = not_decoder_text(model_type)
    if why:
        return f"not a decoder-only text model: {why}"
    if model_type in NO_TINY_MODEL:
        return f"no tiny model offline: {NO_TINY_MODEL[model_type]}"
    return f"fails: {CANNOT_PASS[model_type]}" if model_type in CANNOT_PASS else "passes"


def census_table() -> str:
    """The census table of docs/families.md: every causal-LM model type of transformers CENSUS_VERSION, and its verdict."""
    rows = [f"| `{t}` | {status(t)} |" for t in CENSUS_TYPES]
    return "\n".join([f"| family (transformers {CENSUS_VERSION}) | census |", "|---|---|", *rows])


def tiny_family_model(model_type: str, seed: int = 0, **fields):
    """A tiny random causal LM of `model_type` (config `fields` overriding the tiny ones), in float32 and
    eval mode, built offline."""
    config = tiny_config(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.name_or_path = f"tiny-{model_type}"
    return model.eval()
