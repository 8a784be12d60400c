-- Pushers (POST /pushers/set): where to send push notifications for a user. Each belongs to
-- the device whose access token created it and goes away with that device (logout, device
-- deletion, deactivation), as the spec asks.
CREATE TABLE pushers (
    user_id               TEXT NOT NULL,
    app_id                TEXT NOT NULL,
    pushkey               TEXT NOT NULL,
    device_id             TEXT NOT NULL,
    kind                  TEXT NOT NULL,
    -- The whole pusher as the client gave it (ruma's `Pusher` JSON), echoed by GET /pushers.
    pusher_json           TEXT NOT NULL,
    created_ts            BIGINT NOT NULL,
    -- Delivery progress: notifications (event_push_actions) up to this stream position were
    -- sent or given up. The push_actions table is the persistent queue; this is its cursor.
    last_stream_ordering  BIGINT NOT NULL,
    PRIMARY KEY (user_id, app_id, pushkey),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
CREATE INDEX pushers_by_key ON pushers (app_id, pushkey);
CREATE INDEX pushers_by_device ON pushers (user_id, device_id);
