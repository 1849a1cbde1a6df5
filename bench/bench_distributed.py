"""Data parallelism on CPUs: the scan and 5-shot MMLU on the embedded model with 2 processes x 1 thread
(torchrun, gloo) against 1 process x 1 thread on the same work, as wall-clock speed-ups (goal >= 1.7 on
2 free cores) and how far the results are apart (scan matrix within 1e-6, MMLU log-likelihoods within 1e-4;
the predictions, identical wherever no two answers are that close).

Each run is a fresh launch of this module as a worker; the time is that of the work alone (after a
warm-up, between barriers), not of starting Python and loading the model. Other jobs on the machine
skew the wall-clock ratio: the load average is printed beside it, and the CPU seconds of each process,
whose ratio (one process's over the busier rank's) is the speed-up two free cores would give.

The two launches alternate REPEATS times; every ratio is taken per repeat and printed as its median
with its spread. Half the texts and 3 questions per subject (8 used to be run once) keep the timed
work of three repeats near that of one; each launch still loads the model."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.measure import interleaved, ratios, spread

MODEL = "smollm2-135m"
N_TEXTS, MAX_LENGTH, BATCH_SIZE = 16, 128, 8  # 2 batches: 1 per process
SUBJECTS, PER_SUBJECT, SHOTS = ("anatomy", "high_school_geography", "marketing", "astronomy"), 3, 5  # a split subject costs its prefix twice
REPEATS = 3


def _timed(fn):
    """fn()'s result, its wall-clock seconds, and the CPU seconds of each rank."""
    from kit.core import distributed

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
    from kit.core import distributed
    from kit.evaluate import mmlu
    from kit.loaders import data

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
                      predictions=answers.predictions, loglikelihoods=answers.loglikelihoods.tolist())  # fmt: skip
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
        runs = interleaved({processes: lambda processes=processes: _launch(Path(tmp), processes) for processes in (1, 2)},
                           REPEATS, measure=lambda fn: fn())  # fmt: skip
    ones, twos = runs[1], runs[2]
    gap = max(float(np.abs(np.array(one["matrix"]) - np.array(two["matrix"])).max()) for one, two in zip(ones, twos))
    loglik_gap = max(float(np.abs(np.array(one["loglikelihoods"]) - np.array(two["loglikelihoods"])).max()) for one, two in zip(ones, twos))
    same = all(one["predictions"] == two["predictions"] for one, two in zip(ones, twos))

    def speed_up(seconds) -> list[float]:
        """Per repeat: seconds(one process's result) / seconds(two processes' result)."""
        return ratios([seconds(one) for one in ones], [seconds(two) for two in twos])

    print(f"{MODEL}: scan of {N_TEXTS} texts x {MAX_LENGTH} tokens; {SHOTS}-shot MMLU, {len(SUBJECTS)} subjects x {PER_SUBJECT}; "
          f"medians of {REPEATS} interleaved repeats:")  # fmt: skip
    for name, key in (("scan", "scan"), ("MMLU", "mmlu")):
        wall, cpu = f"{key}_s", f"{key}_cpu"
        print(f"  {name}: 1 process {np.median([r[wall] for r in ones]):.1f} s, 2 processes {np.median([r[wall] for r in twos]):.1f} s   "
              f"speed-up {spread(speed_up(lambda r: r[wall]))};  "
              f"from CPU seconds {spread(speed_up(lambda r: max(r[cpu])))} on 2 free cores")  # fmt: skip
    wall_both = spread(speed_up(lambda r: r["scan_s"] + r["mmlu_s"]))
    cpu_both = spread(speed_up(lambda r: max(r["scan_cpu"]) + max(r["mmlu_cpu"])))
    print(f"  both: speed-up {wall_both} wall-clock with load average {load:.1f} before the runs on "
          f"{os.cpu_count()} cores; {cpu_both} from CPU seconds (goal >= 1.7 on 2 free cores)")  # fmt: skip
    print(f"  results: scan matrix max |difference| {gap:.1e} (goal <= 1e-6), MMLU log-likelihoods {loglik_gap:.1e} "
          f"(goal <= 1e-4), predictions identical: {same}")  # fmt: skip

if __name__ == "__main__":
    worker(Path(sys.argv[1]))
