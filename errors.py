"""What minigpt says to its user when something is wrong, and where its progress lines go.

It sits at the bottom of the import chain (every module imports it, it imports nothing), so every layer that
checks user input can raise a UserError.
"""

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user. The CLI prints the message as one line on stderr and exits 2."""


Log = Callable[[str], None]  # where a function's progress lines go: stderr by default, a list in tests


def log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
