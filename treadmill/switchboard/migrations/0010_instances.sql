-- Several switchboard instances on one database (docs/operations.md, "Several
-- switchboard instances").

-- One row per running switchboard process (a restart is a new row). Each
-- instance refreshes heartbeat_at every second or two and sets stopped_at on a
-- clean stop; one whose heartbeat is older than a few seconds is dead, and the
-- supervisor links it held are gone.
CREATE TABLE instances (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    address      text NOT NULL DEFAULT '',
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz
);
CREATE INDEX instances_live ON instances (heartbeat_at) WHERE stopped_at IS NULL;

-- The instance process (instances.id) that holds the host's link.
ALTER TABLE hosts ADD COLUMN instance_id uuid;

-- The capability signing key every instance must share: the first instance to
-- start records its key's id; an instance with another key refuses to start.
-- Rotation is an operator's act (docs/operations.md).
CREATE TABLE capability_key (
    only_one    boolean PRIMARY KEY DEFAULT true CHECK (only_one),
    key_id      text NOT NULL,
    public_key  text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    recorded_by text NOT NULL
);
