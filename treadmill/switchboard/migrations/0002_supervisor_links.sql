-- Supervisor links: which instance holds each host's link, and one active job per host.

-- A link session is one accepted WebSocket; a newer session supersedes older ones.
ALTER TABLE hosts ADD COLUMN session uuid;

-- A host runs at most one job at a time: the scheduler relies on it.
CREATE UNIQUE INDEX jobs_one_active_per_host ON jobs (host_id)
    WHERE state IN ('assigned', 'initializing', 'ready', 'terminating');

-- The scheduler counts each user's recent assignments for fairness.
CREATE INDEX jobs_assigned_at ON jobs (assigned_at) WHERE assigned_at IS NOT NULL;

-- Job notifications carry the host, so that only the instance holding the
-- host's link needs to look at the job: "<job id> <state> <host id or ->".
CREATE OR REPLACE FUNCTION treadmill_notify_job() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('treadmill_jobs',
                      NEW.id::text || ' ' || NEW.state || ' ' || coalesce(NEW.host_id::text, '-'));
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

-- Host notifications carry the session: "<host id> <session or ->".
CREATE OR REPLACE FUNCTION treadmill_notify_host() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('treadmill_hosts', OLD.id::text || ' -');
        RETURN NULL;
    END IF;
    PERFORM pg_notify('treadmill_hosts', NEW.id::text || ' ' || coalesce(NEW.session::text, '-'));
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

-- Heartbeat refreshes of last_seen_at should not wake every listener.
DROP TRIGGER hosts_notify ON hosts;
CREATE TRIGGER hosts_notify AFTER INSERT OR DELETE OR UPDATE OF
    name, tags, owner_id, enabled, healthy, token_hash, session ON hosts
    FOR EACH ROW EXECUTE FUNCTION treadmill_notify_host();
