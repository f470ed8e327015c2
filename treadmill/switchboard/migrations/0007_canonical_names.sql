-- Canonical names (security issue 12): user and image names are unique without
-- regard to case, since the image repository of a catalogue name, and the
-- namespace a user owns, are their lowercased forms. And namespace grants:
-- an admin may give a user (or every user) use or manage on a repository
-- namespace ("team" covers "team" and "team/…").

-- Names that differ only in case cannot be told apart any more: stop and name
-- them, so that an operator renames all but one of each group and starts again.
DO $$
DECLARE
    users_clash text;
    images_clash text;
    snapshots_clash text;
BEGIN
    SELECT string_agg(names, '; ') INTO users_clash FROM (
        SELECT string_agg(name, ', ' ORDER BY name) AS names FROM users
        GROUP BY lower(name) HAVING count(*) > 1) c;
    SELECT string_agg(names, '; ') INTO images_clash FROM (
        SELECT string_agg(name, ', ' ORDER BY name) AS names FROM images
        GROUP BY lower(name) HAVING count(*) > 1) c;
    SELECT string_agg(names, '; ') INTO snapshots_clash FROM (
        SELECT string_agg(name, ', ' ORDER BY name) AS names FROM snapshots
        WHERE state = 'pending' GROUP BY lower(name) HAVING count(*) > 1) c;
    IF users_clash IS NOT NULL OR images_clash IS NOT NULL OR snapshots_clash IS NOT NULL THEN
        RAISE EXCEPTION 'migration 0007: names must be unique regardless of case; rename all '
            'but one of each group, then start the switchboard again. Users: %. Images: %. '
            'Pending snapshots: %.', coalesce(users_clash, 'none'),
            coalesce(images_clash, 'none'), coalesce(snapshots_clash, 'none')
            USING ERRCODE = 'unique_violation';
    END IF;
END
$$;

CREATE UNIQUE INDEX users_name_canonical ON users (lower(name));
CREATE UNIQUE INDEX images_name_canonical ON images (lower(name));
CREATE UNIQUE INDEX snapshots_pending_name_canonical ON snapshots (lower(name))
    WHERE state = 'pending';

-- Grants on a namespace: one more kind of grant target.
ALTER TABLE grants ADD COLUMN namespace text
    CHECK (namespace ~ '^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*$');
DO $$
DECLARE
    old text;
BEGIN
    SELECT conname INTO old FROM pg_constraint WHERE conrelid = 'grants'::regclass
        AND contype = 'c' AND pg_get_constraintdef(oid) LIKE '%num_nonnulls%';
    EXECUTE format('ALTER TABLE grants DROP CONSTRAINT %I', old);
END
$$;
ALTER TABLE grants ADD CONSTRAINT grants_one_target
    CHECK (num_nonnulls(host_id, job_id, image_id, namespace) = 1);
ALTER TABLE grants ADD CONSTRAINT grants_namespace_privilege
    CHECK ((namespace IS NULL) OR privilege IN ('use', 'manage'));
DROP INDEX grants_unique;
CREATE UNIQUE INDEX grants_unique ON grants (
    coalesce(host_id, 0), coalesce(job_id, '00000000-0000-0000-0000-000000000000'),
    coalesce(image_id, 0), coalesce(namespace, ''), coalesce(user_id, 0), privilege);
CREATE INDEX grants_namespace ON grants (namespace) WHERE namespace IS NOT NULL;
