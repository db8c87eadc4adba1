"""The one exception class for a user's mistake (a bad value, file, directory or resume), as
opposed to a bug. The command line prints its message as one line, `localgp <command>: error:
...`, and exits with 2; anything else keeps its traceback (always with `--debug`)."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user, named in the message. A ValueError, so code that caught the
    ValueErrors raised before this class existed still catches it."""



class DamagedFile(UserError):
    """A file localgp wrote and reads back is not what it wrote (cut short, zeroed, another
    file's bytes, a directory in its place): one line naming the file, what is wrong with it, and
    what recreates it."""

    def __init__(self, path, why: str, fix: str) -> None:
        self.path, self.why, self.fix = path, " ".join(str(why).split()), fix
        super().__init__(f"{path} is damaged ({self.why}): {fix}")


def reader_error(err: BaseException) -> str:
    """A reader's exception in brief, for DamagedFile's `why`: its type and first sentence (torch's
    zip reader adds a paragraph of advice)."""
    text = " ".join(str(err).split())
    first = text.split(". ", 1)[0].rstrip(".")
    return f"{type(err).__name__}: {first[:200]}" if first else type(err).__name__
