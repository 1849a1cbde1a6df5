import importlib.metadata
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from kit import artifacts
from kit.config import ScanConfig


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    artifacts.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_dir(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with artifacts.atomic_dir(target) as tmp:
            (tmp / "weights").write_text("x")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with artifacts.atomic_dir(target) as tmp:
        (tmp / "weights").write_text("y")
    assert (target / "weights").read_text() == "y" and len(list(tmp_path.iterdir())) == 1


def test_require_names_the_notebook(tmp_path):
    with pytest.raises(artifacts.MissingArtifactError, match="Run notebooks/01_similarity.ipynb first"):
        artifacts.require(tmp_path / "distances.safetensors", notebook="01_similarity.ipynb")


def test_manifest_records_each_step(tmp_path):
    config = ScanConfig(n_texts=8)
    artifacts.write_manifest(tmp_path, "scan", config=config, seed=1)
    artifacts.write_manifest(tmp_path, "prune", config={"n": 3}, seed=1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["scan"]["config"]["n_texts"] == 8
    assert manifest["scan"]["config_hash"] == config.digest() != ScanConfig().digest()
    assert manifest["prune"]["config"] == {"n": 3}
    assert manifest["scan"]["versions"]["transformers"] == importlib.metadata.version("transformers")
    assert manifest["scan"]["machine"]["gpus"] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def test_run_dir(tmp_path):
    assert artifacts.run_dir("demo", tmp_path) == tmp_path / "demo" and (tmp_path / "demo").is_dir()


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        artifacts.write_json(tmp_path / "a.json", {})
        with artifacts.atomic_dir(tmp_path / "ckpt"):
            pass
    finally:
        os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755


def test_runs_root_in_colab_is_on_the_mounted_google_drive(tmp_path, monkeypatch):
    mounted = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=lambda path: (mounted.append(path), (Path(path) / "MyDrive").mkdir(parents=True)))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.delenv("KIT_RUNS", raising=False)
    monkeypatch.setattr(artifacts, "COLAB_DRIVE", tmp_path / "drive")
    run = artifacts.run_dir("demo")
    assert run == tmp_path / "drive" / "MyDrive" / "deeper-layers-kit" / "runs" / "demo" and run.is_dir()
    assert artifacts.run_dir("demo") == run and mounted == [str(tmp_path / "drive")]  # mounted once
    assert artifacts.run_dir("demo", tmp_path / "mine") == tmp_path / "mine" / "demo"  # an explicit root wins


def test_runs_root_outside_colab(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.delenv("KIT_RUNS", raising=False)
    assert artifacts.runs_root() == Path("runs")
    monkeypatch.setenv("KIT_RUNS", "/data/runs")
    assert artifacts.runs_root() == Path("/data/runs")
