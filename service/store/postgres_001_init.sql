-- lrserve schema v1 (PostgreSQL)
CREATE TABLE runs (
    id TEXT COLLATE "C" PRIMARY KEY,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    overrides TEXT NOT NULL DEFAULT '[]',
    version BIGINT NOT NULL,
    step BIGINT,
    completed_step BIGINT,
    event_seq BIGINT NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE reports (
    run_id TEXT COLLATE "C" NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step BIGINT NOT NULL,
    rank BIGINT NOT NULL,
    "values" TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (run_id, step, rank)
);
CREATE TABLE events (
    run_id TEXT COLLATE "C" NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    type TEXT NOT NULL,
    step BIGINT,
    at TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX events_by_type ON events (run_id, type, step);
