"""Bounded client traffic through the load balancer, for deploy/test-deployment.sh.

    python deploy/traffic.py send URL TOKEN SECONDS LABEL [--threads N]
    docker logs LB | python deploy/traffic.py lblog NAME=IP...

Each thread owns one run (``deploytest-LABEL-<n>``): it PUTs it (the same body every time, so
the PUT is idempotent), then loops GET ``/lr``, POST ``/metrics`` at the next step and, every
tenth round, the PUT again, until SECONDS have passed. Every answer's status is counted; a
request that gets no answer within 20 s counts as ``timeout``, and a 503 without ``Retry-After``
as an error. Prints one JSON line:
``{"label", "requests", "statuses": {"200": n, ...}, "timeouts", "errors", "rps"}``. The loop
stops by itself: it sends only to URL (the balancer on loopback) and for at most SECONDS.
Standard library only, so it runs with any Python 3.

``lblog`` reads nginx access lines (deploy/nginx.conf's format) and prints, as one JSON line,
how many requests nginx answered with each status, how many were served by each replica (the
last upstream tried), how many attempts reached each replica (a request resent after a 503
counts for both) and the slowest request's time.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import re
import sys
import threading
import time
import urllib.parse
from typing import Any

SPEC = {
    "groups": [{"name": "a", "lr": 0.1}],
    "schedule": {"type": "StepLR", "step_size": 10, "gamma": 0.5},
    "group_schedules": {"a": {"type": "ReduceLROnPlateau", "metric": "loss", "patience": 2}},
}


class Counter:
    """Thread-safe tally of outcomes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: collections.Counter[str] = collections.Counter()
        self.timeouts = 0
        self.errors: collections.Counter[str] = collections.Counter()

    def add(self, outcome: int | str) -> None:
        with self.lock:
            if outcome == "timeout":
                self.timeouts += 1
            elif isinstance(outcome, int):
                self.statuses[str(outcome)] += 1
            else:
                self.errors[outcome] += 1


def worker(base: str, token: str, run: str, deadline: float, tally: Counter) -> None:
    """One client: a keep-alive connection that is reopened after any failure."""
    parts = urllib.parse.urlsplit(base)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    conn: http.client.HTTPConnection | None = None

    def call(method: str, path: str, body: Any = None) -> None:
        nonlocal conn
        c = conn or http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port, timeout=20
        )
        conn = c
        try:
            c.request(method, path, None if body is None else json.dumps(body), headers)
            resp = c.getresponse()
            resp.read()
            # A 503 must say when to retry (the service's and nginx's own both do).
            if resp.status == 503 and resp.getheader("Retry-After") is None:
                tally.add("503 without Retry-After")
            else:
                tally.add(resp.status)
            if resp.getheader("Connection", "").lower() == "close":
                c.close()
                conn = None
        except TimeoutError:
            tally.add("timeout")
            c.close()
            conn = None
        except (OSError, http.client.HTTPException) as exc:
            tally.add(type(exc).__name__)
            c.close()
            conn = None
            time.sleep(0.05)

    call("PUT", f"/v1/runs/{run}", SPEC)
    step = 0
    while time.monotonic() < deadline:
        step += 1
        call("GET", f"/v1/runs/{run}/lr?step={step}")
        call("POST", f"/v1/runs/{run}/metrics", {"step": step, "values": {"loss": 1.0 / step}})
        if step % 10 == 0:
            call("PUT", f"/v1/runs/{run}", SPEC)
    if conn is not None:
        conn.close()


LOG_LINE = re.compile(
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) \d+ upstream=(?P<upstream>.*?) ustatus=.*? '
    r"rt=(?P<rt>[\d.]+)"
)


def lblog(names: dict[str, str], lines: list[str]) -> dict[str, Any]:
    """Per status and per replica counts of nginx access lines."""
    by_ip = {ip: name for name, ip in names.items()}
    statuses: collections.Counter[str] = collections.Counter()
    served: collections.Counter[str] = collections.Counter()
    attempts: collections.Counter[str] = collections.Counter()
    slowest = 0.0
    for line in lines:
        m = LOG_LINE.search(line)
        if not m or " /readyz " in m["request"]:
            continue  # not an access line, or the balancer's own healthcheck
        statuses[m["status"]] += 1
        slowest = max(slowest, float(m["rt"]))
        tried = [u.strip().rsplit(":", 1)[0] for u in re.split(r"[,:] (?=\S)", m["upstream"])]
        # nginx logs the upstream group's own name when no replica was left to try.
        tried = [
            "no-replica" if ip == "lrserve" else by_ip.get(ip, ip)
            for ip in tried
            if ip and ip != "-"
        ]
        for name in tried:
            attempts[name] += 1
        if tried:
            served[tried[-1]] += 1
    return {
        "requests": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "served_by": dict(sorted(served.items())),
        "attempts": dict(sorted(attempts.items())),
        "slowest_s": slowest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    send = sub.add_parser("send")
    send.add_argument("url")
    send.add_argument("token")
    send.add_argument("seconds", type=float)
    send.add_argument("label")
    send.add_argument("--threads", type=int, default=4)
    log = sub.add_parser("lblog")
    log.add_argument("replicas", nargs="+", help="NAME=IP")
    args = parser.parse_args()
    if args.command == "lblog":
        names = dict(r.split("=", 1) for r in args.replicas)
        print(json.dumps(lblog(names, sys.stdin.read().splitlines())))
        return
    tally = Counter()
    started = time.monotonic()
    deadline = started + min(args.seconds, 120.0)
    threads = [
        threading.Thread(
            target=worker,
            args=(args.url, args.token, f"deploytest-{args.label}-{n}", deadline, tally),
        )
        for n in range(args.threads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    total = sum(tally.statuses.values()) + tally.timeouts + sum(tally.errors.values())
    print(
        json.dumps(
            {
                "label": args.label,
                "requests": total,
                "statuses": dict(sorted(tally.statuses.items())),
                "timeouts": tally.timeouts,
                "errors": dict(tally.errors),
                "rps": round(total / elapsed, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
