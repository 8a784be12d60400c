-- Relations between events (m.relates_to: edits, threads, annotations, references), and
-- rooms a user forgot.
CREATE TABLE event_relations (
    event_id         TEXT PRIMARY KEY,
    relates_to_id    TEXT NOT NULL,
    rel_type         TEXT NOT NULL,
    room_id          TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    sender           TEXT NOT NULL,
    stream_ordering  BIGINT NOT NULL
);
CREATE INDEX event_relations_by_target ON event_relations (relates_to_id, stream_ordering);
CREATE INDEX event_relations_threads ON event_relations (room_id, rel_type, stream_ordering);

CREATE TABLE forgotten_rooms (
    user_id   TEXT NOT NULL,
    room_id   TEXT NOT NULL,
    PRIMARY KEY (user_id, room_id)
);
