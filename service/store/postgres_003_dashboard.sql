-- lrserve schema v3 (PostgreSQL): the run list of the dashboard (status, search, tags, sorts)
-- When the last new report arrived (NULL: none yet), and the last heartbeat of a trainer.
ALTER TABLE runs ADD COLUMN last_report_at TEXT;
ALTER TABLE runs ADD COLUMN heartbeat_at TEXT;
ALTER TABLE runs ADD COLUMN heartbeat_step BIGINT;
-- The later of the two (the status filter's indexed column: running = active_at >= now - idle).
ALTER TABLE runs ADD COLUMN active_at TEXT;
-- A heartbeat said "finished" (at finished_step); a report at a higher step clears it.
ALTER TABLE runs ADD COLUMN finished SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN finished_step BIGINT;
-- Derived from the spec and amendments by the run layer (NULL metadata: not derived yet).
ALTER TABLE runs ADD COLUMN horizon BIGINT;
ALTER TABLE runs ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
ALTER TABLE runs ADD COLUMN search TEXT NOT NULL DEFAULT '';
ALTER TABLE runs ADD COLUMN metadata TEXT;
-- Sorted JSON list of every metric name reported (NULL: a run older than v3, read from reports).
ALTER TABLE runs ADD COLUMN metric_names TEXT;
CREATE TABLE run_tags (
    tag TEXT COLLATE "C" NOT NULL,
    run_id TEXT COLLATE "C" NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    PRIMARY KEY (tag, run_id)
);
CREATE INDEX runs_by_created ON runs (created_at, id);
CREATE INDEX runs_by_updated ON runs (updated_at, id);
CREATE INDEX runs_by_step ON runs ((COALESCE(step, -1)), id);
CREATE INDEX runs_by_active ON runs (active_at);
UPDATE runs SET last_report_at = (SELECT MAX(received_at) FROM reports WHERE reports.run_id = runs.id);
UPDATE runs SET active_at = last_report_at;
