-- Other servers' signing keys, fetched from them (or a notary) and cached until
-- valid_until_ts. One row per (server, key id); `expired_ts` is set for keys the server lists
-- under old_verify_keys (usable for signatures made before that time). `key_json` is the
-- whole key document as its owner signed it, re-served by our notary endpoint.
CREATE TABLE server_keys (
    server_name     TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    public_key      TEXT NOT NULL,
    valid_until_ts  BIGINT NOT NULL,
    expired_ts      BIGINT,
    key_json        TEXT NOT NULL,
    fetched_ts      BIGINT NOT NULL,
    PRIMARY KEY (server_name, key_id)
);
