-- lrserve schema v2 (SQLite): steering a live run (amendments, rewind, leases)
ALTER TABLE runs ADD COLUMN amendments TEXT NOT NULL DEFAULT '[]';
ALTER TABLE runs ADD COLUMN rewinds TEXT NOT NULL DEFAULT '[]';
-- No trainer has been handed values for steps >= leased_until: changes may start there.
ALTER TABLE runs ADD COLUMN leased_until INTEGER NOT NULL DEFAULT 0;
-- The run's current branch: the number of rewinds so far.
ALTER TABLE runs ADD COLUMN branch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE reports ADD COLUMN branch INTEGER NOT NULL DEFAULT 0;
-- Reports a rewind set aside, kept readable (a branch's (step, rank) is set aside at most once).
CREATE TABLE abandoned_reports (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    branch INTEGER NOT NULL,
    step INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    "values" TEXT NOT NULL,
    received_at TEXT NOT NULL,
    abandoned_by INTEGER NOT NULL,
    PRIMARY KEY (run_id, branch, step, rank)
) WITHOUT ROWID;
ALTER TABLE events ADD COLUMN branch INTEGER NOT NULL DEFAULT 0;
-- 0: on the current timeline; n: set aside by rewind n.
ALTER TABLE events ADD COLUMN abandoned_by INTEGER NOT NULL DEFAULT 0;
