"""The one exception type a user can meet: printed as one line, exit status 2."""


class UserError(Exception):
    """A problem with the user's input or environment: what is wrong, where, what to do."""

    exit_code = 2
