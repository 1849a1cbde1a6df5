import subprocess
import sys

import pytest
import torch
from torch import nn

import kit
from kit.core import layers


def test_tiny_forward_and_layer_access(tiny):
    model, tokenizer = tiny
    enc = tokenizer(["def f(x): return x", "a"], return_tensors="pt", padding=True)
    logits = model(**enc).logits
    assert logits.shape == (2, enc["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert layers.num_layers(model) == layers.text_config(model.config).num_hidden_layers == 6
    assert isinstance(layers.final_norm(model), nn.Module)
    prefix, covered = layers.anatomy(model).layers + ".", set()
    layer_of = lambda name: int(name.removeprefix(prefix).partition(".")[0])  # noqa: E731
    names = [name for name, _ in model.named_modules()]
    for target in layers.mlp_modules(model):  # layers differ in MoE models: a dense MLP here, experts there
        hits = [n for n in names if n.endswith("." + target)]
        assert hits and all(n.startswith(prefix) for n in hits), f"{target} names no linear inside the layers: {hits}"
        assert len({layer_of(n) for n in hits}) == len(hits), f"{target} should name one linear per layer, found {hits}"
        assert all(isinstance(model.get_submodule(n), nn.Linear) or "Conv1D" in type(model.get_submodule(n)).__name__ for n in hits)
        covered |= {layer_of(n) for n in hits}
    for target in layers.mlp_parameters(model):  # fused routed experts: one 3-d weight per layer
        hits = [n for n, p in model.named_parameters() if n.endswith("." + target) and p.dim() == 3]
        assert hits and len({layer_of(n) for n in hits}) == len(hits), f"{target}: {hits}"
        covered |= {layer_of(n) for n in hits}
    assert covered == set(range(6))  # every layer's MLP has LoRA targets


def test_set_decoder_layers_round_trip():
    model, _ = kit.testing.tiny_model("gpt2")
    kept = nn.ModuleList(list(layers.decoder_layers(model))[:3])
    layers.set_decoder_layers(model, kept)
    assert layers.decoder_layers(model) is kept
    assert model.transformer.h is kept


def test_tiny_models_are_deterministic():
    a, _ = kit.testing.tiny_model("llama", seed=3)
    b, _ = kit.testing.tiny_model("llama", seed=3)
    c, _ = kit.testing.tiny_model("llama", seed=4)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_unknown_tiny_architecture():
    with pytest.raises(ValueError, match="llama, mistral"):
        kit.testing.tiny_model("bert")


def test_a_model_whose_layers_cannot_be_found_says_what_was_looked_for(tmp_path):
    model = kit.families.tiny_family_model("hrm_text")  # its layers are no ModuleList of num_hidden_layers modules
    model.save_pretrained(tmp_path)
    kit.testing.tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(layers.UnsupportedArchitectureError, match=r"'hrm_text' is not supported: looked for a ModuleList.*ANATOMIES"):
        kit.load_model(str(tmp_path))


def test_anatomy_is_found_generically_and_named_exceptions_win(monkeypatch):
    model, _ = kit.testing.tiny_model("opt")
    assert layers.anatomy(model) == layers.Anatomy("model.decoder.layers", "model.decoder.final_layer_norm", ("fc1", "fc2"))
    gemma3 = kit.families.tiny_family_model("gemma3")  # a vision-language wrapper: the text tower's layers
    assert layers.anatomy(gemma3).layers == "model.language_model.layers"
    assert layers.decoder_layers(gemma3) is gemma3.model.language_model.layers
    exception = layers.Anatomy("model.layers", None, ("mlp.up_proj",))
    monkeypatch.setitem(layers.ANATOMIES, "llama", exception)
    assert layers.anatomy(kit.testing.tiny_model("llama")[0]) is exception


def test_unknown_name_lists_aliases():
    with pytest.raises(OSError, match=r"smollm2-135m.*Hub names need network access"):
        kit.load_model("no-such-org/no-such-model")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kit.load_model(str(tmp_path / "absent.gguf"))


def test_bad_quantize_value():
    with pytest.raises(ValueError, match="'4bit', 'auto' or None"):
        kit.load_model("smollm2-135m", quantize="3bit")


def _greedy(model, tokenizer, prompt, n=3):
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :])


def test_embedded_model_knows_paris(smollm):
    model, tokenizer = smollm
    assert layers.num_layers(model) == 30 and model.config.model_type == "llama"
    assert tokenizer.pad_token is not None
    assert _greedy(model, tokenizer, "The capital of France is").startswith(" Paris")


def test_embedded_model_in_4bit_on_cpu():
    import bitsandbytes as bnb

    model, tokenizer = kit.load_model("smollm2-135m", quantize="4bit")
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert model.model.layers[0].mlp.down_proj.weight.quant_type == "nf4"
    assert _greedy(model, tokenizer, "The capital of France is").startswith(" Paris")


def test_gguf_file_loads_through_its_cached_checkpoint(tmp_path, monkeypatch, smollm):
    gguf = kit.loaders.assets.fetch_file(kit.loaders.assets.SMOLLM2_GGUF)
    monkeypatch.setenv("KIT_CACHE", str(tmp_path))
    model, tokenizer = kit.load_model(str(gguf))
    converted = list((tmp_path / "models").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").exists()
    # the same weights, bit for bit, as the embedded alias built from this file (which knows Paris, above)
    expected = smollm[0].state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(weight, expected[name]) for name, weight in model.state_dict().items())
    assert tokenizer("The capital of France is")["input_ids"] == smollm[1]("The capital of France is")["input_ids"]


def test_cached_checkpoint_loads_without_the_kit():
    path = kit.loaders.assets.model_dir("smollm2-135m")
    code = (
        "import sys; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}); "
        "assert 'kit' not in sys.modules; print(m.config.num_hidden_layers)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "30"


def test_top_level_names_survive_submodule_imports():
    import importlib

    import kit.healing.train  # noqa: F401  (binds the submodule on the package)

    for name, module in kit._EXPORTS.items():
        assert getattr(kit, name) is getattr(importlib.import_module(f"kit.{module}"), name)
    assert callable(kit.heal) and kit.heal.__module__ == "kit.healing.train"


def test_an_empty_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint \\(no config.json\\)"):
        kit.load_model(str(tmp_path))
