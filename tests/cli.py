"""Running the `imgembed` command in tests: in this process through Typer's runner (fast: the
libraries are imported once), or as a real process where the process itself matters (exit
with the server still shared, signals, the terminal's encoding, output of the logging module)."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from imgembed.cli import app as cli_app
from imgembed.cli import catalog_commands, model_commands, serve_command, store_commands  # noqa: F401

IMGEMBED = str(Path(sys.executable).with_name("imgembed"))


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Ran:
    """The command in this process (`env`: variables set while it runs); an exception the
    command let escape fails the test (in a process it would have been a traceback)."""
    result = CliRunner().invoke(cli_app.app, [str(a) for a in args], input=stdin, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


def run_process(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [IMGEMBED, *args], capture_output=True, text=True, input=stdin, env=os.environ, timeout=300
    )
