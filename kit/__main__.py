"""`python -m kit STEP --run DIR [settings]`: the pipeline's steps (kit.steps) from the command line, each setting
of the step's config dataclass a flag (ScanConfig.n_texts is --n-texts), so that the command line and the notebooks
run the same code and write the same run folder.

    python -m kit scan     --run runs/llama --model meta-llama/Llama-3.1-8B --n-texts 256
    python -m kit prune    --run runs/llama --n 8
    python -m kit heal     --run runs/llama --steps 500
    python -m kit evaluate --run runs/llama
    python -m kit report   --run runs/llama

Under a launcher (`torchrun --nproc_per_node 8 -m kit scan --run-dir DIR ...`, `accelerate launch -m kit heal --run DIR ...`)
the texts, questions and healing batches are split over the processes and rank 0 writes the run folder; torchrun takes
`--run` for a prefix of its own `--run-path`, so under torchrun the run folder is `--run-dir`.
"""

import argparse
import dataclasses
import types
import typing

from .core import distributed
from .core.deprecation import warn
from .run import Run
from .steps import STEPS

FLAGS = {"model_name": ("--model", "--model-name")}  # fields whose flag reads better under another name


def _parse(kind):
    """A parser of one value of a field annotated `kind` (int, float, str, bool, X | None)."""
    kinds = [k for k in (typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,))]

    def parse(text: str):
        if type(None) in kinds and text.lower() == "none":
            return None
        if bool in kinds and text.lower() in ("true", "false"):
            return text.lower() == "true"
        for k in (int, float, str):
            if k in kinds:
                try:
                    return k(text)
                except ValueError:
                    continue
        raise argparse.ArgumentTypeError(f"{text!r} is not a {' or '.join(getattr(k, '__name__', str(k)) for k in kinds)}")

    return parse


def _element(kind):
    """The element type of a tuple field (tuple[int, ...], tuple[str, ...] | None), or None for a scalar field."""
    for k in typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,):
        if typing.get_origin(k) is tuple:
            return typing.get_args(k)[0]
    return None


def add_config(parser: argparse.ArgumentParser, config_class, defaults=None) -> None:
    """One flag per field of a settings dataclass, its type and default from the field (or from `defaults`, a config)."""
    group = parser.add_argument_group(f"settings (kit.{config_class.__name__})")
    for field in dataclasses.fields(config_class):
        flags = FLAGS.get(field.name, ("--" + field.name.replace("_", "-"),))
        kind, default = field.type, field.default if defaults is None else getattr(defaults, field.name)
        if kind is bool:
            group.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction, default=default)
        elif (element := _element(kind)) is not None:
            parse = _parse(element | None) if type(None) in typing.get_args(kind) else _parse(element)
            group.add_argument(*flags, dest=field.name, nargs="*", type=parse, default=default, metavar=field.name.upper(),
                               help=f"zero or more{' (none: None)' if parse is not None and type(None) in typing.get_args(kind) else ''}; default: {default}")  # fmt: skip
        else:
            group.add_argument(*flags, dest=field.name, type=_parse(kind), default=default, help=f"default: {default}")


def config_from(config_class, args: argparse.Namespace):
    """The config the parsed flags describe (a tuple field given as "none" is None)."""
    values = {}
    for field in dataclasses.fields(config_class):
        value = getattr(args, field.name)
        values[field.name] = None if isinstance(value, list) and value == [None] else value
    return config_class(**values)


class _Out(argparse.Action):
    """--out, kit 0.2's name of --run: the same, with a DeprecationWarning."""

    def __call__(self, parser, namespace, value, option_string=None):
        warn("python -m kit --out", "--run", stacklevel=2)
        namespace.run = value


def heal_settings(method: str):
    """The settings class of the healing method `method` (None: it has none) and its defaults."""
    from .healing.methods import DEFAULTS, HEALERS

    if method not in HEALERS:
        raise SystemExit(f"python -m kit heal: no healing method {method!r}; choose one of {', '.join(HEALERS)}")
    return HEALERS[method].config, DEFAULTS.get(method)


def parser(method: str = "qlora") -> argparse.ArgumentParser:
    """The command line; `heal`'s flags are the settings of the healing method `method` (--method)."""
    from .healing.methods import HEALERS

    top = argparse.ArgumentParser(prog="python -m kit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True, metavar="STEP")
    for name, step in STEPS.items():
        sub = commands.add_parser(name, help=step.help, description=step.help)
        sub.add_argument("--run", "--run-dir", dest="run", help="the run folder: the step reads its inputs there and writes its "
                         "artifacts (required; under torchrun write --run-dir: torchrun's own --run-path makes --run ambiguous)")
        sub.add_argument("--out", dest="run", action=_Out, help=argparse.SUPPRESS)  # kit 0.2's name, deprecated
        sub.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 (auto under a launcher: this process's GPU)")
        sub.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
        sub.add_argument("--device-map", default=None, help="accelerate's dispatch of a model too big for one device, e.g. auto")
        sub.add_argument("--offload-folder", default=None, help="where --device-map offloads weights to disk")
        if name == "heal":
            sub.add_argument("--method", default="qlora", choices=list(HEALERS), help="the healing method (default: qlora, the paper's); "
                             "its settings are the flags below: `python -m kit heal --method NAME --help`")  # fmt: skip
            config, defaults = heal_settings(method)
            if config is not None:
                add_config(sub, config, defaults)
        elif step.config is not None:
            add_config(sub, step.config)
    return top


def _method(argv) -> str:
    """The --method of a heal command, read before the parser is built (its flags depend on it)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="qlora")
    return pre.parse_known_args(argv)[0].method


def main(argv=None):
    import kit.steps

    top = parser(_method(argv))
    args = top.parse_args(argv)
    if args.run is None:
        top.error(f"the following arguments are required: --run (python -m kit {args.command} --run DIR)")
    distributed.init()
    run = Run(args.run if "/" in args.run else f"./{args.run}", device=args.device, dtype=args.dtype, device_map=args.device_map,
              offload_folder=args.offload_folder)  # fmt: skip
    function, config_class = getattr(kit.steps, args.command), STEPS[args.command].config
    if args.command == "heal":
        config_class = heal_settings(args.method)[0]
        result = function(run, args.method if config_class is None else config_from(config_class, args))
    else:
        result = function(run) if config_class is None else function(run, config_from(config_class, args))
    if args.command == "report" and distributed.is_main():
        print(result)
    return result


if __name__ == "__main__":
    main()
