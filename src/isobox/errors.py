"""The one exception type the command lines turn into a single line on stderr and exit 1."""


class IsoboxError(Exception):
    """A user-facing failure: the message is one line saying what is wrong and what to do."""
