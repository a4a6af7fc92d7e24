"""User-facing errors: one clear sentence, exit code 2, never a traceback."""
import functools
import sys


class UserError(Exception):
    """An error the user caused (bad flag, bad file, impossible combination).

    The message is one sentence that names the problem and the fix.
    """


def cli_main(func):
    """Decorate a script's main(): turn UserError into `error: ...` and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
