"""The memory table of docs/gpus.md: each notebook's largest step at its default parameters (read from the
notebooks' `parameters` cells), predicted by kit.core.ledger for Llama-2 7B, 13B and 70B on the GPUs people
have, in the precision the kit's policy picks there (fp16 on a T4, bf16 elsewhere, 4-bit NF4 where the
weights would not leave a fifth of the memory free, as QUANTIZE="auto" does; healing in 4-bit, notebook
03's default). `python docs/memory_table.py` prints it, `--write` puts it in docs/gpus.md between its markers; tests/test_ledger.py
checks the page has it."""

import ast
import json
import re
import sys
from pathlib import Path

from transformers import LlamaConfig

from kit.core import ledger

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
MODELS = {  # Llama-2's published sizes
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
}
GPUS = [("T4", 1), ("L4", 1), ("A100-80GB", 1), ("H100", 1), ("H100", 2), ("H100", 4), ("H100", 8)]
MMLU_TOKENS = 1024  # a 5-shot MMLU prompt and its answer, at most


def defaults(notebook: str) -> dict:
    """The literal values of a notebook's `parameters` cell."""
    cells = json.loads((NOTEBOOKS / f"{notebook}.ipynb").read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    return {t.id: ast.literal_eval(node.value) for node in ast.parse(source).body for t in node.targets}


def notebook_steps(shape: ledger.Shape, precision: str) -> dict[str, list[ledger.Step]]:
    """Each notebook's heavy steps at its defaults."""
    p = {name: defaults(name) for name in ("01_similarity", "02_select_and_prune", "03_heal", "04_compare",
                                           "05_criteria", "06_granularity")}  # fmt: skip
    one, two, three, four, five, six = p.values()
    texts = lambda d: dict(batch_size=d["BATCH_SIZE"], max_length=d["MAX_LENGTH"])  # noqa: E731
    heal = lambda prec, b, s, r, c: ledger.heal(shape, prec, batch_size=b, seq_len=s, rank=r, checkpointing=c)  # noqa: E731
    return {
        "01": [ledger.scan(shape, precision, **texts(one), metric=one["METRIC"])],
        "02": [ledger.loss(shape, precision, **texts(two))],
        "03": [heal("4bit" if three["QUANTIZE"] == "4bit" else precision, three["BATCH_SIZE"], three["SEQ_LEN"], three["RANK"], True)],
        "04": [ledger.loss(shape, precision, batch_size=four["BATCH_SIZE"], max_length=four["MAX_LENGTH"]),
               ledger.loglikelihoods(shape, precision, batch_size=four["BATCH_SIZE"], tokens=MMLU_TOKENS),
               heal(four["HEAL_QUANTIZE"] or precision, four["HEAL_BATCH_SIZE"], four["HEAL_SEQ_LEN"], four["HEAL_RANK"],
                    four["HEAL_CHECKPOINTING"])],
        "05": [ledger.scan(shape, precision, **texts(five), metric="angular_all"), ledger.oracle(shape, precision, **texts(five))],
        "06": [ledger.scan(shape, precision, **texts(six), sublayers=True), ledger.greedy(shape, precision, **texts(six))],
    }  # fmt: skip


def precision_on(shape: ledger.Shape, gpu: str, count: int) -> str:
    half = "fp16" if gpu == "T4" else "bf16"
    return half if shape.weight_bytes(half) <= 0.8 * count * ledger.GPUS[gpu] * ledger.GIB else "4bit"


def memory_table() -> str:
    rows = []
    for model, sizes in MODELS.items():
        shape = ledger.Shape.from_config(LlamaConfig(vocab_size=32000, **sizes))
        for gpu, count in GPUS:
            precision = precision_on(shape, gpu, count)
            cells = []
            for steps in notebook_steps(shape, precision).values():
                worst = max(steps, key=lambda s: s.peak)
                cells.append(f"{worst.peak / ledger.GIB:.1f}" + ("" if ledger.fits(worst, gpu, count) else " ✗"))
            where = f"{count} x {gpu}" if count > 1 else gpu
            rows.append(f"| {model} | {where} | {precision} | {' | '.join(cells)} |")
    header = "| model | GPU | weights | 01 | 02 | 03 | 04 | 05 | 06 |"
    return "\n".join([header, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |", *rows])


PAGE = Path(__file__).resolve().parent / "gpus.md"


def write(page: Path = PAGE) -> None:
    """Replace the table between the page's `<!-- memory-table ... -->` and `<!-- /memory-table -->` markers."""
    text = page.read_text()
    pattern = re.compile(r"(<!-- memory-table[^>]*-->\n).*?(\n<!-- /memory-table -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page}: no <!-- memory-table --> ... <!-- /memory-table --> markers")
    page.write_text(pattern.sub(lambda m: m.group(1) + memory_table() + m.group(2), text))


if __name__ == "__main__":
    write() if sys.argv[1:] == ["--write"] else print(memory_table())
