-- Users' SSH public keys (docs/api.md, "SSH keys"): a job carries its
-- submitter's and its managers' keys to its host. A key is stored parsed and
-- canonical; its fingerprint is unique per user.
CREATE TABLE ssh_keys (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key_type    text NOT NULL,
    body        text NOT NULL,
    comment     text NOT NULL DEFAULT '',
    fingerprint text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, fingerprint)
);

-- The guest's SSH host keys, as its supervisor reported them ("TYPE BASE64"
-- lines), for `tml job ssh` to check the host with.
ALTER TABLE jobs ADD COLUMN ssh_host_keys jsonb NOT NULL DEFAULT '[]';
