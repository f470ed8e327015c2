-- Idempotency-Key of POST /api/v1/jobs: a retried request (same user, same key,
-- same body) gets the first answer instead of a second job. Keys are kept for
-- store.IDEMPOTENCY_RETENTION (24 h), then forgotten.
CREATE TABLE job_idempotency (
    owner_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key          text NOT NULL,
    fingerprint  bytea NOT NULL,   -- sha256 of the request body (canonical JSON)
    job_id       uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    response     json NOT NULL,    -- the 201 body first answered, verbatim
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_id, key)
);
CREATE INDEX job_idempotency_expiry ON job_idempotency (owner_id, created_at);
