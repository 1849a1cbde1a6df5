"""`make wheelhouse`: on a machine with the package index, the wheels an offline GPU node needs for
`python -m bench.gpu_check`, beyond what the node already has: one set per part of the check, each at
most 60 MiB (what one transfer carries), pinned by constraints.txt.

Each set holds everything its part needs that the node lacks or has too old, so that it can be carried
and installed on its own: wheelhouse/full for part "full" (transformers, the huggingface-hub it
requires, tokenizers, peft, accelerate, pandas, ... as the node needs them), wheelhouse/4bit for part
"4bit" (bitsandbytes and the same). Where a part's set would be over the limit (part 4bit beyond a
node with torch alone: bitsandbytes is 41 MiB, part full's set 57 MiB), it holds only what the sets
before it do not, and the script says which sets to install with it.

What the node has: `--node-packages FILE`, the output of `python -m pip list --format freeze` run on
the node (carry it here); without it, torch and what torch needs. On the node, with the repository:

    pip install --no-index --no-deps --target deps wheelhouse/full/*.whl
    PYTHONPATH=$PWD:$PWD/deps python -m bench.gpu_check --part full
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench.gpu_check import PARTS, REPO

LIMIT = 60 * 2**20  # bytes per set: what one transfer may carry
PLATFORMS = tuple(f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)) + ("manylinux2014_x86_64", "linux_x86_64")


def _target(python: str) -> list[str]:
    return ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            *(f"--platform={p}" for p in PLATFORMS)]  # fmt: skip


def _environment(python: str) -> dict[str, str]:
    """The markers of a CPython `python` on Linux x86_64 (what the wheels are chosen for)."""
    return dict(python_version=python, python_full_version=f"{python}.0", sys_platform="linux", platform_system="Linux",
                platform_machine="x86_64", os_name="posix", implementation_name="cpython",
                platform_python_implementation="CPython", extra="")  # fmt: skip


def resolve(packages, python: str) -> dict[str, dict]:
    """{name: {"version", "requires"}} of `packages` and everything they need, as pip resolves them for
    `python` on Linux x86_64 under constraints.txt (metadata only: nothing is installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), "--target", str(Path(tmp) / "t"), *_target(python),
                        "-c", str(REPO / "constraints.txt"), *packages], check=True)  # fmt: skip
        items = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): {"version": i["metadata"]["version"],
                                                        "requires": i["metadata"].get("requires_dist", [])}
            for i in items}  # fmt: skip


def node_packages(freeze: str) -> dict[str, str]:
    """{name: version} from `pip list --format freeze` (or `pip freeze`) output; other lines are ignored."""
    pins = (re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)\s*", line) for line in freeze.splitlines())
    return {canonicalize_name(m[1]): m[2] for m in pins if m}


def missing(roots, resolved: dict[str, dict], node: dict[str, str], python: str, stays=frozenset()) -> dict[str, str]:
    """{name: version} of the packages to carry for `roots`: each root, and each package that a carried
    package requires, where the node lacks it or has a version that the kit (pyproject.toml) or a
    carried package does not accept. What the node keeps brings its own requirements along; so do the
    packages `stays` (the node's torch and what torch needs), which are never carried."""
    kit = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]

    def requirements(lines):
        return [r for r in map(Requirement, lines) if r.marker is None or r.marker.evaluate(_environment(python))]

    def kept(name: str, accepted: dict) -> bool:
        have = node.get(name)
        return name in stays or have is not None and all(s.contains(have, prereleases=True) for s in accepted.get(name, []))

    carried = set()
    while True:  # carrying a package can make its requirements reachable and refuse more of the node's versions
        theirs = [r for name in carried for r in requirements(resolved[name]["requires"])]
        accepted = {}
        for requirement in requirements(kit) + theirs:
            accepted.setdefault(canonicalize_name(requirement.name), []).append(requirement.specifier)
        reachable = {canonicalize_name(name) for name in [*roots, *(r.name for r in theirs)]}
        now = {name for name in reachable if name in resolved and not kept(name, accepted)}
        if now == carried:
            return {name: resolved[name]["version"] for name in sorted(carried)}
        carried = now


def download(pins: dict[str, str], python: str, folder: Path) -> int:
    """Wheels of exactly `pins` into `folder` (emptied first); returns their total size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(folder), *_target(python),
                    *(f"{name}=={version}" for name, version in sorted(pins.items()))], check=True)  # fmt: skip
    return size(folder)


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.whl"))


def package(wheel: Path) -> str:
    """The package a wheel file holds, by its file name (name-version-...whl)."""
    return canonicalize_name(wheel.name.split("-")[0])


def layered(folder: Path, earlier: dict[str, str]) -> None:
    """Removes from `folder` the wheels of packages that the `earlier` sets hold."""
    for wheel in folder.glob("*.whl"):
        if package(wheel) in earlier:
            wheel.unlink()


def build(node: dict[str, str], stays: set[str], python: str, out: Path, fetch=download) -> dict[str, list[str]]:
    """Writes one set per part into out/<part>; returns, per part, the sets to install for it
    (itself, and the earlier sets where it had to be layered on them)."""
    needs, carried, install = [], {}, {}
    for part, packages in PARTS.items():
        needs += packages  # a part needs the kit's imports of the parts before it too
        pins = missing(needs, resolve(needs, python), node, python, stays)
        folder, earlier = out / part, list(install)
        whole = fetch(pins, python, folder)
        install[part] = [part]
        if whole > LIMIT and earlier:
            layered(folder, carried)
            install[part] = [*earlier, part]
            print(f"{folder}: everything part {part} needs is {whole / 2**20:.1f} MiB, over {LIMIT / 2**20:.0f}: "
                  f"it holds only what {' + '.join(earlier)} does not")  # fmt: skip
        wheels = sorted(map(package, folder.glob("*.whl")))
        print(f"{folder}: {len(wheels)} wheels, {size(folder) / 2**20:.1f} MiB: {', '.join(wheels)}")
        carried |= pins
    return install


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wheelhouse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}", help="the node's Python, e.g. 3.12")
    parser.add_argument("--node-packages", type=Path, help="`python -m pip list --format freeze` of the node (default: torch alone)")
    parser.add_argument("--out", type=Path, default=REPO / "wheelhouse")
    args = parser.parse_args(argv)
    torch = resolve(["torch"], args.python)  # the node's torch brings these (its own CUDA build of them)
    node = {name: package["version"] for name, package in torch.items()}
    if args.node_packages is not None:
        node = node_packages(args.node_packages.read_text())
        if "torch" not in node:
            parser.error(f"{args.node_packages} lists no torch: the check needs the node's own CUDA build of torch")
    install = build(node, set(torch), args.python, args.out)
    too_big = [part for part in install if size(args.out / part) > LIMIT]
    if too_big:
        print(f"sets over {LIMIT / 2**20:.0f} MiB: {', '.join(too_big)}")
        return 1
    for part, sets in install.items():
        wheels = " ".join(f"{args.out.name}/{s}/*.whl" for s in sets)
        print(f"on the node, part {part}: pip install --no-index --no-deps --target deps {wheels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
