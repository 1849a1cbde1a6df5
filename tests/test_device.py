"""The device and dtype policy under mocked GPUs: bf16 only where native, fp16 on older GPUs, fp32 on CPU."""

import contextlib

import pytest
import torch

import kit
from kit.core import device as policy


@pytest.fixture
def gpu(monkeypatch):
    """A pretend CUDA machine; `gpu(native_bf16=...)` sets what its GPU computes natively."""

    monkeypatch.delenv("KIT_DEVICE")

    def make(native_bf16, memory_gb: float = 16):
        """native_bf16: one bool for every GPU, or one per GPU (cuda:0, cuda:1, ...)."""
        per_gpu = native_bf16 if isinstance(native_bf16, tuple) else (native_bf16,) * 8
        current = [0]

        @contextlib.contextmanager
        def on(device):  # torch.cuda.device: what is_bf16_supported and friends then read
            before, current[0] = current[0], torch.device(device).index
            yield
            current[0] = before

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
        monkeypatch.setattr(torch.cuda, "device", on)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: per_gpu[current[0]] or including_emulation)  # fmt: skip
        props = type("Props", (), {"total_memory": int(memory_gb * 2**30)})()
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)

    return make


def test_cpu_computes_in_fp32_without_mixed_precision():
    device = policy.resolve_device("cpu")
    assert policy.resolve_dtype("auto", device) == torch.float32
    assert policy.mixed_precision(torch.float32, device) == {"bf16": False, "fp16": False}


def test_a_t4_gets_fp16_although_torch_says_bf16_is_supported(gpu):
    gpu(native_bf16=False)  # a T4: is_bf16_supported() is True through emulation
    assert torch.cuda.is_bf16_supported()
    device = policy.resolve_device("auto")
    assert device == torch.device("cuda", 0)
    assert policy.resolve_dtype("auto", device) == torch.float16
    assert policy.mixed_precision(torch.float16, device) == {"bf16": False, "fp16": True}


def test_an_ampere_gpu_gets_bf16(gpu):
    gpu(native_bf16=True)
    device = policy.resolve_device("auto")
    assert policy.resolve_dtype("auto", device) == torch.bfloat16
    assert policy.mixed_precision(torch.bfloat16, device) == {"bf16": True, "fp16": False}


def test_each_gpu_is_asked_for_its_own_bf16(gpu):
    # a T4 as cuda:0 beside an A100 as cuda:1: the dtype of cuda:1 is read on cuda:1, not on the current GPU
    gpu(native_bf16=(False, True))
    assert policy.resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert policy.resolve_dtype("auto", "cuda:0") == torch.float16
    assert torch.cuda.current_device() == 0


def test_explicit_dtype_wins_and_bad_values_say_what_to_pass():
    assert policy.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert policy.resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype must be 'auto', a torch dtype"):
        policy.resolve_dtype("float17", "cpu")


def test_asking_for_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU is visible: use device='auto' or 'cpu'"):
        policy.resolve_device("cuda")


def test_quantize_auto_picks_4bit_only_when_the_weights_do_not_fit(gpu, monkeypatch, tmp_path):
    model, _ = kit.testing.tiny_model("llama")
    model.save_pretrained(tmp_path)
    size = kit.loaders.models.checkpoint_bytes(str(tmp_path), torch.float16)
    assert size == sum(p.numel() for p in model.parameters()) * 2
    cuda = torch.device("cuda", 0)
    assert kit.loaders.models.resolve_quantize("auto", str(tmp_path), torch.device("cpu"), torch.float32) is None
    gpu(native_bf16=True, memory_gb=size / 2**30)  # weights take all of the GPU
    assert kit.loaders.models.resolve_quantize("auto", str(tmp_path), cuda, torch.float16) == "4bit"
    gpu(native_bf16=True, memory_gb=2 * size / 2**30)
    assert kit.loaders.models.resolve_quantize("auto", str(tmp_path), cuda, torch.float16) is None
    assert kit.loaders.models.resolve_quantize(None, str(tmp_path), cuda, torch.float16) is None


def test_quantize_auto_counts_a_device_maps_gpus_and_stops_without_bitsandbytes(gpu, monkeypatch, tmp_path):
    kit.testing.tiny_model("llama")[0].save_pretrained(tmp_path)
    size, cuda = kit.loaders.models.checkpoint_bytes(str(tmp_path), torch.float16), torch.device("cuda", 0)
    gpu(native_bf16=True, memory_gb=0.7 * size / 2**30)  # one GPU holds 70% of the weights, two hold 140%
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert kit.loaders.models.resolve_quantize("auto", str(tmp_path), cuda, torch.float16) == "4bit"
    assert kit.loaders.models.resolve_quantize("auto", str(tmp_path), cuda, torch.float16, device_map="auto") is None
    assert kit.loaders.models.resolve_quantize("auto", str(tmp_path), cuda, torch.float16, device_map="auto",
                                       max_memory={0: int(0.7 * size), "cpu": "10GiB"}) == "4bit"  # fmt: skip
    real = kit.loaders.models.importlib.util.find_spec
    monkeypatch.setattr(kit.loaders.models.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ValueError, match="bitsandbytes is not installed: install it"):
        kit.loaders.models.resolve_quantize("auto", str(tmp_path), cuda, torch.float16)


def test_kit_device_pins_the_default_device(monkeypatch):
    monkeypatch.setenv("KIT_DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert policy.default_device() == torch.device("cpu")


def test_loads_follow_the_policy_and_record_their_provenance(smollm):
    model, _ = smollm  # loaded by kit.load_model on the CPU: the suite pins KIT_DEVICE=cpu
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    placement = policy.provenance(model)
    assert placement["dtype"] == "float32" and placement["quantization"] is None
    assert placement["device"] == str(model.device)


def test_auto_is_this_ranks_gpu_whoever_made_the_process_group(gpu, monkeypatch):
    # Mocked GPUs and a group the user's own init_process_group made (no set_device: cuda:0 is current
    # on every rank). On GPUs every rank's model went to the current GPU for a bare "cuda", and
    # cuda:$LOCAL_RANK failed where each process sees one GPU (SLURM, CUDA_VISIBLE_DEVICES per task).
    gpu(native_bf16=True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert policy.resolve_device("auto") == policy.resolve_device("cuda") == torch.device("cuda", 2)
    assert policy.resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert policy.resolve_device("auto") == policy.resolve_device("cuda") == torch.device("cuda", 0)
