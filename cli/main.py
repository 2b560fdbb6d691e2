"""The ``mha`` command: one click group, one module per command, heavy imports inside commands."""

from __future__ import annotations

import click

from ._commands import COMMANDS


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mha-twin", prog_name="mha")
def cli():
    """Multi-head attention with twin backends (MLX and numpy): see what heads do, check
    implementations against a property suite, benchmark."""


for _name, _target in COMMANDS.items():
    cli.add_command(_target(), _name)
