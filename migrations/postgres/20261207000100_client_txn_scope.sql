-- Client transaction ids are scoped to the device and the endpoint (the spec's "Transaction
-- identifiers"): `PUT /rooms/{room}/send/{type}/{txn}` in another room or for another event
-- type, `PUT /rooms/{room}/redact/{event}/{txn}` for another event and
-- `PUT /sendToDevice/{type}/{txn}` for another event type are new requests. Before, one id
-- per device covered every room and endpoint: the same id elsewhere silently returned the
-- earlier event (or dropped the to-device messages).
ALTER TABLE events ADD COLUMN txn_scope TEXT;
DROP INDEX events_by_txn;
CREATE UNIQUE INDEX events_by_txn ON events (txn_user, txn_device, txn_scope, txn_id);
-- Earlier sends keep answering their retries: a send's scope is its room and event type, a
-- redaction's the event it redacted (where that is recorded; otherwise it keeps none and a
-- retry makes a second, harmless redaction).
UPDATE events SET txn_scope = 'send/' || room_id || '/' || type
    WHERE txn_user IS NOT NULL AND type <> 'm.room.redaction';
UPDATE events SET txn_scope = 'redact/' || room_id || '/' ||
    (SELECT t.event_id FROM events t WHERE t.redacted_by = events.event_id LIMIT 1)
    WHERE txn_user IS NOT NULL AND type = 'm.room.redaction';

-- To-device transactions, with the event type of their endpoint. The earlier table's ids had
-- none: they are dropped (a retry of a to-device request sent across the upgrade could be
-- delivered twice).
CREATE TABLE to_device_txns (
    sender          TEXT NOT NULL,
    sender_device   TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    txn_id          TEXT NOT NULL,
    PRIMARY KEY (sender, sender_device, event_type, txn_id)
);
DROP TABLE to_device_transactions;
