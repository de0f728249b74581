"""Command-line interface: diffusionseg segment, train, pretrain, evaluate, bench, models (install, download, clear).

One module per subcommand (``add_parser`` and ``run``); this one assembles the parser and runs a
command. User errors (DiffusionSegError) and usage errors are printed as one line on stderr with exit
status 2; no output file is left behind (the writers are all-or-nothing). Inputs that do not fit
the model give one "diffusionseg: warning:" line each before sampling (refusals with --strict).
SIGTERM ends a run like Ctrl+C does (temporary files removed), with exit status 143. A closed
stdout pipe (``diffusionseg models --json | head -1``) ends the program quietly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import NoReturn

from DiffusionSegLib import __version__
from DiffusionSegLib.cli import bench, evaluate, models, pretrain, segment, train
from DiffusionSegLib.cli.protocol import ERROR_PREFIX
from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.pipeline.inputcheck import InputMismatchError

log = logging.getLogger("diffusionseg")

DESCRIPTION = ("Segment medical images with conditional diffusion models and show how sure the model is: fused "
               "mask, consistency, ambiguity, uncertainty and sample diversity.")


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line, like every other error of the CLI.

    argparse prints the (multi-line) usage before its message; programs reading stderr (the Slicer
    module shows the last "diffusionseg: error:" line) and people alike need only the message.
    Subparsers inherit the class, so this holds for every subcommand. Exit status stays 2.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{ERROR_PREFIX}{message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusionseg", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"diffusionseg {__version__}",
                        help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands (diffusionseg COMMAND --help for its options)")
    for command in (segment, train, pretrain, evaluate, bench, models):
        command.add_parser(sub)
    return parser


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head -1``): end quietly, as Unix tools do.

    stdout is pointed at the null device so that the interpreter's final flush cannot raise the
    same error again (and print "Exception ignored ... BrokenPipeError").
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 128 + getattr(signal, "SIGPIPE", 13)


class _Terminated(BaseException):
    """Raised by the SIGTERM handler: unwinds the run like KeyboardInterrupt, cleaning up on the way."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="diffusionseg: %(levelname)s: %(message)s")
    # SIGTERM (a cancel from the Slicer module, `timeout`, a job scheduler) would otherwise end the
    # process on the spot and leave the hidden staging folder in the output folder.
    try:
        previous, installed = signal.signal(signal.SIGTERM, _on_sigterm), True
    except ValueError:  # not the main thread (main() called from a thread): keep the default
        previous, installed = None, False
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe must land in the handler below
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except InputMismatchError as err:  # --strict: each reason is a refusal of its own
        for warning in err.warnings:
            print(f"{ERROR_PREFIX}{warning.message}", file=sys.stderr)
        return 2
    except DiffusionSegError as err:
        print(f"{ERROR_PREFIX}{err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffusionseg: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("diffusionseg: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    raise SystemExit(main())
