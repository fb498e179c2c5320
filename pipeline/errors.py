"""User-facing errors: one readable message that names the bad input and the fix.

The CLI prints these without a traceback and exits non-zero. Anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user (a recipe, a file, a flag). The message says what to do."""

    exit_code = 2


class SizeCapError(UserError):
    """The artifact (code + compressed model) is over the challenge's byte cap."""


class NonFiniteLossError(UserError):
    """Training produced a NaN or inf loss; the last good checkpoint was kept."""
