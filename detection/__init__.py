"""Detection models, training and prediction for lungdet."""

from importlib.metadata import PackageNotFoundError, version


def lungdet_version() -> str:
    """The installed lungdet's version (what exports and replies record), 'unknown' from a checkout that was never installed."""
    try:
        return version("lungdet")
    except PackageNotFoundError:
        return "unknown"
