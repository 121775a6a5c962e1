"""Where a command's configuration comes from besides its flags: a config file (`--config FILE`) and the run it
works on (a later command, or `--resume`).

Precedence, lowest first: the preset; the run's own config.json (commands on an existing run take it, so no
preset or flag has to be repeated); the `--config` file; the flags. What a run was made with and a later command
cannot change (`inherited_fields`: its data, backbone and adapter, the gates `compare` reads, its seed; under
`--resume` everything the config hash covers) must not be contradicted: a file or flag that does is an error
naming both values.

Standard library only (parsed before jax is imported).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import types
import typing
from collections.abc import Mapping
from typing import Any

from ponderttt.train.config import COMMANDS, DEFAULT_PRESET, LATER_STAGES, PRESET_NAMES, ConfigError, RunConfig, to_dict
from ponderttt.train.rundir import CONFIG_FILE, NOT_HASHED, RunDir, resolve_run_dir

# sections a later command takes from the run as it was made (flags may not change them)
INHERITED_SECTIONS = {
    "gate": ("data", "backbone", "adapter"),
    "compare": ("data", "backbone", "adapter", "gate"),
    "analyze": ("data", "backbone", "adapter"),
    "evaluate": ("data", "backbone", "adapter"),
}
INHERITED_RUN_FIELDS = ("seed",)
ALL_SECTIONS = frozenset(f.name for cls in COMMANDS.values() for f in dataclasses.fields(cls))


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """A `--config` file: its sections (section -> fields), and the preset it names (a config.json record does)."""

    path: pathlib.Path
    sections: dict[str, Any]
    preset: str | None = None


def load_config_file(path: str | pathlib.Path) -> ConfigFile:
    """Reads a YAML (.yaml / .yml) or JSON file with the sections of a command config (`--print-config`'s or
    config.json's "config"), or a whole config.json record; ConfigError naming the file when it cannot be read."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {file}: no such file")
    text = file.read_text(encoding="utf-8", errors="replace")
    if file.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--config {file}: not valid YAML: {' '.join(str(error).split())}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--config {file}: not valid JSON: {error.msg} (line {error.lineno}); YAML files "
                              "need the suffix .yaml or .yml") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"--config {file}: expected a mapping of sections (run, data, adapter, ...), got "
                          f"{type(data).__name__}")
    preset = None
    if isinstance(data.get("config"), Mapping):  # a config.json / --print-config record
        preset = data.get("preset")
        data = data["config"]
        if preset is not None and preset not in PRESET_NAMES:
            raise ConfigError(f"--config {file}: preset {preset!r} is not one of {', '.join(PRESET_NAMES)}")
    unknown = sorted(set(data) - ALL_SECTIONS)
    if unknown:
        raise ConfigError(f"--config {file}: unknown section(s) {', '.join(unknown)}; sections: "
                          f"{', '.join(sorted(ALL_SECTIONS))}")
    return ConfigFile(file, dict(data), preset)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """`value` (from JSON / YAML) as type `tp` of a config field; ConfigError naming `where` otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _convert(value, args[0], where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}={value!r} must be a list")
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping of {tp.__name__} fields, got {value!r}")
        return build_section(tp, value, where)
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, int | float) and not isinstance(value, bool), str: isinstance(value, str)}
    if tp not in ok:
        raise ConfigError(f"{where}: unsupported field type {tp!r}")
    if not ok[tp]:
        raise ConfigError(f"{where}={value!r} must be {tp.__name__}")
    return float(value) if tp is float else value


def build_section(cls: type, values: Mapping[str, Any], where: str, base: Any = None) -> Any:
    """A `cls` section from a mapping of (some of) its fields, the rest from `base` (default: `cls()`); the
    section's own checks run. ConfigError naming an unknown field or a bad value."""
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; fields: {', '.join(names)}")
    base = base if base is not None else cls()
    changes = {}
    for name, value in values.items():
        current = getattr(base, name)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[name] = build_section(type(current), value, f"{where}.{name}", current)
        else:
            changes[name] = _convert(value, hints[name], f"{where}.{name}")
    return dataclasses.replace(base, **changes)


def with_sections(config: Any, sections: Mapping[str, Any], where: str) -> Any:
    """`config` (a command config) with the sections the command has replaced from `sections` (field by field);
    sections of other commands are left out."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for name, values in sections.items():
        if name not in fields:
            continue
        current = getattr(config, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(values, Mapping):
                raise ConfigError(f"{where}: section {name} must be a mapping, got {values!r}")
            changes[name] = build_section(type(current), values, f"{where}: {name}", current)
        else:
            hints = typing.get_type_hints(type(config), include_extras=True)
            changes[name] = _convert(values, hints[name], f"{where}: {name}")
    return dataclasses.replace(config, **changes)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """The recorded config of an existing run that a command works on."""

    run_dir: RunDir
    preset: str
    sections: dict[str, Any]  # section -> fields, as the run recorded them
    files: tuple[pathlib.Path, ...]  # where they were read (config.json, config-gate.json, ...)


def scan_run_flags(args: list[str], run: Any) -> tuple[str, str | None, bool]:
    """(output dir, run name, resume) from the command line (else from `run`, the config before the flags)."""
    values = {"--output-dir": run.output_dir, "--name": run.name}
    resume = run.resume
    for i, arg in enumerate(args):
        for flag in values:
            if arg == flag and i + 1 < len(args):
                values[flag] = args[i + 1]
            elif arg.startswith(flag + "="):
                values[flag] = arg.split("=", 1)[1]
        if arg in ("--resume", "--no-resume"):
            resume = arg == "--resume"
    return values["--output-dir"], values["--name"], resume


def _read(path: pathlib.Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: the run's config record is not valid JSON ({error.msg}, line {error.lineno}); "
                          "restore it or start a new run") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ConfigError(f"{path}: not a run config record (no \"config\" mapping)")
    return record


def run_record(command: str, output_dir: str, name: str | None, resume: bool) -> RunRecord | None:
    """The recorded config a command takes from its run: for a later command the run's config.json (and, for
    `compare`, the gates' config-gate.json); under `--resume` the config this command recorded. None when the
    command makes a new run, or the run does not exist yet (the command's checks say so)."""
    if command not in LATER_STAGES and not resume:
        return None
    if name is None and not resume:
        return None
    try:
        run_dir = resolve_run_dir(RunConfig(output_dir=output_dir, name=name, resume=resume), command, DEFAULT_PRESET)
    except ConfigError:
        return None  # reported by the command's prerequisite checks, with what to do
    main = run_dir.root / CONFIG_FILE
    if not main.is_file():
        return None
    record = _read(main)
    files = [main]
    sections = dict(record["config"])
    own = run_dir.root / f"config-{command}.json"
    if resume and command in LATER_STAGES and own.is_file():
        sections, files = dict(_read(own)["config"]), [own]
    elif command == "compare" and (gate_file := run_dir.root / "config-gate.json").is_file():
        sections["gate"] = _read(gate_file)["config"]["gate"]
        files.append(gate_file)
    for section, names in NOT_HASHED.items():  # where and how this invocation runs is its own
        if isinstance(sections.get(section), dict):
            sections[section] = {k: v for k, v in sections[section].items() if k not in names}
    preset = record.get("preset") if record.get("preset") in PRESET_NAMES else DEFAULT_PRESET
    return RunRecord(run_dir, preset, sections, tuple(files))


def inherited_fields(command: str, resume: bool) -> dict[str, tuple[str, ...] | None]:
    """section -> the fields of it a command may not change on its run (None: all of them)."""
    if resume:
        return {section: None for section in ALL_SECTIONS}
    out: dict[str, tuple[str, ...] | None] = {section: None for section in INHERITED_SECTIONS.get(command, ())}
    out["run"] = INHERITED_RUN_FIELDS
    return out


SEED_RANGE = 2**32  # seeds are unsigned 32-bit (numpy, jax.random)


def check_values(config: Any) -> None:
    """ConfigError naming the flag of the first float that is not finite (inf, nan: learning rates, β, λ_max,
    timeouts, budgets, ...) or of a seed outside [0, 2^32), anywhere in a command config."""
    record = to_dict(config)
    for section, values in record.items():
        if not isinstance(values, dict):
            continue
        for path, value in _leaves(values, []):
            items = value if isinstance(value, list | tuple) else [value]
            for item in items:
                if isinstance(item, float) and not math.isfinite(item):
                    shown = " ".join(str(v) for v in items) if isinstance(value, list | tuple) else str(value)
                    raise ConfigError(f"{_flag(section, path)}={shown} must be finite")
    seed = getattr(getattr(config, "run", None), "seed", 0)
    if not 0 <= seed < SEED_RANGE:
        raise ConfigError(f"--seed={seed} must lie in [0, 2^32)")


def _leaves(values: dict[str, Any], path: list[str]) -> list[tuple[list[str], Any]]:
    out = []
    for key, value in values.items():
        out += _leaves(value, [*path, key]) if isinstance(value, dict) else [([*path, key], value)]
    return out


def _flag(section: str, path: list[str]) -> str:
    name = ".".join(p.replace("_", "-") for p in path)
    return f"--{name}" if section == "run" else f"--{section}.{name}"


def _differences(got: Any, want: Any, path: list[str]) -> list[tuple[list[str], Any, Any]]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for key in want:
            if key in got:
                out += _differences(got[key], want[key], [*path, key])
        return out
    return [] if got == want else [(path, got, want)]


def check_against_run(command: str, config: Any, record: RunRecord, resume: bool) -> None:
    """ConfigError naming every flag (or `--config` value) that contradicts what the run was made with."""
    now = json.loads(json.dumps(to_dict(config)))  # tuples as lists, as recorded
    problems = []
    for section, names in inherited_fields(command, resume).items():
        if section not in now or section not in record.sections:
            continue
        got, want = now[section], record.sections[section]
        if names is not None:
            got = {k: got[k] for k in names if k in got}
            want = {k: want[k] for k in names if k in want}
        for path, value, recorded in _differences(got, want, []):
            if section in NOT_HASHED and path[0] in NOT_HASHED[section]:
                continue
            problems.append(f"{_flag(section, path)}={json.dumps(value)} contradicts run {record.run_dir.name!r}, "
                            f"made with {section}.{'.'.join(path)}={json.dumps(recorded)}")
    if problems:
        where = ", ".join(str(f) for f in record.files)
        raise ConfigError("; ".join(problems) + f" ({where}). Drop the flag to use the run's value, or start a new "
                          "run (another --name) to change it")
