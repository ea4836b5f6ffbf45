"""Errors a user can act on. The CLI prints them without a traceback and exits with code 2."""


class InputError(Exception):
    """Bad input (data, config, flags): the message names the file, line and the fix."""

    exit_code = 2
