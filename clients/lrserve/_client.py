"""The synchronous client."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from . import _calls
from ._base import ClientConfig
from ._codec import DecodedWindow
from ._errors import APIError
from ._transport import Call, RetryPolicy
from ._types import (
    CreateRunResult,
    Curve,
    EventList,
    LRValues,
    LRWindow,
    MetricHistory,
    MetricNames,
    Preview,
    RangeTestResult,
    ReportResult,
    Run,
    RunList,
    RunSummary,
)

__all__ = ["Client"]

T = TypeVar("T")


class Client:
    """A synchronous lrserve client with one connection pool.

    >>> with lrserve.Client("http://lrs:8000") as client:        # doctest: +SKIP
    ...     run, created = client.create_run("exp-42", spec)
    ...     client.get_lr("exp-42", step=100)["groups"]["head"]["lr"]

    Args:
        url: server base URL; default ``$LRSERVE_URL``, else ``http://127.0.0.1:8000``.
        token: bearer token; default ``$LRSERVE_TOKEN``, else none.
        timeout: seconds, or an :class:`httpx.Timeout`; default connect 5 s, read 30 s.
        max_retries, backoff_base, backoff_max, retry_after_max: see :class:`RetryPolicy`.
        retry: a whole :class:`RetryPolicy` instead of the four arguments above.
        headers: extra headers for every request.
        transport: an :class:`httpx.BaseTransport` (e.g. with ``verify``/``cert`` set up).

    Connection failures and 502/503/504 answers are retried with exponential backoff and
    full jitter (``Retry-After`` honoured, capped); 4xx answers never are. Failures
    raise :class:`~lrserve.APIError` subclasses carrying the server's problem detail, or
    :class:`~lrserve.TransportError` when the server cannot be reached.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        retry_after_max: float = 30.0,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._config = ClientConfig.build(
            url,
            token=token,
            timeout=timeout,
            retry=retry
            or RetryPolicy(
                max_retries=max_retries,
                backoff_base=backoff_base,
                backoff_max=backoff_max,
                retry_after_max=retry_after_max,
            ),
            headers=headers,
        )
        self._http = httpx.Client(
            base_url=self._config.url,
            headers=self._config.headers,
            timeout=self._config.timeout,
            transport=transport,
        )

    @property
    def url(self) -> str:
        """The server's base URL."""
        return self._config.url

    @property
    def retry(self) -> RetryPolicy:
        """The retry policy in force."""
        return self._config.retry

    # -- plumbing --------------------------------------------------------------------

    def _send(self, call: Call[T]) -> T:
        policy = self._config.retry
        timeout = self._config.timeout_for(call)
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    call.method, call.path, timeout=timeout, **call.request_kwargs()
                )
            except httpx.TransportError as exc:
                if attempt < policy.max_retries and call.should_retry_exception(exc):
                    time.sleep(policy.delay(attempt))
                    attempt += 1
                    continue
                raise call.transport_error(self.url, exc, attempt + 1) from exc
            if attempt < policy.max_retries and call.should_retry_status(response.status_code):
                time.sleep(policy.delay(attempt, self._config.retry_after(response)))
                attempt += 1
                continue
            return call.finish(response)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"

    # -- runs ------------------------------------------------------------------------

    def create_run(self, run_id: str, spec: Mapping[str, Any]) -> CreateRunResult:
        """Create run ``run_id`` from a run body, or confirm an identical one exists.

        Returns ``(run, created)``; ``created`` is false when the same spec was already
        stored. A different spec under the same id raises
        :class:`~lrserve.RunConflictError`.
        """
        return self._send(_calls.create_run(run_id, spec))

    def get_run(self, run_id: str) -> Run:
        """The run: spec, ``version``, ``step``, ``completed_step``, ``state``, overrides."""
        return self._send(_calls.get_run(run_id))

    def list_runs(
        self,
        limit: int | None = None,
        cursor: str | None = None,
        *,
        status: str | Sequence[str] | None = None,
        search: str | None = None,
        tags: Sequence[str] = (),
        sort: str | None = None,
    ) -> RunList:
        """One page of runs: ``{"runs": [...], "next_cursor": str | None}``.

        ``status``: ``running`` / ``idle`` / ``finished`` (or several); ``search``: a
        case-insensitive substring of the id or a metadata value; ``tags``: all of them;
        ``sort``: ``id`` (default), ``created``, ``updated``, ``step``, ``-`` for descending.
        """
        return self._send(
            _calls.list_runs(limit, cursor, status=status, search=search, tags=tags, sort=sort)
        )

    def heartbeat(
        self, run_id: str, *, step: int | None = None, finished: bool = False, rank: int = 0
    ) -> None:
        """Tell the server the job is alive (its run shows ``running``), or with ``finished``
        that it is done (``finished`` until a report at a later step). Changes no value."""
        self._send(_calls.heartbeat(run_id, step, finished, rank))

    def iter_runs(self, page_size: int | None = None, **filters: Any) -> Iterator[RunSummary]:
        """Every run, following ``next_cursor`` page by page (``filters``: as
        :meth:`list_runs`'s ``status``, ``search``, ``tags``, ``sort``)."""
        cursor: str | None = None
        while True:
            page = self.list_runs(page_size, cursor, **filters)
            yield from page["runs"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def delete_run(self, run_id: str, *, missing_ok: bool = False) -> None:
        """Delete a run. With ``missing_ok`` an already-absent run is not an error.

        Use ``missing_ok=True`` where a retried delete may find its own earlier attempt
        already done.
        """
        self._send(_calls.delete_run(run_id, missing_ok))

    # -- values ----------------------------------------------------------------------

    def get_lr(self, run_id: str, step: int | None = None, *, lease: bool = True) -> LRValues:
        """Every group's values at ``step`` (default: the run's current step)."""
        return self._send(_calls.get_lr(run_id, step, lease=lease))

    def get_lr_window(
        self,
        run_id: str,
        start: int,
        count: int,
        etag: str | None = None,
        *,
        lease: bool = True,
    ) -> LRWindow:
        """Values for steps ``start .. start+count-1``, columnar.

        Pass the ``etag`` of the window you hold: while the run's version is unchanged
        the server answers 304 and the result has ``not_modified=True`` and no values.
        """
        binary = getattr(self, "_window_binary", None)
        try:
            return self._send(
                _calls.get_lr_window(run_id, start, count, etag, lease=lease, binary=binary)
            )
        except APIError as exc:
            if exc.status != 406 or binary is False:
                raise
            # Something in between refuses the binary encoding: JSON from now on.
            self._window_binary = False
            return self._send(
                _calls.get_lr_window(run_id, start, count, etag, lease=lease, binary=False)
            )

    def _get_lr_window_arrays(
        self, run_id: str, start: int, count: int, etag: str | None = None
    ) -> tuple[LRWindow, DecodedWindow | None]:
        """:meth:`get_lr_window` as one float64 array (the schedulers' refresh; needs numpy)."""
        binary = getattr(self, "_window_binary", None) is not False
        try:
            return self._send(
                _calls.get_lr_window_arrays(run_id, start, count, etag, binary=binary)
            )
        except APIError as exc:
            if exc.status != 406 or not binary:
                raise
            self._window_binary = False
            return self._send(_calls.get_lr_window_arrays(run_id, start, count, etag, binary=False))

    def get_curve(
        self,
        run_id: str,
        start: int | None = None,
        stop: int | None = None,
        points: int | None = None,
    ) -> Curve:
        """Values over ``[start, stop)`` decimated to about ``points`` samples."""
        return self._send(_calls.get_curve(run_id, start, stop, points))

    def preview(
        self,
        spec: Mapping[str, Any],
        start: int = 0,
        count: int | None = None,
        *,
        stop: int | None = None,
        points: int | None = None,
    ) -> Preview:
        """Values of a schedule spec without creating a run.

        ``spec`` is the run body's schedule part (``groups``, ``schedule``,
        ``group_schedules``, ``param_schedules``) or a whole run body. Give ``count``
        for ``count`` consecutive steps, or ``stop`` and ``points`` for a decimated curve.
        """
        return self._send(_calls.preview(spec, start, count, stop=stop, points=points))

    # -- metrics and control ---------------------------------------------------------

    def report(
        self,
        run_id: str,
        step: int,
        values: Mapping[str, Any],
        rank: int = 0,
        wait: float | None = None,
    ) -> ReportResult:
        """Report metrics for ``step`` from ``rank``.

        Safe to retry: ``(run, step, rank)`` is the idempotency key. NaN and infinities
        are sent in the contract's string form. With ``wait`` the server holds the answer
        up to that many seconds until every rank reported (``complete``); the read
        timeout of this request is raised to cover it. The result's ``groups`` are the
        values from ``applies_from`` (step + 1) on.
        """
        return self._send(_calls.report(run_id, step, values, rank, wait))

    def get_metrics(self, run_id: str, name: str) -> MetricHistory:
        """Stored history of one metric: ``points`` per report, ``aggregate`` per step."""
        return self._send(_calls.get_metrics(run_id, name))

    def get_metric_names(self, run_id: str) -> MetricNames:
        """The names of every metric reported to the run (``{"run", "names"}``)."""
        return self._send(_calls.get_metric_names(run_id))

    def get_events(self, run_id: str, after: int | None = None) -> EventList:
        """The run's events (created, report_completed, reduced, override), oldest first."""
        return self._send(_calls.get_events(run_id, after))

    def range_test(self, run_id: str) -> RangeTestResult:
        """A range-test run's curve (lr, loss, smoothed loss per step), its stop step and the
        ``steepest``/``valley``/``minimum`` suggestions (see docs/range-test.md)."""
        return self._send(_calls.range_test(run_id))

    def override(
        self,
        run_id: str,
        from_step: int,
        action: str,
        value: float,
        groups: Sequence[str] | None = None,
        field: str = "lr",
        note: str | None = None,
    ) -> Run:
        """Scale (``action="scale"``) or replace (``"set"``) ``field`` from ``from_step`` on.

        Not idempotent: sending it twice applies it twice. It is therefore retried only
        when the request cannot have reached the server (connection refused, connect
        timeout) or the server answered 503; after a read timeout or a dropped
        connection it raises :class:`~lrserve.TransportError`, and the caller should
        check ``get_run(run_id)["overrides"]`` before sending it again.
        """
        return self._send(_calls.override(run_id, from_step, action, value, groups, field, note))

    def amend(
        self,
        run_id: str,
        from_step: int,
        schedule: Mapping[str, Any] | None = None,
        *,
        group_schedules: Mapping[str, Any] | None = None,
        param_schedules: Mapping[str, Any] | None = None,
        restart: bool = False,
        base: str = "initial",
        note: str = "",
    ) -> CreateRunResult:
        """Change the run's schedule from ``from_step`` on; ``(run, created)``.

        ``restart=True``: the new schedule counts its steps from ``from_step``;
        ``base="current"``: it starts from the values in force at ``from_step - 1``. Values
        before ``from_step`` never change. Idempotent: the same amendment again returns
        ``created=False``. Raises :class:`~lrserve.TooLateError` (with ``earliest_step``)
        when trainers may already hold the values of ``from_step``.
        """
        return self._send(
            _calls.amend(
                run_id,
                from_step,
                schedule,
                group_schedules=group_schedules,
                param_schedules=param_schedules,
                restart=restart,
                base=base,
                note=note,
            )
        )

    def rewind(self, run_id: str, to_step: int, key: str | None = None, note: str = "") -> Run:
        """Take the run back to how it was when ``to_step`` completed (a job restarting
        from an earlier checkpoint): later reports are set aside as an abandoned branch.
        With ``key``, asking again (from every rank, say) changes nothing."""
        return self._send(_calls.rewind(run_id, to_step, key, note))

    def withdraw_override(self, run_id: str, n: int, from_step: int | None = None) -> Run:
        """Withdraw override ``n`` (numbered from 1) from ``from_step`` on; by default from
        the earliest step every trainer is guaranteed to see (the run's ``leased_until``)."""
        return self._send(_calls.withdraw_override(run_id, n, from_step))

    # -- probes ----------------------------------------------------------------------

    def healthz(self) -> dict[str, Any]:
        """``GET /healthz``: returns when the server process is up."""
        return self._send(_calls.healthz())

    def readyz(self) -> dict[str, Any]:
        """``GET /readyz``: returns when the database answers; raises
        :class:`~lrserve.ServiceUnavailableError` at once (no retry) when it does not."""
        return self._send(_calls.readyz())
