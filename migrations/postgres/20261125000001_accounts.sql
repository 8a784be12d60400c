-- Accounts, devices, access tokens, profiles, registration tokens and
-- user-interactive-authentication sessions. Booleans are 0/1 integers and times are
-- milliseconds since the Unix epoch, identically on SQLite and PostgreSQL.

CREATE TABLE users (
    user_id        TEXT PRIMARY KEY,
    localpart      TEXT NOT NULL UNIQUE,
    password_hash  TEXT,
    is_admin       BIGINT NOT NULL DEFAULT 0,
    deactivated    BIGINT NOT NULL DEFAULT 0,
    created_ts     BIGINT NOT NULL
);

CREATE TABLE devices (
    user_id        TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    device_id      TEXT NOT NULL,
    display_name   TEXT,
    last_seen_ts   BIGINT,
    last_seen_ip   TEXT,
    created_ts     BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- Only the SHA-256 of a token is stored: a copy of the database does not log anybody in.
CREATE TABLE access_tokens (
    token_hash     TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL,
    device_id      TEXT NOT NULL,
    created_ts     BIGINT NOT NULL,
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
CREATE INDEX access_tokens_by_device ON access_tokens (user_id, device_id);

-- Profile fields (displayname, avatar_url and custom fields), value as JSON text.
CREATE TABLE profile_fields (
    user_id        TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    field          TEXT NOT NULL,
    value          TEXT NOT NULL,
    PRIMARY KEY (user_id, field)
);

CREATE TABLE registration_tokens (
    token          TEXT PRIMARY KEY,
    uses_allowed   BIGINT,
    completed      BIGINT NOT NULL DEFAULT 0,
    expiry_ts      BIGINT,
    created_ts     BIGINT NOT NULL
);

CREATE TABLE uiaa_sessions (
    session_id          TEXT PRIMARY KEY,
    action              TEXT NOT NULL,
    user_id             TEXT,
    completed           TEXT NOT NULL DEFAULT '[]',
    registration_token  TEXT,
    created_ts          BIGINT NOT NULL
);
CREATE INDEX uiaa_sessions_by_age ON uiaa_sessions (created_ts);
