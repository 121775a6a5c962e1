"""Command line of `uv run apps/train [COMMAND] [--preset NAME] [FLAGS]`.

The command is the first argument (default: pipeline). `--preset` chooses the defaults (smoke, cpu,
gpu, tpu-pod); every other flag overrides one field of the preset and is parsed by tyro into the
command's frozen dataclass config. Startup imports only the standard library, tyro and the config
module: jax and the packages are imported inside the stages, so `--help` is instant.
"""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap

from ponderttt.train.config import COMMANDS, DEFAULT_PRESET, PRESET_NAMES, ConfigError, preset

PROG = "uv run apps/train"
EXIT_USAGE = 2

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


def parse(argv: list[str]) -> tuple[str, str, object]:
    """(command, preset, config) from the command line; SystemExit(2) with a message on a usage error."""
    import tyro

    args = list(argv)
    command = "pipeline"
    if args and not args[0].startswith("-"):
        command = args.pop(0)
        if command not in COMMANDS:
            raise ConfigError(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)} "
                              f"(`{PROG} --help` describes them)")
    preset_name, rest = split_preset(args)
    default = preset(command, preset_name)
    description = f"{COMMANDS[command].__doc__}\n\n{PRESET_HELP}"
    config = tyro.cli(COMMANDS[command], default=default, args=rest, prog=f"{PROG} {command}",
                      description=description)
    return command, preset_name, config


def main(argv: list[str] | None = None) -> int:
    """Entry point: answers --help / --version, else parses `argv` (default: sys.argv[1:]) and runs the command.

    Returns the exit status: the command's, or 2 (`EXIT_USAGE`) after printing a ConfigError to stderr."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(top_level_help())
        return 0
    if args and args[0] == "--version":
        print(f"ponderttt-train {importlib.metadata.version('ponderttt-train')}")
        return 0
    try:
        command, preset_name, config = parse(args)  # `--help` exits here, before jax is imported
        from ponderttt.train.stages import run_command

        return run_command(command, preset_name, config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
