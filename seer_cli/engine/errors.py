"""Errors a user can cause: the CLI prints the message as one line and exits with code 1."""


class SeerError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""
