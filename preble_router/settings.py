"""Settings declared once: a dataclass field carries its default, its help text and its command-line flag.

    @dataclass
    class Config:
        window: float = setting(180.0, "Seconds of history.", flag="--window")

    add_flags(parser, Config)          # --window WINDOW, default 180.0, that help
    config = from_args(Config, args)   # Config(window=args.window)

A field declared with `setting()` but no flag is documented the same way and keeps its default on the command
line. The flag's type follows the field's annotation (int, float, str, and `X | None` of those); a bool field is
a switch (store_true) unless its setting gives a `type` (e.g. `type=int, choices=[0, 1]`), and is turned back
into a bool by from_args. `env="NAME"`: the flag's default is that environment variable when it is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any

_HELP, _FLAG, _ALIASES, _ENV, _ARGPARSE = "help", "flag", "aliases", "env", "argparse"


def setting(default: Any, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = (),  # noqa: A002
            env: str | None = None, **argparse_kwargs: Any) -> Any:
    """A dataclass field with its default and help; with `flag` (and its short `aliases`), also a command-line
    option (extra keyword arguments, such as choices or type, go to argparse's add_argument)."""
    return dataclasses.field(default=default, metadata={_HELP: help, _FLAG: flag, _ALIASES: aliases, _ENV: env,
                                                         _ARGPARSE: argparse_kwargs})


def _flagged(cls: type) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    return [(f, _plain(hints[f.name])) for f in dataclasses.fields(cls) if f.metadata.get(_FLAG)]


def _plain(hint: Any) -> Any:
    """`float | None` -> float; other hints as they are."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _dest(f: dataclasses.Field) -> str:
    return f.metadata[_FLAG].lstrip("-").replace("-", "_")  # argparse's own rule


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One option per flagged field of dataclass `cls`, in field order."""
    for f, hint in _flagged(cls):
        kwargs = dict(f.metadata[_ARGPARSE])
        default = f.default
        env = f.metadata[_ENV]
        if env:
            default = os.environ.get(env, default)
        if hint is bool and "type" not in kwargs:
            kwargs.setdefault("action", "store_true")
        elif hint is bool:
            default = kwargs["type"](default)
        elif hint in (int, float):
            kwargs.setdefault("type", hint)
        parser.add_argument(f.metadata[_FLAG], *f.metadata.get(_ALIASES, ()), default=default, help=f.metadata[_HELP],
                            **kwargs)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of `cls` from what add_flags(…, cls) parsed into `args`; unflagged fields keep their default."""
    values = {}
    for f, hint in _flagged(cls):
        value = getattr(args, _dest(f))
        values[f.name] = bool(value) if hint is bool else value
    return cls(**{**values, **overrides})
