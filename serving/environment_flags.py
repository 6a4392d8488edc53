"""Flags from the environment: `BALANSIS_<FLAG>` for every `--flag` of a subcommand.

A container is configured by its environment as often as by its arguments (compose files,
Helm values, `podman run -e`), so each flag of `balansis <command>` also reads
`BALANSIS_` + its name in capitals with `_` for `-`: `--max-num-seqs 32` is
`BALANSIS_MAX_NUM_SEQS=32`, `--require-auth` is `BALANSIS_REQUIRE_AUTH=true`, and a flag that
takes several values (`--model`, `--allowed-origins`) takes them space-separated, shell-quoted.

A flag on the command line wins over its variable. The variables become command-line words,
so argparse checks them exactly as it checks typed flags, and a bad value names its variable.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Mapping, Sequence

PREFIX = "BALANSIS_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def variable_name(action: argparse.Action) -> str:
    return PREFIX + action.dest.upper()


def with_environment(parser: argparse.ArgumentParser, argv: Sequence[str],
                     environ: Mapping[str, str]) -> list[str]:
    """`argv` with the flags its (sub)command's BALANSIS_* variables give added at the end, for
    the flags `argv` does not set itself. ValueError names a variable whose value a flag
    cannot take."""
    argv = list(argv)
    command = _command_parser(parser, argv)
    given = {word.split("=", 1)[0] for word in argv if word.startswith("--")}
    words: list[str] = []
    for action in command._actions:  # noqa: SLF001 — argparse has no public list of a parser's actions
        long_options = [option for option in action.option_strings if option.startswith("--")]
        if not long_options or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):  # noqa: SLF001
            continue
        value = environ.get(variable_name(action))
        if value is None or given & set(action.option_strings):
            continue
        words += _words(action, long_options[0], value)
    return argv + words


def _words(action: argparse.Action, option: str, value: str) -> list[str]:
    name = variable_name(action)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # noqa: SLF001
        flag = value.strip().lower()
        if flag not in _TRUE | _FALSE:
            raise ValueError(f"{name}={value!r}: expected true or false (1/0, yes/no, on/off)")
        wanted = flag in _TRUE
        return [option] if wanted == isinstance(action, argparse._StoreTrueAction) else []  # noqa: SLF001
    try:
        items = shlex.split(value)
    except ValueError as e:
        raise ValueError(f"{name}={value!r}: {e}") from None
    if isinstance(action, argparse._AppendAction):  # noqa: SLF001 — repeated flag: one word each
        return [f"{option}={item}" for item in items]
    if action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1:
        return [option, *items] if items else []
    return [f"{option}={value}"]


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the innermost subcommand `argv` names (`keys create` → create's)."""
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for index, word in enumerate(argv):
                if word in action.choices:
                    return _command_parser(action.choices[word], argv[index + 1:])
    return parser
