-- Snapshots: an ended job's disk uploaded by its host as a new catalogue image.
CREATE TABLE snapshots (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id       uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    host_id      bigint REFERENCES hosts (id) ON DELETE SET NULL,
    owner_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text NOT NULL,
    repository   text NOT NULL,
    store        text NOT NULL,
    description  text NOT NULL DEFAULT '',
    state        text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
    digest       text,
    error_code   text,
    message      text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX snapshots_job ON snapshots (job_id, created_at);
CREATE INDEX snapshots_pending ON snapshots (host_id) WHERE state = 'pending';
-- At most one pending snapshot per catalogue name.
CREATE UNIQUE INDEX snapshots_pending_name ON snapshots (name) WHERE state = 'pending';

-- "<host id>": the instance holding that host's link sends its pending snapshots.
CREATE FUNCTION treadmill_notify_snapshot() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('treadmill_snapshots', coalesce(NEW.host_id::text, '-'));
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER snapshots_notify AFTER INSERT ON snapshots
    FOR EACH ROW EXECUTE FUNCTION treadmill_notify_snapshot();
