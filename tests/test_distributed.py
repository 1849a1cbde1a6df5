"""Data parallelism for real: the kit's paths under torchrun with two CPU processes (gloo) return what
one process returns, on uneven shards; ranks given different work stop with a clear error (never a
hang: every launch has a timeout); resuming under another number of processes is refused."""

import ast
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kit
from kit.__main__ import main
from kit.core import distributed
from kit.core.artifacts import save_checkpoint
from kit.loaders.data import LETTERS
from kit.testing import assert_same_choices

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_worker as worker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for one launch: a hang fails the test instead of stalling CI


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node nproc ARGS` from the repository, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The worker under torchrun with two processes, and the same work in this one process."""
    out, alone = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    run = torchrun(REPO / "tests" / "distributed_worker.py", out)
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return out, ranks, worker.work(alone)


def test_shards_cover_every_item_once_in_whole_blocks(monkeypatch):
    for world in (1, 2, 3, 5):
        for n in (0, 1, 4, 7, 11):
            for block in (1, 2, 3):
                shares = []
                for r in range(world):
                    monkeypatch.setattr(distributed, "rank", lambda r=r: r)
                    monkeypatch.setattr(distributed, "world_size", lambda world=world: world)
                    shares.append(distributed.shard(n, block))
                assert [i for share in shares for i in share] == list(range(n))
                assert all(share.start % block == 0 for share in shares if share)
                sizes = [-(-len(share) // block) for share in shares]  # blocks per rank
                assert max(sizes) - min(sizes) <= 1


def test_weighted_shards_cover_every_item_once_and_balance_the_cost(monkeypatch):
    rng = np.random.default_rng(0)
    for world in (1, 2, 3):
        for costs in ([], [5], [1, 1, 1], [1, 100, 1, 1], rng.integers(1, 50, 40).tolist()):
            shares = []
            for r in range(world):
                monkeypatch.setattr(distributed, "rank", lambda r=r: r)
                monkeypatch.setattr(distributed, "world_size", lambda world=world: world)
                shares.append(distributed.weighted_shard(costs))
            assert [i for share in shares for i in share] == list(range(len(costs)))
            if len(costs) == 40:  # each rank's cost is within one item of an equal part
                assert all(abs(sum(costs[i] for i in share) - sum(costs) / world) <= max(costs) for share in shares)


def test_the_work_is_split_unevenly():
    """The worker's sizes leave the two ranks unequal shares: what the comparisons below exercise."""
    texts = worker.N_TEXTS
    assert -(-texts // worker.BATCH) % 2 == 0 and texts % 2 == 1  # 4 batches: 4 + 3 texts
    assert len(worker.inputs()[3]) % 2 == 1  # 5 questions: 3 + 2


def test_scan_equals_one_process(launched):
    _, ranks, alone = launched
    for got, scan in ((got, scan) for got in ranks for scan in ("scan", "sublayer_scan")):
        torch.testing.assert_close(got[scan]["matrix"], alone[scan]["matrix"], atol=1e-6, rtol=0)
        torch.testing.assert_close(got[scan]["stderr"], alone[scan]["stderr"], atol=1e-6, rtol=0)
        # the groups Distances.stability resamples: dealt by the texts' global index, as in one process
        torch.testing.assert_close(got[scan]["group_sums"], alone[scan]["group_sums"], atol=1e-9, rtol=1e-9)
        assert torch.equal(got[scan]["group_counts"], alone[scan]["group_counts"])
    assert alone["sublayer_scan"]["matrix"].shape == (9, 9)  # 4 layers and their middles


def test_mmlu_and_boolq_predictions_equal_one_process(launched):
    _, ranks, alone = launched
    for got in ranks:
        for task in ("mmlu", "boolq"):
            np.testing.assert_allclose(got[task]["loglikelihoods"], alone[task]["loglikelihoods"], atol=1e-4)
            labels = [LETTERS if task == "mmlu" else (False, True)] * len(alone[task]["predictions"])
            assert_same_choices(got[task]["predictions"], labels, alone[task]["loglikelihoods"], margin=2e-4)
        assert got["mmlu"]["accuracy"] == alone["mmlu"]["accuracy"]


def test_validation_loss_equals_one_process(launched):
    _, ranks, alone = launched
    for got in ranks:
        assert got["loss"]["tokens"] == alone["loss"]["tokens"]
        assert got["loss"]["loss"] == pytest.approx(alone["loss"]["loss"], rel=1e-6)
        assert got["loss"]["stderr"] == pytest.approx(alone["loss"]["stderr"], rel=1e-6)


def test_ablation_oracle_equals_one_process(launched):
    _, ranks, alone = launched
    for got in ranks:
        assert got["oracle"]["tokens"] == alone["oracle"]["tokens"]
        np.testing.assert_allclose(got["oracle"]["loss"], alone["oracle"]["loss"], rtol=1e-6)  # NaN where not measured, alike
        np.testing.assert_allclose(got["oracle"]["kl"], alone["oracle"]["kl"], rtol=1e-5, atol=1e-9)


def test_greedy_removal_equals_one_process(launched):
    _, ranks, alone = launched
    for got in ranks:
        assert got["greedy"]["order"] == alone["greedy"]["order"] and got["greedy"]["tokens"] == alone["greedy"]["tokens"]
        np.testing.assert_allclose(got["greedy"]["losses"], alone["greedy"]["losses"], rtol=1e-6)
        np.testing.assert_allclose(got["greedy"]["candidates"], alone["greedy"]["candidates"], rtol=1e-6)  # NaN where removed, alike


def healing_gain(table) -> float:
    """The healed minus the unhealed validation loss at n = 2 in a sweep table."""
    loss = table[table["metric"] == "val_loss"].set_index(["n", "healed"])["value"]
    return loss[(2, True)] - loss[(2, False)]


def test_sweep_with_a_healed_point_equals_one_process_and_rank_0_writes(launched):
    out, ranks, alone = launched
    expected = alone["sweep"]
    assert healing_gain(expected) < -5e-4  # three steps lower the pruned model's loss
    for got in ranks:
        # mmlu, mmlu_subjects, val_loss, val_loss_norm at n = 0, at n = 2, and at n = 2 healed (3 DDP steps)
        assert list(got["sweep"]["n"]) == list(expected["n"]) == [0] * 4 + [2] * 8
        assert got["sweep"]["healed"].tolist() == expected["healed"].tolist() == [False] * 8 + [True] * 4
        np.testing.assert_allclose(got["sweep"]["value"], expected["value"], rtol=1e-6)
        assert healing_gain(got["sweep"]) == pytest.approx(healing_gain(expected), rel=1e-3)
        assert got["sweep"]["outcomes"].fillna("").tolist() == expected["outcomes"].fillna("").tolist()
    cached = json.loads((out / "sweep.json").read_text())
    assert [(p["n"], p["healed"]) for p in cached["points"]] == [(0, False), (2, False), (2, True)]
    record = json.loads((out / "sweep_healed" / "n2" / "heal_config.json").read_text())
    assert (record["world_size"], record["global_batch"]) == (2, worker.GLOBAL_BATCH)
    assert (out / "sweep_healed" / "n2" / "adapter" / "adapter_model.safetensors").is_file()


def test_three_healing_steps_interrupted_and_resumed_equal_one_process_at_the_same_global_batch(launched):
    out, ranks, alone = launched
    for got in ranks:
        history, reference = got["heal"]["history"], alone["heal"]["history"]
        assert got["heal"]["interrupted"] and not alone["heal"]["interrupted"]
        assert (history["world_size"], history["global_batch"]) == (2, worker.GLOBAL_BATCH)
        assert (reference["world_size"], reference["global_batch"]) == (1, worker.GLOBAL_BATCH)
        for part in ("train", "validation"):
            assert [e["step"] for e in history[part]] == [e["step"] for e in reference[part]]
            np.testing.assert_allclose([e["loss"] for e in history[part]], [e["loss"] for e in reference[part]], rtol=1e-5)
        for name, weight in alone["heal"]["adapter"].items():
            torch.testing.assert_close(got["heal"]["adapter"][name], weight, atol=1e-4, rtol=1e-3)
    record = json.loads((out / "heal" / "heal_config.json").read_text())
    assert (record["world_size"], record["global_batch"]) == (2, worker.GLOBAL_BATCH)
    assert (out / "heal" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "heal" / "checkpoint-2").is_dir()  # where the interrupted run resumed from


def test_resuming_under_another_number_of_processes_is_refused(launched):
    out, _, _ = launched
    model, tokenizer, texts, _, _ = worker.inputs()
    with pytest.raises(ValueError, match="made by several processes, this one runs on 1"):
        kit.angular_distances(model, tokenizer, texts, batch_size=worker.BATCH, max_length=32, groups=3,
                              cache_path=out / "scan.safetensors")  # fmt: skip
    config = worker.heal_config(world_size=2)  # the settings the two processes trained with
    with pytest.raises(ValueError, match="on 2 process.*this one runs on 1.*--num_processes 2"):
        kit.heal(model, tokenizer, kit.loaders.data.corpus("train")[:8], config, output_dir=out / "heal", val_texts=texts[:2])


def test_ranks_given_different_texts_stop_with_a_clear_error(tmp_path):
    run = torchrun(REPO / "tests" / "distributed_worker.py", tmp_path, "disagree")
    assert run.returncode != 0
    assert "the similarity scan: rank(s) [1] were given other texts than rank 0" in run.stderr
    assert not list(tmp_path.glob("rank*.pt"))


def test_a_text_with_nothing_to_predict_in_one_ranks_share_stops_every_rank(tmp_path):
    run = torchrun(REPO / "tests" / "distributed_worker.py", tmp_path, "short")
    assert run.returncode != 0
    assert "texts [6] have fewer than 2 tokens: nothing to predict; remove them" in run.stderr
    assert not list(tmp_path.glob("rank*.pt"))


def test_cli_scan_under_torchrun_equals_one_process(tmp_path):
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=4)
    save_checkpoint(tmp_path / "tiny", model, tokenizer)
    options = ["scan", "--model", tmp_path / "tiny", "--n-texts", 5, "--batch-size", 1, "--max-length", 32, "--groups", 3]
    run = torchrun("-m", "kit", *options, "--run-dir", tmp_path / "two")  # torchrun reads --run as its --run-path
    assert run.returncode == 0, run.stderr[-4000:]
    main([str(option) for option in [*options, "--run", tmp_path / "one"]])
    two, one = (kit.Distances.load(tmp_path / name / "distances.safetensors") for name in ("two", "one"))
    torch.testing.assert_close(two.matrix, one.matrix, atol=1e-6, rtol=0)
    torch.testing.assert_close(two.group_sums, one.group_sums, atol=1e-9, rtol=1e-9)
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text())[kit.run.MANIFEST_KEYS["scan"]] for name in ("two", "one")]
    assert [m["world_size"] for m in manifests] == [2, 1]
    assert manifests[0]["config"] == manifests[1]["config"] and manifests[0]["config"]["n_texts"] == 5


def test_distributed_imports_nothing_from_the_kit():
    tree = ast.parse((REPO / "kit" / "core" / "distributed.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("kit"))]


def _fake_nccl_group(monkeypatch, visible: int, local_rank: str | None, current: int = 0) -> list:
    """A mocked NCCL group of 2 ranks (no GPU here) on a node where this process sees `visible` GPUs,
    with LOCAL_RANK set (or not) and cuda:`current` current; returns the list of GPUs made current."""
    made_current = [current]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: made_current[-1])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: made_current.append(torch.device(device).index))
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    return made_current


def test_init_sets_each_ranks_gpu_also_when_a_group_exists(monkeypatch):
    # Mocked NCCL group (no GPU here). On GPUs: a group made by accelerate before init() left every rank
    # on cuda:0, where NCCL's object collectives then hang or fail with "Duplicate GPU detected".
    made_current = _fake_nccl_group(monkeypatch, visible=4, local_rank="1")
    assert distributed.init() and made_current == [0, 1]
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    assert distributed.init() and made_current == [0, 1]


def test_local_gpu_is_local_rank_among_the_visible_gpus(monkeypatch):
    # Mocked GPUs. Under SLURM with CUDA_VISIBLE_DEVICES per task each process sees one GPU as cuda:0
    # while LOCAL_RANK says 3: cuda:3 fails with "invalid device ordinal".
    _fake_nccl_group(monkeypatch, visible=1, local_rank="3")
    assert distributed.local_gpu() == torch.device("cuda", 0)
    made_current = _fake_nccl_group(monkeypatch, visible=1, local_rank="3")
    assert distributed.init() and made_current == [0, 0]
    _fake_nccl_group(monkeypatch, visible=4, local_rank="2")
    assert distributed.local_gpu() == torch.device("cuda", 2)
    _fake_nccl_group(monkeypatch, visible=4, local_rank="5")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=5 but this process sees 4 GPUs \(CUDA_VISIBLE_DEVICES=0,1,2,3\): launch"):
        distributed.local_gpu()
    _fake_nccl_group(monkeypatch, visible=4, local_rank=None, current=3)  # a launcher without LOCAL_RANK: the script's set_device
    assert distributed.local_gpu() == torch.device("cuda", 3)


def test_collectives_run_on_this_ranks_gpu_in_a_group_the_user_made(monkeypatch):
    # Mocked NCCL group that the user's own init_process_group made, without torch.cuda.set_device: the
    # current GPU is cuda:0 on every rank. On GPUs, collectives there fail with "Duplicate GPU detected"
    # or hang; they must run on cuda:$LOCAL_RANK (object collectives and barriers on the current GPU,
    # all_reduce on its tensor's).
    _fake_nccl_group(monkeypatch, visible=2, local_rank="1")
    current, seen = [0], []

    @contextlib.contextmanager
    def on(device):
        before, current[0] = current[0], torch.device(device).index
        yield
        current[0] = before

    def gather(out, obj, group=None):
        seen.append(("gather", current[0]))
        out[:] = [obj] * len(out)

    def broadcast(payload, src=0, group=None):
        seen.append(("broadcast", current[0]))
        payload[:] = [("from rank 0", None)]

    monkeypatch.setattr(torch.cuda, "device", on)
    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast)
    monkeypatch.setattr(torch.distributed, "barrier", lambda group=None, device_ids=None: seen.append(("barrier", device_ids)))
    distributed.require_same("scan", {"n": 1})
    with distributed.stop_together():
        pass
    assert distributed.on_main(lambda: "never run on rank 1") == "from rank 0"
    distributed.barrier()
    assert seen == [("gather", 1), ("gather", 1), ("broadcast", 1), ("barrier", [1])] and current == [0]
    assert distributed._reduce_device(torch.device("cpu")) == torch.device("cuda", 1)
    assert distributed._reduce_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    assert distributed._reduce_device(torch.device("cpu")) == torch.device("cpu")
