"""The ``otfuse`` command line: fuse, evaluate, train, inspect and interpolate users' own models.

::

    otfuse train --arch mlpnet --data fashion-mnist -o a.safetensors --seed 1
    otfuse inspect a.safetensors
    otfuse fuse a.safetensors b.safetensors -o fused.safetensors --data fashion-mnist --eval
    otfuse fuse a.pt b.pt --arch mypkg.nets:make:width=64 --arch mypkg.nets:make:width=32 \\
        --data my_inputs.pt -o fused.safetensors
    otfuse eval fused.safetensors --data my_images/
    otfuse interpolate a.safetensors b.safetensors --data fashion-mnist -o path/

Modules: :mod:`~otfuse.cli.options` (the fusion flags and ``--config`` keys, generated from
:class:`otfuse.FusionConfig`), :mod:`~otfuse.cli.models` (``--arch``, ``--in-shape``, loading and
checking checkpoints), :mod:`~otfuse.cli.sources` (``--data``: named datasets or own files),
:mod:`~otfuse.cli.report` (what is printed and written), :mod:`~otfuse.cli.commands` (one module per
command).

Output: results on stdout; progress (a bar on a terminal, else one line per stage) and warnings on
stderr; ``-q`` prints the results only; ``--json`` prints one JSON object on stdout.

Exit codes: 0 success; 1 a bad input (file, data, models) or an operation that cannot be done (a
diverged training run included); 2 a wrong command line or config; 130 interrupted. Every error is
one line on stderr, ``otfuse: error: ...``; every file is written atomically, so a failed run
leaves no partial file.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Iterator, Sequence

import otfuse
from otfuse.cli.common import PROG, ArgumentParser, Report, UsageError, jsonable
from otfuse.cli.models import parse_arch
from otfuse.errors import OtfuseError

__all__ = ["PROG", "Report", "UsageError", "build_parser", "main", "parse_arch"]


def build_parser() -> ArgumentParser:
    from otfuse.cli.commands import add_all

    parser = ArgumentParser(
        prog=PROG,
        description="Fuse trained PyTorch models by aligning their neurons with optimal transport.",
        epilog="Run 'otfuse COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {otfuse.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_all(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0, 1 user error, 2 usage, 130 interrupted)."""
    parser = build_parser()
    quiet = False
    try:
        with _one_line_warnings(lambda: quiet):
            args = parser.parse_args(argv)
            quiet = args.quiet
            stdout = sys.stdout
            # in --json mode anything a library prints goes to stderr; stdout holds one JSON object
            redirect = (
                contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
            )
            with redirect:
                report: Report = args.handler(args)
    except UsageError as exc:
        return _fail(exc, 2)
    except OtfuseError as exc:
        return _fail(exc, 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    if args.json:
        print(json.dumps(jsonable(report.payload), indent=2), file=stdout)
        return 0
    lines = [report.text] if report.text else []
    if not args.quiet:
        lines += report.notes
    if lines:
        print("\n".join(lines), file=stdout)
    return 0


def _fail(error: BaseException | str, status: int) -> int:
    print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return status


@contextlib.contextmanager
def _one_line_warnings(quiet) -> Iterator[None]:
    """Warnings as one line each on stderr (none with --quiet)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not quiet():
            print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
