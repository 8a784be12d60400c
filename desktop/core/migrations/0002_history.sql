-- Back-pagination: where older history of a room continues on the server.
-- prev_batch: the /messages token for events before the oldest one we hold (NULL: we have
-- not been told one, or history_complete says there is nothing older).
ALTER TABLE rooms ADD COLUMN prev_batch TEXT;
ALTER TABLE rooms ADD COLUMN history_complete INTEGER NOT NULL DEFAULT 0;
