"""``python -m lungdet``: the same command as ``lungdet``."""

from lungdet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
