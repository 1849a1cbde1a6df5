"""Run folders, atomic writes and manifests: how notebooks hand results to each other."""

import json
import os
import platform
import random
import shutil
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path


class MissingArtifactError(FileNotFoundError):
    pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


COLAB_DRIVE = Path("/content/drive")  # where Google Drive is mounted in Colab
COLAB_RUNS = "MyDrive/deeper-layers-kit/runs"  # the runs folder inside it


def in_colab() -> bool:
    return "google.colab" in sys.modules


def runs_root(root: str | Path = "auto") -> Path:
    """The folder holding all runs. "auto": $KIT_RUNS if set; in Colab a folder of the user's Google
    Drive (mounted on first use), so notebooks run on different Colab machines share their artifacts
    and healing resumes after a disconnect; else ./runs."""
    if root != "auto":
        return Path(root)
    if "KIT_RUNS" in os.environ:
        return Path(os.environ["KIT_RUNS"])
    if in_colab():
        from google.colab import drive

        if not (COLAB_DRIVE / "MyDrive").is_dir():
            drive.mount(str(COLAB_DRIVE))
        return COLAB_DRIVE / COLAB_RUNS
    return Path("runs")


def run_dir(run: str, root: str | Path = "auto") -> Path:
    """The folder of run `run` under `runs_root(root)` (created if needed); notebooks of one run share it."""
    folder = runs_root(root) / run
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; give it the usual permissions
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary file path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path, *, notebook: str | None = None):
    return json.loads(require(path, notebook=notebook).read_text())


def require(path: str | Path, *, notebook: str | None = None) -> Path:
    """`path` if it exists; otherwise an error naming the notebook that writes it."""
    path = Path(path)
    if not path.exists():
        hint = f" Run notebooks/{notebook} first, with the same RUN." if notebook else ""
        raise MissingArtifactError(f"{path} does not exist.{hint}")
    return path


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("kit", "torch", "transformers", "peft", "bitsandbytes", "datasets"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def machine() -> dict:
    """The accelerators this process sees (recorded in every manifest)."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"platform": platform.platform(), "gpus": gpus}


def write_manifest(folder: str | Path, step: str, *, config=None, seed: int | None = None, **extra) -> Path:
    """Record one step of a run in `folder/manifest.json`: settings, their hash, versions, machine,
    seed, and `extra` (notebooks add the model's placement: kit.device.provenance(model))."""
    path = Path(folder) / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest[step] = {
        "config": config.to_dict() if hasattr(config, "to_dict") else config,
        "config_hash": config.digest() if hasattr(config, "digest") else None,
        "seed": seed,
        "versions": versions(),
        "machine": machine(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    return write_json(path, manifest)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
