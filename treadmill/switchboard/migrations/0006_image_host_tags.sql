-- The host tags a job naming a catalogue image gets when it asks for none
-- (a QEMU image needs a QEMU host, a board image its kind of board).
ALTER TABLE images ADD COLUMN host_tags text[] NOT NULL DEFAULT '{}';
