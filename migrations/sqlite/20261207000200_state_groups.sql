-- The room state before and after every event, as the spec's model needs it (state
-- resolution where branches meet, `/state_ids` at any event, authorization of received
-- events against the state before them).
--
-- A state group is one full room state, (type, state key) -> event id. It is stored as the
-- entries that differ from `prev_group` (a delta), or in full when `prev_group` is NULL (a
-- snapshot). `chain_len` counts the deltas between a group and its snapshot; it is bounded
-- (see store::state), so reading a group never walks a long chain.
CREATE TABLE state_groups (
    id          INTEGER PRIMARY KEY,
    room_id     TEXT NOT NULL,
    prev_group  BIGINT,
    chain_len   BIGINT NOT NULL
);

CREATE TABLE state_group_entries (
    group_id   BIGINT NOT NULL,
    type       TEXT NOT NULL,
    state_key  TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    PRIMARY KEY (group_id, type, state_key)
);

-- `state_group`: the state after the event. An event that is not a state event leaves the
-- state as it was, so a message costs this one integer and no rows. `state_before`: set for
-- state events only (the state before them; for other events it is `state_group`). Both NULL
-- where the state is not known: history fetched with a join or backfilled, events of rooms
-- we were only invited to.
ALTER TABLE events ADD COLUMN state_group BIGINT;
ALTER TABLE events ADD COLUMN state_before BIGINT;

-- Outliers: soft-failed events keep their state (later events may build on them), and
-- events refused on receipt are kept as rejected (`rejection` says why) so that they are
-- never used for authorization or state and an event citing them is refused too.
ALTER TABLE event_outliers ADD COLUMN state_group BIGINT;
ALTER TABLE event_outliers ADD COLUMN state_before BIGINT;
ALTER TABLE event_outliers ADD COLUMN rejection TEXT;

-- The group equal to `room_current_state` (NULL: not known, e.g. a room we are only
-- invited to).
ALTER TABLE rooms ADD COLUMN current_state_group BIGINT;

-- Rooms that existed before this migration: their groups are computed once at start from
-- what is stored (see `Store::build_pending_state_groups`).
CREATE TABLE state_groups_pending (
    room_id  TEXT PRIMARY KEY
);
INSERT INTO state_groups_pending (room_id) SELECT room_id FROM rooms;
