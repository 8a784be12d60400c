-- Lookups of a room's state events by (type, state key) and by position. Without these the
-- history of one state key (`m.room.history_visibility`, a user's memberships) was read by
-- walking every event of the room in order (`events_by_room`), and of the user's memberships
-- in every room (`events_membership`): in an initial sync of 50 rooms of 200 messages that was
-- 40 % of the database time. Only state events are indexed, a small part of the table.
CREATE INDEX events_state ON events (room_id, type, state_key, stream_ordering) WHERE state_key IS NOT NULL;
CREATE INDEX events_state_by_room ON events (room_id, stream_ordering) WHERE state_key IS NOT NULL;
