"""``python -m mha_cli``: the same as the ``mha`` command."""

from .main import cli

cli(prog_name="mha")
