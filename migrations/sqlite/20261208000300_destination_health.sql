-- Destinations our send queue has failed to reach, since when (milliseconds). A row exists
-- only while deliveries fail; it survives restarts, so a destination dead for days is known
-- to be and its backlog stays bounded (see service/send_queue.rs).
CREATE TABLE federation_destination_failures (
    destination    TEXT PRIMARY KEY,
    failing_since  BIGINT NOT NULL
);
