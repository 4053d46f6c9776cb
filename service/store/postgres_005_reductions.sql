-- lrserve schema v5 (PostgreSQL): plateau reductions in their own rows (issue 12)
-- A metric-driven node's reductions, one row each, appended by the report that decides one:
-- the run's state keeps only their count, so a report writes one small row and the state stays
-- small however many reductions there were. ``branch``: the run's branch the row belongs to (a
-- rewind rewrites the rows under the new one). States stored before v5 keep their reductions
-- inline until their next write moves them here.
CREATE TABLE reductions (
    run_id TEXT COLLATE "C" NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    node TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL,
    branch INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, node, seq)
);
