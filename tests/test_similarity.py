"""The similarity scan against an independent brute-force computation, padding and batching
invariance, resume, the uncertainty it measures (the Distances container: test_distances.py), and the
sublayer scan: each layer's middle, between its attention and MLP sublayers, against its own
brute-force computation on every tiny architecture, how each family's middle is found, the layers
it refuses."""

import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import kit
from kit import families
from kit.core import layers
from kit.scan.distances import Distances
from kit.scan.similarity import METRICS
from kit.testing import reference_distance_sums, reference_distances

MAX_LENGTH = 48


@pytest.fixture(scope="module")
def texts():
    """Texts of very different token counts, some truncated at MAX_LENGTH: batches need padding."""
    chunks = kit.loaders.data.load_texts("corpus", "validation", 6)
    return [chunk[:chars] for chunk, chars in zip(chunks, (15, 300, 60, 40, 500, 120))]


def scan(model, tokenizer, texts, **kwargs):
    return kit.angular_distances(model, tokenizer, texts, max_length=MAX_LENGTH, **kwargs)


def brute_force(model, tokenizer, texts):
    return reference_distances(model, tokenizer, texts, MAX_LENGTH)


def assert_matches_brute_force(model, tokenizer, texts, **kwargs):
    expected = brute_force(model, tokenizer, texts)
    assert set(expected) == set(METRICS), "every scan metric needs its reference in kit.testing.REFERENCE_METRICS"
    for metric in METRICS:
        distances = scan(model, tokenizer, texts, metric=metric, **kwargs)
        np.testing.assert_allclose(distances.matrix.numpy(), expected[metric], atol=2e-5, err_msg=metric)


def test_matches_brute_force_on_tiny_models(tiny, texts):
    assert_matches_brute_force(*tiny, texts, batch_size=4)


def test_matches_brute_force_on_embedded_model(smollm, texts):
    assert_matches_brute_force(*smollm, texts[:4], batch_size=4)


def test_token_chunks_add_up(monkeypatch, texts):
    monkeypatch.setattr(kit.scan.similarity, "_TOKEN_CHUNK", 7)  # many chunks per batch, a ragged last one
    assert_matches_brute_force(*kit.testing.tiny_model("qwen3"), texts, batch_size=3)


def test_bfloat16_model_is_measured_in_float32(texts):
    model, tokenizer = kit.testing.tiny_model("llama")
    model.to(torch.bfloat16)
    distances = scan(model, tokenizer, texts, batch_size=1)
    assert distances.matrix.dtype == torch.float32
    np.testing.assert_allclose(distances.matrix.numpy(), brute_force(model, tokenizer, texts)["angular_last"], atol=2e-5)


def test_4bit_model_matches_brute_force(tmp_path, texts):
    model, tokenizer = kit.testing.tiny_model("llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tokenizer = kit.load_model(str(tmp_path), quantize="4bit", dtype=torch.float32)
    distances = scan(model, tokenizer, texts, batch_size=1)
    np.testing.assert_allclose(distances.matrix.numpy(), brute_force(model, tokenizer, texts)["angular_last"], atol=2e-5)


# Every architecture on every token (its positions and masks under padding), of layers and of sublayers;
# finding the last token is the kit's own arithmetic on the mask, checked on one rotary and one
# absolute-position model.
@pytest.mark.parametrize("sublayers", [False, True], ids=["layers", "sublayers"])
@pytest.mark.parametrize(
    "arch, metric",
    [(arch, "angular_all") for arch in kit.testing.TINY_ARCHITECTURES] + [("llama", "angular_last"), ("gpt2", "angular_last")],
)
def test_padding_side_and_batch_size_do_not_matter(arch, metric, sublayers, texts):
    model, tokenizer = kit.testing.tiny_model(arch)
    tokenizer.padding_side = "right"
    right_1 = scan(model, tokenizer, texts, batch_size=1, metric=metric, sublayers=sublayers).matrix
    tokenizer.padding_side = "left"
    left_8 = scan(model, tokenizer, texts, batch_size=8, metric=metric, sublayers=sublayers).matrix
    torch.testing.assert_close(left_8, right_1, atol=1e-5, rtol=0)
    assert len(right_1) == 6 * (2 if sublayers else 1) + 1


@pytest.mark.parametrize("sublayers", [False, True], ids=["layers", "sublayers"])
def test_resume_after_interruption_gives_the_same_matrix(tmp_path, texts, sublayers):
    model, tokenizer = kit.testing.tiny_model("llama")
    run = partial(scan, sublayers=sublayers)
    expected = run(model, tokenizer, texts, batch_size=2, metric="angular_all").matrix
    forwards = []

    def interrupt_third_batch(module, args):
        forwards.append(1)
        if len(forwards) == 3:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(interrupt_third_batch)
    cache = tmp_path / "scan.safetensors"
    with pytest.raises(KeyboardInterrupt):
        run(model, tokenizer, texts, batch_size=2, metric="angular_all", cache_path=cache)
    resumed = run(model, tokenizer, texts, batch_size=2, metric="angular_all", cache_path=cache)
    handle.remove()
    assert len(forwards) == 4  # batches 1, 2, the interrupted 3, then only 3 again
    assert torch.equal(resumed.matrix, expected)
    assert resumed.meta["tokens"] == run(model, tokenizer, texts, batch_size=2, metric="angular_all").meta["tokens"]
    with pytest.raises(ValueError, match="other settings.*batch_size: 2 -> 3.*Delete it"):
        run(model, tokenizer, texts, batch_size=3, metric="angular_all", cache_path=cache)
    with pytest.raises(ValueError, match="other settings \\(dtype: 'float32' -> 'bfloat16'\\)"):
        run(model.to(torch.bfloat16), tokenizer, texts, batch_size=2, metric="angular_all", cache_path=cache)


def test_scan_result_is_a_distance_matrix(texts):
    model, tokenizer = kit.testing.tiny_model("gpt2")
    distances = scan(model, tokenizer, texts, batch_size=3, model_name="tiny")
    matrix = distances.matrix
    assert matrix.shape == (7, 7) and distances.num_layers == 6
    assert torch.equal(matrix, matrix.T) and torch.all(matrix.diagonal() == 0)
    assert torch.all(matrix[~torch.eye(7, dtype=torch.bool)] > 0) and torch.all(matrix <= 1)
    assert distances.meta["model"] == "tiny" and distances.meta["n_texts"] == len(texts)
    assert distances.meta["tokens"] == len(texts) and distances.meta["metric"] == "angular_last"
    assert distances.meta["max_length"] == MAX_LENGTH and "torch" in distances.meta["versions"]


def test_bad_arguments_say_what_to_do(texts):
    model, tokenizer = kit.testing.tiny_model("llama")
    with pytest.raises(ValueError, match="choose one of: angular_last, angular_all, block_influence"):
        scan(model, tokenizer, texts, metric="cosine")
    with pytest.raises(ValueError, match="non-empty list"):
        scan(model, tokenizer, "one string")
    with pytest.raises(ValueError, match=r"texts \[1\] have no tokens"):
        scan(model, tokenizer, ["hello", ""])


# ------------------------------------------------------------------------------ uncertainty


def test_standard_errors_and_group_sums_match_brute_force(texts):
    model, tokenizer = kit.testing.tiny_model("llama")
    for metric, (sums, counts) in reference_distance_sums(model, tokenizer, texts, MAX_LENGTH).items():
        distances = scan(model, tokenizer, texts, batch_size=4, metric=metric, groups=4)
        m, mean = len(texts), sums.sum(0) / counts.sum()
        if metric == "angular_last":  # one token per text: the textbook standard error of a mean
            expected = (sums[:, :, :] / counts[:, None, None]).std(axis=0, ddof=1) / np.sqrt(m)
        else:  # token-weighted mean: delta method over texts
            expected = np.sqrt(m / (m - 1) * ((sums - mean * counts[:, None, None]) ** 2).sum(0)) / counts.sum()
        np.fill_diagonal(expected, 0)
        np.testing.assert_allclose(distances.stderr.numpy(), expected, atol=2e-6, err_msg=metric)
        groups = np.arange(m) % 4
        np.testing.assert_allclose(distances.group_sums.numpy(), [sums[groups == k].sum(0) for k in range(4)], atol=1e-6)
        np.testing.assert_array_equal(distances.group_counts.numpy(), [counts[groups == k].sum() for k in range(4)])
        best = distances.best_block(2)
        assert best.stderr == pytest.approx(expected[best.start, best.end], abs=2e-6)


def test_uncertainty_survives_save_and_load_and_older_files_still_load(tmp_path, texts):
    distances = scan(*kit.testing.tiny_model("qwen3"), texts, batch_size=4, groups=3)
    loaded = Distances.load(distances.save(tmp_path / "distances.safetensors"))
    for key in ("matrix", "stderr", "group_sums", "group_counts"):
        assert torch.equal(getattr(loaded, key), getattr(distances, key)), key
    assert loaded.meta["groups"] == 3 and np.array_equal(loaded.stability(2), distances.stability(2))
    save_file({"matrix": distances.matrix}, tmp_path / "old.safetensors", metadata={"format": "kit.scan.distances/1", "meta": "{}"})
    old = Distances.load(tmp_path / "old.safetensors")
    assert torch.equal(old.matrix, distances.matrix) and old.stderr is None and old.best_block(2).stderr is None
    with pytest.raises(ValueError, match="no group_sums.*rerun the scan"):
        old.stability(2)


def test_too_few_texts_for_uncertainty(texts):
    model, tokenizer = kit.testing.tiny_model("llama")
    with pytest.raises(ValueError, match=r"groups must be between 1 and the number of texts \(6\), got 7"):
        scan(model, tokenizer, texts, groups=7)
    with pytest.warns(UserWarning, match="one calibration text"):
        single = scan(model, tokenizer, texts[:1])
    off_diagonal = ~torch.eye(7, dtype=torch.bool)
    assert torch.isnan(single.stderr[off_diagonal]).all() and single.meta["groups"] == 1
    with pytest.raises(ValueError, match="at least 2 groups"):
        single.stability(1)


def test_cosine_chunks_shrink_to_the_gpus_free_memory(monkeypatch):
    # Mocked free memory (no GPU here). On a T4 after a 7B fp16 load (about 2 GiB free) a chunk of 1,024
    # tokens x 33 positions x hidden 4,096 needs 0.7 GiB (fp32 stack, one fp64 slice of 512 features,
    # fp64 Gram matrix, cosines and distances): more than a quarter of what is free.
    from kit.scan import similarity

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * 2**30, 16 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    tokens = similarity._chunk_tokens(33, 4096, torch.device("cuda", 0))
    per_token = 33 * (4096 * 4 + 512 * 8) + 3 * 33**2 * 8
    assert 1 <= tokens < similarity._TOKEN_CHUNK and tokens * per_token <= 2 * 2**30 / 4 < (tokens + 1) * per_token
    assert similarity._chunk_tokens(33, 4096, torch.device("cpu")) == similarity._TOKEN_CHUNK


def test_cosine_chunks_count_the_memory_pytorch_holds_cached_as_free(monkeypatch):
    # Mocked CUDA memory (no GPU here). On a GPU, after a step that freed 1.5 GiB of tensors, PyTorch's caching
    # allocator keeps those blocks reserved: mem_get_info calls them used, though PyTorch can allocate them
    # again, and the chunks shrank to a quarter of the 0.5 GiB CUDA reports free instead of the 2 GiB there are.
    from kit.scan import similarity

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**29, 16 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2**31)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2**29)
    gpu = torch.device("cuda", 0)
    assert kit.core.device.free_bytes(gpu) == 2**31
    per_token = 33 * (4096 * 4 + 512 * 8) + 3 * 33**2 * 8
    tokens = similarity._chunk_tokens(33, 4096, gpu)
    assert tokens < similarity._TOKEN_CHUNK and tokens * per_token <= 2**31 / 4 < (tokens + 1) * per_token


def test_cosines_keep_small_angles_and_zero_states_orthogonal():
    """Against an independent, well-conditioned formula; the diagonal is exact (0), whatever the blocking."""
    from kit.scan import similarity

    torch.manual_seed(0)
    x = torch.randn(8, 1, 1200)  # 8 tokens; hidden 1,200: three slices of the Gram matrix, the last partial
    near = x + 1e-4 * torch.randn_like(x)
    stack = torch.cat([x, 3 * x, near, torch.randn_like(x), torch.zeros_like(x)], dim=1)
    angles = torch.arccos(similarity._cosines(stack)) / math.pi
    unit = F.normalize(stack.double(), dim=-1)  # independent: well conditioned at small angles
    apart, together = (unit[:, :, None] - unit[:, None]).norm(dim=-1), (unit[:, :, None] + unit[:, None]).norm(dim=-1)
    exact = 2 * torch.atan2(apart, together) / math.pi
    exact[:, 4, :] = exact[:, :, 4] = 0.5  # a zero state: orthogonal to every other state, as F.normalize has it
    exact.diagonal(dim1=1, dim2=2).zero_()  # every state at distance 0 from itself, exactly
    torch.testing.assert_close(angles, exact, atol=1e-7, rtol=1e-6)
    assert angles[:, 0, 1].max() < 1e-7 and 1e-6 < angles[:, 0, 2].min()  # parallel: 0; 1e-4 apart: ~1e-5, not noise
    assert (angles.diagonal(dim1=1, dim2=2) == 0).all()  # set, not computed: the same on every machine


# ------------------------------------------------------------------------------ sublayers

# Where each tiny family's middle is read: the input of the norm before its MLP (Llama's and most others'
# post_attention_layernorm), the MLP's own input where no norm precedes it (OLMo 2 normalises after each
# branch instead), or, with a parallel residual, the layer's output less its MLP's.
PARALLEL = "output - mlp (parallel residual)"
MIDDLES = {
    "gemma2": "input of pre_feedforward_layernorm", "gemma3": "input of pre_feedforward_layernorm",
    "gemma3_vl": "input of pre_feedforward_layernorm", "olmo2": "input of mlp", "gpt2": "input of ln_2",
    "opt": "input of final_layer_norm", "phi": PARALLEL, "gpt_neox": PARALLEL,
}  # fmt: skip


def assert_same_sums(whole, plain, metric):
    """A sublayer scan's layers() against a layer scan of the same texts: the same sums of the same
    distances, but each token's Gram matrix is one BLAS call over 2L + 1 positions instead of L + 1,
    blocked differently (on another CPU, or under KIT_ODD_CHUNKS=1, with other hidden slices). Measured
    under KIT_ODD_CHUNKS=1 on all tiny architectures and metrics: group sums within 4.2e-13 relative,
    the float32 matrix and stderr equal; asserted: 1e-10 and 1e-6 relative."""
    torch.testing.assert_close(whole.group_sums, plain.group_sums, rtol=1e-10, atol=1e-13, msg=metric)
    for key in ("matrix", "stderr"):
        torch.testing.assert_close(getattr(whole, key), getattr(plain, key), rtol=1e-6, atol=1e-12, msg=f"{metric}: {key}")
    assert torch.equal(whole.group_counts, plain.group_counts)  # token counts: integers


def test_sublayer_scan_matches_brute_force_and_its_layers_the_layer_scan(tiny, texts):
    model, tokenizer = tiny
    arch = model.name_or_path.removeprefix("tiny-")
    expected = reference_distances(model, tokenizer, texts, MAX_LENGTH, sublayers=True)
    assert set(expected) == set(METRICS)
    for metric in METRICS:
        distances = scan(model, tokenizer, texts, batch_size=4, metric=metric, sublayers=True)
        np.testing.assert_allclose(distances.matrix.numpy(), expected[metric], atol=2e-5, err_msg=metric)
        assert distances.matrix.shape == (13, 13) and distances.num_layers == 6 and distances.positions == "sublayers"
        assert distances.meta["middles"] == [MIDDLES.get(arch, "input of post_attention_layernorm")] * 6
        whole, plain = distances.layers(), scan(model, tokenizer, texts, batch_size=4, metric=metric)
        assert_same_sums(whole, plain, metric)
        best, expected_best = whole.best_block(2), plain.best_block(2)
        assert whole.positions == "layers" and (best.start, best.n) == (expected_best.start, expected_best.n)
        assert best.distance == pytest.approx(expected_best.distance, rel=1e-6)
        table = distances.sublayers()
        i = np.arange(6)
        np.testing.assert_array_equal(table["attention"], distances.matrix.numpy()[2 * i, 2 * i + 1])
        np.testing.assert_array_equal(table["mlp_stderr"], distances.stderr.numpy()[2 * i + 1, 2 * i + 2])
        assert (table[["attention", "mlp"]] > 0).all().all()  # the middle is neither the layer's input nor its output


def test_the_middle_follows_the_residual_not_the_family(texts):
    """GPT-NeoX with a sequential residual is read like Llama; a post-norm OPT layer and layers with no MLP
    (Mamba, Nemotron-H's one-mixer blocks) are refused, saying what to do instead."""
    neox = families.tiny_family_model("gpt_neox", use_parallel_residual=False)
    assert [str(m) for m in layers.middles(neox)] == ["input of post_attention_layernorm"] * neox.config.num_hidden_layers
    _, tokenizer = kit.testing.tiny_model("gpt_neox")  # the same vocabulary size (512)
    np.testing.assert_allclose(
        scan(neox, tokenizer, texts, sublayers=True).matrix.numpy(),
        reference_distances(neox, tokenizer, texts, MAX_LENGTH, sublayers=True)["angular_last"], atol=2e-5,
    )  # fmt: skip
    refusals = [
        ("opt", {"do_layer_norm_before": False}, "layer 0 \\(OPTDecoderLayer\\) returns a child's output: a post-norm layer"),
        ("mamba", {}, "layer 0 \\(MambaBlock\\) has no MLP child \\(children: norm, mixer\\)"),
        ("nemotron_h", {}, "layer 0 \\(NemotronHBlock\\) has no MLP child"),
    ]  # fmt: skip
    for model_type, fields, message in refusals:
        with pytest.raises(layers.UnsupportedArchitectureError, match=f"{message}.*scan its whole layers \\(sublayers=False\\)"):
            layers.middles(families.tiny_family_model(model_type, **fields))


def test_a_sublayer_scan_does_not_resume_a_layer_scans_cache(tmp_path, texts):
    model, tokenizer = kit.testing.tiny_model("llama")
    cache = tmp_path / "scan.safetensors"
    scan(model, tokenizer, texts, batch_size=2, cache_path=cache)
    with pytest.raises(ValueError, match="other settings \\(positions: 7 -> 13; sublayers: None -> True\\)"):
        scan(model, tokenizer, texts, batch_size=2, cache_path=cache, sublayers=True)
    cache.unlink()
    scan(model, tokenizer, texts, batch_size=2, cache_path=cache, sublayers=True)
    with pytest.raises(ValueError, match="other settings \\(positions: 13 -> 7\\)"):
        scan(model, tokenizer, texts, batch_size=2, cache_path=cache)


def test_a_half_precision_models_states_are_kept_in_its_dtype(monkeypatch, texts):
    """A bf16 model's residual stream is kept in bf16 (half the memory of fp32 copies) and made fp32 a chunk at a
    time: the distances are those of states copied to fp32 at once, bit for bit (the same values, the same sums)."""
    from kit.scan import similarity

    model, tokenizer = kit.testing.tiny_model("llama")
    model = model.to(torch.bfloat16)
    kept = []
    real = similarity._Residuals.__call__
    monkeypatch.setattr(similarity._Residuals, "__call__", lambda self, *a: kept.append(real(self, *a)) or kept[-1])
    half = scan(model, tokenizer, texts, batch_size=4, metric="angular_all", sublayers=True)
    assert {state.dtype for states in kept for state in states} == {torch.bfloat16}
    selected = similarity._Residuals._selected
    monkeypatch.setattr(similarity._Residuals, "_selected", lambda self, hidden: selected(self, hidden).float())
    upcast = scan(model, tokenizer, texts, batch_size=4, metric="angular_all", sublayers=True)
    assert torch.equal(half.group_sums, upcast.group_sums) and torch.equal(half.matrix, upcast.matrix)
