"""The ``mha`` command: one click group, one module per command, heavy imports inside commands."""

from __future__ import annotations

import errno
import sys

import click

from ._commands import COMMANDS


class OneLineGroup(click.Group):
    """click's group with errors as one line on stderr (DESIGN: "usage errors exit 2 with one clear
    line"): click's own format takes four (Usage, Try, a blank line, Error)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as err:
            # a value refused says what was expected; a malformed command line points to the help
            where = (f" (see '{err.ctx.command_path} --help')" if err.ctx is not None
                     and not isinstance(err, click.BadParameter) else "")
            click.echo(f"Error: {err.format_message()}{where}", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"Error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except (click.Abort, EOFError, KeyboardInterrupt):
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except OSError as err:
            if err.errno != errno.EPIPE:  # a closed pipe (mha demo ... | head) is not an error of ours
                raise
            sys.stdout = click.utils.PacifyFlushWrapper(sys.stdout)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)  # --help and --version return their exit code


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mha-twin", prog_name="mha")
def cli():
    """Multi-head attention with twin backends (MLX and numpy): see what heads do, check
    implementations against a property suite, benchmark."""


for _name, _target in COMMANDS.items():
    cli.add_command(_target(), _name)
