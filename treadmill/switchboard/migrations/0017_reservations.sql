-- Reservations (docs/jobs.md, "Reservations"): a job that holds a matching host
-- for interactive work until its deadline; extendable (POST /jobs/{id}/extend).
ALTER TABLE jobs ADD COLUMN reservation boolean NOT NULL DEFAULT false;
