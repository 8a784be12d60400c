//! Messages: sending, redacting, reading history (`/messages`, `/event`), typing, receipts
//! and read markers.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    api::{
        Direction,
        client::{
            message::{get_message_events, send_message_event},
            read_marker::set_read_marker,
            receipt::create_receipt::{self, v3::ReceiptType},
            redact::redact_event,
            room::get_room_event,
            typing::create_typing_event,
        },
    },
    events::receipt::ReceiptThread,
};
use serde_json::{Value as JsonValue, json};

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::{
        Services,
        events::Viewer,
        streams::Positions,
        sync::{EventFilter, event_filter_from_json},
        timeline::{EventDraft, Txn},
    },
    store::now_ms,
};

/// `PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}`
pub async fn send(
    State(services): State<Arc<Services>>,
    req: Ruma<send_message_event::v3::Request>,
) -> Result<RumaResponse<send_message_event::v3::Response>> {
    let user = req.user()?.clone();
    let content: JsonValue =
        serde_json::from_str(req.body.body.json().get()).map_err(|e| Error::BadJson(e.to_string()))?;
    if !content.is_object() {
        return Err(Error::BadJson("Event content must be an object".to_owned()));
    }
    let kind = req.body.event_type.to_string();
    if kind == "m.room.redaction" {
        return Err(Error::BadJson("Use the /redact endpoint to redact events".to_owned()));
    }
    let scope = format!("send/{}/{kind}", req.body.room_id);
    if let Some(sent) =
        services.limit_event_send(&user.user_id, user.device_id.as_str(), &scope, req.body.txn_id.as_str()).await?
    {
        return Ok(RumaResponse(send_message_event::v3::Response::new(sent)));
    }
    let txn = Txn { device_id: user.device_id.as_str(), scope: &scope, txn_id: req.body.txn_id.as_str() };
    let event_id = services
        .timeline
        .append(&req.body.room_id, &user.user_id, EventDraft::message(&kind, content), Some(txn))
        .await?;
    Ok(RumaResponse(send_message_event::v3::Response::new(event_id)))
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}`
pub async fn redact(
    State(services): State<Arc<Services>>,
    req: Ruma<redact_event::v3::Request>,
) -> Result<RumaResponse<redact_event::v3::Response>> {
    let user = req.user()?.clone();
    services.redactions.check_client_redaction(&req.body.room_id, &req.body.event_id, &user.user_id).await?;
    let mut content = serde_json::Map::new();
    if let Some(reason) = &req.body.reason {
        content.insert("reason".into(), JsonValue::from(reason.as_str()));
    }
    let draft = EventDraft {
        event_type: "m.room.redaction".to_owned(),
        state_key: None,
        content: JsonValue::Object(content),
        redacts: Some(req.body.event_id.clone()),
    };
    let scope = format!("redact/{}/{}", req.body.room_id, req.body.event_id);
    if let Some(sent) =
        services.limit_event_send(&user.user_id, user.device_id.as_str(), &scope, req.body.txn_id.as_str()).await?
    {
        return Ok(RumaResponse(redact_event::v3::Response::new(sent)));
    }
    let txn = Txn { device_id: user.device_id.as_str(), scope: &scope, txn_id: req.body.txn_id.as_str() };
    let event_id = services.timeline.append(&req.body.room_id, &user.user_id, draft, Some(txn)).await?;
    Ok(RumaResponse(redact_event::v3::Response::new(event_id)))
}

/// Most `/backfill` rounds one `/messages` request may start.
const MAX_BACKFILLS_PER_REQUEST: usize = 3;

/// `GET /_matrix/client/v3/rooms/{roomId}/messages`
pub async fn messages(
    State(services): State<Arc<Services>>,
    req: Ruma<get_message_events::v3::Request>,
) -> Result<RumaResponse<get_message_events::v3::Response>> {
    let user = req.user()?.clone();
    let body = req.body;
    let room_id = body.room_id.as_str();
    // Members and former members may read history (subject to history visibility).
    services.rooms.require_known(&body.room_id).await?;
    services.rooms.require_ever_joined(&body.room_id, &user.user_id).await?;
    let parse = |t: &str| {
        Positions::parse_pagination(t).ok_or_else(|| Error::InvalidParam(format!("Invalid pagination token {t}")))
    };
    let backwards = body.dir == Direction::Backward;
    let from = match &body.from {
        Some(t) => parse(t)?.stream,
        None if backwards => services.streams.current().stream,
        None => i64::MIN,
    };
    let to = body.to.as_deref().map(parse).transpose()?.map(|p| p.stream);
    let limit = i64::try_from(u64::from(body.limit)).unwrap_or(10).clamp(1, 1000);
    let filter_json = serde_json::to_value(&body.filter).map_err(|e| Error::internal(e.to_string()))?;
    let filter: EventFilter = event_filter_from_json(&json!({"room": {"timeline": filter_json, "state": filter_json}}));

    // Read in pages until `limit` visible events that pass the filter are found or the room
    // runs out; `cursor` is always just past the last event looked at.
    let wanted = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut chunk_rows = Vec::new();
    let mut cursor = from;
    let mut more = true;
    // History from before our join is fetched from other servers when we run out (at most
    // a few times per request, so one request stays bounded).
    let mut backfills = 0;
    'pages: loop {
        let page = if backwards {
            services.timeline.page(room_id, to.unwrap_or(i64::MIN), cursor, limit, Direction::Backward).await?
        } else {
            let upto = to.unwrap_or(i64::MAX).min(services.streams.current().stream);
            services.timeline.page(room_id, cursor, upto, limit, Direction::Forward).await?
        };
        let page_len = page.len();
        let visible: std::collections::HashSet<String> = services
            .sync
            .visible_events(room_id, user.user_id.as_str(), page.clone())
            .await?
            .into_iter()
            .map(|r| r.event_id)
            .collect();
        for row in page {
            cursor = if backwards { row.stream_ordering - 1 } else { row.stream_ordering };
            if visible.contains(&row.event_id) && filter.allows_event(&row) {
                chunk_rows.push(row);
                if chunk_rows.len() == wanted {
                    break 'pages;
                }
            }
        }
        if page_len < wanted {
            if backwards && to.is_none() && backfills < MAX_BACKFILLS_PER_REQUEST {
                backfills += 1;
                match services.receiver.backfill_older(&body.room_id, wanted - chunk_rows.len()).await {
                    Ok(stored) if stored > 0 => continue,
                    Ok(_) => {}
                    Err(e) => tracing::info!(%room_id, error = %e, "could not backfill older history"),
                }
            }
            more = false;
            break;
        }
    }
    let end = more.then_some(Positions::at(cursor));

    let viewer = Viewer { user_id: user.user_id.as_str(), device_id: user.device_id.as_str() };
    let chunk = services.relations.raw_client_events(&chunk_rows, viewer, true).await?;
    let mut state = Vec::new();
    if filter.lazy_load_members {
        let mut senders: Vec<&str> = chunk_rows.iter().map(|r| r.sender.as_str()).collect();
        senders.sort();
        senders.dedup();
        for sender in senders {
            if let Some(row) = services.rooms.member_event(room_id, sender).await? {
                state.push(services.events.raw_client_event(&row, viewer, true).await?);
            }
        }
    }
    let mut response = get_message_events::v3::Response::new();
    response.start = body.from.unwrap_or_else(|| Positions::at(from).to_string());
    response.end = end.map(|p| p.to_string());
    response.chunk = chunk;
    response.state = state;
    Ok(RumaResponse(response))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/event/{eventId}`
pub async fn event(
    State(services): State<Arc<Services>>,
    req: Ruma<get_room_event::v3::Request>,
) -> Result<RumaResponse<get_room_event::v3::Response>> {
    let user = req.user()?.clone();
    let row = services
        .events
        .visible_in_room(req.body.room_id.as_str(), req.body.event_id.as_str(), user.user_id.as_str())
        .await?;
    let viewer = Viewer { user_id: user.user_id.as_str(), device_id: user.device_id.as_str() };
    let event = services.relations.raw_client_event_bundled(&row, viewer, true).await?;
    Ok(RumaResponse(get_room_event::v3::Response::new(event)))
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}`
pub async fn typing(
    State(services): State<Arc<Services>>,
    req: Ruma<create_typing_event::v3::Request>,
) -> Result<RumaResponse<create_typing_event::v3::Response>> {
    let user = req.user()?.clone();
    if req.body.user_id != user.user_id {
        return Err(Error::Forbidden("You may only set your own typing state".to_owned()));
    }
    services.rooms.require_joined(req.body.room_id.as_str(), user.user_id.as_str()).await?;
    let timeout = match req.body.state {
        ruma::api::client::typing::create_typing_event::v3::Typing::Yes(info) => Some(info.timeout),
        _ => None,
    };
    let changed = services
        .typing
        .set(&req.body.room_id, &user.user_id, timeout, || services.streams.bump_typing([&*req.body.room_id]));
    if changed || timeout.is_some() {
        // Other servers in the room hear it too (a renewal keeps their timeout alive).
        let edu = json!({"edu_type": "m.typing", "content": {
            "room_id": req.body.room_id, "user_id": user.user_id, "typing": timeout.is_some(),
        }});
        services.send_queue.queue_edu(&req.body.room_id, edu).await?;
    }
    Ok(RumaResponse(create_typing_event::v3::Response::new()))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}`
pub async fn receipt(
    State(services): State<Arc<Services>>,
    req: Ruma<create_receipt::v3::Request>,
) -> Result<RumaResponse<create_receipt::v3::Response>> {
    let user = req.user()?.clone();
    services.rooms.require_joined(req.body.room_id.as_str(), user.user_id.as_str()).await?;
    let kind = match &req.body.receipt_type {
        ReceiptType::Read => "m.read",
        ReceiptType::ReadPrivate => "m.read.private",
        ReceiptType::FullyRead => "m.fully_read",
        other => return Err(Error::InvalidParam(format!("Unknown receipt type {other}"))),
    };
    let thread = match &req.body.thread {
        ReceiptThread::Unthreaded => String::new(),
        ReceiptThread::Main => "main".to_owned(),
        ReceiptThread::Thread(id) => id.to_string(),
        _ => String::new(),
    };
    services.sync.set_receipt(&req.body.room_id, &user.user_id, kind, &req.body.event_id, &thread).await?;
    if kind == "m.read" {
        // Public read receipts go to the room's other servers.
        let mut data = json!({"ts": now_ms()});
        if !thread.is_empty() {
            data["thread_id"] = json!(thread);
        }
        let edu = json!({"edu_type": "m.receipt", "content": {
            (req.body.room_id.as_str()): {"m.read": {(user.user_id.as_str()): {"event_ids": [req.body.event_id], "data": data}}},
        }});
        services.send_queue.queue_edu(&req.body.room_id, edu).await?;
    }
    Ok(RumaResponse(create_receipt::v3::Response::new()))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/read_markers`
pub async fn read_markers(
    State(services): State<Arc<Services>>,
    req: Ruma<set_read_marker::v3::Request>,
) -> Result<RumaResponse<set_read_marker::v3::Response>> {
    let user = req.user()?.clone();
    services.rooms.require_joined(req.body.room_id.as_str(), user.user_id.as_str()).await?;
    for (kind, event_id) in [
        ("m.fully_read", &req.body.fully_read),
        ("m.read", &req.body.read_receipt),
        ("m.read.private", &req.body.private_read_receipt),
    ] {
        if let Some(event_id) = event_id {
            services.sync.set_receipt(&req.body.room_id, &user.user_id, kind, event_id, "").await?;
        }
    }
    Ok(RumaResponse(set_read_marker::v3::Response::new()))
}
