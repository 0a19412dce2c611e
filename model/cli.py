"""What every command-line entry point of the repo shares: exit codes, one-line errors, quiet broken pipes.

Exit codes (all CLIs, the C `mmoe-run` included):
    0  success
    2  bad input: a wrong argument, a missing / malformed / unsafe file, an invalid recipe. One line on stderr,
       "error: <what> ...", naming the file / option / key. (argparse's own usage errors also exit 2.)
    1  an unexpected internal failure: one line on stderr pointing at --debug (or MOBILEMOE_DEBUG=1), which
       re-raises with the full traceback.
A closed stdout (`... | head`) ends the program quietly with 0.

Torch-free (the phone-side CLI uses it).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(ValueError):
    """An expected failure caused by the user's input: printed as one line, exit 2."""


# Exceptions that mean "your input is wrong" wherever they escape a CLI (a missing file, a parse error, a value
# out of range, a file we refuse to overwrite).
EXPECTED = (BadInput, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
            PermissionError, KeyError, OSError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default and keeps the module docstring's line breaks."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the one-line error convention: a usage error is "error: <prog>: <what> (see --help)" on
    stderr and exit 2, without the multi-line usage block (--help still prints it). Sub-parsers inherit it."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    return ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def choices(values: Sequence[str]) -> str:
    """The one style for lists of choices in help and errors: 'a | b | c'."""
    return " | ".join(values)


# ---- argparse types: validated at parse time, so a bad value is a usage error (exit 2) naming the option ------
def _num(kind: type, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         hi_open: bool = False) -> Callable[[str], float]:
    def conv(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {s!r}") \
                from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be finite, got {s!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo:g}, got {s!r}")
        if hi is not None and (v >= hi if hi_open else v > hi):
            raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi:g}, got {s!r}")
        return v
    conv.__name__ = kind.__name__  # argparse names the type in its message
    return conv


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    return _num(int, lo, hi)


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[str], float]:
    return _num(float, lo, hi, lo_open, hi_open)


def one_of(values: Sequence[str]) -> Callable[[str], str]:
    """An argparse type for a fixed list of names, erroring in the choices() style (argparse's own `choices=`
    words its error differently)."""
    def conv(s: str) -> str:
        if s not in values:
            raise argparse.ArgumentTypeError(f"expected {choices(values)}, got {s!r}")
        return s
    conv.__name__ = "choice"
    return conv


positive_int = int_range(1)
nonneg_int = int_range(0)
positive_float = float_range(0.0, lo_open=True)
finite_float = float_range()


def _debug(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("MOBILEMOE_DEBUG", "") not in ("", "0")


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Call main(argv) and turn every failure into the exit codes above. `--debug` anywhere in argv is removed
    before main sees it and makes failures re-raise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        rc = main(argv)
        sys.stdout.flush()
        return EXIT_OK if rc is None else int(rc)
    except SystemExit as e:  # argparse (2) and explicit exits keep their codes
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_BAD_INPUT)
    except BrokenPipeError:
        # the reader went away (`| head`): point stdout at devnull so the interpreter's final flush is silent
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except EXPECTED as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001  (last resort: no traceback reaches a user unless asked for)
        if debug:
            raise
        print(f"error: internal error ({type(e).__name__}: {one_line(e)}); rerun with --debug for the traceback",
              file=sys.stderr)
        return EXIT_INTERNAL


def one_line(e: BaseException) -> str:
    msg = str(e)
    if isinstance(e, KeyError) and e.args:
        msg = f"missing key {e.args[0]!r}"
    if isinstance(e, OSError) and e.filename and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    msg = " ".join(msg.split())
    return msg or type(e).__name__
