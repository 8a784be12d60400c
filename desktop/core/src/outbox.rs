//! The outbox: messages are queued in the local store with their transaction id and sent by
//! a background task, oldest first. The transaction id is chosen once, when the message is
//! queued, and reused by every retry (after a network failure or an app restart), and the
//! server answers a repeated `PUT .../send/{type}/{txn}` with the first event id: a message
//! is never delivered twice.

use ruma::{
    OwnedTransactionId, RoomId, TransactionId, api::client::message::send_message_event, events::MessageLikeEventType,
    serde::Raw,
};
use serde_json::Value;

use crate::{
    Client, Error, ItemContent, Result, SendState, TimelineItem, Update,
    http::REQUEST_TIMEOUT,
    store::{NewItem, OutboxRow},
    sync::{Backoff, now_ms},
};

/// The background task (see [`Client::start`]).
pub(crate) async fn run(client: Client) {
    let mut backoff = Backoff::new();
    loop {
        match client.flush_outbox().await {
            Ok(()) => {
                backoff.reset();
                client.inner.outbox_wake.notified().await;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::info!(%e, ?delay, "outbox: will retry");
                // Whichever comes first: the delay, or news (new message, back online).
                let _ = tokio::time::timeout(delay, client.inner.outbox_wake.notified()).await;
            }
        }
    }
}

impl Client {
    /// Queues a message for sending; returns its timeline item (state `Sending`).
    pub(crate) async fn enqueue(
        &self,
        room_id: &RoomId,
        event_type: &str,
        content: Value,
        item_content: ItemContent,
    ) -> Result<TimelineItem> {
        self.enqueue_as(TransactionId::new().to_string(), room_id, event_type, content, item_content).await
    }

    /// [`Client::enqueue`] with a transaction id chosen earlier (a file's, announced in its
    /// upload progress).
    pub(crate) async fn enqueue_as(
        &self,
        txn_id: String,
        room_id: &RoomId,
        event_type: &str,
        content: Value,
        item_content: ItemContent,
    ) -> Result<TimelineItem> {
        let session = self.require_session()?;
        let room = self.store()?.room(room_id.as_str()).await?;
        let Some(room) = room.filter(|r| r.membership == crate::Membership::Joined) else {
            return Err(Error::InvalidInput("You are not in this room.".into()));
        };
        let row =
            OutboxRow { txn_id: txn_id.clone(), room_id: room_id.to_string(), event_type: event_type.into(), content };
        self.store()?
            .enqueue(
                &row,
                NewItem {
                    room_id: room_id.as_str(),
                    key: &txn_id,
                    event_id: None,
                    sender: session.user_id.as_str(),
                    ts: now_ms(),
                    content: &item_content,
                    encrypted: room.encryption.is_some(),
                    send_state: Some(&SendState::Sending),
                    raw: None,
                },
            )
            .await?;
        let item = self.store()?.item(&txn_id).await?.ok_or_else(|| Error::Store("queued item vanished".into()))?;
        self.emit(Update::Timeline { item: item.clone() });
        self.emit(Update::RoomsChanged);
        self.inner.outbox_wake.notify_one();
        Ok(item)
    }

    /// Sends everything queued, in order; stops at the first transient failure (the rest
    /// waits its turn: messages of a room keep their order).
    pub(crate) async fn flush_outbox(&self) -> Result<()> {
        for row in self.store()?.outbox().await? {
            match self.send_queued(&row).await {
                Ok(event_id) => {
                    self.store()?.outbox_done(&row.txn_id, &event_id).await?;
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(Error::SessionExpired) => return Err(Error::SessionExpired),
                Err(e) => {
                    tracing::warn!(%e, txn = %row.txn_id, "the server refused a message");
                    self.store()?.outbox_failed(&row.txn_id, &e.to_string()).await?;
                }
            }
            if let Some(item) = self.store()?.item(&row.txn_id).await? {
                self.emit(Update::Timeline { item });
            }
        }
        Ok(())
    }

    /// One `PUT /rooms/{room}/send/{type}/{txn}`, encrypted if the room is.
    async fn send_queued(&self, row: &OutboxRow) -> Result<String> {
        let session = self.require_session()?;
        let room_id = RoomId::parse(&row.room_id).map_err(|e| Error::Store(e.to_string()))?;
        let room = self.store()?.room(&row.room_id).await?;
        let (event_type, content) = match room.and_then(|r| r.encryption) {
            Some(encryption) => (
                "m.room.encrypted".to_owned(),
                self.encrypt_for_room(&session, &room_id, &encryption, &row.event_type, row.content.clone()).await?,
            ),
            None => (row.event_type.clone(), row.content.clone()),
        };
        let body = Raw::<Value>::from_json(serde_json::value::to_raw_value(&content)?).cast_unchecked();
        let txn: OwnedTransactionId = row.txn_id.as_str().into();
        let request = send_message_event::v3::Request::new_raw(
            room_id,
            txn,
            MessageLikeEventType::from(event_type.as_str()),
            body,
        );
        let response =
            self.inner.http.send(&session.server_url, Some(&session.access_token), request, REQUEST_TIMEOUT).await?;
        Ok(response.event_id.to_string())
    }

    /// Sends a text message (end-to-end encrypted in encrypted rooms). Returns at once with
    /// the item in state [`SendState::Sending`]; [`crate::Update::Timeline`] reports `Sent`
    /// and `Read` later. Survives network failures and restarts (see the outbox).
    pub async fn send_text(&self, room_id: &RoomId, body: &str) -> Result<TimelineItem> {
        if body.trim().is_empty() {
            return Err(Error::InvalidInput("The message is empty.".into()));
        }
        let content = serde_json::json!({"msgtype": "m.text", "body": body});
        self.enqueue(room_id, "m.room.message", content, ItemContent::Text { body: body.to_owned() }).await
    }
}
