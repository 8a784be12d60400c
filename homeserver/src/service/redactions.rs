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
//!
//! A received redaction can arrive before its target (the two on different branches). With
//! the `redact` power it goes on the timeline at once and the store redacts the target as the
//! target is stored; without it, it is soft-failed and remembered, and decided again when the
//! target arrives: put on the timeline after the target if allowed then, left aside if not.

use federation::pdu::Pdu;
use ruma::{EventId, OwnedEventId, RoomId, ServerName, UserId, room_version_rules::RoomVersionRules};

use super::{Hub, received::VerifiedEvent};
use crate::error::{Error, Result};

/// What an event does as a redaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RedactionVerdict {
    /// Not a redaction: nothing to apply.
    NotARedaction,
    /// A redaction its sender may make: the target is redacted.
    Apply(OwnedEventId),
    /// A redaction its sender may not make (why).
    Refused(String),
    /// A redaction of an event we do not hold, by a sender without the `redact` power: whether
    /// it may be made depends on who sent the target. A received one waits for the target,
    /// soft-failed (see [`Redactions::apply_waiting_for`]).
    TargetUnknown(OwnedEventId),
}

/// Redactions: whether one may apply, and the ones held until their target arrives.
pub struct Redactions {
    hub: Hub,
}

impl Redactions {
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }

    /// May `user_id` redact `event_id`? The auth rules let any member send a redaction;
    /// whether it may redact somebody else's event is the server's check (the sender's
    /// `redact` power, a v12 creator's unlimited one).
    pub async fn check_client_redaction(&self, room_id: &RoomId, event_id: &EventId, user_id: &UserId) -> Result<()> {
        let s = self.hub.services();
        let target = s.store.event(event_id.as_str()).await?;
        let Some(target) = target.filter(|t| t.room_id == room_id.as_str()) else {
            return Err(Error::NotFound("Event not found".to_owned()));
        };
        if target.sender != user_id.as_str()
            && !s.rooms.power_levels(target.room_id.as_str()).await?.user_can_redact_event_of_other(user_id)
        {
            return Err(Error::Forbidden("You may only redact your own events".to_owned()));
        }
        Ok(())
    }

    /// Decides whether `pdu` redacts an event in `room_id` (see the module), by the room's
    /// current power levels. Call under the room lock.
    pub(crate) async fn verdict(
        &self,
        room_id: &RoomId,
        pdu: &Pdu,
        rules: &RoomVersionRules,
    ) -> Result<RedactionVerdict> {
        let s = self.hub.services();
        let Some(target) = pdu.redaction_target(rules) else { return Ok(RedactionVerdict::NotARedaction) };
        // The room's current power levels, v12 creators' unlimited power included.
        if s.rooms.power_levels(room_id.as_str()).await?.user_can_redact_event_of_other(&pdu.sender) {
            return Ok(RedactionVerdict::Apply(target));
        }
        let Some(row) = s.store.event(target.as_str()).await? else {
            return Ok(RedactionVerdict::TargetUnknown(target));
        };
        if row.room_id != room_id.as_str() {
            return Ok(RedactionVerdict::Refused(format!("{target} is in another room")));
        }
        let Ok(original_sender) = UserId::parse(row.sender.as_str()) else {
            return Ok(RedactionVerdict::Refused(format!("{target} has no valid sender")));
        };
        let remote_sender = pdu.sender.server_name() != s.settings.server_name;
        if original_sender == pdu.sender || (remote_sender && original_sender.server_name() == pdu.sender.server_name())
        {
            Ok(RedactionVerdict::Apply(target))
        } else {
            Ok(RedactionVerdict::Refused(format!("{} may not redact {target} of {original_sender}", pdu.sender)))
        }
    }

    /// Decides again the soft-failed redactions that waited for `target`, now stored: each is
    /// taken in like a received event (as if it came from `from` now), and so reaches the
    /// timeline if its sender may redact the target. Best effort: a failure is logged.
    pub(crate) async fn apply_waiting_for(&self, room_id: &RoomId, target: &EventId, from: &ServerName) {
        let s = self.hub.services();
        let waiting = match s.store.pending_redactions_held_aside(room_id.as_str(), target.as_str()).await {
            Ok(waiting) => waiting,
            Err(e) => {
                tracing::warn!(%room_id, %target, error = %e, "cannot read the redactions waiting for an event");
                return;
            }
        };
        for redaction in waiting {
            if let Err(e) = self.retry_held(room_id, &redaction, from).await {
                tracing::info!(%room_id, %redaction, error = %e, "a waiting redaction stays without effect");
            }
            if let Err(e) = s.store.drop_pending_redaction(target.as_str(), &redaction).await {
                tracing::warn!(%room_id, %redaction, error = %e, "cannot forget a waiting redaction");
            }
        }
    }

    async fn retry_held(&self, room_id: &RoomId, redaction: &str, from: &ServerName) -> Result<()> {
        let s = self.hub.services();
        let Some(stored) = s.store.pdus_for_auth(&[redaction.to_owned()]).await?.into_iter().next() else {
            return Ok(());
        };
        let event_id = EventId::parse(stored.event_id.as_str()).map_err(|e| Error::internal(e.to_string()))?;
        let object: ruma::CanonicalJsonObject =
            serde_json::from_str(&stored.json).map_err(|e| Error::internal(e.to_string()))?;
        let pdu = Pdu::from_json(event_id.clone(), &stored.json).map_err(|e| Error::internal(e.to_string()))?;
        let event = VerifiedEvent { event_id, object, json: stored.json, pdu };
        // Its signatures were checked when it arrived; it is decided again from the start.
        Box::pin(s.receiver.accept_again(room_id, event, from)).await.map(|_| ())
    }
}
