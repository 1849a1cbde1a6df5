"""The GPU check's two-process run: `torchrun --nproc_per_node 2` on NCCL (one GPU per process), the
scan and the validation loss of a tiny model, against one process on one GPU. Skipped, saying why,
where fewer than two GPUs are visible."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TOLERANCE = 1e-5  # the fp32 tolerances of bench.gpu_checks: two processes only split the sums


def worker(out: Path) -> dict:
    """This process's share of the work (all of it without a launcher); rank 0 writes the results."""
    import kit
    from kit.core import distributed
    from kit.evaluate import validation_loss

    distributed.init()  # NCCL on cuda:$LOCAL_RANK under torchrun with GPUs
    model, tokenizer = kit.testing.tiny_model("llama", num_layers=4)
    model.to(kit.core.device.default_device())
    texts = kit.loaders.data.corpus("validation")[:8]
    result = dict(
        world_size=distributed.world_size(),
        backend=torch.distributed.get_backend() if distributed.active() else None,
        matrix=kit.angular_distances(model, tokenizer, texts, batch_size=4, max_length=64).matrix.tolist(),
        loss=validation_loss(model, tokenizer, texts, max_length=64, batch_size=4).loss,
    )
    if distributed.is_main():
        (out / f"world{result['world_size']}.json").write_text(json.dumps(result))
    return result


def _launch(out: Path, processes: int) -> dict:
    env = {**{k: v for k, v in os.environ.items() if k != "KIT_DEVICE"}, "TQDM_DISABLE": "1",  # each process: cuda:$LOCAL_RANK
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = (launcher if processes > 1 else [sys.executable]) + ["-m", "bench.gpu_nccl", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / f"world{processes}.json").read_text())


def compare(one: dict, two: dict) -> list[str]:
    """Prints and judges two processes' results against one's."""
    gap = max(abs(a - b) for row_one, row_two in zip(one["matrix"], two["matrix"]) for a, b in zip(row_one, row_two))
    loss_gap = abs(two["loss"] / one["loss"] - 1)
    ok = two["world_size"] == 2 and gap <= TOLERANCE and loss_gap <= TOLERANCE
    print(f"  2 processes ({two['backend']}) against 1: scan max |difference| {gap:.1e}, loss {loss_gap:.1e} "
          f"(tolerance {TOLERANCE:.0e})  {'ok' if ok else 'FAIL'}")  # fmt: skip
    return [] if ok else ["two processes on NCCL"]


def check(device) -> list[str]:
    """The two-process run where two GPUs are visible; else a printed reason and no failure."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        why = "a CPU run" if device.type != "cuda" else f"{torch.cuda.device_count()} GPU visible"
        print(f"  skipped: {why}; NCCL needs two GPUs (tests/test_distributed.py runs the same sums on gloo)")
        return []
    with tempfile.TemporaryDirectory() as tmp:
        one, two = _launch(Path(tmp), 1), _launch(Path(tmp), 2)
    return compare(one, two)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
