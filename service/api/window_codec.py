"""The binary window encoding, ``application/vnd.lrserve.window`` (see docs/api.md).

A window in JSON repeats what groups share: at 256 layer-wise groups of one schedule shape a
4,096-step window is 27 MB of decimal text that a trainer parses value by value. This
encoding sends little-endian float64 columns after a small JSON header, and a column that is
another column times a constant (layer-wise decay: one shape, a base rate per group), or a
constant plus that (a floor, ``eta_min``), as the constant(s) plus the difference, in units
in the last place, between the prediction and the column's own bits: a per-column base and
small unsigned integers bit-packed at 0, 2, 4, 8 or 16 bits each (torch computes each
group's rate recursively, so rounding differs per group by a few ulps: 2 bits is the
common case). It is lossless: the differences are exact integers (the column's bits less the
prediction's, which a client recomputes bit for bit: IEEE multiply and add of the same
float64s, scales round-tripping exactly through JSON), every packed block is unpacked here
at encode time and compared with them, and a column whose difference does not fit in 16
bits (or does not round-trip) is sent raw. Identical columns are sent once.

The encoder works on all columns at once (one ``series x count`` array, a few numpy passes
per candidate shape), so its cost grows with the values, not with a Python loop per column.

Layout::

    b"LRW2" | uint32 LE header length | header (UTF-8 JSON) | zero padding to 8 bytes | payload

The header: ``run``, ``start``, ``count``, ``version``, ``series`` (``[group, field]`` per
column, in the JSON answer's order) and ``blocks``, decoded in order, each naming the
columns it fills (``series``: indices):

- ``{"kind": "raw", "offset"}``: ``len(series) x count`` float64 at that payload offset;
- ``{"kind": "same", "of"}``: column ``series[i]`` is bitwise column ``of[i]`` (earlier);
- ``{"kind": "scaled" | "affine", "of", "scale", ["offset",] "base", "width", "roffset"}``:
  column ``series[i]`` is ``((col[of] * scale[i] [+ offset[i]]).view(int64) + base[i] +
  u[i]).view(float64)``, ``u`` being ``count`` unsigned ``width``-bit integers (width 0: none;
  2 and 4 packed low bits first, ``ceil(count * width / 8)`` bytes per column; 8 and 16
  little-endian), one column after another from payload ``roffset``.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic_core import to_json

MEDIA_TYPE = "application/vnd.lrserve.window"
MAGIC = b"LRW2"
# Shapes tried (each a pass over the columns not yet encoded), then the rest is sent raw:
# bounded, so a window of unrelated columns costs at most this many passes.
_MAX_SHAPES = 4
_WIDTHS = (0, 2, 4, 8, 16)
# Columns sampled per fingerprint when looking for identical columns.
_FINGERPRINT = 64


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


def _lanes(width: int) -> npt.NDArray[Any]:
    """Byte -> its ``8 // width`` packed values (low bits first), as one wider integer."""
    per = 8 // width
    byte = np.arange(256, dtype=np.uint8)[:, None]
    lanes = (byte >> np.arange(0, 8, width, dtype=np.uint8)) & np.uint8((1 << width) - 1)
    return np.ascontiguousarray(lanes, dtype=np.uint8).view(f"<u{per}")[:, 0].copy()


_UNPACK = {2: _lanes(2), 4: _lanes(4)}


def pack_residuals(u: npt.NDArray[Any], width: int) -> bytes:
    """``rows x count`` unsigned integers below ``2**width`` as the payload stores them."""
    if width == 0:
        return b""
    if width >= 8:
        return np.ascontiguousarray(u, dtype=f"<u{width // 8}").tobytes()
    rows, count = u.shape
    per = 8 // width
    if count % per:
        padded = np.zeros((rows, count + per - count % per), dtype=np.uint8)
        padded[:, :count] = u
        u = padded
    # ``per`` bytes, each below 2**width, as one little-endian integer: shifting copies of
    # it down by multiples of (8 - width) lines the values up in the low byte.
    word = np.ascontiguousarray(u, dtype=np.uint8).view(f"<u{per}")
    out = word.copy()
    for lane in range(1, per):
        out |= word >> np.uint8(lane * (8 - width))
    return out.astype(np.uint8).tobytes()


def unpack_residuals(
    buf: bytes | memoryview, offset: int, rows: int, count: int, width: int
) -> npt.NDArray[Any]:
    """The inverse of :func:`pack_residuals` (``rows x count``, uint8 or uint16)."""
    if width >= 8:
        dtype = f"<u{width // 8}"
        return np.frombuffer(buf, dtype, rows * count, offset).reshape(rows, count)
    per = 8 // width
    per_row = -(-count // per)
    packed = np.frombuffer(buf, np.uint8, rows * per_row, offset).reshape(rows, per_row)
    return _UNPACK[width][packed].view(np.uint8)[:, :count]


def _rows(a: npt.NDArray[Any], idx: npt.NDArray[np.intp]) -> npt.NDArray[Any]:
    """``a[idx]``, a view when ``idx`` is a run of consecutive rows."""
    if idx.size and idx[-1] - idx[0] + 1 == idx.size:
        return a[int(idx[0]) : int(idx[-1]) + 1]
    return a[idx]


def _width(span: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """The residual width each column needs (``-1``: does not fit in 16 bits)."""
    width = np.full(span.shape, -1, dtype=np.int64)
    for w in reversed(_WIDTHS):
        width[span < (1 << w)] = w
    return width


def _fit(
    shape: npt.NDArray[np.float64],
    cols: npt.NDArray[np.float64],
    scale: npt.NDArray[np.float64],
    offset: npt.NDArray[np.float64] | None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``(diff, base, width)`` of ``cols`` against ``shape * scale [+ offset]``, in ulps.

    ``diff - base`` is in ``[0, 2**width)`` where ``width >= 0`` (``-1``: no fit).
    """
    with np.errstate(all="ignore"):
        pred = np.multiply(scale[:, None], shape[None, :])
        if offset is not None:
            np.add(pred, offset[:, None], out=pred)
    diff = pred.view(np.int64)
    # Wraps on overflow, as the decoder's addition does: lossless either way.
    np.subtract(cols.view(np.int64), diff, out=diff)
    lo = diff.min(axis=1)
    span = diff.max(axis=1).astype(np.uint64) - lo.astype(np.uint64)
    width = _width(span)
    width[~(np.isfinite(scale) & (True if offset is None else np.isfinite(offset)))] = -1
    return diff, lo, width


def _residuals(
    diff: npt.NDArray[np.int64], base: npt.NDArray[np.int64], width: int
) -> npt.NDArray[Any]:
    """``diff - base``, known to be in ``[0, 2**width)``, as uint8 or uint16.

    Cast first and subtract in the narrow type: modular, so exact for values that fit.
    """
    narrow = np.uint16 if width > 8 else np.uint8
    u: npt.NDArray[Any] = diff.astype(narrow)
    u -= base.astype(narrow)[:, None]
    return u


def encode_window(
    run_id: str, start: int, count: int, version: int, values: dict[str, dict[str, Any]]
) -> bytes:
    """The binary encoding of a window (``values``: group -> field -> float64 array)."""
    names: list[list[str]] = []
    arrays: list[Any] = []
    for group, fields in values.items():
        for field, raw in fields.items():
            names.append([group, field])
            arrays.append(raw)
    n = len(names)
    cols = _matrix(arrays, count)
    bits = cols.view("<i8")

    same: dict[str, Any] | None = None
    # Identical columns: equal fingerprints (a sample of each column), then compared whole.
    unique = np.arange(n)
    if n > 1:
        # Rows of the sample as single opaque items: np.unique groups equal ones in C.
        sample = np.ascontiguousarray(bits[:, :: max(1, count // _FINGERPRINT)])
        keys = sample.view(np.dtype((np.void, sample.shape[1] * 8))).ravel()
        _, firsts, inverse = np.unique(keys, return_index=True, return_inverse=True)
        first_of = firsts[inverse.ravel()]  # each column's first column with its fingerprint
        dup = np.flatnonzero(first_of != np.arange(n))
        if dup.size:
            of = first_of[dup]
            equal = (bits[dup] == bits[of]).all(axis=1)
            dup, of = dup[equal], of[equal]
            if dup.size:
                same = {"kind": "same", "series": dup.tolist(), "of": of.tolist()}
                keep = np.ones(n, dtype=bool)
                keep[dup] = False
                unique = unique[keep]

    derived: list[tuple[dict[str, Any], bytes]] = []
    raw_rows: list[int] = []
    remaining = unique
    for _ in range(_MAX_SHAPES):
        if not remaining.size:
            break
        k = int(remaining[0])
        raw_rows.append(k)
        remaining = remaining[1:]
        if not remaining.size:
            break
        remaining = _derive(cols, k, remaining, count, derived)
    raw_rows.extend(remaining.tolist())

    blocks: list[dict[str, Any]] = []
    payload: list[bytes] = []
    offset = 0
    if raw_rows:
        raw_idx = np.array(sorted(raw_rows), dtype=np.intp)
        data = np.ascontiguousarray(_rows(cols, raw_idx)).tobytes()
        blocks.append({"kind": "raw", "series": raw_idx.tolist(), "offset": 0})
        payload.append(data)
        offset = len(data)
    for block, data in derived:
        block["roffset"] = offset
        pad = -len(data) % 8
        payload.append(data + b"\0" * pad)
        offset += len(data) + pad
    blocks.extend(b for b, _ in derived)
    if same is not None:  # last: their originals may be derived columns
        blocks.append(same)
    header = {
        "run": run_id,
        "start": start,
        "count": count,
        "version": version,
        "series": names,
        "blocks": blocks,
    }
    # (pydantic-core's writer: 256 groups' scales are a quarter of a millisecond in json;
    # floats in the shortest form that reads back exactly, as json's repr.)
    head = to_json(header)
    prefix = MAGIC + struct.pack("<I", len(head)) + head
    prefix += b"\0" * (-len(prefix) % 8)
    return prefix + b"".join(payload)


def _matrix(arrays: list[Any], count: int) -> npt.NDArray[np.float64]:
    """The columns as one ``len(arrays) x count`` float64 array, read only here: the array
    the evaluation computed, when they are its rows in order (one schedule over every group:
    8 MB not copied at 256 groups), else a copy."""
    n = len(arrays)
    base = getattr(arrays[0], "base", None) if n else None
    if (
        isinstance(base, np.ndarray)
        and base.shape == (n, count)
        and base.dtype == np.dtype("<f8")
        and base.flags.c_contiguous
    ):
        origin = base.ctypes.data
        row = count * 8
        if all(
            a.base is base and a.shape == (count,) and a.ctypes.data == origin + j * row
            for j, a in enumerate(arrays)
        ):
            return base
    cols = np.empty((n, count), dtype="<f8")
    for j, raw in enumerate(arrays):
        cols[j] = raw
    return cols


def _derive(
    cols: npt.NDArray[np.float64],
    k: int,
    rest: npt.NDArray[np.intp],
    count: int,
    out: list[tuple[dict[str, Any], bytes]],
) -> npt.NDArray[np.intp]:
    """Encode the columns ``rest`` that ``cols[k]`` predicts (blocks into ``out``); the rest."""
    shape = cols[k]
    mag = np.abs(shape)
    i = int(np.argmax(mag))
    if not np.isfinite(mag[i]) or mag[i] == 0.0:
        return rest
    todo = rest
    for kind in ("scaled", "affine"):
        if not todo.size:
            break
        x = _rows(cols, todo)
        with np.errstate(all="ignore"):
            if kind == "scaled":
                scale = x[:, i] / shape[i]
                offset = None
            else:
                hi, lo = int(np.argmax(shape)), int(np.argmin(shape))
                if not shape[hi] > shape[lo]:  # constant, or not finite
                    break
                scale = (x[:, hi] - x[:, lo]) / (shape[hi] - shape[lo])
                offset = x[:, hi] - scale * shape[hi]
        diff, base, width = _fit(shape, x, scale, offset)
        done = np.zeros(todo.size, dtype=bool)
        for w in _WIDTHS:
            sel = np.flatnonzero(width == w)
            if not sel.size:
                continue
            whole = sel.size == todo.size
            data = b""
            if w:
                u = _residuals(diff if whole else diff[sel], base[sel], w)
                data = pack_residuals(u, w)
                # Unpack as a client does and compare: the residuals or nothing. (The
                # prediction itself the client recomputes bitwise: IEEE multiply and add
                # of the same float64s, the scales round-tripping exactly through JSON.)
                back = unpack_residuals(data, 0, sel.size, count, w)
                if not np.array_equal(back, u):
                    continue  # not lossless: left to another shape, or sent raw
            # (The header's writer would write a non-finite number as null: _fit gave those
            # no width, so none is here.)
            assert np.isfinite(scale[sel]).all() and (
                offset is None or np.isfinite(offset[sel]).all()
            )
            block: dict[str, Any] = {
                "kind": kind,
                "series": todo[sel].tolist(),
                "of": k,
                "scale": scale[sel].tolist(),
                "base": base[sel].tolist(),
                "width": w,
            }
            if offset is not None:
                block["offset"] = offset[sel].tolist()
            done[sel] = True
            out.append((block, data))
        todo = todo[~done]
    return todo
