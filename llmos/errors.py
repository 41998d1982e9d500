"""One error type for everything a user can get wrong.

The command line prints `error: <message>` and exits with code 2; the message
names the problem and what to do about it, on one line, never a traceback.
"""


class LlmosError(Exception):
    """A problem with the user's input: a missing file, a bad value, a model that does not fit."""
