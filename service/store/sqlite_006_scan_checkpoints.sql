-- lrserve schema v6 (SQLite): scan checkpoints (issue 12)
-- A recursive composition (a ChainedScheduler with an additive child, a SequentialLR segment
-- that keeps the lr it finds) is scanned step by step; the lr at every 2,048-step block edge
-- is kept here, so a process that starts, or another replica, resumes a scan far into a run
-- instead of scanning it from step 0. A row is a pure function of its key: ``curve`` names
-- the compiled spec (a hash, with the scan's format) and the scan in it, ``signature`` the
-- metric-driven state the value depends on. Rows are shared by runs with the same spec; deleting
-- a run deletes those of its spec (they are recomputed if another run needs them).
CREATE TABLE scan_checkpoints (
    curve TEXT NOT NULL,
    block INTEGER NOT NULL,
    signature BLOB NOT NULL,
    lr BLOB NOT NULL,
    PRIMARY KEY (curve, block, signature)
) WITHOUT ROWID;
