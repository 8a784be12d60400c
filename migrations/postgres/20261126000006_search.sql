-- Full-text search over unencrypted messages, names and topics (PostgreSQL tsvector; the
-- 'simple' configuration: no stemming, works the same for every language).
CREATE TABLE event_search (
    event_id   TEXT PRIMARY KEY,
    room_id    TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    vector     TSVECTOR NOT NULL
);
CREATE INDEX event_search_vector ON event_search USING GIN (vector);
CREATE INDEX event_search_room ON event_search (room_id);
