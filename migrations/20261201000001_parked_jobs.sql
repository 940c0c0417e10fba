-- Jobs the job handler parked: an event it cannot decode or fold, or a
-- driver that cannot go on. The handler leaves such a job alone; every
-- other job goes on. GET /v1/jobs/{id}/status shows the reason.
CREATE TABLE handler_parked_jobs (
    job_id    TEXT        PRIMARY KEY,
    seq       BIGINT      NOT NULL,
    reason    TEXT        NOT NULL,
    parked_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
