//! Rooms across servers: membership through us (make_join / send_join, make_leave /
//! send_leave, invite) and transactions of events (`/send`).

use std::{collections::BTreeMap, sync::Arc};

use axum::extract::State;
use ruma::api::federation::{
    membership::{create_invite, create_join_event, create_leave_event, prepare_join_event, prepare_leave_event},
    transactions::send_transaction_message,
};

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::{
        Services,
        inbound::{Received, TURN_WAIT},
    },
    store::now_ms,
};

/// Most PDUs in one transaction (the spec's limit).
const MAX_PDUS: usize = 50;
/// Most EDUs in one transaction (the spec's limit).
const MAX_EDUS: usize = 100;
/// What a server whose transaction found another of its own still worked on after
/// `TURN_WAIT` is told to wait.
const ORIGIN_BUSY_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

pub(super) fn origin<T>(req: &Ruma<T>) -> Result<ruma::OwnedServerName> {
    req.origin.clone().ok_or_else(|| Error::Unauthorized("The request is not signed".to_owned()))
}

/// `GET /_matrix/federation/v1/make_join/{roomId}/{userId}`
pub async fn make_join(
    State(services): State<Arc<Services>>,
    req: Ruma<prepare_join_event::v1::Request>,
) -> Result<RumaResponse<prepare_join_event::v1::Response>> {
    let origin = origin(&req)?;
    let b = &req.body;
    let version = services.rooms.version(b.room_id.as_str()).await?;
    if !b.ver.contains(&version) {
        return Err(Error::IncompatibleRoomVersion(version));
    }
    let (version, event) = services.remote_rooms.membership_template(&b.room_id, &b.user_id, &origin, "join").await?;
    let mut response = prepare_join_event::v1::Response::new(event);
    response.room_version = Some(version);
    Ok(RumaResponse(response))
}

/// `PUT /_matrix/federation/v2/send_join/{roomId}/{eventId}`
pub async fn send_join(
    State(services): State<Arc<Services>>,
    req: Ruma<create_join_event::v2::Request>,
) -> Result<RumaResponse<create_join_event::v2::Response>> {
    let origin = origin(&req)?;
    let b = &req.body;
    services.remote_rooms.take_membership(&b.room_id, &b.event_id, &b.pdu, &origin, "join").await?;
    let joined = services.remote_rooms.state_and_auth_chain(&b.room_id, &b.event_id).await?;
    let mut state = create_join_event::v2::RoomState::new();
    state.state = joined.state;
    state.auth_chain = joined.auth_chain;
    Ok(RumaResponse(create_join_event::v2::Response::new(state)))
}

/// `GET /_matrix/federation/v1/make_leave/{roomId}/{userId}`
pub async fn make_leave(
    State(services): State<Arc<Services>>,
    req: Ruma<prepare_leave_event::v1::Request>,
) -> Result<RumaResponse<prepare_leave_event::v1::Response>> {
    let origin = origin(&req)?;
    let b = &req.body;
    let (version, event) = services.remote_rooms.membership_template(&b.room_id, &b.user_id, &origin, "leave").await?;
    Ok(RumaResponse(prepare_leave_event::v1::Response::new(Some(version), event)))
}

/// `PUT /_matrix/federation/v2/send_leave/{roomId}/{eventId}`
pub async fn send_leave(
    State(services): State<Arc<Services>>,
    req: Ruma<create_leave_event::v2::Request>,
) -> Result<RumaResponse<create_leave_event::v2::Response>> {
    let origin = origin(&req)?;
    let b = &req.body;
    services.remote_rooms.take_membership(&b.room_id, &b.event_id, &b.pdu, &origin, "leave").await?;
    Ok(RumaResponse(create_leave_event::v2::Response::new()))
}

/// `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`
pub async fn invite(
    State(services): State<Arc<Services>>,
    req: Ruma<create_invite::v2::Request>,
) -> Result<RumaResponse<create_invite::v2::Response>> {
    let origin = origin(&req)?;
    let b = &req.body;
    let event = services
        .remote_rooms
        .take_invite(&b.room_id, &b.event_id, &b.room_version, &b.event, &b.invite_room_state, &origin)
        .await?;
    Ok(RumaResponse(create_invite::v2::Response::new(event)))
}

/// `PUT /_matrix/federation/v1/send/{transactionId}`
/// `PUT /send/{txnId}`: each PDU is taken in or refused on its own; a transaction seen
/// before gets the answer it got then. One transaction at a time per origin (another waits
/// its turn up to `TURN_WAIT`, then 429); PDUs that need
/// events fetched are worked on in the background (see `service::inbound`), waited for up to
/// `federation.inbound_wait_secs`.
pub async fn send_transaction(
    State(services): State<Arc<Services>>,
    req: Ruma<send_transaction_message::v1::Request>,
) -> Result<RumaResponse<send_transaction_message::v1::Response>> {
    let origin = origin(&req)?;
    let b = &req.body;
    if b.origin != origin {
        return Err(Error::Forbidden("The transaction's origin is not the signing server".to_owned()));
    }
    if b.pdus.len() > MAX_PDUS {
        return Err(Error::BadJson(format!("at most {MAX_PDUS} PDUs per transaction")));
    }
    if b.edus.len() > MAX_EDUS {
        return Err(Error::BadJson(format!("at most {MAX_EDUS} EDUs per transaction")));
    }
    let Some(_turn) = services.receiver.turn(&origin, TURN_WAIT).await else {
        return Err(Error::LimitExceeded { retry_after: ORIGIN_BUSY_RETRY });
    };
    if let Some(answer) = services.store.received_txn(origin.as_str(), b.transaction_id.as_str()).await? {
        let pdus = serde_json::from_str(&answer).map_err(|e| Error::internal(e.to_string()))?;
        return Ok(RumaResponse(send_transaction_message::v1::Response::new(pdus)));
    }
    let mut results = BTreeMap::new();
    let mut queued = Vec::new();
    for raw in &b.pdus {
        match services.receiver.take_pdu(&origin, raw).await {
            Ok(Received::Done(event_id, _)) => {
                results.insert(event_id, Ok(()));
            }
            Ok(Received::Queued(event_id, verdict)) => queued.push((event_id, verdict)),
            Err(Error::Database(e)) => return Err(Error::Database(e)),
            Err(e) => {
                tracing::info!(%origin, error = %e, "refused a received event");
                // An event we cannot even identify has no entry to report under.
                if let Some(event_id) = event_id_hint(raw, &services).await {
                    results.insert(event_id, Err(e.to_string()));
                }
            }
        }
    }
    for edu in &b.edus {
        // EDUs are best effort: a bad one is logged and skipped.
        let edu: serde_json::Value = serde_json::from_str(edu.json().get()).unwrap_or_default();
        if let Err(e) = services.receiver.take_edu(&origin, &edu).await {
            tracing::info!(%origin, edu_type = %edu["edu_type"], error = %e, "ignored a received EDU");
        }
    }
    // Queued PDUs: their verdicts if they come in time; otherwise they are being worked on
    // (and reported as taken, as a server that stages what it receives does).
    let deadline = tokio::time::Instant::now() + services.settings.federation.inbound_wait;
    for (event_id, verdict) in queued {
        let verdict = match tokio::time::timeout_at(deadline, verdict).await {
            Ok(Ok(verdict)) => verdict,
            Ok(Err(_)) | Err(_) => Ok(()),
        };
        results.insert(event_id, verdict);
    }
    let answer = serde_json::to_string(&results).map_err(|e| Error::internal(e.to_string()))?;
    services.store.store_received_txn(origin.as_str(), b.transaction_id.as_str(), &answer, now_ms()).await?;
    Ok(RumaResponse(send_transaction_message::v1::Response::new(results)))
}

/// The id of a refused PDU, when it can be computed.
async fn event_id_hint(raw: &serde_json::value::RawValue, services: &Services) -> Option<ruma::OwnedEventId> {
    let room_id = crate::service::received::room_id_of(raw).ok()?;
    let version = services.rooms.version(room_id.as_str()).await.ok()?;
    let object: ruma::CanonicalJsonObject = serde_json::from_str(raw.get()).ok()?;
    federation::pdu::event_id_of(&object, &version).ok()
}
