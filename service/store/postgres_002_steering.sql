-- lrserve schema v2 (PostgreSQL): steering a live run (amendments, rewind, leases)
ALTER TABLE runs ADD COLUMN amendments TEXT NOT NULL DEFAULT '[]';
ALTER TABLE runs ADD COLUMN rewinds TEXT NOT NULL DEFAULT '[]';
-- No trainer has been handed values for steps >= leased_until: changes may start there.
ALTER TABLE runs ADD COLUMN leased_until BIGINT NOT NULL DEFAULT 0;
-- The run's current branch: the number of rewinds so far.
ALTER TABLE runs ADD COLUMN branch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE reports ADD COLUMN branch BIGINT NOT NULL DEFAULT 0;
-- Reports a rewind set aside, kept readable (a branch's (step, rank) is set aside at most once).
CREATE TABLE abandoned_reports (
    run_id TEXT COLLATE "C" NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    branch BIGINT NOT NULL,
    step BIGINT NOT NULL,
    rank BIGINT NOT NULL,
    "values" TEXT NOT NULL,
    received_at TEXT NOT NULL,
    abandoned_by BIGINT NOT NULL,
    PRIMARY KEY (run_id, branch, step, rank)
);
ALTER TABLE events ADD COLUMN branch BIGINT NOT NULL DEFAULT 0;
-- 0: on the current timeline; n: set aside by rewind n.
ALTER TABLE events ADD COLUMN abandoned_by BIGINT NOT NULL DEFAULT 0;
