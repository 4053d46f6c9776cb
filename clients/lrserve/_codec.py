"""Decoding the binary window encoding, ``application/vnd.lrserve.window`` (docs/api.md).

Asked for whenever numpy is importable (the SDK core needs only httpx: without numpy the
client asks for JSON). Decoding is a handful of numpy operations per block of columns (raw
columns a copy of the body; columns derived from one shape a multiply and integer adds of
bit-unpacked residuals, all at once), so a 256-group window costs a few times what a
one-group window does, and numpy releases the GIL in its loops, so a refresh in
a background thread does not hold up the training loop.
"""

from __future__ import annotations

import importlib.util
import json
import struct
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
_MAGIC = b"LRW2"
_WIDTHS = (0, 2, 4, 8, 16)


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


@lru_cache(maxsize=2)
def _lanes(width: int) -> npt.NDArray[Any]:
    """Byte -> its ``8 // width`` packed values (low bits first), as one wider integer."""
    import numpy as np

    per = 8 // width
    byte = np.arange(256, dtype=np.uint8)[:, None]
    lanes = (byte >> np.arange(0, 8, width, dtype=np.uint8)) & np.uint8((1 << width) - 1)
    return np.ascontiguousarray(lanes, dtype=np.uint8).view(f"<u{per}")[:, 0].copy()


def _unpack(body: bytes, at: int, rows: int, count: int, width: int) -> npt.NDArray[Any]:
    """``rows x count`` unsigned ``width``-bit residuals at ``at`` (2 and 4 bits: packed)."""
    import numpy as np

    if width >= 8:
        return np.frombuffer(body, f"<u{width // 8}", rows * count, at).reshape(rows, count)
    per_row = -(-count // (8 // width))
    packed = np.frombuffer(body, np.uint8, rows * per_row, at).reshape(rows, per_row)
    # One table look-up a byte: its 4 (or 2) values at once.
    return _lanes(width)[packed].view(np.uint8)[:, :count]


def decode_window(body: bytes) -> DecodedWindow:
    """Decode an ``application/vnd.lrserve.window`` body (ValueError if malformed)."""
    if len(body) < 8 or body[:4] != _MAGIC:
        if body[:3] == b"LRW":
            raise ValueError(
                f"unsupported lrserve binary window format {body[:4]!r} (this SDK reads "
                f"{_MAGIC!r}): upgrade the SDK or the server, or ask for JSON"
            )
        raise ValueError("not an lrserve binary window (bad magic)")
    try:
        return _decode(body)
    except (KeyError, TypeError, IndexError, AttributeError, OverflowError) as e:
        raise ValueError(f"malformed lrserve binary window: {e!r}") from e


def _decode(body: bytes) -> DecodedWindow:
    import numpy as np

    (hlen,) = struct.unpack_from("<I", body, 4)
    header: dict[str, Any] = json.loads(body[8 : 8 + hlen])
    base = 8 + hlen
    base += -base % 8
    count = int(header["count"])
    series = [(str(g), str(f)) for g, f in header["series"]]
    n = len(series)
    # Column-major: each column one contiguous run, and the ``count x series`` array handed
    # out is its transpose, a view (a transposing copy of a 256-group window costs more than
    # all the rest of decoding; a step's row converts just as fast from a strided view).
    cols = np.empty((n, count), dtype=np.float64)
    filled = np.zeros(n, dtype=bool)
    for block in header["blocks"]:
        kind = block["kind"]
        idx = np.asarray(block["series"], dtype=np.intp)
        rows = idx.size
        if not rows or idx.min() < 0 or filled[idx].any():
            raise ValueError(f"a {kind!r} block fills no column, or one already filled")
        # Consecutive columns (the common case): written in place.
        run = bool(idx[-1] - idx[0] + 1 == rows and (np.diff(idx) > 0).all())
        out = cols[int(idx[0]) : int(idx[-1]) + 1] if run else np.empty((rows, count))
        if kind == "raw":
            at = base + int(block["offset"])
            out[:] = np.frombuffer(body, "<f8", rows * count, at).reshape(rows, count)
        elif kind == "same":
            of = np.asarray(block["of"], dtype=np.intp)
            if (of.size and of.min() < 0) or not filled[of].all():
                raise ValueError("a 'same' block refers to a column not decoded yet")
            out[:] = cols[of]
        elif kind in ("scaled", "affine"):
            of_one = int(block["of"])
            if of_one < 0 or not filled[of_one]:
                raise ValueError(f"a {kind!r} block refers to a column not decoded yet")
            scale = np.asarray(block["scale"], dtype=np.float64).reshape(rows, 1)
            np.multiply(scale, cols[of_one], out=out)
            if kind == "affine":
                np.add(out, np.asarray(block["offset"], dtype=np.float64).reshape(rows, 1), out=out)
            bits = out.view(np.int64)
            offsets = np.asarray(block["base"], dtype=np.int64).reshape(rows, 1)
            width = int(block["width"])
            if width not in _WIDTHS:
                raise ValueError(f"unknown residual width {width!r}")
            residual = None
            if width:
                residual = _unpack(body, base + int(block["roffset"]), rows, count, width)
                if width <= 4 and offsets.min() >= -128 and offsets.max() + (1 << width) <= 128:
                    # base + residual fits int8: one narrow add, then a single int64 add.
                    residual = (residual + offsets.astype(np.int8).view(np.uint8)).view(np.int8)
                    offsets = offsets[:0]
                np.add(bits, residual, out=bits, casting="unsafe")
            if offsets.any():
                np.add(bits, offsets, out=bits)
        else:
            raise ValueError(f"unknown series kind {kind!r}")
        if not run:
            cols[idx] = out
        filled[idx] = True
    if not filled.all():
        raise ValueError("columns missing from the window")
    return DecodedWindow(
        run=str(header["run"]),
        start=int(header["start"]),
        count=count,
        version=int(header["version"]),
        series=series,
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
