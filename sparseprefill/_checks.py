"""Validators shared by the option dataclasses (``config.py``, ``decode_config.py``): each refuses a bad
value in one line that names the option, what was found and what is required."""

from __future__ import annotations

import enum
from typing import Any

from .kernels.common import MIN_TRITON_QUERY_BLOCK


def _check_fraction(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__} {value!r}")
    lower_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (lower_ok and value <= 1.0):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")


def _check_positive_int(name: str, value: int, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_spot_check(section: str, value: float | None, quantile: float | None = None) -> None:
    if value is not None:
        _check_fraction(f"{section}.spot_check_recall", value)
    if quantile is not None:
        _check_fraction(f"{section}.spot_check_quantile", quantile, allow_zero=True)
        if value is None:
            raise ValueError(f"{section}.spot_check_quantile is {quantile!r} but {section}.spot_check_recall is None: "
                             "the quantile chooses what the check compares with spot_check_recall; set both")


def _coerce_enum(config: Any, attribute: str, kind: type[enum.Enum], name: str) -> None:
    """Store ``config.attribute`` as a member of ``kind`` (a frozen dataclass takes its value's string)."""
    try:
        object.__setattr__(config, attribute, kind(getattr(config, attribute)))
    except ValueError:
        raise ValueError(f"{name} must be one of {[m.value for m in kind]}, "
                         f"got {getattr(config, attribute)!r}") from None


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _layer_indices(name: str, value: Any) -> tuple[int, ...]:
    """A collection of layer indices as a sorted tuple without repeats (checked: ints >= 0)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a tuple of layer indices, got {value!r}")
    layers = tuple(value)
    for layer in layers:
        _check_positive_int(f"{name}[]", layer, allow_zero=True)
    return tuple(sorted(set(layers)))


def _check_block_size(name: str, value: int) -> None:
    """Query/key block sizes: the GPU kernels tile them with power-of-two row counts (``tl.dot``'s
    minimum is ``MIN_TRITON_QUERY_BLOCK``); refused here rather than at the first long prompt."""
    _check_positive_int(name, value)
    if value < MIN_TRITON_QUERY_BLOCK or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {MIN_TRITON_QUERY_BLOCK}, got {value}")
