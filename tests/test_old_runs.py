"""What kit 0.1 saved reads back under today's names: a result table's "strategy" column (and paired.csv's
"strategy=..." columns) is "criterion", a selection whose source is "argmin" is "similarity", and a sweep cache that
recorded "strategy" resumes. (The 0.1 names in code, strategy= and the rest, are gone since 0.3: tests/test_aliases.py.)"""

import json

import pandas as pd
import pytest
from conftest import accuracy_rows, write_compare_run

from kit.choose.criteria import Selection
from kit.core import layers
from kit.experiments import curves, readings, results, sweep
from kit.testing import random_distances, tiny_model


def probe(model, tokenizer):
    return {"layers": float(layers.num_layers(model))}


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def sweep_table() -> pd.DataFrame:
    """Recall rows of a sweep of both criteria."""
    return pd.DataFrame(accuracy_rows("similarity", {0: 30, 2: 25, 4: 20}) + accuracy_rows("heuristic", {0: 30, 2: 20, 4: 8}))


def test_a_result_table_of_0_1_reads_under_the_new_column_names(tmp_path):
    table = sweep_table()
    paired = curves.paired_comparison(table, "criterion", "similarity", "heuristic", metric="recall")
    for name, new in (("sweep", table), ("paired", paired)):
        new.to_csv(tmp_path / f"{name}.csv", index=False)
        new.rename(columns=lambda c: c.replace("criterion", "strategy")).to_csv(tmp_path / f"{name}-0.1.csv", index=False)
        pd.testing.assert_frame_equal(results.read_csv(tmp_path / f"{name}-0.1.csv"), pd.read_csv(tmp_path / f"{name}.csv"))
    assert list(pd.read_csv(tmp_path / "paired-0.1.csv"))[2:4] == ["strategy=similarity", "strategy=heuristic"]
    assert results.renamed([{"strategy": "heuristic", "n": 2}]) == [{"criterion": "heuristic", "n": 2}]


def test_a_run_of_0_1_reads_the_same(tmp_path):
    """Notebook 04's reading of a run folder whose tables say "strategy" is the reading of today's."""
    today = readings.reading(write_compare_run(tmp_path), "04_compare").markdown
    for name in ("sweep.csv", "collapse.csv", "paired.csv", "healing_gains.csv"):
        table = pd.read_csv(tmp_path / name)
        table.rename(columns=lambda c: c.replace("criterion", "strategy")).to_csv(tmp_path / name, index=False)
    assert "strategy" in pd.read_csv(tmp_path / "paired.csv").columns[2]
    assert readings.reading(tmp_path, "04_compare").markdown == today


def test_a_selection_of_0_1_reads_its_source_argmin_as_similarity(tmp_path):
    (tmp_path / "selection.json").write_text(json.dumps({"start": 3, "n": 2, "distance": 0.1, "source": "argmin", "model": "m"}))
    selection = Selection.load(tmp_path / "selection.json")
    assert selection == Selection(3, 2, 0.1, "similarity", "m")
    selection.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["source"] == "similarity"
    assert Selection.from_dict({"start": 3, "n": 2, "distance": None, "source": "heuristic", "model": None}).source == "heuristic"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # a plain-function evaluation beside a cache
def test_a_sweep_cache_that_says_strategy_resumes(tiny, tmp_path):
    """A cache recorded before the rename ("strategy" in its settings, the CLI's options and its rows) is resumed, not rerun."""
    calls = []

    def counted(model, tokenizer):
        calls.append(layers.num_layers(model))
        return probe(model, tokenizer)

    cache = tmp_path / "sweep-heuristic.json"
    settings = {"criterion": "heuristic", "shots": 5}  # as the CLI records its options
    run = lambda: sweep.sweep(*tiny, ns=[0, 2], evals=[counted], criterion="heuristic", cache_path=cache, settings=settings)  # noqa: E731
    fresh = run()
    cache.write_text(cache.read_text().replace('"criterion"', '"strategy"'))
    old = json.loads(cache.read_text())
    assert old["settings"]["strategy"] == old["settings"]["settings"]["strategy"] == old["points"][0]["rows"][0]["strategy"]
    calls.clear()
    pd.testing.assert_frame_equal(run(), fresh)
    assert calls == []
    with pytest.raises(ValueError, match="criterion: 'heuristic' -> 'similarity'"):
        sweep.sweep(*tiny, ns=[0, 2], evals=[counted], criterion="similarity", distances=random_distances(6), cache_path=cache,
                    settings={**settings, "criterion": "similarity"})  # fmt: skip
