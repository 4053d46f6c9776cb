"""PyTorch integration: :class:`RemoteScheduler`, a drop-in for a torch LR scheduler.

>>> sched = lrserve.torch.RemoteScheduler(opt, run="exp-42", spec=spec)  # doctest: +SKIP
>>> for batch in loader:                                                 # doctest: +SKIP
...     loss.backward(); opt.step(); sched.step()       # never waits on the network
...     if step % eval_every == 0:
...         sched.report({"val_loss": evaluate()})      # the one place it talks

How it works: the values of the steps ahead are prefetched as a *window* (the server's
columnar ``GET /v1/runs/{id}/lr?start=&count=``); ``step()`` only indexes into it and
writes the values into the optimizer's param groups. A background thread refreshes the
window before it runs out and revalidates it with the run's ETag, so a change of the run
(a plateau reduction, an operator override) arrives without the training loop asking.
See docs/sdk-torch.md for data-parallel training, tensor learning rates, resume and the
behaviour while the service is down.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal

import httpx

try:
    import torch
    import torch.distributed as dist
    from torch.optim.lr_scheduler import LRScheduler
except ModuleNotFoundError as exc:  # pragma: no cover - exercised in a subprocess test
    if exc.name is None or exc.name.split(".")[0] != "torch":
        raise
    raise ModuleNotFoundError(
        "lrserve.torch needs PyTorch, which is not installed here: pip install "
        "'lrserve[torch]' (or torch itself); `import lrserve` alone works without it",
        name="torch",
    ) from exc

from ._client import Client
from ._errors import (
    APIError,
    ConflictError,
    LRServeError,
    ServerError,
    TransportError,
    UsageError,
)
from ._metrics import aggregate as aggregate_ranks
from ._metrics import metric_values
from ._types import ReportResult
from ._window import PROBE_AT, BoundWindow, Window, bind, memory_key, read_values

__all__ = [
    "LRServeOfflineWarning",
    "RemoteScheduler",
    "WindowExhaustedError",
    "groups_from_optimizer",
]

log = logging.getLogger("lrserve.torch")

HEARTBEAT_INTERVAL = 30.0
"""Seconds between two heartbeats of rank 0 (``POST .../heartbeat``: the run's status)."""

Aggregate = Literal["mean", "min", "max", "rank0"]

# Errors that mean "the service is not answering right now" (as opposed to "the request
# is wrong"): the scheduler keeps training on what it has and tries again later.
_UNAVAILABLE: tuple[type[BaseException], ...] = (TransportError, ServerError, httpx.HTTPError)


MAX_WINDOW = 100_000  # the server's longest window

FETCH_VALUES = 1 << 18
"""A fast loop's windows grow (doubling, up to 4x ``window``) while a window holds at most
this many values (2 MiB of float64): past that, a fetch takes longer than it saves."""

FETCH_SWITCH_INTERVAL = 0.0002
"""``sys.setswitchinterval`` while a fetch the loop is waiting on is in flight (see
:class:`_FastSwitch`)."""


class _FastSwitch:
    """Lowers the interpreter's switch interval while any scheduler's fetch is in flight.

    A busy training loop holds the GIL; each time the refresher's thread comes back from
    the network (a 64 KiB read of the body, the wake-up itself) it waits for the loop to
    drop it, up to the switch interval (5 ms by default) each time, and a fetch of a few
    dozen reads would take longer than a fast loop's window lasts. With a 0.2 ms interval
    the refresher gets the GIL back at once, and the loop gives it up only as often as the
    refresher has something to do (a sleep in every step would hand it over at every step
    instead, costing ~100 µs each). The interval is put back when the last fetch ends,
    unless someone else changed it meanwhile.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._saved: float | None = None

    def enter(self) -> None:
        with self._lock:
            self._active += 1
            if self._active == 1:
                current = sys.getswitchinterval()
                if current > FETCH_SWITCH_INTERVAL:
                    self._saved = current
                    sys.setswitchinterval(FETCH_SWITCH_INTERVAL)

    def exit(self) -> None:
        with self._lock:
            self._active = max(0, self._active - 1)
            if self._active == 0 and self._saved is not None:
                if abs(sys.getswitchinterval() - FETCH_SWITCH_INTERVAL) < 1e-6:
                    sys.setswitchinterval(self._saved)
                self._saved = None


_FAST_SWITCH = _FastSwitch()


class LRServeOfflineWarning(UserWarning):
    """The service cannot be reached: training continues on the values already fetched."""


class WindowExhaustedError(LRServeError):
    """``strict=True``: a step needs values the scheduler does not have and cannot fetch."""


def _dist_info(process_group: Any) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(process_group), dist.get_world_size(process_group)
    return 0, 1


# Param group keys that are not hyperparameters the scheduler writes (``initial_lr`` is
# torch's schedulers' bookkeeping).
_NOT_WRITTEN = frozenset({"params", "param_names", "initial_lr"})


def _untie_tensors(optimizer: torch.optim.Optimizer) -> list[str]:
    """Give every param group its own tensor hyperparameters; returns what was replaced.

    ``torch.optim.AdamW(groups, lr=torch.tensor(1e-3))`` puts one tensor object in every
    group (the constructor's default is shared), and a tensor the scheduler writes in
    place can hold only one group's value. Each tensor hyperparameter (``lr``,
    ``momentum``, ``betas`` elements, ``weight_decay``, ...) met a second time, in another
    group or another slot, is replaced by a copy on the same device with the same dtype
    and value. Tensors that are not shared are left as they are.
    """
    seen: dict[tuple[Any, ...], str] = {}
    replaced: list[str] = []

    def own(t: torch.Tensor, where: str) -> torch.Tensor:
        key = memory_key(t)
        first = seen.get(key)
        if first is None:
            seen[key] = where
            return t
        replaced.append(f"{where} (was {first}'s tensor)")
        copy = t.detach().clone()
        seen[memory_key(copy)] = where
        return copy

    for i, group in enumerate(optimizer.param_groups):
        label = f"group {i}" + (f" ({group['name']!r})" if "name" in group else "")
        for key, value in list(group.items()):
            if key in _NOT_WRITTEN:
                continue
            if isinstance(value, torch.Tensor):
                new = own(value, f"{label} {key!r}")
                if new is not value:
                    group[key] = new
            elif isinstance(value, (tuple, list)) and any(
                isinstance(x, torch.Tensor) for x in value
            ):
                items = [
                    own(x, f"{label} {key}[{j}]") if isinstance(x, torch.Tensor) else x
                    for j, x in enumerate(value)
                ]
                if any(a is not b for a, b in zip(items, value, strict=True)):
                    group[key] = tuple(items) if isinstance(value, tuple) else items
    return replaced


def groups_from_optimizer(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The ``groups`` of a run spec, taken from an optimizer's param groups.

    A group's name is its ``"name"`` key when it has one, else ``group<i>``; its base
    ``lr`` is ``initial_lr`` when a torch scheduler already set one, else ``lr``.
    ``betas`` (Adam family) or ``momentum`` (SGD, RMSprop) and ``weight_decay`` are
    passed along so that the schedule can cycle or schedule them.
    """
    out: list[dict[str, Any]] = []
    for i, pg in enumerate(optimizer.param_groups):
        group: dict[str, Any] = {
            "name": str(pg.get("name", f"group{i}")),
            "lr": float(pg.get("initial_lr", pg["lr"])),
        }
        if "betas" in pg:
            group["betas"] = [float(b) for b in pg["betas"]]
        elif "momentum" in pg:
            group["momentum"] = float(pg["momentum"])
        if "weight_decay" in pg:
            group["weight_decay"] = float(pg["weight_decay"])
        out.append(group)
    return out


class RemoteScheduler(LRScheduler):
    """A learning-rate scheduler whose values come from an lrserve run.

    It is a ``torch.optim.lr_scheduler.LRScheduler``, so frameworks that type-check
    schedulers (Lightning, accelerate, Hugging Face ``Trainer``) take it as it is.
    Use it where a ``torch.optim.lr_scheduler`` scheduler goes: construct it after the
    optimizer (it writes step 0's values into the param groups, like torch does), call
    :meth:`step` after ``optimizer.step()``, and :meth:`report` with validation metrics
    for metric-driven schedules (``ReduceLROnPlateau``). The values applied after ``N``
    calls of :meth:`step` are the run's values for step ``N``.

    Args:
        optimizer: the optimizer whose param groups receive the values, in the order of
            the run's groups. Float hyperparameters are assigned; tensor ones (``lr``,
            ``betas[0]``) are updated in place on their device and dtype. Groups that
            share one tensor (``AdamW(groups, lr=torch.tensor(...))`` does that) each get
            their own copy first, with a warning.
        run: the run id.
        url: the server; default ``$LRSERVE_URL``, else ``http://127.0.0.1:8000``.
        spec: the run body (``schedule``, ``group_schedules``, ``param_schedules``, ...).
            Given, the run is created idempotently; ``groups`` default to the optimizer's
            param groups (:func:`groups_from_optimizer`). Not given, the run must exist.
        token: bearer token (default ``$LRSERVE_TOKEN``).
        client: an :class:`lrserve.Client` to use instead of building one (not closed by
            :meth:`close`).
        rank, world_size: this process's place in a data-parallel job; default from
            ``torch.distributed`` when it is initialised, else 0 and 1.
        chief: data-parallel "chief" mode: only rank 0 talks to the service and
            broadcasts the values over ``torch.distributed`` every ``sync_every`` steps
            and at every :meth:`report` (both collective calls then).
        process_group: the ``torch.distributed`` group (default: the world).
        window: how many steps of values one fetch brings (the server allows 100000).
        poll_interval: seconds between ETag revalidations of the window.
        sync_every: chief mode: steps between two broadcasts of values.
        report_timeout: data-parallel: seconds :meth:`report` waits for every rank.
        aggregate: chief mode: how rank metrics are combined before rank 0 reports them.
        strict: raise :class:`WindowExhaustedError` / the client's errors instead of
            holding the last known values when the service is unreachable.
        timeout: seconds for one request of the client this builds.
        rewind: what :meth:`load_state_dict` does with a checkpoint older than the run's
            last completed step (a job restarting from an earlier checkpoint): ``True``
            rewinds the run to the checkpoint's step, once for all ranks, and warns;
            ``False`` raises :class:`lrserve.UsageError` instead.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        run: str,
        url: str | None = None,
        spec: Mapping[str, Any] | None = None,
        *,
        token: str | None = None,
        client: Client | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        chief: bool = False,
        process_group: Any = None,
        window: int = 4096,
        poll_interval: float = 2.0,
        sync_every: int = 256,
        report_timeout: float = 120.0,
        aggregate: Aggregate = "mean",
        strict: bool = False,
        timeout: float = 10.0,
        rewind: bool = True,
    ) -> None:
        if window < 2 or window > 100_000:
            raise UsageError(f"window must be between 2 and 100000 steps, got {window}")
        if sync_every < 1:
            raise UsageError(f"sync_every must be at least 1, got {sync_every}")
        if aggregate not in ("mean", "min", "max", "rank0"):
            raise UsageError(f"aggregate must be mean, min, max or rank0, got {aggregate!r}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer")
        # LRScheduler.__init__ is deliberately not called: it would add ``initial_lr`` to the
        # groups, wrap ``optimizer.step`` and call step() once, so the groups would hold
        # step 1's values, not step 0's. The attributes torch and the frameworks read are set
        # here instead: ``optimizer``, ``base_lrs``, ``_step_count`` (accelerate increments it
        # on accumulation steps) and ``last_epoch`` (a property).
        self.optimizer = optimizer
        self.base_lrs = [
            v.clone() if isinstance(v, torch.Tensor) else v
            for v in (g.get("initial_lr", g["lr"]) for g in optimizer.param_groups)
        ]
        self._step_count = 1
        self.run_id = run
        self.strict = strict
        self.chief = chief
        self.process_group = process_group
        d_rank, d_world = _dist_info(process_group)
        self.rank = d_rank if rank is None else int(rank)
        self.world_size = d_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise UsageError(f"rank {self.rank} is outside world_size {self.world_size}")
        if chief and self.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise UsageError("chief mode needs torch.distributed to be initialised")
        self._collective = chief and self.world_size > 1
        self._talks = not self._collective or self.rank == 0
        self._window_size = int(window)
        self._sync_every = int(sync_every)
        self._poll_interval = float(poll_interval)
        self._report_timeout = float(report_timeout)
        self._aggregate = aggregate
        self._spec = dict(spec) if spec is not None else None
        self._rewind = bool(rewind)

        self._step = 0
        self._names: list[str] | None = None
        self._bound: BoundWindow | None = None
        self._next: Window | None = None  # chief rank 0: fetched, applied at the next sync
        # The window after the bound one, fetched and bound by the refresher before the loop
        # gets there: step() swaps it in at the boundary instead of fetching (and waiting).
        self._ahead: BoundWindow | None = None
        self._bound_since = time.monotonic()  # when the bound window's first step ran
        self._fast = False  # the loop consumes a window in about the time a fetch takes
        self._fetch_took = 0.0  # seconds the last window fetch took
        # Whether step() woke the refresher for a fetch and lowered the switch interval
        # (_FastSwitch) until the refresher is done with it.
        self._switching = False
        self._switch_lock = threading.Lock()
        # (window start, index, time) of the step where the loop's pace started to be timed
        # (a window's start, not the window: nothing old is kept alive for it).
        self._pace_mark: tuple[int, int, float] | None = None
        # The bound window whose successor step() asked the refresher for, and whether the
        # loop is near that window's end without it (each step then yields the GIL).
        self._want_ahead: BoundWindow | None = None
        self._hurry = False
        self._pace: tuple[int, float] | None = None  # (window start, seconds per step)
        self._validated_at = -math.inf  # when the server last confirmed the window's version
        self._ahead_ready = threading.Event()  # set when no fetch of the next window runs
        self._ahead_ready.set()
        self._outbox: deque[tuple[int, dict[str, float | None]]] = deque()
        self._io_lock = threading.RLock()
        self._offline = False
        self._warned_offline = False
        self._warned_held = False
        self._warned_rewind = False
        self._closed = False
        self._warned_shared = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_heartbeat = -HEARTBEAT_INTERVAL  # the first refresh sends one
        self._heartbeat_due: float | None = None  # since when a fast loop put one off
        # Before anything is bound to the param groups' tensors.
        self._untie()

        self._owns_client = client is None and self._talks
        self._client: Client | None = client
        if self._client is None and self._talks:
            self._client = Client(
                url,
                token=token,
                timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
                max_retries=1,
                backoff_base=0.1,
                backoff_max=0.5,
            )

        startup_error: BaseException | None = None
        if self._talks:
            try:
                self._attach()
                w = self._fetch(0)
                self._install(w)
            except _UNAVAILABLE as exc:
                if strict:
                    startup_error = exc
                else:
                    self._went_offline(exc)
            except BaseException as exc:
                startup_error = exc
            if startup_error is not None:
                self._close_client()
                if not self._collective:
                    raise startup_error
        if self._collective:
            # Every rank waits in this broadcast: rank 0 must send its failure too, or the
            # others would block here for ever.
            self._chief_sync(0, startup_error)
        elif self._bound is not None and self._bound.window.covers(0):
            self._bound.apply(0 - self._bound.start)
        if self._talks:
            self._thread = threading.Thread(
                target=self._refresh_loop, name=f"lrserve-refresh-{run}", daemon=True
            )
            self._thread.start()

    # -- the step path ---------------------------------------------------------------

    def step(self, epoch: int | None = None) -> None:
        """Advance one step and write that step's values into the param groups.

        Steady state: an index into the prefetched window, no network, no lock.
        ``epoch`` is there for torch's signature only (torch deprecated it); passing one
        raises :class:`lrserve.UsageError`: use :meth:`load_state_dict` to move elsewhere.
        """
        if epoch is not None:
            raise UsageError("RemoteScheduler.step() takes no epoch; it advances one step")
        s = self._step + 1
        b = self._bound
        if b is not None and b.groups is self.optimizer.param_groups:
            i = s - b.start
            if 0 <= i < b.count:
                self._step = s
                if b.steady_due:
                    # The window's first step here: its steady values too (see BoundWindow).
                    b.apply(i)
                else:
                    if b.python:
                        # One row of the changing values converted per step (a C loop).
                        row = b.rows[i].tolist()
                        for d, k, j in b.floats:
                            d[k] = row[j]
                        if b.tuples:
                            for d, k, head, rest, j in b.tuples:
                                d[k] = (*head, row[j], *rest)
                        if b.fills:
                            for t, j in b.fills:
                                t.fill_(row[j])
                    if b.buckets:
                        for targets, rows in b.buckets:
                            torch._foreach_copy_(targets, rows[i].unbind(0))
                if i == b.refill_at:
                    self._at_refill(b, i)
                elif self._hurry:
                    time.sleep(0)  # the window is nearly used up: let the refresher finish
                return
        self._step_slow(s)

    def _at_refill(self, b: BoundWindow, i: int) -> None:
        """Step thread, at ``b.refill_at``: wake the refresher to fetch the next window.

        Before half way it times the loop: at ``PROBE_AT`` it notes the time, ``PROBE_AT``
        steps later it has the loop's pace (from steps taken, not from when the window
        arrived: a loop starts a while after construction). A loop that would reach the
        window's end within a few fetch times has the next window asked for then; any other
        is woken again half way, as before.
        """
        if self._thread is None:
            return  # a rank without a refresher
        if self._collective:
            self._wake.set()  # chief rank 0: the refresher brings the next sync's values
            return
        if self._want_ahead is b:
            # The late checkpoint: the next window was asked for and is not here yet. From
            # now on each step hands the refresher the GIL (sleep(0)), so that its fetch
            # ends before the loop runs out, rather than the loop stopping dead at the end.
            with self._io_lock:
                a = self._ahead
                if a is None or a.window.start != b.window.end:
                    self._hurry = True
            return
        if i < b.half:
            now = time.monotonic()
            mark = self._pace_mark
            if mark is None or mark[0] != b.start or mark[1] >= i:
                self._pace_mark = (b.start, i, now)
                b.move_refill(min(i + PROBE_AT, b.half))
                return
            self._pace_mark = None
            per_step = (now - mark[2]) / max(i - mark[1], 1)
            self._pace = (b.start, per_step)
            left = (b.count - i) * per_step
            if left >= 4 * self._fetch_took:
                b.move_refill(b.half)
                return
            self._fast = True
        self._want_ahead = b
        self._wake_for_fetch()
        self._mark_late(b, i)

    def _mark_late(self, b: BoundWindow, i: int) -> None:
        """Have step() look again when ``b`` is 7/8 used (see :meth:`_at_refill`)."""
        late = b.count - max(1, b.count // 8)
        b.move_refill(late if late > i else -1)

    def _wake_for_fetch(self) -> None:
        """Wake the refresher for a fetch the loop will need soon (switch interval lowered)."""
        with self._switch_lock:
            if not self._switching:
                self._switching = True
                _FAST_SWITCH.enter()
            self._wake.set()

    def _fetch_done(self, *, unless_woken: bool = False) -> None:
        """The refresher is done: put the switch interval back (``unless_woken``: not when
        the step thread already asked for the next fetch, which would then wait for the GIL
        a whole switch interval again)."""
        with self._switch_lock:
            if self._switching and not (unless_woken and self._wake.is_set()):
                self._switching = False
                _FAST_SWITCH.exit()

    def _step_slow(self, s: int) -> None:
        self._hurry = False
        b = self._bound
        if b is not None and b.groups is not self.optimizer.param_groups:
            # optimizer.load_state_dict() replaced the param group dicts (or a window was
            # bound to tensors that groups share): bind again, each group its own tensors.
            with self._io_lock:
                self._untie()
                b = self._bound = bind(b.window, self._group_names(), self.optimizer.param_groups)
            if 0 <= s - b.start < b.count:
                self._step = s
                b.apply(s - b.start)
                return
        if self._collective:
            self._step = s
            self._chief_sync(s)
            return
        if b is not None and not b.window.covers(s) and not self._ahead_ready.is_set():
            # The refresher is fetching the next window: wait for it rather than send the
            # same request again (two fetches at once make both slower).
            self._ahead_ready.wait(self._client_timeout())
        if b is not None and not b.window.covers(s) and self._swap_ahead(b, s):
            b = self._bound
            assert b is not None
            self._step = s
            b.apply(s - b.start)
            return
        if b is None or not b.window.covers(s):
            # Ahead of the window (a fast loop outran the refresher): fetch now rather
            # than apply a wrong value. Offline, don't: every step would wait.
            if self._talks and not self._offline and self._names is not None:
                try:
                    self._install(self._fetch(s))
                except _UNAVAILABLE as exc:
                    self._went_offline(exc)
            b = self._bound
        self._step = s
        if b is not None and b.window.covers(s):
            b.apply(s - b.start)
            return
        self._hold(s)

    def _swap_ahead(self, b: BoundWindow, s: int) -> bool:
        """Make the prefetched next window the bound one when it covers ``s``."""
        with self._io_lock:
            a = self._ahead
            if a is None or not a.window.covers(s) or a.groups is not self.optimizer.param_groups:
                return False
            self._ahead = None
            if self._bound is not b or _changed(b.window, a.window):
                return False  # the run changed meanwhile: the prefetched values are stale
            self._bound = a
            self._bound_since = time.monotonic()
        self._hurry = False
        if a.refill_at == 0:
            # A fast loop: the refresher fetches the window after this one at once.
            self._want_ahead = a
            self._wake_for_fetch()
            self._mark_late(a, 0)
        return True

    def _hold(self, s: int) -> None:
        self._wake.set()
        if self.strict:
            raise WindowExhaustedError(
                f"lrserve run {self.run_id!r}: no values for step {s} "
                "(the service is unreachable and the prefetched window has run out)"
            )
        if not self._warned_held:
            self._warned_held = True
            msg = (
                f"lrserve run {self.run_id!r}: step {s} is beyond the values fetched so far; "
                "holding the last known values until the service answers again"
            )
            log.warning(msg)
            warnings.warn(msg, LRServeOfflineWarning, stacklevel=3)

    def _untie(self) -> None:
        """Give each param group its own tensor hyperparameters (see :func:`_untie_tensors`)."""
        replaced = _untie_tensors(self.optimizer)
        if not replaced:
            return
        msg = (
            f"lrserve run {self.run_id!r}: param groups shared tensor hyperparameters; the "
            "scheduler writes them in place and one tensor can hold only one group's value, "
            "so each of these now has its own copy (same device, dtype and value): "
            + ", ".join(replaced)
        )
        log.warning(msg)
        if not self._warned_shared:
            self._warned_shared = True
            warnings.warn(msg, UserWarning, stacklevel=3)

    # -- torch scheduler API ---------------------------------------------------------

    @property
    def last_epoch(self) -> int:
        """The number of :meth:`step` calls so far (torch's name for it)."""
        return self._step

    @last_epoch.setter
    def last_epoch(self, value: int) -> None:
        # LRScheduler declares last_epoch as a plain attribute; a setter keeps the type
        # checks of subclasses happy, but moving the step goes through the server.
        if int(value) != self._step:
            raise UsageError(
                f"RemoteScheduler.last_epoch is read-only (step {self._step}); "
                "use load_state_dict() to continue from another step"
            )

    @property
    def version(self) -> int | None:
        """The run version of the values in use (``None`` before any arrived)."""
        b = self._bound
        return None if b is None or b.window.held else b.window.version

    @property
    def offline(self) -> bool:
        """Whether the last attempt to reach the service failed."""
        return self._offline

    @property
    def holding(self) -> bool:
        """Whether the current step's values are held (not served) values."""
        b = self._bound
        return b is None or b.window.held or not b.window.covers(self._step)

    def get_last_lr(self) -> list[Any]:
        """The learning rate of every param group, as torch's ``get_last_lr()``."""
        return [
            g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
            for g in self.optimizer.param_groups
        ]

    def get_lr(self) -> list[Any]:
        """The current step's rates (torch's ``get_lr()``; the values come from the run)."""
        return self.get_last_lr()

    def _reapply(self) -> None:
        """Write the current step's values again from the window in hand (no network).

        For the framework callbacks (``lrserve.lightning``, ``lrserve.hf``): frameworks step
        the scheduler before they validate, so the callbacks report for the step before
        the current one, and the decision then applies to the current step, as it does for
        the framework's own ``ReduceLROnPlateau``.
        """
        b = self._bound
        if (
            b is not None
            and b.groups is self.optimizer.param_groups
            and b.window.covers(self._step)
        ):
            b.apply(self._step - b.start)

    def report(self, metrics: Mapping[str, Any], step: int | None = None) -> ReportResult | None:
        """Report metrics for ``step`` (default: the current step) and apply the answer.

        A decision taken on this report (e.g. a plateau reduction) applies from
        ``step + 1``: the next :meth:`step` already uses it. With ``world_size > 1``
        every rank reports and this returns once every rank has (the step is complete),
        so all ranks continue with the same values. Returns the server's answer, or
        ``None`` when the service is unreachable (the report is then kept and sent when
        it is back; ``strict=True`` raises instead).

        A value is a number, a numpy scalar or a one-element tensor (read with ``.item()``),
        NaN or ±infinity (sent as ``"NaN"``, ``"Infinity"``, ``"-Infinity"``), or ``None``
        for "no value this time" (sent as ``null``: metric-driven schedules skip it). Any
        other value raises :class:`lrserve.UsageError` (a ``ValueError``) naming the
        metric, before anything is sent.
        """
        s = self._step if step is None else int(step)
        if self._collective:
            return self._report_chief(s, metrics)
        values = metric_values(metrics)
        assert self._client is not None
        with self._io_lock:
            self._flush_outbox()
            if self._outbox:
                return self._queue_report(s, values, None)
            wait = self._report_timeout if self.world_size > 1 else None
            try:
                res = self._client.report(
                    self.run_id, s, values, rank=self.rank, wait=min(wait, 300.0) if wait else None
                )
            except _UNAVAILABLE as exc:
                return self._queue_report(s, values, exc)
            except ConflictError as exc:
                if self.strict:
                    raise
                warnings.warn(f"lrserve: report ignored: {exc}", RuntimeWarning, stacklevel=2)
                return None
            self._back_online()
        complete = bool(res.get("complete", True))
        if self.world_size > 1 and not complete:
            self._wait_complete(s)
        # Completed later than this answer was written: its version may predate the
        # decision, so fetch regardless.
        self._after_report(res, force=not complete)
        return res

    def _wait_complete(self, s: int) -> None:
        assert self._client is not None
        deadline = time.monotonic() + self._report_timeout
        while time.monotonic() < deadline:
            try:
                run = self._client.get_run(self.run_id)
            except _UNAVAILABLE as exc:
                self._went_offline(exc)
                break
            done = run.get("completed_step")
            if done is not None and done >= s:
                return
            time.sleep(0.05)
        msg = f"lrserve run {self.run_id!r}: step {s} not complete after {self._report_timeout}s"
        if self.strict:
            raise WindowExhaustedError(msg)
        warnings.warn(msg + "; ranks may apply different values", RuntimeWarning, stacklevel=3)

    def _after_report(self, res: Mapping[str, Any], force: bool = False) -> None:
        b = self._bound
        same = b is not None and not b.window.held and _values_version(res) == b.window.version
        if same and not force:
            return
        try:
            self._install(self._fetch(self._step), force=True)
        except _UNAVAILABLE as exc:
            self._went_offline(exc)
            # Still apply the decision from the step it applies to; the refresher
            # brings the rest of the window when the service answers again.
            cols = {g: {f: [float(v)] for f, v in fs.items()} for g, fs in res["groups"].items()}
            start = int(res.get("applies_from", self._step + 1))
            self._install(Window(start, 1, _values_version(res), None, cols), force=True)

    def _queue_report(
        self, s: int, values: dict[str, float | None], exc: BaseException | None
    ) -> ReportResult | None:
        if self.strict and exc is not None:
            raise exc
        self._outbox.append((s, values))
        if exc is not None:
            self._went_offline(exc)
        self._wake.set()
        return None

    def _flush_outbox(self) -> None:
        """Send reports kept while the service was down, oldest first (idempotent)."""
        assert self._client is not None
        with self._io_lock:
            while self._outbox:
                s, values = self._outbox[0]
                try:
                    self._client.report(self.run_id, s, values, rank=self.rank)
                except _UNAVAILABLE as exc:
                    self._went_offline(exc)
                    return
                except ConflictError as exc:
                    log.warning("lrserve: dropping the kept report for step %d: %s", s, exc)
                self._outbox.popleft()

    # -- chief mode ------------------------------------------------------------------

    def _chief_sync(self, s: int, startup_error: BaseException | None = None) -> None:
        """Collective: rank 0 sends every rank the values from step ``s`` on.

        With ``startup_error`` (rank 0 could not attach), rank 0 sends the error instead and
        every rank raises.
        """
        payload: list[Any] = [None]
        if self.rank == 0:
            if startup_error is not None:
                payload[0] = ("error", f"{type(startup_error).__name__}: {startup_error}")
            else:
                w = self._chief_source(s)
                payload[0] = ("values", self._names, w)
        dist.broadcast_object_list(payload, src=0, group=self.process_group)
        if payload[0][0] == "error":
            if startup_error is not None:
                raise startup_error
            raise LRServeError(
                f"lrserve run {self.run_id!r}: rank 0 could not attach: {payload[0][1]}"
            )
        _, names, w = payload[0]
        if names is not None:
            self._names = list(names)
        if w is None:
            self._bound = None
            self._hold(s)
            return
        self._untie()
        self._bound = bind(w, self._group_names(), self.optimizer.param_groups)
        self._bound.apply(s - w.start)
        if w.held:
            self._hold(s)

    def _chief_source(self, s: int) -> Window | None:
        with self._io_lock:
            candidates = [self._next, self._bound.window if self._bound else None]
            src = next(
                (w for w in candidates if w is not None and w.covers(s) and not w.held), None
            )
            if src is None and not self._offline and self._names is not None:
                try:
                    src = self._next = self._fetch(s)
                except _UNAVAILABLE as exc:
                    self._went_offline(exc)
            if src is not None and src.covers(s):
                return src.sliced(s, self._sync_every)
            if self._names is None:
                return None
            held = read_values(self._names, self.optimizer.param_groups, self._fields())
            version = self._bound.window.version if self._bound else -1
            return Window.held_at(s, self._sync_every, version, held)

    def _report_chief(self, s: int, metrics: Mapping[str, Any]) -> ReportResult | None:
        """Collective: gather every rank's metrics, combine and report them on rank 0.

        Every rank takes part in every collective whatever happens, or the others would wait
        for ever: a rank whose metrics are invalid still joins the gather (with its error),
        and so does a rank 0 that the service refuses (it broadcasts the error); then every
        rank raises.
        """
        own_error: UsageError | None = None
        try:
            mine: tuple[str, Any] = ("values", metric_values(metrics))
        except UsageError as exc:
            own_error = exc
            mine = ("error", str(exc))
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.process_group)
        bad = [(r, g[1]) for r, g in enumerate(gathered) if g[0] == "error"]
        if own_error is not None:
            raise own_error
        if bad:
            r, why = bad[0]
            raise UsageError(f"lrserve run {self.run_id!r}: step {s} not reported: rank {r}: {why}")
        result: list[Any] = [None]
        failure: BaseException | None = None
        if self.rank == 0:
            assert self._client is not None
            combined = aggregate_ranks([g[1] for g in gathered], self._aggregate)
            try:
                result[0] = ("answer", self._report_combined(s, combined))
            except BaseException as exc:  # sent to the other ranks, raised below
                failure = exc
                result[0] = ("error", f"{type(exc).__name__}: {exc}")
        dist.broadcast_object_list(result, src=0, group=self.process_group)
        if result[0][0] == "error":
            if failure is not None:
                raise failure
            raise LRServeError(
                f"lrserve run {self.run_id!r}: rank 0 could not report step {s}: {result[0][1]}"
            )
        res: ReportResult | None = result[0][1]
        # The answer changes values from s + 1 on: every rank takes them now, at the
        # same step, from the same broadcast.
        self._chief_sync(self._step)
        if res is None and self.strict:
            raise WindowExhaustedError(f"lrserve run {self.run_id!r}: report for step {s} failed")
        return res

    def _report_combined(self, s: int, combined: dict[str, float | None]) -> ReportResult | None:
        """Chief rank 0: report the combined metrics (or keep them while offline)."""
        assert self._client is not None
        with self._io_lock:
            self._flush_outbox()
            res: ReportResult | None = None
            if self._outbox:
                self._outbox.append((s, combined))
            else:
                try:
                    res = self._client.report(self.run_id, s, combined, rank=0)
                    self._back_online()
                except _UNAVAILABLE as exc:
                    self._outbox.append((s, combined))
                    self._went_offline(exc)
                except ConflictError as exc:
                    log.warning("lrserve: report ignored: %s", exc)
            if res is not None:
                cur = self._next or (self._bound.window if self._bound else None)
                if cur is None or cur.version != _values_version(res):
                    try:
                        self._next = self._fetch(self._step)
                    except _UNAVAILABLE as exc:
                        self._went_offline(exc)
        return res

    # -- fetching and installing windows ---------------------------------------------

    def _group_names(self) -> list[str]:
        if self._names is None:
            return [f"group{i}" for i in range(len(self.optimizer.param_groups))]
        return self._names

    def _fields(self) -> dict[str, tuple[str, ...]]:
        b = self._bound
        if b is None:
            return {n: ("lr",) for n in self._group_names()}
        return b.window.fields()

    def _attach(self) -> None:
        """Create the run (when given a spec) or look it up; learn the group names."""
        assert self._client is not None
        n_groups = len(self.optimizer.param_groups)
        if self._spec is not None:
            body = dict(self._spec)
            body.setdefault("groups", groups_from_optimizer(self.optimizer))
            if not self._collective and self.world_size > 1:
                body.setdefault("world_size", self.world_size)
            groups = body["groups"]
            if len(groups) != n_groups:
                raise UsageError(
                    f"spec has {len(groups)} groups but the optimizer has {n_groups} param groups"
                )
            self._client.create_run(self.run_id, body)
        else:
            run = self._client.get_run(self.run_id)
            groups = run["spec"]["groups"]
            if len(groups) != n_groups:
                raise UsageError(
                    f"run {self.run_id!r} has {len(groups)} groups but the optimizer has "
                    f"{n_groups} param groups"
                )
        self._names = [str(g["name"]) for g in groups]

    def _fetch(self, start: int, etag: str | None = None, size: int | None = None) -> Window:
        assert self._client is not None
        client = self._client
        n = self._window_size if size is None else min(size, MAX_WINDOW)
        t0 = time.monotonic()
        try:
            meta, w = client._get_lr_window_arrays(self.run_id, start, n, etag)
        except APIError as exc:
            # Over the server's work budget (many groups, a costly schedule): the refusal
            # names the largest window that fits; fetch that, and keep that size from now on.
            fits = exc.body.get("max_count") if isinstance(exc.body, dict) else None
            if exc.slug != "work-limit" or not isinstance(fits, int) or fits < 1:
                raise
            self._window_size = min(self._window_size, max(2, fits))
            meta, w = client._get_lr_window_arrays(self.run_id, start, self._window_size, etag)
        self._validated_at = time.monotonic()
        if not meta.not_modified:
            self._fetch_took = self._validated_at - t0
        if meta.not_modified or w is None:
            raise _NotModified
        return Window(w.start, w.count, w.version, meta.etag, array=w.array, series=tuple(w.series))

    def _install(self, w: Window, force: bool = False) -> None:
        """Make ``w`` the window ``step()`` reads, if it is newer or reaches further."""
        with self._io_lock:
            if self._collective:
                cur = self._next
                if force or cur is None or _better(w, cur):
                    self._next = w
                return
            b = self._bound
            if force or b is None or _better(w, b.window):
                # One reference assignment: step() sees the old window or the new one.
                self._bound = bind(w, self._group_names(), self.optimizer.param_groups)
                self._bound_since = time.monotonic()
                a = self._ahead
                if a is not None and (force or a.window.start != w.end or _better(w, a.window)):
                    self._ahead = None

    # -- the background refresher ----------------------------------------------------

    def _refresh_loop(self) -> None:
        delay = self._poll_interval
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                # The refresh first: a heartbeat is a request the loop's values need not
                # wait behind.
                self._refresh_once()
            except _UNAVAILABLE as exc:
                self._went_offline(exc)
                delay = min(max(delay * 2, 0.05), self._poll_interval)
                continue
            except Exception:  # never let the thread die: the loop would lose its values
                log.exception("lrserve: window refresh failed")
                delay = self._poll_interval
                continue
            finally:
                self._hurry = False
                self._fetch_done(unless_woken=not self._stop.is_set())
                if not self._wake.is_set():
                    # Not while the loop waits on the next fetch: the heartbeat goes after it.
                    self._heartbeat_if_due(defer=self._fast)
            delay = self._poll_interval if not self._offline else 0.05

    def _refresh_once(self) -> None:
        if self._names is None:
            self._attach()
        self._flush_outbox()
        cur = self._step
        w = (self._next if self._collective else None) or (
            self._bound.window if self._bound else None
        )
        b = None if self._collective else self._bound
        if b is not None and not b.window.held and b.start <= cur < b.start + b.count:
            wanted = self._want_ahead is b or cur >= b.start + b.half
            if wanted and self._fetch_ahead(b, cur):
                return
            if self._ahead is not None:
                # The next window is in hand: revalidate the current one (a 304 while
                # nothing changed) rather than fetch it again.
                try:
                    new = self._fetch(cur, etag=b.window.etag)
                except _NotModified:
                    self._back_online()
                    return
                self._install(new)
                self._back_online()
                return
        low = w is None or w.held or cur >= w.start + w.count // 2 or cur < w.start
        if not low and time.monotonic() - self._validated_at < self._poll_interval:
            return  # woken at a window boundary: the version was confirmed just now
        try:
            new = self._fetch(cur, etag=None if low else w.etag if w else None)
        except _NotModified:
            self._back_online()
            return
        self._install(new)
        self._back_online()

    def _fetch_ahead(self, b: BoundWindow, cur: int) -> bool:
        """Fetch and bind the window that follows ``b`` (False: nothing to do here)."""
        a = self._ahead
        if a is not None and a.window.start == b.window.end:
            return False
        self._ahead_ready.clear()
        size = self._window_size
        if self._fast:
            # A fast loop gets longer windows ahead, each twice the last, up to 4x and
            # FETCH_VALUES values: a fetch's fixed cost is spread over more steps, while the
            # lease reaches no further in time than a slower loop's does. At many groups
            # the values bound keeps it at ``window`` (a bigger fetch would only take
            # longer than the loop takes to use it).
            cols = max(1, len(b.window.series))
            grow = min(4 * size, 2 * b.count, FETCH_VALUES // cols)
            size = max(size, grow)
        try:
            new = self._fetch(b.window.end, size=size)
        except BaseException:
            self._ahead_ready.set()
            raise
        took = self._fetch_took
        if _changed(new, b.window):
            # A newer version (or a re-created run): the bound window is stale too.
            self._install(self._fetch(self._step), force=True)
            self._back_online()
            return True
        # A loop that would reach the boundary within a few fetch times gets the next
        # window asked for at its first step (a whole window of time), else timed again.
        # The pace is the probe's when it timed this window (the first window's arrival
        # long precedes the loop's first step), else the steps since the window was bound.
        pace = self._pace
        if pace is None or pace[0] != b.start:
            elapsed = max(time.monotonic() - self._bound_since, 1e-9)
            per_step = elapsed / max(cur - b.start, 1)
        else:
            per_step = pace[1]
        left = (b.window.end - cur) * per_step
        self._fast = left < 4 * took
        try:
            with self._io_lock:
                if self._bound is b:
                    refill = 0 if self._fast else None
                    self._ahead = bind(
                        new, self._group_names(), self.optimizer.param_groups, refill=refill
                    )
                self._hurry = False
        finally:
            self._ahead_ready.set()
        self._back_online()
        return True

    def _client_timeout(self) -> float:
        """Seconds a step may wait for the refresher's fetch (one request's read timeout)."""
        timeout = getattr(self._client, "_config", None)
        read = getattr(getattr(timeout, "timeout", None), "read", None)
        return float(read) if isinstance(read, (int, float)) else 30.0

    def _heartbeat_if_due(self, defer: bool = False) -> None:
        """Rank 0, from this background thread: tell the service the job is alive (the run
        shows ``running``) at most every ``HEARTBEAT_INTERVAL`` s. Best effort: a failure is
        logged at debug level and forgotten; skipped while the service is unreachable (the
        refresh already waits on it)."""
        now = time.monotonic()
        if self.rank != 0 or self._offline or self._client is None:
            return
        if now - self._last_heartbeat < HEARTBEAT_INTERVAL:
            return
        if defer:
            # A fast loop (``defer``): its refresher goes from fetch to fetch, and a heartbeat
            # in between would hold up the next one; it is put off, once, by at most
            # HEARTBEAT_INTERVAL/10 (the run still shows ``running``).
            if self._heartbeat_due is None:
                self._heartbeat_due = now
            if now - self._heartbeat_due < HEARTBEAT_INTERVAL / 10:
                return
        self._heartbeat_due = None
        self._last_heartbeat = now
        try:
            self._client.heartbeat(self.run_id, step=max(0, self._step))
        except Exception as exc:
            log.debug("lrserve: heartbeat for run %r failed: %s", self.run_id, exc)

    def _went_offline(self, exc: BaseException) -> None:
        self._offline = True
        if not self._warned_offline:
            self._warned_offline = True
            b = self._bound
            upto = f"up to step {b.window.end - 1}" if b is not None else "none yet"
            msg = (
                f"lrserve service unreachable for run {self.run_id!r} ({exc}); training "
                f"continues on the values already fetched ({upto}) and catches up when it is back"
            )
            log.warning(msg)
            warnings.warn(msg, LRServeOfflineWarning, stacklevel=2)

    def _back_online(self) -> None:
        if self._offline:
            log.warning("lrserve service reachable again for run %r", self.run_id)
        self._offline = False
        self._warned_offline = False
        self._warned_held = False

    # -- checkpointing ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume: run id, step, world and pending reports."""
        names = self._group_names()
        return {
            "run": self.run_id,
            "step": self._step,
            "rank": self.rank,
            "world_size": self.world_size,
            "chief": self.chief,
            "version": self.version,
            "values": read_values(names, self.optimizer.param_groups, self._fields()),
            "outbox": [[s, dict(v)] for s, v in self._outbox],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: same step, values from the server.

        Call it after ``optimizer.load_state_dict()`` (or instead of restoring the
        optimizer's learning rates). Collective in chief mode.
        """
        if state_dict.get("run") != self.run_id:
            raise UsageError(
                f"state_dict is for run {state_dict.get('run')!r}, not {self.run_id!r}"
            )
        s = int(state_dict["step"])
        with self._io_lock:
            self._step = s
            self._untie()  # optimizer.load_state_dict() may have brought shared tensors
            for item in state_dict.get("outbox", []):
                self._outbox.append((int(item[0]), metric_values(item[1])))
            held = state_dict.get("values") or {}
            if held:
                # The checkpoint's values are the last known ones: in force until the
                # server's arrive (and what is held if it cannot be reached).
                w = Window.held_at(s, 1, int(state_dict.get("version") or -1), held)
                bind(w, self._group_names(), self.optimizer.param_groups).apply(0)
            self._bound = None
            self._next = None
        refused: BaseException | None = None
        if self._talks and self._names is not None:
            try:
                self._rewind_to(s)
                self._flush_outbox()
                self._install(self._fetch(s), force=True)
            except _UNAVAILABLE as exc:
                if self.strict:
                    raise
                self._went_offline(exc)
            except UsageError as exc:
                if not self._collective:
                    raise
                refused = exc  # every rank raises it, after the broadcast below
        if self._collective:
            self._chief_sync(s, refused)
        elif self._bound is not None and self._bound.window.covers(s):
            self._bound.apply(s - self._bound.start)
        self._wake.set()

    def _rewind_to(self, s: int) -> None:
        """Resuming at step ``s`` of a run that completed later steps: rewind it to ``s``.

        The key is the checkpoint's step and the branch the run is on, so every rank that
        loads the same checkpoint asks for the same rewind (the server makes it once), and a
        second resume from the same checkpoint later, on the new branch, rewinds again.
        A rank that reads the run after another rank's rewind finds nothing to rewind.
        """
        assert self._client is not None
        run = self._client.get_run(self.run_id)
        completed = run.get("completed_step")
        if completed is None or completed <= s:
            return
        if not self._rewind:
            raise UsageError(
                f"lrserve run {self.run_id!r}: the checkpoint is at step {s} but the run has "
                f"completed step {completed}: resuming as is would meet the later steps' "
                "reports and the decisions they caused (a plateau reduction, say). Pass "
                "rewind=True to take the run back to the checkpoint (the later reports are "
                "kept as an abandoned branch), resume from a newer checkpoint, or rewind it "
                "yourself (lrserve rewind RUN --to-step N)"
            )
        branch = int(run.get("branch", 0))
        key = f"resume-step{s}-branch{branch}"
        after = self._client.rewind(self.run_id, s, key=key, note=f"resume from step {s}")
        if after.get("branch", branch) != branch and not self._warned_rewind:
            self._warned_rewind = True
            msg = (
                f"lrserve run {self.run_id!r}: resumed from a checkpoint at step {s}, older "
                f"than the run's completed step {completed}: the run is rewound to step {s} "
                f"(branch {after.get('branch')}); reports after it are kept as an abandoned "
                "branch and their decisions are undone"
            )
            log.warning(msg)
            warnings.warn(msg, UserWarning, stacklevel=3)

    # -- lifetime --------------------------------------------------------------------

    def finish(self) -> None:
        """The job is done: rank 0 tells the service (the run shows ``finished`` until a
        report at a later step), then :meth:`close`. Best effort: a service that does not
        answer is logged at debug level. Call it after the last step; ``close()`` alone (or
        leaving a ``with`` block) does not mark the run finished, as a job stopped early to
        resume later is not."""
        if not self._closed and self.rank == 0 and self._talks and self._client is not None:
            try:
                self._client.heartbeat(self.run_id, step=max(0, self._step), finished=True)
            except Exception as exc:
                log.debug("lrserve: finish heartbeat for run %r failed: %s", self.run_id, exc)
        self.close()

    def close(self) -> None:
        """Stop the refresher, send kept reports if the service answers, close the client."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._fetch_done()
        if self._talks and self._outbox:
            with contextlib.suppress(Exception):
                self._flush_outbox()
        self._close_client()

    def _close_client(self) -> None:
        if self._owns_client and self._client is not None:
            self._client.close()

    def __enter__(self) -> RemoteScheduler:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._stop.set()
            self._wake.set()

    def __repr__(self) -> str:
        return (
            f"RemoteScheduler(run={self.run_id!r}, step={self._step}, version={self.version}, "
            f"rank={self.rank}/{self.world_size}{', chief' if self.chief else ''})"
        )


class _NotModified(Exception):
    """The server answered 304: the window in hand is still exact."""


def _values_version(res: Mapping[str, Any]) -> int:
    """The values version a report's answer names (an older server sends only ``version``,
    which its windows carried too)."""
    return int(res.get("values_version", res["version"]))


def _incarnation(etag: str | None) -> str | None:
    """The run-creation part of a values ETag (``"7-1a2b3c4d"`` -> ``"1a2b3c4d"``)."""
    if not etag:
        return None
    tag = etag.removeprefix("W/").strip('"')
    return tag.split("-", 1)[1] if "-" in tag else None


def _changed(new: Window, old: Window) -> bool:
    """Whether ``new`` belongs to a later version (or another incarnation) than ``old``."""
    a, b = _incarnation(new.etag), _incarnation(old.etag)
    if a is not None and b is not None and a != b:
        return True
    return new.version > old.version


def _better(new: Window, old: Window) -> bool:
    if old.held:
        return True
    a, b = _incarnation(new.etag), _incarnation(old.etag)
    if a is not None and b is not None and a != b:
        # The run was deleted and created again under the same id: its versions restarted.
        return True
    if new.version != old.version:
        # Versions only grow; an older one can arrive late from a slow request.
        return new.version > old.version
    return new.end > old.end
