-- The audit log (docs/operations.md, "Audit log"): one row per privileged
-- action, appended by the switchboard and never changed. No foreign keys: a
-- record outlives the user, host, job or image it names.
CREATE TABLE audit_log (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    actor         text NOT NULL,        -- a user name, a host name, 'manhole' or 'system'
    actor_kind    text NOT NULL CHECK (actor_kind IN ('user', 'host', 'manhole', 'system')),
    source        text NOT NULL DEFAULT '',   -- the client's address, '' if none
    action        text NOT NULL,        -- a dotted name: token.create, host.drain, ...
    subject_kind  text NOT NULL,        -- user, host, job, image, store, namespace, token, key
    subject_id    text NOT NULL,        -- user/host/image name, job id, ...
    subject_user  text,                 -- the user the subject belongs to, if any
    details       jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_subject ON audit_log (subject_kind, lower(subject_id), id);
CREATE INDEX audit_log_actor ON audit_log (lower(actor), id);
CREATE INDEX audit_log_subject_user ON audit_log (lower(subject_user), id);
CREATE INDEX audit_log_at ON audit_log (at);

-- Append-only: UPDATE, DELETE and TRUNCATE are refused, except DELETE by the
-- retention pass, which sets treadmill.audit_retention = 'on' for its own
-- transaction (SET LOCAL). This guards against mistakes in the switchboard;
-- against a hostile database owner, give the switchboard a role that does not
-- own the table (docs/operations.md).
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('treadmill.audit_retention', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
