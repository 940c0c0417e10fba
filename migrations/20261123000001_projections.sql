-- Projection bookkeeping: one row per projection version. The checkpoint is
-- written in the same transaction as the rows it covers (exactly-once effect).
CREATE TABLE projection_checkpoints (
    name        TEXT        NOT NULL,
    version     INT         NOT NULL,
    last_seq    BIGINT      NOT NULL DEFAULT 0,
    -- running | stopped (at error_seq, with error) | building (rebuild in progress)
    state       TEXT        NOT NULL DEFAULT 'running',
    active      BOOLEAN     NOT NULL DEFAULT FALSE,
    error_seq   BIGINT,
    error       TEXT,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- Stream sequences an operator chose to skip (each also recorded as a
-- ProjectionSkipped event in the log).
CREATE TABLE projection_skips (
    name       TEXT        NOT NULL,
    seq        BIGINT      NOT NULL,
    reason     TEXT        NOT NULL,
    skipped_by TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (name, seq)
);
