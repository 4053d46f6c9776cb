"""The application layer: runs, their use cases, and the repository they need.

- ``model``: the run spec and the pure transitions (report planning, aggregation, overrides);
- ``service``: ``Runs``, the async application service the HTTP layer calls: one method per
  use case, deciding where each runs (the event loop, a worker thread, the heavy pool);
- ``transactions``: the blocking transactions under it (``create_run``, ``report``,
  ``add_override``, ...), callable from any thread, and dry runs of the operator changes;
- ``views``: what the use cases hand out (``Run``, ``ReportOutcome``, ...), never HTTP bodies;
- ``evaluation``: expensive evaluations off the event loop (``heavy``), curves, previews;
- ``limits``: what a spec and an answer may cost (the work and size checks);
- ``repository``: the storage protocol ``service.store`` implements, and its rows;
- ``values``: the one cache of evaluated values; ``errors``: what a request is refused for.

Dependencies point inward: ``service.api`` -> here -> ``service.schedules``.
"""
