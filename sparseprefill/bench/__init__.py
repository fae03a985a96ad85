"""Benchmarks (GPU): kernels and end to end."""

from __future__ import annotations

import argparse
from typing import Callable


def command_main(doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                 run_from_args: Callable[[argparse.Namespace], int], argv=None) -> int:
    """``python -m sparseprefill.bench.<name>``: the same options as ``sparseprefill bench <name>``
    (the first paragraph of the module docstring is the description)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
