"""The one base class of the errors a user can act on."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a state the user can repair: the message names the file, sample or flag and says what to do.

    The `regate` command prints the message of a `UserError` on one line and exits with status 2; any other
    exception is a bug and keeps its traceback. Every error class of the plugin that reports bad input derives
    from it (next to its builtin base, so `except ValueError` and the like still catch it)."""
