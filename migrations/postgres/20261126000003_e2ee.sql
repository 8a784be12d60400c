-- End-to-end encryption on the server: device keys, one-time and fallback keys, cross-signing
-- keys, device list changes, to-device messages and key backup. The server stores and relays
-- these; it never sees a private key or a plaintext.

CREATE TABLE device_keys (
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    json        TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE one_time_keys (
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    algorithm   TEXT NOT NULL,
    json        TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, key_id)
);
CREATE INDEX one_time_keys_by_algorithm ON one_time_keys (user_id, device_id, algorithm);

CREATE TABLE fallback_keys (
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    algorithm   TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    json        TEXT NOT NULL,
    used        BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, device_id, algorithm)
);

CREATE TABLE cross_signing_keys (
    user_id     TEXT NOT NULL,
    key_type    TEXT NOT NULL,
    json        TEXT NOT NULL,
    PRIMARY KEY (user_id, key_type)
);

-- A user's devices or cross-signing keys changed at this stream position.
CREATE TABLE device_list_changes (
    stream_id   BIGINT NOT NULL,
    user_id     TEXT NOT NULL,
    PRIMARY KEY (stream_id, user_id)
);
CREATE INDEX device_list_changes_by_user ON device_list_changes (user_id, stream_id);

CREATE TABLE to_device_messages (
    stream_id       BIGINT NOT NULL,
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    sender          TEXT NOT NULL,
    type            TEXT NOT NULL,
    content         TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, stream_id)
);

CREATE TABLE to_device_transactions (
    sender          TEXT NOT NULL,
    sender_device   TEXT NOT NULL,
    txn_id          TEXT NOT NULL,
    PRIMARY KEY (sender, sender_device, txn_id)
);

CREATE TABLE backup_versions (
    user_id     TEXT NOT NULL,
    version     BIGINT NOT NULL,
    algorithm   TEXT NOT NULL,
    etag        BIGINT NOT NULL DEFAULT 0,
    deleted     BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, version)
);

CREATE TABLE backup_keys (
    user_id     TEXT NOT NULL,
    version     BIGINT NOT NULL,
    room_id     TEXT NOT NULL,
    session_id  TEXT NOT NULL,
    json        TEXT NOT NULL,
    PRIMARY KEY (user_id, version, room_id, session_id)
);

-- Stream positions of rows that were deleted after delivery (to-device messages): restart must
-- continue above every position a client may have seen.
CREATE TABLE stream_high_water (
    id          BIGINT PRIMARY KEY,
    position    BIGINT NOT NULL
);
INSERT INTO stream_high_water (id, position) VALUES (1, 0);
