"""Benchmarks (GPU; each has a CPU ``--dry-run`` or a no-GPU message), ``sparseprefill bench TARGET``:

- ``kernels``: sparse kernels vs SDPA and FlexAttention; ``e2e``: TTFT of full-size architectures;
- ``decode``: top-k KV page retrieval for decode; ``follow_up``: a follow-up chunk over a long cache;
- ``layer``: torch.profiler breakdown of one layer.

Shared pieces: ``common`` (timing, SDPA backends, run metadata, CSV), ``models`` (shipped architecture
configs, random-weight models), ``budget`` (fixed sparse budgets); ``plot`` and ``e2e_plot`` draw PNGs.
"""

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
