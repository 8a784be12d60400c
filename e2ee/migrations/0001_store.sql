-- The e2ee crate's local store. Every value is sealed (XChaCha20-Poly1305) with a key derived
-- from the store key, and every row key is a keyed hash, so the file reveals neither secrets
-- nor which rooms, users or devices it holds. Only the passphrase salt is plain.
CREATE TABLE IF NOT EXISTS plain_meta (
    name TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    id BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (kind, id)
);
