"""The errors a command line reports as one line, not a traceback.

Every such error derives from `ShortcutError`, whose `exit_code` the command lines return: 2 for an
`InputError` (what was asked is rejected before anything is written: a bad spec, a run that cannot fit
its devices, a plan that cannot be made), 1 for any other (a run cannot go on; the message says what to
do). Command lines catch `ShortcutError` once, so a new error needs no list updated anywhere.
"""

from __future__ import annotations


class ShortcutError(Exception):
    """An error whose message is one line for the user; exit status 1."""

    exit_code = 1


class InputError(ShortcutError):
    """What was asked cannot be done, found before anything was written; exit status 2."""

    exit_code = 2
