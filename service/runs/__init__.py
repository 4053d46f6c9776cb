"""The run model: RunSpec, pure transitions (create, report, override), evaluation."""
