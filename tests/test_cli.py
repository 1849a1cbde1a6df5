"""`python -m kit scan | sweep | heal` in one process: options built from the config dataclasses, the
notebooks' artifacts in the run folder, the same results as the library calls. (Under torchrun:
tests/test_distributed.py.)"""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import kit
from kit.__main__ import main, parser
from kit.core.artifacts import save_checkpoint
from kit.core.config import HealConfig, ScanConfig
from kit.evaluate import metrics
from kit.experiments import sweep
from kit.loaders import data


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    save_checkpoint(folder, *kit.testing.tiny_model("llama", num_layers=4))
    return folder


def test_options_are_the_config_fields():
    args = parser().parse_args(["heal", "--model", "m", "--out", "o", "--quantize", "none", "--target-modules", "gate_proj,up_proj",
                                "--no-gradient-checkpointing", "--grad-accum", "4", "--lr", "3e-5"])  # fmt: skip
    config = HealConfig(**{f: getattr(args, f) for f in HealConfig.__dataclass_fields__})
    assert config == HealConfig(quantize=None, target_modules=("gate_proj", "up_proj"), gradient_checkpointing=False, grad_accum=4, lr=3e-5)
    args = parser().parse_args(["scan", "--model", "m", "--out", "o", "--groups", "none", "--n-texts", "10"])
    assert (args.groups, args.n_texts, args.metric) == (None, 10, ScanConfig.metric)
    with pytest.raises(SystemExit):
        parser().parse_args(["scan", "--model", "m", "--out", "o", "--n-texts", "many"])


def test_a_sublayer_scan_writes_its_layer_scan_where_sweeps_read_one(checkpoint, tmp_path):
    settings = dict(batch_size=2, max_length=32)
    distances = main(["scan", "--model", str(checkpoint), "--out", str(tmp_path), "--n-texts", "4", "--sublayers",
                      *(f"--{k.replace('_', '-')}={v}" for k, v in settings.items())])  # fmt: skip
    assert kit.Distances.load(tmp_path / "sublayer_distances.safetensors").matrix.equal(distances.matrix)
    plain = kit.angular_distances(*kit.load_model(str(checkpoint)), data.load_texts("corpus", "train", 4), **settings)
    assert distances.positions == "sublayers"  # its layer positions: other BLAS shapes than a layer scan, equal to rounding
    torch.testing.assert_close(kit.Distances.load(tmp_path / "distances.safetensors").matrix, plain.matrix, rtol=1e-6, atol=1e-12)


def test_scan_sweep_and_heal_write_the_notebooks_artifacts(checkpoint, tmp_path):
    common = ["--model", str(checkpoint), "--out", str(tmp_path)]
    distances = main(["scan", *common, "--n-texts", "4", "--batch-size", "2", "--max-length", "32"])
    assert kit.Distances.load(tmp_path / "distances.safetensors").matrix.equal(distances.matrix)
    results = main(["sweep", *common, "--ns", "0", "2", "--mmlu-subjects", "2", "--per-subject", "2", "--shots", "1",
                    "--val-texts", "3", "--max-length", "32", "--batch-size", "2"])  # fmt: skip
    model, tokenizer = kit.load_model(str(checkpoint))
    evals = [metrics.MMLUAccuracy(data.mmlu_questions(data.mmlu_subjects()[:2], per_subject=2), shots=1, batch_size=2),
             metrics.ValidationLoss(data.load_texts("corpus", "validation", 3), max_length=32, batch_size=2)]  # fmt: skip
    expected = sweep.sweep(model, tokenizer, ns=[0, 2], evals=evals, distances=distances)
    np.testing.assert_allclose(results["value"], expected["value"], rtol=1e-9)
    assert pd.read_csv(tmp_path / "sweep-similarity.csv")["metric"].tolist() == expected["metric"].tolist()
    healed = main(["heal", *common, "--steps", "2", "--batch-size", "1", "--grad-accum", "2", "--seq-len", "16", "--quantize", "none",
                   "--rank", "2", "--n-train-texts", "4", "--n-val-texts", "0", "--log-every", "1"])  # fmt: skip
    history = json.loads((tmp_path / "heal_history.json").read_text())
    assert history == json.loads(json.dumps(healed.history)) and (history["world_size"], history["global_batch"]) == (1, 2)
    assert (tmp_path / "healed" / "adapter" / "adapter_model.safetensors").is_file()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest) == {"scan", "sweep-similarity", "heal"}
    assert manifest["heal"]["global_batch"] == 2 and manifest["heal"]["config"]["grad_accum"] == 2
    assert manifest["scan"]["world_size"] == 1 and manifest["scan"]["config"]["n_texts"] == 4
