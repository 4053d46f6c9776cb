"""The binary window encoding, ``application/vnd.lrserve.window`` (see docs/api.md).

A window in JSON repeats what groups share: at 256 layer-wise groups of one schedule shape a
4,096-step window is 27 MB of decimal text that a trainer parses value by value. This
encoding sends little-endian float64 columns after a small JSON header, and a column that is
another column times a constant (layer-wise decay: one shape, a base rate per group) as that
constant plus the difference, in units in the last place, between the product and the
column's own bits: small integers (int8 or int16), zlib-compressed. It is lossless: every
encoded column is decoded here at encode time and compared bit for bit, and a column whose
difference does not fit (or does not round-trip) is sent raw. Identical columns are sent once.

Layout::

    b"LRW1" | uint32 LE header length | header (UTF-8 JSON) | zero padding to 8 bytes | payload

The header: ``run``, ``start``, ``count``, ``version``, ``residuals`` (``offset``,
``nbytes`` of the zlib stream in the payload) and ``series``: one entry per (group, field),
in the JSON answer's order, each ``{"group", "field", "kind", ...}`` with ``kind``
``"raw"`` (``offset``: ``count`` float64 at that payload offset), ``"same"`` (``of``: the
index of an earlier series with identical bits) or ``"scaled"`` (``of``: a raw series,
``scale``; ``residual``: ``"i0"`` for none, or ``"i1"``/``"i2"`` with ``roffset``, the
offset in the decompressed residual stream of ``count`` int8/int16). A scaled column is
``((raw * scale).view(int64) + residual).view(float64)``.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np
import numpy.typing as npt

MEDIA_TYPE = "application/vnd.lrserve.window"
MAGIC = b"LRW1"
# Raw columns a new column is tried against as a shape (the most recent ones): bounded, so a
# window of unrelated columns costs at most this many trials per column.
_MAX_SHAPES = 4
_RESIDUAL_TYPES = ((np.int8, "i1"), (np.int16, "i2"))


def wants_binary(accept: str | None) -> bool:
    """Whether an ``Accept`` header prefers the binary window encoding over JSON.

    Only an explicit mention of :data:`MEDIA_TYPE` with a quality above 0 and at least that
    of ``application/json`` selects it; anything else, a malformed header included, gets
    JSON (the default, what curl and browsers see).
    """
    if not accept or MEDIA_TYPE not in accept:
        return False
    ours = json_q = -1.0
    for part in accept.split(","):
        kind, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0  # a malformed quality counts as "not acceptable"
                if not 0.0 <= q <= 1.0:
                    q = 0.0
        kind = kind.strip().lower()
        if kind == MEDIA_TYPE:
            ours = max(ours, q)
        elif kind == "application/json":
            json_q = max(json_q, q)
    return ours > 0 and ours >= json_q


def _as_bits(a: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    return np.ascontiguousarray(a, dtype="<f8").view("<i8")


def _scaled(
    col: npt.NDArray[np.float64], shape: npt.NDArray[np.float64]
) -> tuple[float, str, npt.NDArray[Any] | None] | None:
    """``(scale, residual type, residual)`` reproducing ``col`` bitwise from ``shape``."""
    mag = np.abs(shape)
    i = int(np.argmax(mag))
    if not np.isfinite(mag[i]) or mag[i] == 0.0:
        return None
    with np.errstate(all="ignore"):
        scale = float(col[i] / shape[i])
        if not np.isfinite(scale) or scale == 0.0:
            return None
        predicted = _as_bits(shape * scale)
        diff = _as_bits(col) - predicted  # wraps on overflow; then it does not fit below
    lo, hi = int(diff.min()), int(diff.max())
    if lo == 0 and hi == 0:
        return scale, "i0", None
    for dtype, name in _RESIDUAL_TYPES:
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            residual = diff.astype(dtype)
            # Decode as a client would, and compare bits: lossless or not used.
            back = predicted + residual.astype(np.int64)
            if np.array_equal(back, _as_bits(col)):
                return scale, name, residual
            return None
    return None


def encode_window(
    run_id: str, start: int, count: int, version: int, values: dict[str, dict[str, Any]]
) -> bytes:
    """The binary encoding of a window (``values``: group -> field -> float64 array)."""
    series: list[dict[str, Any]] = []
    payload: list[bytes] = []
    offset = 0
    residuals: list[bytes] = []
    roffset = 0
    by_crc: dict[int, list[tuple[int, npt.NDArray[np.int64]]]] = {}
    shapes: list[tuple[int, npt.NDArray[np.float64]]] = []
    for group, fields in values.items():
        for field, raw in fields.items():
            col = np.ascontiguousarray(raw, dtype="<f8")
            bits = col.view("<i8")
            entry: dict[str, Any] = {"group": group, "field": field}
            crc = zlib.crc32(bits.tobytes())
            same = next(
                (j for j, b in by_crc.get(crc, ()) if np.array_equal(b, bits)),
                None,
            )
            if same is not None:
                entry.update(kind="same", of=same)
                series.append(entry)
                continue
            index = len(series)
            by_crc.setdefault(crc, []).append((index, bits))
            for j, shape in reversed(shapes):
                found = _scaled(col, shape)
                if found is None:
                    continue
                scale, rtype, residual = found
                entry.update(kind="scaled", of=j, scale=scale, residual=rtype)
                if residual is not None:
                    entry["roffset"] = roffset
                    data = residual.astype(residual.dtype.newbyteorder("<")).tobytes()
                    residuals.append(data)
                    roffset += len(data)
                break
            else:
                entry.update(kind="raw", offset=offset)
                data = col.tobytes()
                payload.append(data)
                offset += len(data)
                shapes.append((index, col))
                del shapes[:-_MAX_SHAPES]
            series.append(entry)
    stream = zlib.compress(b"".join(residuals), 1) if residuals else b""
    header = {
        "run": run_id,
        "start": start,
        "count": count,
        "version": version,
        "residuals": {"offset": offset, "nbytes": len(stream)},
        "series": series,
    }
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    prefix = MAGIC + struct.pack("<I", len(head)) + head
    prefix += b"\0" * (-len(prefix) % 8)
    return prefix + b"".join(payload) + stream
