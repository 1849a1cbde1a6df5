"""kit 0.1's names of the rule that chooses the block ("strategy", and "argmin" for the similarity criterion's
choice) keep working for one release: each old keyword, attribute, option and column name warns, naming
"criterion", and gives what the new name gives; what 0.1 saved (result tables, selection.json, manifests,
sweep caches) reads back under the new names."""

import json
import re
import warnings

import pandas as pd
import pytest
from test_readings import accuracy_rows, write_compare_run

import kit
from kit.__main__ import parser
from kit.choose.criteria import Selection
from kit.core import layers
from kit.core.config import PruneConfig
from kit.experiments import curves, plots, readings, results, sweep
from kit.experiments.widgets import BlockPicker
from kit.testing import random_distances


def renamed(old: str, new: str):
    return pytest.warns(DeprecationWarning, match=rf"{re.escape(old)} is deprecated and will be removed in kit 0\.3: use {re.escape(new)}")


def probe(model, tokenizer):
    return {"layers": float(layers.num_layers(model))}


@pytest.fixture(scope="module")
def tiny():
    return kit.tiny_model("llama")


def test_sweep_strategy_is_criterion(tiny):
    new = sweep.sweep(*tiny, ns=[0, 2], evals=[probe], criterion="heuristic")
    with renamed("kit.experiments.sweep.sweep(strategy=)", "criterion="):
        old = sweep.sweep(*tiny, ns=[0, 2], evals=[probe], strategy="heuristic")
    pd.testing.assert_frame_equal(old, new)
    assert set(new["criterion"]) == {"heuristic"} and "strategy" not in new


@pytest.mark.filterwarnings("ignore::FutureWarning")  # a plain-function evaluation beside a cache
def test_sweeps_strategies_is_criteria(tiny, tmp_path):
    distances = random_distances(6)
    new = sweep.sweeps(*tiny, ns=[0, 2], evals=[probe], distances=distances, folder=tmp_path / "new", criteria=["similarity"])
    with renamed("kit.experiments.sweep.sweeps(strategies=)", "criteria="):
        old = sweep.sweeps(*tiny, ns=[0, 2], evals=[probe], distances=distances, folder=tmp_path / "old", strategies=["similarity"])
    pd.testing.assert_frame_equal(old, new)
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["sweep-similarity.json"]


def test_sweep_strategies_constant_is_paper_criteria():
    with renamed("kit.experiments.sweep.STRATEGIES", "kit.experiments.sweep.PAPER_CRITERIA"):
        assert sweep.STRATEGIES == sweep.PAPER_CRITERIA == ("similarity", "heuristic")
    with renamed("kit.experiments.sweep.STRATEGIES", "kit.experiments.sweep.PAPER_CRITERIA"):
        from kit.experiments.sweep import STRATEGIES  # noqa: F401
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        sweep.nothing


def test_prune_config_strategy_is_criterion():
    config = PruneConfig(n=4, criterion="heuristic")
    with renamed("kit.core.config.PruneConfig(strategy=)", "criterion="):
        assert PruneConfig(n=4, strategy="heuristic") == config
    with renamed("kit.core.config.PruneConfig.strategy", "criterion"):
        assert config.strategy == "heuristic"
    old_manifest = {"n": 4, "start": None, "strategy": "heuristic", "n_val_texts": 32, "max_length": 256, "batch_size": 8}
    with renamed("kit.core.config.PruneConfig(strategy=)", "criterion="):
        assert PruneConfig(**old_manifest) == config
    assert PruneConfig(**json.loads(json.dumps(config.to_dict()))) == config  # today's round trip: no warning
    assert config.to_dict()["criterion"] == "heuristic" and "strategy" not in config.to_dict()
    assert config.replace(n=5).criterion == "heuristic"


def test_block_picker_strategy_is_criterion():
    distances = random_distances(6)
    new = BlockPicker(distances, n=2, criterion="heuristic")
    with renamed("kit.experiments.widgets.BlockPicker(strategy=)", "criterion="):
        old = BlockPicker(distances, n=2, strategy="heuristic")
    assert old.selection() == new.selection() and new.source == "heuristic"
    with renamed("kit.experiments.widgets.BlockPicker.strategy", "criterion"):
        assert new.strategy == new.criterion == "heuristic"
    assert BlockPicker(distances, n=2).source == "similarity"  # not "argmin"


def test_cli_strategy_is_a_hidden_alias_of_criterion():
    base = ["sweep", "--model", "m", "--out", "o", "--ns", "0", "2"]
    with renamed("--strategy", "--criterion"):
        old = parser().parse_args([*base, "--strategy", "heuristic"])
    assert old == parser().parse_args([*base, "--criterion", "heuristic"]) and old.criterion == "heuristic"
    assert parser().parse_args(base).criterion == "similarity"
    sweep_help = parser()._subparsers._group_actions[0].choices["sweep"].format_help()
    assert "--criterion" in sweep_help and "--strategy" not in sweep_help


def sweep_table() -> pd.DataFrame:
    """Recall rows of a sweep of both criteria."""
    return pd.DataFrame(accuracy_rows("similarity", {0: 30, 2: 25, 4: 20}) + accuracy_rows("heuristic", {0: 30, 2: 20, 4: 8}))


def test_a_column_named_strategy_is_criterion():
    table = sweep_table()
    with renamed("the column 'strategy'", "'criterion'"):
        old = curves.paired_comparison(table, "strategy", "similarity", "heuristic", metric="recall")
    pd.testing.assert_frame_equal(old, curves.paired_comparison(table, "criterion", "similarity", "heuristic", metric="recall"))
    with renamed("the column 'strategy'", "'criterion'"):
        ax = plots.sweep_plot(table, "recall", hue="strategy")
    assert ax.get_legend().get_title().get_text() == "criterion"
    with renamed("the column 'strategy'", "'criterion'"):
        axes = plots.sweep_figure(table, ["recall"], hue="healed", rows="strategy")
    assert [row[0].get_title() for row in axes] == ["criterion = similarity", "criterion = heuristic"]


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


def test_notebook_02_takes_strategy_as_its_old_name_of_criterion():
    """Notebook 02 passes both parameters to PruneConfig: STRATEGY left at None is silent, set it wins and warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PruneConfig(criterion="heuristic", strategy=None).criterion == "heuristic"
    with pytest.warns(DeprecationWarning, match="criterion="):
        assert PruneConfig(criterion="similarity", strategy="heuristic").criterion == "heuristic"


def test_an_old_keyword_beside_its_new_one_set_is_refused_and_each_warning_points_at_the_caller():
    with pytest.raises(TypeError, match=r"PruneConfig\(\) got both strategy= and criterion=: .* pass only criterion="):
        PruneConfig(criterion="heuristic", strategy="similarity")
    with pytest.raises(TypeError, match=r"sweeps\(\) got both strategies= and criteria="):
        sweep.sweeps(None, None, ns=[0], evals=[], folder="unused", criteria=["heuristic"], strategies=["similarity"])
    with pytest.raises(TypeError, match="pass only criterion="):
        PruneConfig(4, None, "heuristic", strategy="similarity")  # the new one given by position
    with renamed("kit.core.config.PruneConfig(strategy=)", "criterion=") as caught:
        assert PruneConfig(4, None, "similarity", strategy="heuristic") == PruneConfig(n=4, criterion="heuristic")
    with renamed("kit.core.config.PruneConfig.strategy", "criterion") as read:
        PruneConfig().strategy
    assert {w.filename for w in [*caught, *read]} == {__file__}
    with pytest.raises(AttributeError, match="read-only name of criterion: set criterion"):
        BlockPicker(random_distances(6), n=2).strategy = "heuristic"


def test_a_prune_config_made_with_strategy_is_a_plain_dataclass():
    """Only criterion is a field: replace, asdict, the digest and the signature know nothing of the old name."""
    import dataclasses
    import inspect

    with renamed("kit.core.config.PruneConfig(strategy=)", "criterion="):
        old = PruneConfig(n=4, strategy="heuristic")
    new = PruneConfig(n=4, criterion="heuristic")
    assert [f.name for f in dataclasses.fields(PruneConfig)] == ["n", "start", "criterion", "n_val_texts", "max_length", "batch_size"]
    assert dataclasses.asdict(old) == dataclasses.asdict(new) and old.digest() == new.digest() and hash(old) == hash(new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataclasses.replace(old, n=5) == old.replace(n=5) == PruneConfig(n=5, criterion="heuristic")
    assert "strategy" not in inspect.signature(PruneConfig).parameters
