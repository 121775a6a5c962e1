"""Command line of `uv run apps/train [COMMAND] [--preset NAME] [FLAGS]`.

The command is the first argument (default: pipeline). `--preset` chooses the defaults (smoke, cpu,
gpu, tpu-pod); every other flag overrides one field of the preset and is parsed by tyro into the
command's frozen dataclass config. Startup imports only the standard library, tyro, the config module and
`rundir` (standard library): jax and the packages are imported inside the stages, so `--help` is instant.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import sys
import textwrap

from ponderttt.train.config import (
    COMMANDS,
    DEFAULT_PRESET,
    PRESET_NAMES,
    ConfigError,
    TrainingDiverged,
    preset,
    to_dict,
)
from ponderttt.train.rundir import DiskFull

PROG = "uv run apps/train"
EXIT_USAGE = 2
EXIT_DIVERGED = 3  # a training stage's loss or parameters went non-finite (nothing poisoned was saved)
EXIT_DISK_FULL = 4  # a write failed for want of space (or quota, or a read-only disk); the last checkpoint is intact

SUMMARIES = {
    "pipeline": "the whole workflow on the embedded default: data, backbone, adapter, gates, compare, report",
    "pretrain": "pretrain the small in-house GPT-2 backbone on the corpus (cached by config hash)",
    "ttt": "train the TTT adapter with a fixed UPDATE_k: L = L_CE + beta * L_TTT",
    "gate": "train the learned gates: gumbel (hard skip), continuous (scale), ppo (PID-Lagrangian budget)",
    "compare": "every method x budget on the same held-out chunks, reset and carry protocols",
    "analyze": "correlate per-chunk signals with the oracle advantage (scaling table)",
    "evaluate": "code and reasoning benchmarks with TTT during generation",
    "reproduce": "the published run-all-experiments workflow over backbone scales (--scales 125m 350m ...)",
}

PRESET_HELP = (
    f"Presets (--preset NAME, anywhere on the line): {', '.join(PRESET_NAMES)}; default {DEFAULT_PRESET}. "
    "smoke: tiny, seconds. cpu: float32, the offline default. gpu: bfloat16 with remat. tpu-pod: bfloat16, "
    "remat, fsdp mesh, jax.distributed.initialize() and per-host data. The defaults shown below are the chosen "
    "preset's; flags override them."
)

CONFIG_HELP = (
    "--config FILE (YAML or JSON: the sections of a config.json, or a whole config.json / --print-config output) "
    "sets the defaults that flags override; --print-config prints the resolved config and exits. Commands on an "
    "existing run (gate, compare, analyze, evaluate, and --resume) take the run's config.json: repeat no preset or "
    "flag; one that contradicts the run is an error naming both values."
)


def top_level_help() -> str:
    """The text of `--help` before a command: usage, one line per command (`SUMMARIES`) and the presets."""
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {SUMMARIES[name]}" + (" (default)" if name == "pipeline" else "")
             for name in COMMANDS]
    return "\n".join([
        f"usage: {PROG} [COMMAND] [--preset {{{','.join(PRESET_NAMES)}}}] [FLAGS]",
        "",
        "PonderTTT: adaptive, budget-aware test-time training of code language models.",
        "",
        "commands:",
        *lines,
        "",
        textwrap.fill(PRESET_HELP, width=100),
        "",
        textwrap.fill(CONFIG_HELP, width=100),
        "",
        f"`{PROG} COMMAND --help` lists a command's flags. `{PROG} --version` prints the version.",
    ])


def split_preset(args: list[str]) -> tuple[str, list[str]]:
    """Removes `--preset NAME` / `--preset=NAME` from `args`; returns the preset name and the rest."""
    name = DEFAULT_PRESET
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--preset":
            if i + 1 >= len(args):
                raise ConfigError(f"--preset needs a value: one of {', '.join(PRESET_NAMES)}")
            name = args[i + 1]
            i += 2
            continue
        if arg.startswith("--preset="):
            name = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    if name not in PRESET_NAMES:
        raise ConfigError(f"--preset={name!r} is not a preset; choose one of {', '.join(PRESET_NAMES)}")
    return name, rest


def take_option(args: list[str], flag: str) -> tuple[str | None, list[str]]:
    """Removes `flag VALUE` / `flag=VALUE` from `args`; returns the value (None when absent) and the rest."""
    value, rest, i = None, [], 0
    while i < len(args):
        if args[i] == flag:
            if i + 1 >= len(args):
                raise ConfigError(f"{flag} needs a value")
            value, i = args[i + 1], i + 2
            continue
        if args[i].startswith(flag + "="):
            value = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return value, rest


def _suppressed(cls: type) -> list[str]:
    """The fields of a config dataclass that its command line does not offer (marked `tyro.conf.Suppress`)."""
    import typing

    import tyro

    hints = typing.get_type_hints(cls, include_extras=True)
    return [f.name for f in dataclasses.fields(cls)
            if typing.get_origin(hints[f.name]) is typing.Annotated
            and any(m is tyro.conf.Suppress for m in typing.get_args(hints[f.name])[1:])]


def _refuse_training_flags(command: str, args: list[str]) -> None:
    """A clear error for a flag that `command` does not offer: a section it takes from its run (nothing is trained),
    or a training-only run option."""
    cls = COMMANDS[command]
    trained = _suppressed(cls)
    run_only = set(_suppressed(type(next(f.default for f in dataclasses.fields(cls) if f.name == "run"))))
    for arg in args:
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0]
        if "." in name and name.split(".", 1)[0] in trained:
            raise ConfigError(f"--{name}: `{command}` reads the {', '.join(trained)} of the run it works on (its "
                              "config.json); training flags are not offered here. Change them by training a new run "
                              f"(`{PROG} ttt` / `gate` / `pipeline` with another --name)")
        if name.replace("-", "_") in run_only:
            raise ConfigError(f"--{name}: `{command}` trains nothing, so it has no checkpoints, logging or evaluation "
                              "intervals")


def parse(argv: list[str]) -> tuple[str, str, object]:
    """(command, preset, config) from the command line; SystemExit(2) with a message on a usage error.

    The config starts from the preset, then (commands on an existing run, `--resume`) the run's own config.json,
    then a `--config FILE`, then the flags (`ponderttt.train.runconfig`)."""
    import tyro

    from ponderttt.train import runconfig

    args = list(argv)
    command = "pipeline"
    if args and not args[0].startswith("-"):
        command = args.pop(0)
        if command not in COMMANDS:
            raise ConfigError(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)} "
                              f"(`{PROG} --help` describes them)")
    preset_given = any(a == "--preset" or a.startswith("--preset=") for a in args)
    preset_name, rest = split_preset(args)
    config_path, rest = take_option(rest, "--config")
    file = runconfig.load_config_file(config_path) if config_path is not None else None
    if file is not None and file.preset is not None and not preset_given:
        preset_name = file.preset

    def layered(preset_name: str, record: runconfig.RunRecord | None = None) -> object:
        """The defaults the flags start from: the preset, the run's recorded sections, the --config file."""
        default = preset(command, preset_name)
        if record is not None:
            default = runconfig.with_sections(default, record.sections, where=str(record.files[0]))
        if file is not None:
            default = runconfig.with_sections(default, file.sections, where=f"--config {file.path}")
        return default

    default = layered(preset_name)
    resume = False
    record = None
    if command != "reproduce":
        _refuse_training_flags(command, rest)
        output_dir, name, resume = runconfig.scan_run_flags(rest, default.run)
        record = runconfig.run_record(command, output_dir, name, resume)
    if record is not None:
        if preset_given and preset_name != record.preset:
            raise ConfigError(f"--preset {preset_name} contradicts run {record.run_dir.name!r}, made with --preset "
                              f"{record.preset} ({record.files[0]}); drop --preset to use the run's")
        preset_name = record.preset
        default = layered(preset_name, record)
    description = f"{COMMANDS[command].__doc__}\n\n{PRESET_HELP}\n\n{CONFIG_HELP}"
    config = tyro.cli(COMMANDS[command], default=default, args=rest, prog=f"{PROG} {command}",
                      description=description)
    runconfig.check_values(config)
    if record is not None:
        runconfig.check_against_run(command, config, record, resume)
    return command, preset_name, config


def config_record(command: str, preset_name: str, config: object) -> dict:
    """What `--print-config` prints: {command, preset, config}, the shape of config.json that `--config` reads."""
    return {"command": command, "preset": preset_name, "config": to_dict(config)}


def main(argv: list[str] | None = None) -> int:
    """Entry point: answers --help / --version, else parses `argv` (default: sys.argv[1:]) and runs the command.

    Returns the exit status: the command's, 2 (`EXIT_USAGE`) after printing a ConfigError, 3 (`EXIT_DIVERGED`) after
    a training stage went non-finite (`TrainingDiverged`), or 4 (`EXIT_DISK_FULL`) after a write failed for want of
    space (`rundir.DiskFull`), each as one line on stderr."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(top_level_help())
        return 0
    if args and args[0] == "--version":
        print(f"ponderttt-train {importlib.metadata.version('ponderttt-train')}")
        return 0
    try:
        print_config = "--print-config" in args
        args = [a for a in args if a != "--print-config"]
        command, preset_name, config = parse(args)  # `--help` exits here, before jax is imported
        if print_config:
            print(json.dumps(config_record(command, preset_name, config), indent=2, sort_keys=True))
            return 0
        from ponderttt.train.stages import run_command

        return run_command(command, preset_name, config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except DiskFull as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DISK_FULL


if __name__ == "__main__":
    sys.exit(main())
