"""Option defaults from a TOML config file: flags > environment variables > config file > defaults.

The file is ``$SEER_CONFIG`` when set (it must exist), else ``$XDG_CONFIG_HOME/seer/config.toml``
(``~/.config/seer/config.toml``), which may be missing. Top-level keys apply to every command
that has the option; a table named after a command applies to that command only and wins over
the top-level keys. Keys are long option names, with dashes or underscores:

    sparsity = 0.9
    max-tokens = 64

    [batch]
    prompt = "Summarise this document in one sentence."
    max_tokens = 128

A key or table that no command knows is an error, so a typo does not pass unnoticed. The values
become Click's ``default_map``, which Click ranks below flags and environment variables; they
are checked like flag values, and also show as the defaults in ``--help``.
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from .console import handle_user_errors, warn
from .engine.errors import SeerError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None


@handle_user_errors
def apply_config_file(ctx: typer.Context) -> None:
    """Give the sub-commands of ``ctx`` their defaults from the config file.

    Call it from the root callback: Click runs that before it creates the sub-command's context,
    which takes its defaults from ``ctx.default_map``. A bad file ends the run with one line.
    """
    ctx.default_map = load_default_map(ctx.command.commands)


def load_default_map(commands: Mapping[str, Any]) -> dict:
    """Click's default_map, ``{command name: {parameter name: value}}``, from the config file.

    ``commands`` maps the command names to their Click commands (the root group's ``commands``).

    Raises SeerError, in one sentence naming the file, if it cannot be read or has unknown keys.
    """
    path, named = config_path()
    if not path.exists():
        if named:
            raise SeerError(f"SEER_CONFIG names {path}, which does not exist.")
        return {}
    if tomllib is None:
        warn(f"ignoring {path}: reading TOML on Python 3.10 needs the tomli package.")
        return {}
    return default_map(read_toml(path), commands, path)


def config_path() -> tuple[Path, bool]:
    """The config file, and whether the user named it through ``$SEER_CONFIG``."""
    named = os.environ.get("SEER_CONFIG")
    if named:
        return Path(named).expanduser(), True
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "seer" / "config.toml", False


def read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SeerError(f"{path} is not valid TOML: {error}.") from error
    except OSError as error:
        raise SeerError(f"cannot read {path} ({error.strerror}).") from error


def default_map(config: dict, commands: Mapping[str, Any], path: Path) -> dict:
    """Spread the top-level keys over the commands that have them, then apply command tables."""
    shared = {key: value for key, value in config.items() if not isinstance(value, dict)}
    tables = {key: value for key, value in config.items() if isinstance(value, dict)}
    unknown = sorted(tables.keys() - commands.keys())
    if unknown:
        raise SeerError(
            f"{path}: table {unknown[0]!r} is not a seer command ({', '.join(commands)})."
        )
    names = {command: parameter_names(commands[command]) for command in commands}
    for key in shared:
        if not any(key in known for known in names.values()):
            raise SeerError(f"{path}: no seer command has an option --{_dashed(key)}.")
    result = {}
    for command, known in names.items():
        defaults = {known[key]: value for key, value in shared.items() if key in known}
        for key, value in tables.get(command, {}).items():
            if key not in known:
                raise SeerError(f"{path}: seer {command} has no option --{_dashed(key)}.")
            defaults[known[key]] = value
        if defaults:
            result[command] = defaults
    return result


def parameter_names(command) -> dict[str, str]:
    """Config keys → parameter names: ``max-tokens`` and ``max_tokens`` → ``max_tokens``,
    ``json`` → ``json_output``. Only options have keys; positional arguments do not."""
    names = {}
    for param in command.params:
        if param.param_type_name == "option":
            for option in param.opts:
                if option.startswith("--"):
                    names[option[2:]] = names[option[2:].replace("-", "_")] = param.name
    return names


def _dashed(key: str) -> str:
    return key.replace("_", "-")
