"""The error every stage of the data pipeline raises for data that cannot be used as given."""

from ..errors import UserError


class DataError(UserError):
    """Training data that cannot be used as given; the message says what is wrong and what to do."""
