"""Data parallelism on torch.distributed, as `torchrun` and `accelerate launch` start it: which share
of the work this rank does, sums reduced over the ranks, results assembled from every rank's share,
and the check that every rank was given the same work. Without an initialised default process group
everything here is the one-process case (rank 0 of 1). Imports nothing else from the kit."""

import hashlib
import json
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether a default process group is initialised (by torchrun + init, accelerate, or by hand)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that shows progress bars and writes results."""
    return rank() == 0


def local_gpu() -> torch.device:
    """This process's GPU: cuda:$LOCAL_RANK where each process sees every GPU of its node (torchrun,
    accelerate launch), cuda:0 where it sees only one (SLURM with CUDA_VISIBLE_DEVICES per task, where
    LOCAL_RANK may be 3 beside device_count() == 1), the current GPU without LOCAL_RANK. Call it only
    where CUDA is available."""
    if "LOCAL_RANK" not in os.environ:
        return torch.device("cuda", torch.cuda.current_device())
    local, visible = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    if not 0 <= local < visible:
        raise ValueError(
            f"LOCAL_RANK={local} but this process sees {visible} GPUs (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): launch at most {visible} processes per node, "
            "or give each process one GPU of its own with CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", local)


def init() -> bool:
    """Join the process group a launcher describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR),
    on NCCL with one GPU per process (local_gpu) when GPUs are visible, else gloo. False when not launched so."""
    if not active():
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            return False
        nccl = torch.cuda.is_available() and os.environ.get("KIT_DEVICE", "cuda").startswith("cuda")
        if nccl:
            torch.cuda.set_device(local_gpu())
        dist.init_process_group("nccl" if nccl else "gloo")
    if dist.get_backend() == "nccl":
        # also when a group exists already (accelerate's): code outside the kit expects the current
        # device to be this rank's, not cuda:0 on every rank (the kit's collectives pick it themselves)
        torch.cuda.set_device(local_gpu())
    return True


def shard(n: int, block: int = 1) -> range:
    """This rank's contiguous share of the items 0..n-1, cut at multiples of `block` (a batch size, so
    that every batch is the one a single process would run). The shares cover every item exactly once
    and differ by at most one block; a rank gets none when there are fewer blocks than ranks."""
    blocks = -(-n // block)
    low, high = rank() * blocks // world_size(), (rank() + 1) * blocks // world_size()
    return range(min(low * block, n), min(high * block, n))


def weighted_shard(costs) -> range:
    """This rank's contiguous share of items of unequal `costs` (e.g. prompt lengths): each item goes
    to the rank whose equal part of the total cost holds its middle, so the ranks' costs are about
    equal; every item goes to exactly one rank."""
    total, before, owners = float(sum(costs)) or 1.0, 0.0, []
    for cost in costs:
        owners.append(min(world_size() - 1, int(world_size() * (before + cost / 2) / total)))
        before += cost
    start = sum(owner < rank() for owner in owners)
    return range(start, start + owners.count(rank()))


@contextmanager
def _on_this_gpu():
    """For NCCL, make this rank's GPU (local_gpu) current for the block: NCCL runs object collectives
    and barriers on the current GPU, which is cuda:0 on every rank unless someone set it (a group made
    by the user's own init_process_group) - "Duplicate GPU detected" or a hang. Nothing for gloo."""
    if not active() or dist.get_backend() != "nccl":
        yield
        return
    with torch.cuda.device(local_gpu()):
        yield


def _reduce_device(device: torch.device) -> torch.device:
    """Where all_sum reduces a tensor on `device`: for NCCL its own GPU, or this rank's (local_gpu) for
    a CPU tensor, never the current GPU blindly (cuda:0 on every rank of a group the user made); the
    CPU for gloo."""
    if dist.get_backend() != "nccl":
        return torch.device("cpu")
    return device if device.type == "cuda" else local_gpu()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `tensor` over the ranks (a new tensor on its device); `tensor` itself in
    one process. Every rank must call it, with a tensor of the same shape and dtype."""
    if not active():
        return tensor
    buffer = tensor.to(_reduce_device(tensor.device), copy=True)
    dist.all_reduce(buffer)  # NCCL runs it on the buffer's GPU, whichever is current
    return buffer.to(tensor.device)


def assemble(values: torch.Tensor, positions, n: int) -> torch.Tensor:
    """Per-item results of all ranks in item order: this rank's `values` sit at `positions` of
    an [n, ...] tensor of zeros, and the ranks' tensors are summed (adding zeros is exact)."""
    full = torch.zeros(n, *values.shape[1:], dtype=values.dtype, device=values.device)
    full[torch.as_tensor(list(positions), dtype=torch.long, device=values.device)] = values
    return all_sum(full)


def digest(items) -> str:
    """A short hash of a sequence of texts (or of items, by their repr), in order."""
    hashed = hashlib.sha256()
    for item in items:
        text = item if isinstance(item, str) else repr(item)
        hashed.update(f"{len(text)}:{text}".encode())
    return hashed.hexdigest()[:16]


def require_same(what: str, settings: dict) -> None:
    """Stop on every rank with one clear error when the ranks were given different `settings` (texts
    by their `digest`), before any of them sums its share: compared through all_gather_object, so no
    rank is left waiting in a collective the others never reach."""
    if not active():
        return
    gathered = [None] * world_size()
    with _on_this_gpu():
        dist.all_gather_object(gathered, json.loads(json.dumps(settings, sort_keys=True, default=str)))
    first = gathered[0]
    differ = [r for r, other in enumerate(gathered) if other != first]
    if differ:
        keys = sorted({k for r in differ for k in first.keys() | gathered[r].keys() if first.get(k) != gathered[r].get(k)})
        raise ValueError(
            f"{what}: rank(s) {differ} were given other {', '.join(keys)} than rank 0, so their sums cannot be combined. "
            "Every process must be given the same texts (or questions) and settings: load them the same way on "
            "every rank (same source, split, n and seed), then split nothing yourself: the kit shards the work."
        )


@contextmanager
def stop_together():
    """Run the block on every rank; a ValueError raised in it on any rank (bad input, a refused resume)
    is raised on every rank as the block ends (the others: "rank r stopped: ..."), so no rank goes on
    alone into a collective the others never reach. Every rank must enter the block."""
    error = None
    try:
        yield
    except ValueError as caught:
        error = caught
    if not active():
        if error is not None:
            raise error
        return
    gathered = [None] * world_size()
    with _on_this_gpu():
        dist.all_gather_object(gathered, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, message) for r, message in enumerate(gathered) if message is not None]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"rank {failed[0][0]} stopped: {failed[0][1]}")


def on_main(fn):
    """fn() run on rank 0 only (reading or writing shared files) and its result given to every rank;
    an exception there is raised on every rank."""
    if not active():
        return fn()
    payload = [None]
    if is_main():
        try:
            payload = [(fn(), None)]
        except Exception as error:  # noqa: BLE001 - re-raised on every rank below
            payload = [(None, error)]
    with _on_this_gpu():
        dist.broadcast_object_list(payload, src=0)
    value, error = payload[0]
    if error is not None:
        raise error
    return value


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written what the others read next)."""
    if not active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[local_gpu().index])  # else NCCL guesses this rank's GPU
    else:
        dist.barrier()
