-- PDUs of acknowledged `/send` transactions still to be worked on: those that need events
-- fetched from other servers first (missing `prev_events` or auth events) are kept here, in
-- the order they came, and worked per room in the background, so that `/send` need not wait
-- for the fetching. Written before the transaction is answered; a row goes once its PDU is
-- decided. A restart carries on with what is left.
CREATE TABLE federation_inbound_pdus (
    id           INTEGER PRIMARY KEY,
    room_id      TEXT NOT NULL,
    origin       TEXT NOT NULL,
    event_id     TEXT NOT NULL UNIQUE,
    pdu          TEXT NOT NULL,
    received_ts  BIGINT NOT NULL
);
CREATE INDEX federation_inbound_pdus_by_room ON federation_inbound_pdus (room_id, id);
