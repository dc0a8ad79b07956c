"""The ``deadlift`` command line: commands parse, call the library, and render."""

from deadlift.cli.app import main

__all__ = ["main"]
