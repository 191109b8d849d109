"""The one error type of the data package."""


class DatasetError(ValueError):
    """A dataset is missing, malformed or inconsistent; the message names the file."""
