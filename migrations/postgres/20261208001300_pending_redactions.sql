-- Redactions whose target we did not hold when they arrived. A redaction its sender could
-- make without seeing the target (the room's `redact` power) is on the timeline and redacts
-- the target as the target is stored; one that depends on who sent the target (their own
-- event, or one of their server's users) is kept soft-failed until the target arrives, and is
-- then decided again. Rows go once the target is stored.
CREATE TABLE pending_redactions (
    target_id     TEXT NOT NULL,
    redaction_id  TEXT NOT NULL,
    room_id       TEXT NOT NULL,
    PRIMARY KEY (target_id, redaction_id)
);
