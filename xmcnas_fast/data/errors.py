"""The one exception the data layer raises for bad input."""


class DataError(ValueError):
    """Bad or unusable input data. The message names the file and, where there is one, the line:
    ``path:line: what is wrong``."""


def where(path, line=None) -> str:
    """``path:line`` (or just ``path``) for the start of an error message."""
    return f"{path}:{line}" if line is not None else str(path)
