-- Rooms across servers.

-- The persistent send queue: events (PDUs, by id) and EDUs (their JSON) waiting for delivery
-- to another server, in stream order. PDU rows are written in the transaction that appends
-- the event; rows are deleted once the destination accepted the transaction carrying them.
CREATE TABLE federation_outbox (
    destination      TEXT NOT NULL,
    stream_ordering  BIGINT NOT NULL,
    event_id         TEXT,
    edu              TEXT,
    PRIMARY KEY (destination, stream_ordering)
);

-- Events of a room we know but that are not on its timeline: the auth chain received with a
-- join, and events that failed authorization against the current state (soft-failed).
CREATE TABLE event_outliers (
    event_id     TEXT PRIMARY KEY,
    room_id      TEXT NOT NULL,
    json         TEXT NOT NULL,
    soft_failed  BIGINT NOT NULL DEFAULT 0,
    received_ts  BIGINT NOT NULL
);
CREATE INDEX event_outliers_by_room ON event_outliers (room_id);

-- Transactions received from other servers (`PUT /send/{txnId}`), so a retried transaction
-- gets the same answer without being processed twice.
CREATE TABLE federation_received_txns (
    origin       TEXT NOT NULL,
    txn_id       TEXT NOT NULL,
    response     TEXT NOT NULL,
    received_ts  BIGINT NOT NULL,
    PRIMARY KEY (origin, txn_id)
);

-- The room state another server showed with an invite to one of our users (stripped events:
-- type, state_key, sender, content), shown with the invite until the user joins.
CREATE TABLE remote_invite_state (
    room_id  TEXT NOT NULL,
    user_id  TEXT NOT NULL,
    events   TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
