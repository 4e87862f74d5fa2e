"""`python -m stoppoint`: the `stoppoint` command."""

from ._cli import entry_point

entry_point()
