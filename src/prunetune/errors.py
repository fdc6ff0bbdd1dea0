"""The one exception type for a user's mistake.

Anything raised as `UserError` is printed by the CLI as a single line `error: ...` and exits with
code 2; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in what the user asked for; the message says what to do instead."""
