-- The public endpoints (through rendezvous proxies) a job's supervisor reported.
ALTER TABLE jobs ADD COLUMN endpoints jsonb NOT NULL DEFAULT '[]';
