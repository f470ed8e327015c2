-- Holding a failed job's host (docs/jobs.md, "Holding a failed job's host"):
-- hold_on_failure (seconds) asks its supervisor to keep the host as it is when the
-- job fails; held_until (set when the job ended held, NULL once the hold is over)
-- keeps the host from the scheduler until its supervisor has released it.
ALTER TABLE jobs ADD COLUMN hold_on_failure double precision
    CHECK (hold_on_failure IS NULL OR hold_on_failure > 0);
ALTER TABLE jobs ADD COLUMN held_until timestamptz;
CREATE INDEX jobs_held ON jobs (host_id) WHERE held_until IS NOT NULL;
