import importlib.metadata
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from kit.core import artifacts
from kit.core.config import ScanConfig


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


def test_atomic_dir_replaces_a_folder_without_a_moment_missing(tmp_path):
    import threading

    target = tmp_path / "ckpt"
    with artifacts.atomic_dir(target) as tmp:
        (tmp / "weights").write_text("0")
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                seen.append((target / "weights").read_text())
            except FileNotFoundError:
                seen.append(None)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, 300):
            with artifacts.atomic_dir(target) as tmp:
                (tmp / "weights").write_text(str(i))
    finally:
        stop.set()
        reader.join()
    assert None not in seen and len(set(seen)) > 1
    assert (target / "weights").read_text() == "299" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_atomic_dir_without_renameat2_renames_aside(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    target = tmp_path / "ckpt"
    for text in ("old", "new"):
        with artifacts.atomic_dir(target) as tmp:
            (tmp / "weights").write_text(text)
    assert (target / "weights").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_exchange_swaps_two_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    if not artifacts._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (tmp_path / "b" / "x").read_text() == "a" and not list((tmp_path / "a").iterdir())


def test_atomic_writes_refuse_the_wrong_kind_of_path_before_writing(tmp_path):
    (tmp_path / "file").write_text("keep")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileExistsError, match="file, not a folder: remove it or choose another path"):
        with artifacts.atomic_dir(tmp_path / "file"):
            raise AssertionError("the block must not run")
    with pytest.raises(IsADirectoryError, match="folder, not a file"):
        with artifacts.atomic_path(tmp_path / "folder"):
            raise AssertionError("the block must not run")
    assert (tmp_path / "file").read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


def test_atomic_dir_cleans_up_when_the_move_fails(tmp_path, monkeypatch):
    def fail(new, path):
        raise OSError("disk gone")

    monkeypatch.setattr(artifacts, "_replace_dir", fail)
    with pytest.raises(OSError, match="disk gone"):
        with artifacts.atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "weights").write_text("x")
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_dead_writers_are_removed_by_the_next_write(tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [tmp_path / f".ckpt.tmp-{dead.pid}-abc", tmp_path / f".out.json.tmp-{dead.pid}-abc.json"]
    stale[0].mkdir()
    stale[1].write_text("half")
    live = tmp_path / f".ckpt.tmp-{os.getpid()}-other"  # a writer still running in this process
    live.mkdir()
    other = tmp_path / f".ckpt2.tmp-{dead.pid}-abc"  # the temporary of another path
    other.mkdir()
    with artifacts.atomic_dir(tmp_path / "ckpt"):
        pass
    artifacts.write_json(tmp_path / "out.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", "out.json", live.name, other.name])
