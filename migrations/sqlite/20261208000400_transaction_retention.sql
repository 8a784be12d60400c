-- Idempotency records are kept for a window (`transactions.retention_secs`), not forever.
-- To-device transaction ids (from clients, and message ids of federated to-device EDUs)
-- record when they were first seen. The ones already stored start their window at the
-- newest event's time (about now on a server in use; SQL both engines accept has no
-- common "now" in milliseconds).
ALTER TABLE to_device_txns ADD COLUMN created_ts BIGINT NOT NULL DEFAULT 0;
UPDATE to_device_txns SET created_ts = (SELECT COALESCE(MAX(origin_server_ts), 0) FROM events);
CREATE INDEX to_device_txns_by_age ON to_device_txns (created_ts);
-- Client transaction ids on events are cleared once their window has passed; this finds the
-- events that still carry one by age, and shrinks as they are cleared.
CREATE INDEX events_txn_by_age ON events (origin_server_ts) WHERE txn_user IS NOT NULL;
