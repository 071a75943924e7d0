"""The one rule for how fnabench commands end, in one place.

A mistake in what the user asked (a bad config, an unknown name, a path that cannot be written, a
missing extra) is one line on stderr naming what is wrong and what is accepted, exit 2, no
traceback. Exit 1 is kept for what a command found (``check``: a regression; ``run``: failed
cells). A service the machine needs that refuses or cannot be reached (a SLURM controller, its
``sbatch``/``squeue``/``sacct``) is one line quoting that service, exit 4: the machine, not the input.
Anything else (a bug, a full disk) is a traceback and exit 3, so CI can tell them apart.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

EXIT_OK = 0
EXIT_FOUND = 1  # check: a regression; run: some cells failed (their records say why)
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_ENVIRONMENT = 4  # a service the machine needs refused or is unreachable (scheduler): not the input's fault
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports `cmd | head`


class UserError(Exception):
    """Base of every error that means "the input was wrong": the top level prints its one line, exit 2."""


class ConfigError(UserError, ValueError):
    """A config file or value that cannot be used (a sweep, an ``[executor]`` table, a recall run); one line
    naming what is wrong and what is accepted. The harness and the recall suite re-export it."""


class TaskError(UserError, ValueError):
    """A task that cannot run as asked (unknown dataset, bad option); one line saying what is accepted.

    Raised by the tasks and by the data they read (``fnabench.tasks.base`` re-exports it)."""


class EnvironmentFault(Exception):
    """A service the machine needs refused the work or cannot be reached (e.g. the SLURM controller); the message
    quotes it in one line. Not a :class:`UserError`: the input may be fine; exit 4."""


def one_line(err: BaseException) -> str:
    """An error's message on one line (what ``str`` gives, whitespace collapsed)."""
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    return text or type(err).__name__


def guarded(prog: str, command: Callable[[], int]) -> int:
    """Run ``command`` under the rule above; returns the exit status."""
    try:
        return command()
    except UserError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except EnvironmentFault as err:
        print(f"{prog}: error (the machine, not your input): {one_line(err)}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except BrokenPipeError:  # `fnabench leaderboard ... | head` closed our stdout
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as err:
        if err.filename is None:
            return _internal(prog)
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)  # a path that cannot be read or written
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished work is saved, run again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        return _internal(prog)


def _internal(prog: str) -> int:
    """Not the input's fault: the traceback, then one line saying so."""
    traceback.print_exc()
    print(f"{prog}: internal error, not a mistake in your input; unless the machine is at fault (disk, memory), "
          "please report it with the traceback above", file=sys.stderr)
    return EXIT_INTERNAL


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
