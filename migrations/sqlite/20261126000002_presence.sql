-- Presence: the last state each user set or was given, positioned in the shared stream.
CREATE TABLE presence (
    user_id           TEXT PRIMARY KEY,
    state             TEXT NOT NULL,
    status_msg        TEXT,
    last_active_ts    BIGINT NOT NULL,
    stream_id         BIGINT NOT NULL
);
CREATE INDEX presence_by_stream ON presence (stream_id);
