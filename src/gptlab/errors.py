"""The user's mistakes, as one type: what every layer raises for input it cannot use as given.

The command line prints a UserError as one line and exits with code 2; any other exception is a bug in
gptlab and keeps its traceback. UserError is a ValueError, so code that catches ValueError still does.
A DownloadError is not the user's mistake either: the network or an optional package is missing, and the
message says what to fetch by hand.
"""


class UserError(ValueError):
    """Input that cannot be used as given (an option, a file, a folder): the message says what is wrong
    and what to do."""


class DownloadError(Exception):
    """The Hub could not be reached (or huggingface_hub is missing): the files must be fetched by hand."""
