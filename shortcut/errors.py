"""The errors a command line reports as one line, not a traceback.

Every such error derives from `ShortcutError`, whose `exit_code` the command lines return: 2 for an
`InputError` (what was asked is rejected before anything is written: a bad spec, a run that cannot fit
its devices, a plan that cannot be made), 1 for any other (a run cannot go on; the message says what to
do). Command lines catch `ShortcutError` once, so a new error needs no list updated anywhere.
"""

from __future__ import annotations

import re


class ShortcutError(Exception):
    """An error whose message is one line for the user; exit status 1."""

    exit_code = 1


class InputError(ShortcutError):
    """What was asked cannot be done, found before anything was written; exit status 2."""

    exit_code = 2


class KeyedValueError(ValueError):
    """A validation failure that knows the spec key it is about (e.g. `method.bootstrap_fraction`)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(message)


# parts of a pydantic error location that name a union member or validator, not a key: `float`, `tuple[...]`
_UNION_TAG = re.compile(r"^(function-.*|float|int|str|bool|none|\w+\[.*\])$")


def first_error(error, prefix: str = "") -> tuple[str, str]:
    """The first error of a pydantic ValidationError as (dotted key, one-line message), the key under `prefix`
    (e.g. `method.`). A validator that raised KeyedValueError names its own key and message."""
    err = error.errors()[0]
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, KeyedValueError):
        return ctx_error.key, ctx_error.message
    key = prefix + ".".join(str(p) for p in err["loc"] if not _UNION_TAG.match(str(p)))
    kind, given = err["type"], err.get("input")
    if kind == "extra_forbidden":
        return key, "unknown key"
    if kind == "missing":
        return key, "required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:]
    return key, msg if isinstance(given, (dict, list)) or given is None else f"{msg}, got {given!r}"
