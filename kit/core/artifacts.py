"""Run folders, atomic writes and manifests: how notebooks hand results to each other."""

import ctypes
import errno
import glob
import json
import os
import platform
import random
import re
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


RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths in one step
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` atomically; False where the system cannot (not Linux, old kernel, filesystem)."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def _clean_stale_temps(path: Path) -> None:
    """Remove the temporaries of `path` left by writers that died (killed mid-write): their process is gone."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-(\d+)-")
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        match = pattern.match(sibling.name)
        if match and not _alive(int(match[1])):
            shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def _replace_dir(new: Path, path: Path) -> None:
    """Move folder `new` to `path`. An existing folder is swapped out in one step (afterwards `new` holds it);
    where that is impossible it is renamed aside first, then deleted."""
    if not path.is_dir() or path.is_symlink():
        os.replace(new, path)
    elif not _exchange(new, path):
        aside = new.with_name(new.name + "-old")
        os.rename(path, aside)
        try:
            os.replace(new, path)
        except BaseException:
            os.rename(aside, path)
            raise
        os.rename(aside, new)


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds.
    An existing folder at `path` is replaced in one step (Linux): readers always find a whole folder there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder: remove it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path)))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; give it the usual permissions
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the failed write, or the replaced folder


def save_checkpoint(path: str | Path, *objects, files: dict[str, str] | None = None) -> Path:
    """Write HF objects (model, tokenizer, peft adapter: anything with `save_pretrained`) and small
    text `files` ({name: text}) into `path` as one atomic folder."""
    with atomic_dir(path) as tmp:
        for obj in objects:
            obj.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary file path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file: remove it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_tensors(path: str | Path, tensors: dict, *, format: str, meta: dict) -> Path:
    """Write `tensors` ({name: tensor}) as one safetensors file at `path`, atomically, with `format` and `meta`
    (as JSON) in its header: how the kit's result tables (Distances, Ablation, GreedyRemoval) are saved."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        metadata = {"format": format, "meta": json.dumps(meta, default=str)}
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, tmp, metadata=metadata)
    return Path(path)


def load_tensors(path: str | Path, *, format: str, not_it: str) -> tuple[dict, dict]:
    """({name: tensor}, meta) of a file save_tensors wrote with `format`; a missing file is MissingArtifactError,
    any other file (another format, not safetensors) a ValueError with the message `not_it`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(require(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != format:
                raise ValueError(not_it)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as error:
        raise ValueError(f"{not_it}: {error}") from None
    return tensors, json.loads(metadata["meta"])


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
    for package in ("deeper-layers-kit", "torch", "transformers", "peft", "bitsandbytes", "datasets"):
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
    seed, and `extra` (notebooks add the model's placement: kit.core.device.provenance(model))."""
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
