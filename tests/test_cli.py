"""`python -m kit STEP --run DIR`: every step of kit.steps, its flags generated from its config dataclass, writing the
run folder the notebooks write (and their readings read), with the results of the library calls. (Under torchrun:
tests/test_distributed.py.)"""

import dataclasses
import json
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch

import kit
from kit.__main__ import main, parser
from kit.core.artifacts import save_checkpoint
from kit.steps import STEPS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    save_checkpoint(folder, *kit.testing.tiny_model("llama", num_layers=6))
    return folder


def test_help_lists_every_step():
    result = subprocess.run([sys.executable, "-m", "kit", "--help"], capture_output=True, text=True, check=True)
    assert all(re.search(rf"^    {name}\b", result.stdout, re.M) for name in STEPS), result.stdout


@pytest.mark.parametrize("step", [name for name, step in STEPS.items() if step.config is not None])
def test_every_config_field_is_a_flag_with_its_default(step):
    from kit.__main__ import config_from

    config = STEPS[step].config
    args = parser().parse_args([step, "--run", "r"])
    assert {f.name for f in dataclasses.fields(config)} <= set(vars(args))
    assert config_from(config, args) == config()


def test_flags_parse_to_the_config():
    from kit.__main__ import config_from

    args = parser().parse_args(["heal", "--run", "r", "--quantize", "none", "--target-modules", "gate_proj", "up_proj",
                                "--no-gradient-checkpointing", "--grad-accum", "4", "--lr", "3e-5"])  # fmt: skip
    assert config_from(kit.HealConfig, args) == kit.HealConfig(quantize=None, target_modules=("gate_proj", "up_proj"),
                                                               gradient_checkpointing=False, grad_accum=4, lr=3e-5)  # fmt: skip
    args = parser().parse_args(["sweep", "--run", "r", "--ns", "0", "4", "--heal-ns", "--mmlu", "true", "--boolq", "hub"])
    assert config_from(kit.SweepConfig, args) == kit.SweepConfig(ns=(0, 4), heal_ns=(), mmlu=True, boolq="hub")
    args = parser().parse_args(["scan", "--run", "r", "--model", "m", "--groups", "none", "--n-texts", "10"])
    assert config_from(kit.ScanConfig, args) == kit.ScanConfig(model_name="m", groups=None, n_texts=10)
    with pytest.raises(SystemExit):
        parser().parse_args(["scan", "--run", "r", "--n-texts", "many"])


def test_a_step_without_a_run_folder_says_so(capsys):
    with pytest.raises(SystemExit):
        main(["scan", "--model", "m"])
    assert "required: --run (python -m kit scan --run DIR)" in capsys.readouterr().err


def test_out_is_the_deprecated_name_of_run(checkpoint, tmp_path):
    with pytest.warns(DeprecationWarning, match="python -m kit --out is deprecated and will be removed in kit 0.4: use --run"):
        args = parser().parse_args(["scan", "--out", str(tmp_path), "--model", str(checkpoint)])
    assert args.run == str(tmp_path)


def test_a_step_whose_input_is_missing_names_the_step_to_run_first(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run the scan step first, on this run \(`python -m kit scan --run"):
        main(["prune", "--run", str(tmp_path), "--n", "2"])


def test_the_pipeline_writes_what_the_notebooks_read(checkpoint, tmp_path):
    """scan, prune, heal, evaluate, sweep, criteria, budget, heal_compare and report on a tiny Llama: the artifacts equal the library's
    results, and the report holds every notebook's reading."""
    run = ["--run", str(tmp_path)]
    small = ["--max-length", "32", "--batch-size", "2"]
    distances = main(["scan", *run, "--model", str(checkpoint), "--n-texts", "4", *small])
    expected = kit.angular_distances(*kit.load_model(str(checkpoint)), kit.data.load_texts("corpus", "train", 4), batch_size=2, max_length=32)
    torch.testing.assert_close(distances.matrix, expected.matrix, rtol=0, atol=0)  # the same arithmetic, repeated
    assert kit.Distances.load(tmp_path / "distances.safetensors").matrix.equal(distances.matrix)

    pruned = main(["prune", *run, "--n", "2", "--n-val-texts", "2", *small])
    assert (pruned.selection.start, pruned.selection.n) == (distances.best_block(2).start, 2)
    model = kit.load_model(str(tmp_path / "pruned"))[0]
    assert kit.core.layers.num_layers(model) == 4 and model.config.pruned_blocks == [[pruned.selection.start, 2]]

    healing = main(["heal", *run, "--steps", "2", "--batch-size", "1", "--grad-accum", "2", "--seq-len", "16", "--quantize", "none",
                    "--rank", "2", "--n-train-texts", "4", "--n-val-texts", "2", "--log-every", "1", "--eval-every", "1"])  # fmt: skip
    assert (healing.history["world_size"], healing.history["global_batch"]) == (1, 2)
    assert list(healing.losses.index) == ["original", "pruned", "healed"] and (tmp_path / "healed_merged" / "config.json").is_file()

    evaluation = ["--recall-items", "4", "--recall-facts", "2", "--mmlu-subjects", "1", "--mmlu-per-subject", "2", "--shots", "1",
                  "--n-val-texts", "2", "--cost-prompt-tokens", "4", "--cost-new-tokens", "2", "--cost-repeats", "1", *small]  # fmt: skip
    swept = main(["sweep", *run, "--ns", "0", "2", "--heal-ns", "2", "--heal-method", "replacement_layer", "--mmlu", "true", *evaluation])
    assert pd.read_csv(tmp_path / "sweep.csv")["value"].tolist() == pytest.approx(swept.table["value"].tolist(), rel=1e-12)
    twins = swept.table[swept.table["healed"]]
    assert set(twins["n"]) == {2} and set(twins["criterion"]) == {"similarity", "heuristic"}
    assert json.loads((tmp_path / "sweep_healed" / "similarity" / "n2" / "healing.json").read_text())["method"] == "replacement_layer"
    comparison = main(["evaluate", *run, *evaluation])
    assert list(comparison.index) == ["original", "pruned", "healed (unmerged)", "healed"]
    merged, unmerged = comparison.loc["healed", "val_loss"], comparison.loc["healed (unmerged)", "val_loss"]
    assert merged == pytest.approx(unmerged, rel=1e-4)  # the merge is the adapter, in the weights

    main(["criteria", *run, "--n-calibration", "2", "--n-held-out", "2", "--ns", "1", "2", "--metrics", "angular_last", *small])
    main(["budget", *run, "--n-calibration", "2", "--n-held-out", "2", "--budgets", "0.4", "--units", "block", "layers",
          "--no-greedy", "--recall-items", "4", "--recall-facts", "2", "--mmlu-subjects", "1", "--mmlu-per-subject", "2", "--shots", "1",
          "--cost-prompt-tokens", "4", "--cost-new-tokens", "2", "--cost-repeats", "1", *small])  # fmt: skip
    compared = main(["heal_compare", *run, "--ns", "2", "--methods", "none", "replacement_layer", "--n-texts", "4", "--n-val-texts", "2",
                     "--max-length", "16", "--steps", "1", "--recall-items", "2", "--recall-facts", "2"])  # fmt: skip
    assert set(compared.table["method"]) == {"none", "replacement_layer"} and list(compared.blocks) == [2]
    report = main(["report", *run])
    assert report == (tmp_path / "report.md").read_text()
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert sections == [f"## {name}" for name in kit.experiments.reports.NOTEBOOKS]
    for notebook in kit.experiments.reports.NOTEBOOKS:
        assert kit.readings.reading(tmp_path, notebook).markdown in report


def test_heal_takes_any_method_and_its_settings_as_flags(checkpoint, tmp_path):
    from kit.__main__ import config_from

    args = parser("linear_patch").parse_args(["heal", "--run", "r", "--method", "linear_patch", "--n-texts", "8", "--ridge", "0.5"])
    assert config_from(kit.LinearPatchConfig, args) == kit.LinearPatchConfig(n_texts=8, ridge=0.5)
    assert parser("distill").parse_args(["heal", "--run", "r", "--method", "distill"]).distill_weight > 0  # the method's defaults
    with pytest.raises(SystemExit, match="no healing method 'no_such_method'; choose one of none, qlora, distill"):
        main(["heal", "--run", str(tmp_path), "--method", "no_such_method"])

    run = ["--run", str(tmp_path)]
    main(["scan", *run, "--model", str(checkpoint), "--n-texts", "4", "--max-length", "32"])
    main(["prune", *run, "--n", "2", "--start", "2", "--n-val-texts", "2", "--max-length", "32"])
    healing = main(["heal", *run, "--method", "linear_patch", "--n-texts", "8", "--max-length", "32"])
    assert healing.method == "linear_patch" and list(healing.losses.index) == ["original", "pruned", "healed"]
    record = json.loads((tmp_path / "healed_merged" / "healing.json").read_text())
    assert record["method"] == "linear_patch" and record["block"] == [2, 2]
    assert json.loads((tmp_path / "heal_history.json").read_text())["method"] == "linear_patch"
    assert "healed by `linear_patch`" in kit.readings.reading(tmp_path, "03_heal").markdown
