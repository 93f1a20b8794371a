"""The error every stage of the data pipeline raises for data that cannot be used as given."""


class DataError(ValueError):
    """Training data that cannot be used as given; the message says what is wrong and what to do."""
