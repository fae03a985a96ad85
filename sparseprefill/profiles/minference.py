"""Import MInference's per-head pattern files as sparseprefill profiles.

MInference (github.com/microsoft/MInference, ``minference/configs/*.json``) stores, per model, a
JSON list over layers; each layer is an object mapping the query-head index (a string) to
``[pattern_name, vertical_size, slash_size, score]``. What the sizes mean was read from MInference's
source, ``minference/modules/minference_forward.py`` (``gather_last_q_vertical_slash_topk_v4`` and
``minference_prefill_kernel``: the kernels that run a loaded config), ``ops/streaming_kernel.py`` and
``ops/block_sparse_flash_attention.py``:

* ``vertical_and_slash`` (``vertical_and_slash_kernel``): the sizes are first clamped to
  ``max(vertical_size, 30)`` and ``max(slash_size, 50)``; then ``vertical[..., :30] = inf`` and
  ``slash[..., -100:] = inf`` force the first 30 key columns and the 100 nearest diagonals into the
  top-k, and ``topk(vertical, vertical_size)`` / ``topk(slash, slash_size)`` take the totals. So
  the sizes are *total* counts that include the forced lines. Our ``max_vertical``/``max_slash``
  count only the lines beyond the always-kept ``sink_tokens``/``local_tokens``, so the import is
  ``sink_tokens=30``, ``local_tokens=min(100, slash)``, ``max_vertical=vertical-30``,
  ``max_slash=slash-local`` with masses 1.0 (keep-all capped at the count = a fixed top-k). Where
  nothing is left beyond the forced lines (vertical_size <= 30, or slash_size <= 100, both common
  in MInference's shipped files) the mass is 0.0, which keeps exactly the forced lines.
  MInference estimates from the last 64 queries in 64-query blocks, as VerticalSlashConfig's
  defaults do.
* ``stream_llm`` (``streaming_forward(q, k, v, n_init=vertical_size, n_local=slash_size)``): the
  first ``vertical_size`` keys plus a sliding window whose mask is ``0 <= q - k < n_local``, i.e.
  the ``slash_size`` nearest diagonals, no clamping: ``a_shape(sink_tokens=vertical_size,
  local_tokens=slash_size)``.
* ``block_sparse`` (``block_sparse_kernel``): the sizes are ignored; it always calls
  ``block_sparse_attention(q, k, v, top_k=100)`` with 64x64 blocks: each 64-query block keeps its
  100 best key blocks by mean-pooled q.k, i.e. 6400 keys. We keep the same key budget at the block
  size the profile will run with: ``top_k = ceil(100 * 64 / block_size_q)``. Our block_sparse also
  keeps the sink and diagonal blocks on top of ``top_k``, so it keeps at least MInference's budget.

The fourth entry (``score``) is the search's quality number for the head; it is checked to be a
finite number and otherwise not used (its meaning differs between MInference's search versions).
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from .._version import __version__
from ..config import DEFAULT_BLOCK_SIZE, KEEP_ALL_MASS, PatternName
from .fields import ProfileError, _req_array, _req_int, _req_number, _req_object, _show
from .identity import model_identity
from .io import _read_json_file
from .schema import Calibration, HeadSetting, Profile

__all__ = ["import_minference", "MINFERENCE_PATTERNS", "MINFERENCE_SEARCH_LENGTH"]

MINFERENCE_PATTERNS = ("vertical_and_slash", "stream_llm", "block_sparse")

# vertical_and_slash_kernel: ``min(q_len, max(vertical_size, 30))``, ``min(q_len, max(slash_size, 50))``.
MINFERENCE_MIN_VERTICAL = 30
MINFERENCE_MIN_SLASH = 50
# ``vertical[..., :30] = inf``: the first 30 key columns are always among the kept verticals.
MINFERENCE_SINK_COLUMNS = 30
# ``slash[..., -100:] = inf``: the 100 nearest diagonals are always among the kept slashes.
MINFERENCE_LOCAL_DIAGONALS = 100
# block_sparse_kernel: ``block_sparse_attention(q, k, v, topk=100)`` with 64x64 blocks.
MINFERENCE_BLOCK_TOP_K = 100
MINFERENCE_BLOCK_SIZE = 64

# The context length in the names of MInference's shipped configs for most models
# (``..._128k_kv_out_v32_fit_o_best_pattern.json``), i.e. the length its offline search ran at. Pass
# the real one as ``calibration_length`` when it is known (some files say 262k or 1M).
MINFERENCE_SEARCH_LENGTH = 131072

# Objective recorded for imported profiles: nothing was measured by sparseprefill itself.
IMPORT_OBJECTIVE = "minference_import"
IMPORT_SAMPLES = 0
IMPORT_TARGET = 1.0

_ENTRY_FIELDS = ("pattern_name", "vertical_size", "slash_size", "score")


def _vertical_slash(vertical_size: int, slash_size: int) -> dict[str, Any]:
    vertical_total = max(vertical_size, MINFERENCE_MIN_VERTICAL)
    slash_total = max(slash_size, MINFERENCE_MIN_SLASH)
    sink = min(MINFERENCE_SINK_COLUMNS, vertical_total)
    local = min(MINFERENCE_LOCAL_DIAGONALS, slash_total)
    extra_vertical = vertical_total - sink
    extra_slash = slash_total - local
    return {
        # Mass 1.0 with a cap is a fixed top-k of that many lines; mass 0.0 keeps the forced ones only.
        "vertical_mass": KEEP_ALL_MASS if extra_vertical else 0.0,
        "slash_mass": KEEP_ALL_MASS if extra_slash else 0.0,
        "max_vertical": extra_vertical or None,
        "max_slash": extra_slash or None,
        "sink_tokens": sink,
        "local_tokens": local,
    }


def _block_top_k(block_size_q: int) -> int:
    return math.ceil(MINFERENCE_BLOCK_TOP_K * MINFERENCE_BLOCK_SIZE / block_size_q)


def _head_setting(entry: Any, path: str, block_size_q: int) -> HeadSetting:
    entry = _req_array(entry, path)
    if len(entry) != len(_ENTRY_FIELDS):
        raise ProfileError(path, f"must be [{', '.join(_ENTRY_FIELDS)}] ({len(_ENTRY_FIELDS)} items), got {len(entry)} items")
    name, vertical_size, slash_size, score = entry
    if name not in MINFERENCE_PATTERNS:
        allowed = ", ".join(repr(p) for p in MINFERENCE_PATTERNS)
        raise ProfileError(f"{path}[0]", f"unknown MInference pattern {_show(name)}; allowed: {allowed}")
    vertical_size = _req_int(vertical_size, f"{path}[1]", 1)
    slash_size = _req_int(slash_size, f"{path}[2]", 1)
    _req_number(score, f"{path}[3]")
    if name == "vertical_and_slash":
        return HeadSetting(PatternName.VERTICAL_SLASH, _vertical_slash(vertical_size, slash_size))
    if name == "stream_llm":
        return HeadSetting(PatternName.A_SHAPE, {"sink_tokens": vertical_size, "local_tokens": slash_size})
    return HeadSetting(PatternName.BLOCK_SPARSE, {"mass": KEEP_ALL_MASS, "top_k": _block_top_k(block_size_q)})


def _layer(obj: Any, path: str, num_heads: int, block_size_q: int) -> tuple[HeadSetting, ...]:
    obj = _req_object(obj, path)
    if len(obj) != num_heads:
        raise ProfileError(path, f"{len(obj)} heads, the model has {num_heads}")
    by_index: dict[int, Any] = {}
    for key, entry in obj.items():
        key_path = f"{path}[{json.dumps(key)}]"
        # Canonical decimal only: "07" or " 7" would be a second spelling of head 7.
        if not (key.isascii() and key.isdigit() and str(int(key)) == key):
            raise ProfileError(key_path, "head index must be a decimal integer string such as \"0\"")
        index = int(key)
        if index >= num_heads:
            raise ProfileError(key_path, f"head index out of range 0..{num_heads - 1}")
        by_index[index] = (entry, key_path)
    # len(obj) == num_heads and every key is a distinct index < num_heads, so all are present.
    return tuple(_head_setting(*by_index[h], block_size_q) for h in range(num_heads))


def import_minference(
    source: str | os.PathLike[str] | Sequence[Any],
    model_config: Any,
    *,
    block_size_q: int = DEFAULT_BLOCK_SIZE,
    calibration_length: int = MINFERENCE_SEARCH_LENGTH,
) -> Profile:
    """A profile from an MInference pattern file (path) or its parsed list.

    Args:
        source: MInference's ``*_best_pattern*.json`` or the list it holds.
        model_config: the (duck-typed) transformers config of the model it is for; its layer and
            query-head counts must equal the file's.
        block_size_q: the block size (``BlockSparseConfig.block_size``) the profile's block_sparse
            heads will run with; MInference's 100 blocks of 64 keys become ``ceil(6400 / block_size_q)``
            blocks. The default is SparseConfig's default block size.
        calibration_length: the context length MInference's search ran at, recorded in
            ``calibration.lengths``.

    Raises ProfileError naming the path (``minference[3]["7"][1]``) of any malformed entry.
    """
    _req_int(block_size_q, "block_size_q", 1)
    _req_int(calibration_length, "calibration_length", 1)
    if isinstance(source, (str, os.PathLike)):
        file_name = os.path.basename(os.fspath(source))
        data = _read_json_file(source)
    else:
        file_name, data = "in-memory", source
    identity = model_identity(model_config)
    try:
        layers_obj = _req_array(data, "minference")
        if len(layers_obj) != identity.num_layers:
            raise ProfileError("minference", f"{len(layers_obj)} layers, the model has {identity.num_layers}")
        layers = tuple(
            _layer(layer, f"minference[{i}]", identity.num_query_heads, block_size_q) for i, layer in enumerate(layers_obj)
        )
    except ProfileError as exc:
        if isinstance(source, (str, os.PathLike)):
            raise ProfileError(exc.path, exc.problem, os.fspath(source)) from None
        raise

    calibration = Calibration(
        source=f"minference:{file_name}",
        lengths=(calibration_length,),
        samples=IMPORT_SAMPLES,
        objective=IMPORT_OBJECTIVE,
        target=IMPORT_TARGET,
        tool_version=__version__,
        date=datetime.date.today().isoformat(),
    )
    return Profile(model=identity, calibration=calibration, layers=layers)

