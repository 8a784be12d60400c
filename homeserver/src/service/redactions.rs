//! Which redactions take effect. Only a non-state `m.room.redaction` redacts (its target at
//! the top level before room version 11, in the content from version 11), and only when its
//! sender may redact the target: their own event, or with the room's `redact` power level,
//! or, for a redaction from another server, an event of a user of that same server (room
//! versions 3 and later leave that check to the receiving server, and the spec names it).
//!
//! The auth rules alone let any member send a redaction event; this decides whether it
//! *applies*. A local one that may not is refused; a received one is soft-failed (kept off
//! the timeline, so clients never see a redaction they would apply themselves); only an
//! allowed one marks its target redacted (store, room cache, search index).

use federation::pdu::Pdu;
use ruma::{OwnedEventId, RoomId, UserId, room_version_rules::RoomVersionRules};

use super::Services;
use crate::error::Result;

/// What an event does as a redaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RedactionVerdict {
    /// Not a redaction: nothing to apply.
    NotARedaction,
    /// A redaction its sender may make: the target is redacted.
    Apply(OwnedEventId),
    /// A redaction its sender may not make (why).
    Refused(String),
}

impl Services {
    /// Decides whether `pdu` redacts an event in `room_id` (see the module), by the room's
    /// current power levels. Call under the room lock.
    pub(crate) async fn redaction_verdict(
        &self,
        room_id: &RoomId,
        pdu: &Pdu,
        rules: &RoomVersionRules,
    ) -> Result<RedactionVerdict> {
        let Some(target) = pdu.redaction_target(rules) else { return Ok(RedactionVerdict::NotARedaction) };
        // The room's current power levels, v12 creators' unlimited power included.
        if self.power_levels(room_id.as_str()).await?.user_can_redact_event_of_other(&pdu.sender) {
            return Ok(RedactionVerdict::Apply(target));
        }
        let Some(row) = self.store.event(target.as_str()).await? else {
            return Ok(RedactionVerdict::Refused(format!("{target} is not an event we hold")));
        };
        if row.room_id != room_id.as_str() {
            return Ok(RedactionVerdict::Refused(format!("{target} is in another room")));
        }
        let Ok(original_sender) = UserId::parse(row.sender.as_str()) else {
            return Ok(RedactionVerdict::Refused(format!("{target} has no valid sender")));
        };
        let remote_sender = pdu.sender.server_name() != self.settings.server_name;
        if original_sender == pdu.sender || (remote_sender && original_sender.server_name() == pdu.sender.server_name())
        {
            Ok(RedactionVerdict::Apply(target))
        } else {
            Ok(RedactionVerdict::Refused(format!("{} may not redact {target} of {original_sender}", pdu.sender)))
        }
    }
}
