-- Console patterns (docs/results.md): an image's, and a job's own (which
-- replace its image's; copied from the image when the job is enqueued).
ALTER TABLE images ADD COLUMN results jsonb;
ALTER TABLE jobs ADD COLUMN results jsonb;
