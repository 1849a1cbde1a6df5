"""Data parallelism on CPUs: the scan and 5-shot MMLU on the embedded model with 2 processes x 1 thread
(torchrun, gloo) against 1 process x 1 thread on the same work, as wall-clock speed-ups (goal >= 1.7 on
2 free cores) and whether the results are equal (scan matrix to 1e-6, MMLU predictions identical).

Each run is a fresh launch of this module as a worker; the time is that of the work alone (after a
warm-up, between barriers), not of starting Python and loading the model. Other jobs on the machine
skew the wall-clock ratio: the load average is printed beside it, and the CPU seconds of each process,
whose ratio (one process's over the busier rank's) is the speed-up two free cores would give."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODEL = "smollm2-135m"
N_TEXTS, MAX_LENGTH, BATCH_SIZE = 32, 128, 8  # 4 batches: 2 per process
SUBJECTS, PER_SUBJECT, SHOTS = ("anatomy", "high_school_geography", "marketing", "astronomy"), 8, 5  # a split subject costs its prefix twice


def _timed(fn):
    """fn()'s result, its wall-clock seconds, and the CPU seconds of each rank."""
    from kit import distributed

    distributed.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    cpu = time.process_time() - cpu
    distributed.barrier()
    wall = time.perf_counter() - start
    cpus = distributed.assemble(torch.tensor([cpu], dtype=torch.float64), [distributed.rank()], distributed.world_size())
    return result, wall, cpus.tolist()


def worker(out: Path):
    """The work in this process (and its share under torchrun); rank 0 writes times and results."""
    import kit
    from kit import data, distributed
    from kit.evaluate import mmlu

    torch.set_num_threads(1)
    distributed.init()
    model, tokenizer = kit.load_model(MODEL)
    texts = data.corpus("train")[:N_TEXTS]
    questions = data.mmlu_questions(list(SUBJECTS), per_subject=PER_SUBJECT)
    kit.angular_distances(model, tokenizer, texts[:2], batch_size=1, max_length=16)  # warm-up
    mmlu(model, tokenizer, questions[:2], shots=1)
    scan, scan_s, scan_cpu = _timed(lambda: kit.angular_distances(model, tokenizer, texts, batch_size=BATCH_SIZE, max_length=MAX_LENGTH))
    answers, mmlu_s, mmlu_cpu = _timed(lambda: mmlu(model, tokenizer, questions, shots=SHOTS, batch_size=BATCH_SIZE))
    if distributed.is_main():
        result = dict(scan_s=scan_s, mmlu_s=mmlu_s, scan_cpu=scan_cpu, mmlu_cpu=mmlu_cpu, matrix=scan.matrix.tolist(),
                      predictions=answers.predictions)  # fmt: skip
        (out / f"world{distributed.world_size()}.json").write_text(json.dumps(result))


def _launch(out: Path, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "KIT_DEVICE": "cpu",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = (launcher if processes > 1 else [sys.executable]) + ["-m", "bench.bench_distributed", str(out)]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=1800)
    return json.loads((out / f"world{processes}.json").read_text())


def main():
    load = os.getloadavg()[0]  # before the runs: the other jobs' load
    with tempfile.TemporaryDirectory() as tmp:
        one, two = _launch(Path(tmp), 1), _launch(Path(tmp), 2)
    gap = float(np.abs(np.array(one["matrix"]) - np.array(two["matrix"])).max())
    same = one["predictions"] == two["predictions"]
    total_one, total_two = one["scan_s"] + one["mmlu_s"], two["scan_s"] + two["mmlu_s"]
    print(f"{MODEL}: scan of {N_TEXTS} texts x {MAX_LENGTH} tokens; {SHOTS}-shot MMLU, {len(SUBJECTS)} subjects x {PER_SUBJECT}")
    for name, key in (("scan", "scan"), ("MMLU", "mmlu")):
        wall, cpu = f"{key}_s", f"{key}_cpu"
        print(f"  {name}: 1 process {one[wall]:.1f} s, 2 processes {two[wall]:.1f} s   speed-up {one[wall] / two[wall]:.2f}x;  "
              f"CPU s {one[cpu][0]:.1f} vs {' + '.join(f'{c:.1f}' for c in two[cpu])}: "
              f"{one[cpu][0] / max(two[cpu]):.2f}x on 2 free cores")  # fmt: skip
    projected = (one["scan_cpu"][0] + one["mmlu_cpu"][0]) / (max(two["scan_cpu"]) + max(two["mmlu_cpu"]))
    print(f"  both: speed-up {total_one / total_two:.2f}x wall-clock with load average {load:.1f} before the runs on "
          f"{os.cpu_count()} cores; {projected:.2f}x from CPU seconds (goal >= 1.7 on 2 free cores)")  # fmt: skip
    print(f"  results equal: scan matrix max |difference| {gap:.1e} (goal <= 1e-6), MMLU predictions identical: {same}")


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
