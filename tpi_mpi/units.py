"""Memory sizes as users write them: 1.5GB (decimal), 800MiB (binary), 4G, or a plain number of bytes."""

from __future__ import annotations

import re
from typing import Any

from tpi_mpi.errors import UserError

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
          "ti": 2**40, "tib": 2**40}


def parse_size(value: Any, key: str, examples: str = "1.5GB, 800MiB or 2000000000") -> int:
    """Bytes from `value`; anything else is one UserError naming `key`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = _SIZE.fullmatch(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"{key}={value!r} is not a size: write e.g. {examples}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
