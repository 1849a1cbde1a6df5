"""Every command of README.md runs in a test: its shell and Python code blocks are read from the README itself
(not copied here), with the embedded model `smollm2-135m` standing in for Hub ids and CPU sizes for the
paper's, and run in a temporary folder. A README command that no test here knows fails
test_every_readme_command_is_tested: add it to a test."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

README = REPO / "README.md"
MODEL = "smollm2-135m"
# The README's sizes are the paper's; on a CPU the same commands run at these.
SIZES = {
    r"--n-texts \d+": "--n-texts 8", r"n_texts=\d+": "n_texts=8",
    r"--steps \d+": "--steps 2", r"steps=\d+": "steps=2",
    r"--ns( \d+)+": "--ns 0 4",
}  # fmt: skip
# ... and each step's other sizes, which the README leaves at their defaults: config fields, added to each config
# the Python block builds and as flags to each command of that step.
_EVALUATE = dict(recall_items=8, mmlu_subjects=1, mmlu_per_subject=2, n_val_texts=2, max_length=64, cost_repeats=1)
CPU = {
    "PruneConfig": ("prune", dict(n_val_texts=2, max_length=64)),
    "HealConfig": ("heal", dict(batch_size=2, seq_len=64, n_train_texts=16, n_val_texts=2)),
    "EvaluateConfig": ("evaluate", _EVALUATE),
    "SweepConfig": ("sweep", dict(_EVALUATE, heal_ns=(4,), heal_steps=2, n_heal_texts=8)),
}
HUB_ID = r"\b(meta-llama|mistralai|google|Qwen|microsoft)/[\w.\-]+"
# The commands import this clone's kit, from whatever folder they run in.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks in `language` (bash or python), in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)


def commands(block: str) -> list[str]:
    """A shell block's commands: one a line, without comments."""
    return [line.split(" #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def on_the_embedded_model(text: str) -> str:
    """`text` (a command or Python code) with the embedded model for every Hub id and CPU sizes for the paper's."""
    text = re.sub(HUB_ID, MODEL, text)
    for pattern, small in SIZES.items():
        text = re.sub(pattern, small, text)
    for config, (step, fields) in CPU.items():
        keywords = "".join(f"{k}={v!r}, " for k, v in fields.items())
        text = text.replace(f"kit.{config}(", f"kit.{config}({keywords}")
        if re.match(rf"python -m kit {step}\b", text):
            text += "".join(f" --{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, tuple) else v}"
                            for k, v in fields.items())  # fmt: skip
    return text


def readme_commands() -> list[str]:
    return [c for block in blocks("bash") for c in commands(block)]


def run(command: str | list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(command, shell=isinstance(command, str), cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, f"{command}\nexited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


KINDS = {  # each kind of README command and the test that runs it
    "pip install": "test_the_install_commands_name_the_distribution_and_its_extras",
    "python -m kit": "test_the_command_line_pipeline_runs_on_the_embedded_model",
    "hf auth login": "test_the_gated_model_login_command_exists",
    "make setup": "test_ci_runs_the_readme_development_commands",
    "make test": "test_ci_runs_the_readme_development_commands",
}


def test_every_readme_command_is_tested():
    untested = [c for c in readme_commands() if not any(c.startswith(kind) for kind in KINDS)]
    assert not untested, f"README commands no test runs: {untested}: add them to tests/test_readme.py"
    assert len(blocks("python")) == 1, "one Python block, run by test_the_python_pipeline_runs_on_the_embedded_model"


def test_the_install_commands_name_the_distribution_and_its_extras(tmp_path):
    """`pip install "NAME[extras] @ git+URL"` against this clone (no network: a dry run resolving nothing but
    the kit): the distribution is NAME, it provides every extra named, and URL is the project's repository."""
    import tomllib

    repository = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    installs = [c for c in readme_commands() if c.startswith("pip install")]
    assert installs, "the README installs the kit with pip"
    for command in installs:
        (requirement,) = re.findall(r'"([^"]+)"', command)
        name, extras, url = re.fullmatch(r"([\w.\-]+)(?:\[([\w,]+)\])? @ git\+(\S+)", requirement).groups()
        assert url == repository, f"{command}: installs from {url}, not [project.urls] Repository {repository}"
        report = tmp_path / "report.json"
        local = f"{name}{f'[{extras}]' if extras else ''} @ {REPO.as_uri()}"
        run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation",
             "--quiet", "--report", str(report), local], cwd=tmp_path)  # fmt: skip
        (kit,) = json.loads(report.read_text())["install"]
        metadata = kit["metadata"]
        assert metadata["name"] == name
        assert set((extras or "").split(",")) - {""} <= set(metadata.get("provides_extra", []))


def test_the_command_line_pipeline_runs_on_the_embedded_model(tmp_path):
    pipeline = [c for c in readme_commands() if c.startswith("python -m kit")]
    assert [c.split()[3] for c in pipeline] == ["scan", "prune", "heal", "evaluate", "sweep", "report"]
    for command in pipeline:
        run(on_the_embedded_model(command).replace("python", sys.executable, 1), cwd=tmp_path)
    assert (tmp_path / "runs" / "llama" / "distances.safetensors").is_file()
    assert (tmp_path / "runs" / "llama" / "manifest.json").is_file() and (tmp_path / "runs" / "llama" / "report.md").is_file()


def test_the_python_pipeline_runs_on_the_embedded_model(tmp_path):
    (code,) = blocks("python")
    assert MODEL not in code and re.search(HUB_ID, code), "the README's Python block names a Hub model"
    run([sys.executable, "-c", on_the_embedded_model(code)], cwd=tmp_path)
    assert (tmp_path / "runs" / "llama" / "distances.safetensors").is_file()


def test_the_gated_model_login_command_exists(tmp_path):
    """Logging in needs the Hub; the command the README gives exists in the installed huggingface_hub."""
    (login,) = [c for c in readme_commands() if c.startswith("hf auth login")]
    hf = Path(sys.executable).parent / "hf"
    run([str(hf), *login.split()[1:], "--help"], cwd=tmp_path, timeout=120)


def test_ci_runs_the_readme_development_commands():
    """CI (.ci/run) runs the README's set-up and test commands, exactly and in order."""
    section = README.read_text().split("## Development", 1)[1]
    development = commands(re.search(r"```bash\n(.*?)```", section, re.S).group(1))
    assert development == ["make setup", "make test"]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert [line for line in ci if line.startswith("make ")] == development


def test_the_readme_links_to_files_that_exist():
    links = re.findall(r"\]\(((?:docs|notebooks)/[^)#]+)", README.read_text()) + re.findall(r'src="([^"]+)"', README.read_text())
    assert links and not [link for link in links if not (REPO / link).exists()]
