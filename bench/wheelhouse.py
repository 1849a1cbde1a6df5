"""`make wheelhouse`: on a machine with the package index, the wheels an offline GPU node needs for
`python -m bench.gpu_check`, beyond the torch it already has: one set per part of the check, each at
most 60 MiB, pinned by constraints.txt. wheelhouse/full holds what part "full" needs (transformers, the
huggingface-hub it requires, tokenizers, peft, accelerate, pandas, ... with their dependencies);
wheelhouse/4bit adds bitsandbytes. On the node, with the repository beside it:

    pip install --no-index --no-deps --target deps wheelhouse/full/*.whl    # and wheelhouse/4bit/*.whl
    PYTHONPATH=$PWD:$PWD/deps python -m bench.gpu_check
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.gpu_check import PARTS, REPO

LIMIT = 60 * 2**20  # bytes per set: what one transfer may carry
PLATFORMS = tuple(f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)) + ("manylinux2014_x86_64", "linux_x86_64")


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def _target(python: str) -> list[str]:
    return ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            *(f"--platform={p}" for p in PLATFORMS)]  # fmt: skip


def resolve(packages, python: str) -> dict[str, str]:
    """{name: version} of `packages` and everything they need, as pip resolves them for `python` on
    Linux x86_64 under constraints.txt (metadata only: nothing is installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), "--target", str(Path(tmp) / "t"), *_target(python),
                        "-c", str(REPO / "constraints.txt"), *packages], check=True)  # fmt: skip
        items = json.loads(report.read_text())["install"]
    return {_name(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def closure(root: str, python: str) -> set[str]:
    """`root` and every package it needs (what a torch install brings along)."""
    return set(resolve([root], python))


def download(pins: dict[str, str], python: str, folder: Path) -> int:
    """Wheels of exactly `pins` into `folder`; returns their total size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(folder), *_target(python),
                    *(f"{name}=={version}" for name, version in sorted(pins.items()))], check=True)  # fmt: skip
    return sum(f.stat().st_size for f in folder.glob("*.whl"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wheelhouse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}", help="the node's Python, e.g. 3.12")
    parser.add_argument("--out", type=Path, default=REPO / "wheelhouse")
    args = parser.parse_args(argv)
    torch_brings = closure("torch", args.python)  # the node has torch and what it needs
    carried, sizes = set(torch_brings), {}
    for part, packages in PARTS.items():
        pins = {name: version for name, version in resolve(packages, args.python).items() if name not in carried}
        carried |= set(pins)
        sizes[part] = download(pins, args.python, args.out / part)
        print(f"{args.out / part}: {len(pins)} wheels, {sizes[part] / 2**20:.1f} MiB: {', '.join(sorted(pins))}")
    too_big = [part for part, size in sizes.items() if size > LIMIT]
    if too_big:
        print(f"sets over {LIMIT / 2**20:.0f} MiB: {', '.join(too_big)}")
        return 1
    print(f"on the node: pip install --no-index --no-deps --target deps {args.out.name}/full/*.whl {args.out.name}/4bit/*.whl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
