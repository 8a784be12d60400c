-- Rooms, their events (signed PDUs) and current state, aliases, filters, account data and
-- receipts. `stream_ordering` / `stream_id` come from one server-wide sequence: a sync token
-- is a position in it (see service::streams).

CREATE TABLE rooms (
    room_id        TEXT PRIMARY KEY,
    room_version   TEXT NOT NULL,
    creator        TEXT NOT NULL,
    published      BIGINT NOT NULL DEFAULT 0,
    created_ts     BIGINT NOT NULL
);

-- Every PDU of every room, as signed JSON. `prev_state_event_id` is the event a state event
-- replaced in the current state, so the state at any earlier position can be rebuilt.
CREATE TABLE events (
    stream_ordering      BIGINT PRIMARY KEY,
    event_id             TEXT NOT NULL UNIQUE,
    room_id              TEXT NOT NULL REFERENCES rooms (room_id),
    depth                BIGINT NOT NULL,
    type                 TEXT NOT NULL,
    state_key            TEXT,
    sender               TEXT NOT NULL,
    origin_server_ts     BIGINT NOT NULL,
    json                 TEXT NOT NULL,
    prev_state_event_id  TEXT,
    redacted_by          TEXT,
    txn_user             TEXT,
    txn_device           TEXT,
    txn_id               TEXT
);
CREATE INDEX events_by_room ON events (room_id, stream_ordering);
CREATE UNIQUE INDEX events_by_txn ON events (txn_user, txn_device, txn_id);
CREATE INDEX events_membership ON events (state_key, stream_ordering) WHERE type = 'm.room.member';
CREATE INDEX events_relations ON events (room_id, type);

CREATE TABLE room_current_state (
    room_id     TEXT NOT NULL REFERENCES rooms (room_id),
    type        TEXT NOT NULL,
    state_key   TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    membership  TEXT,
    PRIMARY KEY (room_id, type, state_key)
);
CREATE INDEX room_current_members ON room_current_state (state_key, membership) WHERE type = 'm.room.member';

CREATE TABLE room_forward_extremities (
    room_id    TEXT NOT NULL REFERENCES rooms (room_id),
    event_id   TEXT NOT NULL,
    PRIMARY KEY (room_id, event_id)
);

CREATE TABLE room_aliases (
    alias        TEXT PRIMARY KEY,
    room_id      TEXT NOT NULL REFERENCES rooms (room_id),
    creator      TEXT NOT NULL,
    created_ts   BIGINT NOT NULL
);
CREATE INDEX room_aliases_by_room ON room_aliases (room_id);

CREATE TABLE user_filters (
    user_id     TEXT NOT NULL,
    filter_id   BIGINT NOT NULL,
    json        TEXT NOT NULL,
    PRIMARY KEY (user_id, filter_id)
);

-- Global account data has room_id ''.
CREATE TABLE account_data (
    user_id     TEXT NOT NULL,
    room_id     TEXT NOT NULL,
    type        TEXT NOT NULL,
    content     TEXT NOT NULL,
    stream_id   BIGINT NOT NULL,
    PRIMARY KEY (user_id, room_id, type)
);
CREATE INDEX account_data_by_stream ON account_data (user_id, stream_id);

-- Unthreaded receipts have thread_id ''.
CREATE TABLE receipts (
    room_id       TEXT NOT NULL,
    receipt_type  TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    thread_id     TEXT NOT NULL,
    event_id      TEXT NOT NULL,
    ts            BIGINT NOT NULL,
    stream_id     BIGINT NOT NULL,
    PRIMARY KEY (room_id, receipt_type, user_id, thread_id)
);
CREATE INDEX receipts_by_stream ON receipts (room_id, stream_id);
