-- Treadmill switchboard schema, version 1.
-- Applied by treadmill.switchboard.database.migrate inside one transaction
-- under an advisory lock. Never edit an applied migration: add a new file.

CREATE TABLE users (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL UNIQUE,
    admin         boolean NOT NULL DEFAULT false,
    disabled      boolean NOT NULL DEFAULT false,
    password_hash text,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_tokens (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash   bytea NOT NULL UNIQUE,
    label        text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);

CREATE TABLE hosts (
    id                   bigserial PRIMARY KEY,
    name                 text NOT NULL UNIQUE,
    tags                 text[] NOT NULL DEFAULT '{}',
    owner_id             bigint REFERENCES users (id) ON DELETE SET NULL,
    description          text NOT NULL DEFAULT '',
    token_hash           bytea NOT NULL UNIQUE,
    enabled              boolean NOT NULL DEFAULT true,
    healthy              boolean NOT NULL DEFAULT true,
    consecutive_failures integer NOT NULL DEFAULT 0,
    -- Which switchboard instance holds the supervisor's link, and since when.
    instance             text,
    connected_at         timestamptz,
    last_seen_at         timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE images (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    digest      text NOT NULL,
    stores      text[] NOT NULL DEFAULT '{}',
    owner_id    bigint REFERENCES users (id) ON DELETE SET NULL,
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE jobs (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq                 bigserial NOT NULL UNIQUE,
    owner_id            bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    label               text NOT NULL DEFAULT '',
    image_name          text,
    image_digest        text NOT NULL,
    image_stores        text[] NOT NULL DEFAULT '{}',
    tags                text[] NOT NULL DEFAULT '{}',
    parameters          jsonb NOT NULL DEFAULT '{}',
    timeout             double precision NOT NULL,
    queue_timeout       double precision NOT NULL,
    max_restarts        integer NOT NULL DEFAULT 0,
    restarts_left       integer NOT NULL DEFAULT 0,
    restart_of          uuid REFERENCES jobs (id) ON DELETE SET NULL,
    state               text NOT NULL DEFAULT 'queued' CHECK (state IN
        ('queued', 'assigned', 'initializing', 'ready', 'terminating', 'terminated')),
    stage               text CHECK (stage IN
        ('starting', 'fetching_image', 'allocating', 'provisioning', 'booting')),
    host_id             bigint REFERENCES hosts (id) ON DELETE SET NULL,
    termination_reason  text,
    exit_status         integer,
    termination_message text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    assigned_at         timestamptz,
    started_at          timestamptz,
    ready_at            timestamptz,
    terminating_at      timestamptz,
    terminated_at       timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- The seq of the job's newest event in job_events.
    event_seq           integer NOT NULL DEFAULT 0,
    queue_deadline      timestamptz NOT NULL,
    deadline            timestamptz
);
CREATE INDEX jobs_queued ON jobs (seq) WHERE state = 'queued';
CREATE INDEX jobs_active ON jobs (host_id) WHERE state <> 'terminated';
CREATE INDEX jobs_owner_seq ON jobs (owner_id, seq);
CREATE INDEX jobs_state_seq ON jobs (state, seq);

CREATE TABLE job_events (
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq         integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    state       text NOT NULL,
    stage       text,
    reason      text,
    exit_status integer,
    message     text,
    PRIMARY KEY (job_id, seq)
);

-- A grant gives one user (or every user, when user_id is NULL) one privilege
-- on exactly one host, job or image.
CREATE TABLE grants (
    id         bigserial PRIMARY KEY,
    host_id    bigint REFERENCES hosts (id) ON DELETE CASCADE,
    job_id     uuid REFERENCES jobs (id) ON DELETE CASCADE,
    image_id   bigint REFERENCES images (id) ON DELETE CASCADE,
    user_id    bigint REFERENCES users (id) ON DELETE CASCADE,
    privilege  text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (num_nonnulls(host_id, job_id, image_id) = 1),
    CHECK ((host_id IS NULL) OR privilege IN ('read', 'start', 'manage')),
    CHECK ((job_id IS NULL) OR privilege IN ('read', 'stop', 'manage')),
    CHECK ((image_id IS NULL) OR privilege IN ('use', 'manage'))
);
CREATE UNIQUE INDEX grants_unique ON grants (
    coalesce(host_id, 0), coalesce(job_id, '00000000-0000-0000-0000-000000000000'),
    coalesce(image_id, 0), coalesce(user_id, 0), privilege);
CREATE INDEX grants_host ON grants (host_id) WHERE host_id IS NOT NULL;
CREATE INDEX grants_job ON grants (job_id) WHERE job_id IS NOT NULL;
CREATE INDEX grants_image ON grants (image_id) WHERE image_id IS NOT NULL;
CREATE INDEX grants_user ON grants (user_id);

-- Change notifications: the scheduler, job watchers and token caches of every
-- switchboard instance listen on these channels.
CREATE FUNCTION treadmill_notify_job() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('treadmill_jobs', NEW.id::text || ' ' || NEW.state);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION treadmill_notify_job();

CREATE FUNCTION treadmill_notify_host() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('treadmill_hosts', OLD.name);
        RETURN NULL;
    END IF;
    PERFORM pg_notify('treadmill_hosts', NEW.name);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER hosts_notify AFTER INSERT OR UPDATE OR DELETE ON hosts
    FOR EACH ROW EXECUTE FUNCTION treadmill_notify_host();

CREATE FUNCTION treadmill_notify_auth() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('treadmill_auth', TG_TABLE_NAME);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

-- Token revocation and user changes invalidate cached authentication.
CREATE TRIGGER api_tokens_notify AFTER UPDATE OF revoked_at, expires_at OR DELETE ON api_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION treadmill_notify_auth();
CREATE TRIGGER users_notify AFTER UPDATE OR DELETE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION treadmill_notify_auth();
