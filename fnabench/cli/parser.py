"""The argument parser every fnabench command uses: a usage mistake is one line on stderr, exit 2."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` without the usage block on errors; ``--help`` still shows it.

    Sub-parsers inherit the class (``add_subparsers`` defaults to the parent's type), so a whole
    command tree built from one of these reports errors the same way.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
