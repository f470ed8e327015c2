-- Host health that users cannot spoil (docs/operations.md, "Host health"):
-- operator-defined health checks, the jobs that run them, and each host's history.

-- A health check: per host (host_id) or per tag (tag); the image is resolved when
-- the check is set, like a job's.
CREATE TABLE health_checks (
    id           bigserial PRIMARY KEY,
    host_id      bigint REFERENCES hosts (id) ON DELETE CASCADE,
    tag          text,
    image        text NOT NULL,          -- as the operator named it
    image_name   text,
    image_digest text NOT NULL,
    image_stores text[] NOT NULL DEFAULT '{}',
    image_kind   text,
    parameters   jsonb NOT NULL DEFAULT '{}',
    log_servers  text[] NOT NULL DEFAULT '{}',
    expect_exit  integer NOT NULL DEFAULT 0,
    timeout      double precision NOT NULL,
    every_jobs   integer CHECK (every_jobs > 0),
    every_hours  double precision CHECK (every_hours > 0),
    after_failures integer CHECK (after_failures > 0),  -- NULL: hosts.max_failures
    set_by       bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    set_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((host_id IS NULL) <> (tag IS NULL))
);
CREATE UNIQUE INDEX health_checks_host ON health_checks (host_id) WHERE host_id IS NOT NULL;
CREATE UNIQUE INDEX health_checks_tag ON health_checks (tag) WHERE tag IS NOT NULL;

-- Jobs since the host's last health check, and when that check ended.
ALTER TABLE hosts ADD COLUMN jobs_since_check integer NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN last_check_at timestamptz;

-- A health-check job carries the exit status that passes it (NULL: an ordinary job);
-- a queued job says why it waits when only drained or unhealthy hosts could run it.
ALTER TABLE jobs ADD COLUMN health_expect_exit integer;
ALTER TABLE jobs ADD COLUMN queue_message text;

-- "Has this image ever become ready?" decides whose fault a start failure is.
CREATE INDEX jobs_ready_digest ON jobs (image_digest) WHERE ready_at IS NOT NULL;

-- Each host's health history: suspicious failures, checks and their results,
-- and who or what changed its health.
CREATE TABLE host_health_events (
    id       bigserial PRIMARY KEY,
    host_id  bigint NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    at       timestamptz NOT NULL DEFAULT now(),
    event    text NOT NULL,
    job_id   uuid,
    reason   text,
    healthy  boolean NOT NULL,           -- the host's health after the event
    actor    text NOT NULL,              -- a user's name, or 'switchboard'
    message  text NOT NULL DEFAULT ''
);
CREATE INDEX host_health_events_host ON host_health_events (host_id, id);
