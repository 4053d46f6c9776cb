"""lrserve server: schedule engine, run model, storage and HTTP API."""
