-- The desktop client's local cache: the session, rooms, members, timelines, the outbox and
-- what we know of other users. Everything here can be rebuilt from the server except the
-- outbox (messages not yet accepted by the server).

CREATE TABLE session (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    server_url TEXT NOT NULL,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    access_token TEXT NOT NULL,
    -- next_batch of the last /sync whose results are committed here
    sync_token TEXT
);

CREATE TABLE rooms (
    room_id TEXT PRIMARY KEY,
    -- join / invite / leave
    membership TEXT NOT NULL,
    name TEXT,
    is_direct INTEGER NOT NULL DEFAULT 0,
    inviter TEXT,
    -- the m.room.encryption content (JSON) when the room is encrypted
    encryption TEXT,
    -- seq of the newest timeline row we have read
    read_seq INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE members (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    -- join / invite / leave / ban / knock
    membership TEXT NOT NULL,
    display_name TEXT,
    PRIMARY KEY (room_id, user_id)
);

CREATE TABLE timeline (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    room_id TEXT NOT NULL,
    -- our transaction id for our own messages, else the event id
    item_key TEXT NOT NULL UNIQUE,
    event_id TEXT UNIQUE,
    sender TEXT NOT NULL,
    ts INTEGER NOT NULL,
    -- ItemContent as JSON
    content TEXT NOT NULL,
    encrypted INTEGER NOT NULL,
    -- SendState as JSON (our own messages only)
    send_state TEXT,
    -- the raw event, kept to retry decryption when its key arrives late
    raw TEXT
);
CREATE INDEX timeline_room ON timeline (room_id, seq);

CREATE TABLE outbox (
    txn_id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    -- plaintext content (JSON)
    content TEXT NOT NULL,
    queued_ts INTEGER NOT NULL
);

CREATE TABLE users (
    user_id TEXT PRIMARY KEY,
    display_name TEXT,
    avatar_url TEXT,
    avatar_colour TEXT,
    presence TEXT,
    status_msg TEXT,
    last_active_ts INTEGER,
    currently_active INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE receipts (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
