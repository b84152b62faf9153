"""Errors a user can cause (bad file, bad config, bad flag).

The CLI prints a :class:`UserError` as one line and exits with code 2, without a
traceback. Library code raises it wherever the cause is the user's input.
"""


class UserError(Exception):
    """A problem with the user's input; ``str(err)`` is the one-line message."""

    exit_code = 2
