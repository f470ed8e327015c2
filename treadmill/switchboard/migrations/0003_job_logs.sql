-- Where each job's logs live: the log servers chosen for it at enqueue.
ALTER TABLE jobs ADD COLUMN log_servers text[] NOT NULL DEFAULT '{}';
