-- Where the job handler resumes reading the log: the submission sequence
-- of the oldest job it still owes an action (its low-water mark).
CREATE TABLE handler_positions (
    name       TEXT        PRIMARY KEY,
    next_seq   BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Nonces of accepted incoming callbacks: each is accepted once. Rows older
-- than the timestamp window are deleted (a replay that old fails the window).
CREATE TABLE callback_nonces (
    nonce   TEXT        PRIMARY KEY,
    seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX callback_nonces_seen ON callback_nonces (seen_at);
