-- lrserve schema v4 (PostgreSQL): many ranks (issue 12)
-- The values version: what window and GET lr ETags name. It changes only when the run's
-- values change (a reduction, an override, an amendment, a rewind), not on every report.
ALTER TABLE runs ADD COLUMN values_version BIGINT NOT NULL DEFAULT 1;
UPDATE runs SET values_version = version;
-- How many ranks reported each step (kept by every report's transaction), so a partial
-- report does not read the other ranks' rows.
CREATE TABLE step_reports (
    run_id TEXT COLLATE "C" NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step BIGINT NOT NULL,
    ranks INTEGER NOT NULL,
    PRIMARY KEY (run_id, step)
);
INSERT INTO step_reports (run_id, step, ranks)
    SELECT run_id, step, COUNT(*) FROM reports GROUP BY run_id, step;
