-- Image stores (and site image caches) registered by operators. A registry
-- token is issued only for a registered service name (its audience), catalogue
-- images may name only registered store URLs, and supervisors fetch only from
-- these (docs/imagestore.md, "Registered stores").
CREATE TABLE image_stores (
    id          bigserial PRIMARY KEY,
    url         text NOT NULL UNIQUE,
    service     text NOT NULL UNIQUE,
    description text NOT NULL DEFAULT '',
    cache       boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);
