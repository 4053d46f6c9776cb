"""Decoding the binary window encoding, ``application/vnd.lrserve.window`` (docs/api.md).

Asked for whenever numpy is importable (the SDK core needs only httpx: without numpy the
client asks for JSON). Decoding is a handful of numpy operations per column (a raw column is
a view of the body; a scaled one a multiply and an integer add), so a 256-group window costs
about what a one-group window does, and numpy releases the GIL in its loops, so a refresh in
a background thread does not hold up the training loop.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["ACCEPT", "MEDIA_TYPE", "DecodedWindow", "binary_supported", "decode_window"]

MEDIA_TYPE = "application/vnd.lrserve.window"
#: What the SDK sends: the binary encoding, JSON from a server without it.
ACCEPT = f"{MEDIA_TYPE}, application/json;q=0.5"
_MAGIC = b"LRW1"
_RESIDUAL_DTYPES = {"i1": "<i1", "i2": "<i2"}


@lru_cache(maxsize=1)
def binary_supported() -> bool:
    """Whether numpy can be imported here (the binary encoding needs it)."""
    try:
        return importlib.util.find_spec("numpy") is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class DecodedWindow:
    """A decoded window: ``array[i, j]`` is series ``series[j]`` at step ``start + i``."""

    run: str
    start: int
    count: int
    version: int
    series: list[tuple[str, str]]
    """``(group, field)`` of each column, in the server's order."""
    array: npt.NDArray[np.float64]
    """``count x len(series)`` float64 (Fortran order: the transpose of a column per series)."""

    def columns(self) -> dict[str, dict[str, list[float]]]:
        """``{group: {field: [value per step]}}``, as the JSON answer has them."""
        out: dict[str, dict[str, list[float]]] = {}
        by_series = self.array.T
        for j, (group, field) in enumerate(self.series):
            out.setdefault(group, {})[field] = by_series[j].tolist()
        return out


def decode_window(body: bytes) -> DecodedWindow:
    """Decode an ``application/vnd.lrserve.window`` body (ValueError if malformed)."""
    import numpy as np

    if len(body) < 8 or body[:4] != _MAGIC:
        raise ValueError("not an lrserve binary window (bad magic)")
    (hlen,) = struct.unpack_from("<I", body, 4)
    header: dict[str, Any] = json.loads(body[8 : 8 + hlen])
    base = 8 + hlen
    base += -base % 8
    count = int(header["count"])
    series = header["series"]
    res = header["residuals"]
    stream = b""
    if res["nbytes"]:
        at = base + int(res["offset"])
        stream = zlib.decompress(body[at : at + int(res["nbytes"])])
    # Column-major: each column one contiguous run, and the ``count x series`` array handed
    # out is its transpose, a view (a transposing copy of a 256-group window costs more than
    # all the rest of decoding; a step's row converts just as fast from a strided view).
    cols = np.empty((len(series), count), dtype=np.float64)
    for j, s in enumerate(series):
        kind = s["kind"]
        if kind == "raw":
            cols[j] = np.frombuffer(body, "<f8", count, base + int(s["offset"]))
        elif kind == "same":
            cols[j] = cols[int(s["of"])]
        elif kind == "scaled":
            np.multiply(cols[int(s["of"])], float(s["scale"]), out=cols[j])
            rtype = s["residual"]
            if rtype != "i0":
                residual = np.frombuffer(stream, _RESIDUAL_DTYPES[rtype], count, int(s["roffset"]))
                bits = cols[j].view(np.int64)
                np.add(bits, residual, out=bits)
        else:
            raise ValueError(f"unknown series kind {kind!r}")
    return DecodedWindow(
        run=str(header["run"]),
        start=int(header["start"]),
        count=count,
        version=int(header["version"]),
        series=[(str(s["group"]), str(s["field"])) for s in series],
        array=cols.T,
    )


def window_from_json(body: Any, run_id: str, start: int, count: int) -> DecodedWindow:
    """A JSON window answer as a :class:`DecodedWindow` (a server without the encoding)."""
    import numpy as np

    groups = body["groups"]
    series = [(str(g), str(f)) for g, fields in groups.items() for f in fields]
    n = int(body.get("count", count))
    array = np.empty((n, len(series)), dtype=np.float64)
    for j, (g, f) in enumerate(series):
        array[:, j] = np.asarray(groups[g][f], dtype=np.float64)
    return DecodedWindow(
        run=str(body.get("run", run_id)),
        start=int(body.get("start", start)),
        count=n,
        version=int(body["version"]),
        series=series,
        array=array,
    )
