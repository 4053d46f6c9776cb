-- lrserve schema v1 (SQLite)
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    overrides TEXT NOT NULL DEFAULT '[]',
    version INTEGER NOT NULL,
    step INTEGER,
    completed_step INTEGER,
    event_seq INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE reports (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    "values" TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (run_id, step, rank)
) WITHOUT ROWID;
CREATE TABLE events (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    step INTEGER,
    at TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE INDEX events_by_type ON events (run_id, type, step);
