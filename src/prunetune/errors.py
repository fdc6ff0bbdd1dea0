"""The exception types for a user's mistake.

Anything raised as `UserError` is printed by the CLI as a single line `error: ...` and exits with
code 2; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in what the user asked for; the message says what to do instead."""


class SettingError(UserError):
    """A settings field holds a value it cannot take.

    The message names settings the way a Python caller set them, `Class.field` (e.g.
    "ShearSettings.warmup is a share of the steps in [0, 1], got 2"), and quotes no command-line
    flag: someone calling the API never passed one. The CLI words the same message with its flags
    (cli/flags.py maps every setting to the flag that sets it). `setting` is the field at fault.
    """

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting
