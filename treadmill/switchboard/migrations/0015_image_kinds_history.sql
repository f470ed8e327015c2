-- Scheduling by image kind (docs/images.md, "Kinds") and catalogue history.

-- The image kinds ("qemu", "board") the host's driver runs, as its supervisor
-- last reported them (protocol minor 5, `status.kinds`); NULL: any kind (a
-- supervisor that does not report them).
ALTER TABLE hosts ADD COLUMN kinds text[];
-- The link session (hosts.session) whose status recorded kinds: a host is offered
-- jobs only once its current link has answered a status request, so that a host
-- whose driver changed is never offered a job by the kinds of its last link.
ALTER TABLE hosts ADD COLUMN kinds_session uuid;

-- The kind of a catalogue image (from its manifest's artifactType); NULL: unknown.
ALTER TABLE images ADD COLUMN kind text;

-- The kind of the job's image at enqueue; NULL: unknown (any host may run it).
ALTER TABLE jobs ADD COLUMN image_kind text;

-- Every digest a catalogue image has had: version 1 at creation, a new version
-- on every change of digest (a replace or a rollback). Bounded: the oldest
-- versions beyond the configured number are deleted.
CREATE TABLE image_versions (
    image_id    bigint NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    version     integer NOT NULL,
    digest      text NOT NULL,
    stores      text[] NOT NULL DEFAULT '{}',
    host_tags   text[] NOT NULL DEFAULT '{}',
    kind        text,
    created_by  bigint REFERENCES users (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    note        text NOT NULL DEFAULT '',
    PRIMARY KEY (image_id, version)
);

-- Existing images start their history at version 1.
INSERT INTO image_versions (image_id, version, digest, stores, host_tags, created_by,
                            created_at)
SELECT id, 1, digest, stores, host_tags, owner_id, updated_at FROM images;

-- A change of a host's kinds wakes the scheduler like a change of its tags.
DROP TRIGGER hosts_notify ON hosts;
CREATE TRIGGER hosts_notify AFTER INSERT OR DELETE OR UPDATE OF
    name, tags, owner_id, enabled, healthy, token_hash, session, kinds, kinds_session
    ON hosts
    FOR EACH ROW EXECUTE FUNCTION treadmill_notify_host();
