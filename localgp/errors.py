"""The one exception class for a user's mistake (a bad value, file, directory or resume), as
opposed to a bug. The command line prints its message as one line, `localgp <command>: error:
...`, and exits with 2; anything else keeps its traceback (always with `--debug`)."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user, named in the message. A ValueError, so code that caught the
    ValueErrors raised before this class existed still catches it."""

