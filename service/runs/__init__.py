"""The application layer: runs, their use cases, and the repository they need.

- ``model``: the run spec and the pure transitions (report planning, aggregation, overrides);
- ``service``: every use case (``Runs``, the async service the HTTP layer calls, and the
  blocking transactions under it);
- ``repository``: the storage protocol ``service.store`` implements, and its rows;
- ``values``: the one cache of evaluated values; ``errors``: what a request is refused for.

Dependencies point inward: ``service.api`` -> here -> ``service.schedules``.
"""
