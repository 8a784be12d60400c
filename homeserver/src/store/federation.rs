//! Rooms across servers: joined rooms' state arriving in one piece, outlier events, the
//! persistent send queue and received transaction ids.

use sqlx::Row;

use super::{AppendEvent, AppendOutcome, Store};

/// One queued item for a destination: a PDU (its id and JSON) or an EDU (its JSON).
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub stream_ordering: i64,
    pub event_id: Option<String>,
    pub pdu_json: Option<String>,
    pub edu_json: Option<String>,
}

/// A room joined through another server: the room row, its state and the join event.
pub struct JoinedRoom<'a> {
    pub room_id: &'a str,
    pub room_version: &'a str,
    pub creator: &'a str,
    /// The auth chain events that are not part of the state: (event id, JSON).
    pub outliers: &'a [(String, String)],
    /// The room state before the join, oldest first; events we already hold are skipped.
    pub state: Vec<AppendEvent<'a>>,
    pub join: AppendEvent<'a>,
}

impl Store {
    /// Creates the room row for a room we learn about from another server (an invite, a
    /// join), or corrects its creator once the create event is known.
    pub async fn upsert_remote_room(
        &self,
        room_id: &str,
        room_version: &str,
        creator: &str,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        upsert_room(&mut tx, room_id, room_version, creator, now).await?;
        tx.commit().await
    }

    /// Stores a joined room in one transaction: outliers, the state (as timeline events, so
    /// the current state and the sync see it), the join; afterwards the join is the room's
    /// only forward extremity. Returns which of the state events were new.
    pub async fn persist_joined_room(&self, room: JoinedRoom<'_>, now: i64) -> Result<Vec<bool>, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        upsert_room(&mut tx, room.room_id, room.room_version, room.creator, now).await?;
        for (event_id, json) in room.outliers {
            sqlx::query(
                "INSERT INTO event_outliers (event_id, room_id, json, soft_failed, received_ts) VALUES ($1, $2, $3, 0, $4)
                 ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(event_id)
            .bind(room.room_id)
            .bind(json)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        let mut new = Vec::with_capacity(room.state.len());
        for ev in room.state.iter().chain(std::iter::once(&room.join)) {
            let exists = sqlx::query("SELECT 1 FROM events WHERE event_id = $1")
                .bind(ev.event_id)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            if !exists {
                let outcome = self.append_in_tx(&mut tx, ev).await?;
                debug_assert!(matches!(outcome, AppendOutcome::Appended { .. }));
            }
            new.push(!exists);
        }
        sqlx::query("DELETE FROM room_forward_extremities WHERE room_id = $1")
            .bind(room.room_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO room_forward_extremities (room_id, event_id) VALUES ($1, $2)")
            .bind(room.room_id)
            .bind(room.join.event_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        new.pop();
        Ok(new)
    }

    /// Stores an event that is not on the timeline (see `event_outliers`).
    pub async fn insert_outlier(
        &self,
        event_id: &str,
        room_id: &str,
        json: &str,
        soft_failed: bool,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO event_outliers (event_id, room_id, json, soft_failed, received_ts) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event_id)
        .bind(room_id)
        .bind(json)
        .bind(i64::from(soft_failed))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// The JSON of events by id, from the timeline or the outliers: (event id, room id, JSON).
    pub async fn any_events_json(&self, ids: &[String]) -> Result<Vec<(String, String, String)>, sqlx::Error> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let row = sqlx::query(
                "SELECT event_id, room_id, json FROM events WHERE event_id = $1
                 UNION ALL SELECT event_id, room_id, json FROM event_outliers WHERE event_id = $1",
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(r) = row {
                out.push((r.try_get("event_id")?, r.try_get("room_id")?, r.try_get("json")?));
            }
        }
        Ok(out)
    }

    /// Destinations with queued events.
    pub async fn outbox_destinations(&self) -> Result<Vec<String>, sqlx::Error> {
        let rows = sqlx::query("SELECT DISTINCT destination FROM federation_outbox").fetch_all(&self.pool).await?;
        rows.iter().map(|r| r.try_get("destination")).collect()
    }

    /// The oldest queued events for `destination`, at most `limit`.
    pub async fn outbox_batch(&self, destination: &str, limit: i64) -> Result<Vec<OutboxRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT o.stream_ordering, o.event_id, e.json, o.edu FROM federation_outbox o
             LEFT JOIN events e ON e.event_id = o.event_id
             WHERE o.destination = $1 ORDER BY o.stream_ordering LIMIT $2",
        )
        .bind(destination)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxRow {
                    stream_ordering: r.try_get("stream_ordering")?,
                    event_id: r.try_get("event_id")?,
                    pdu_json: r.try_get("json")?,
                    edu_json: r.try_get("edu")?,
                })
            })
            .collect()
    }

    /// Queues an EDU for `destinations` at stream position `position`.
    pub async fn enqueue_edu(&self, destinations: &[String], position: i64, edu: &str) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        for destination in destinations {
            sqlx::query("INSERT INTO federation_outbox (destination, stream_ordering, edu) VALUES ($1, $2, $3)")
                .bind(destination)
                .bind(position)
                .bind(edu)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    /// Destinations that deliveries are failing to reach, and since when.
    pub async fn failing_destinations(&self) -> Result<Vec<(String, i64)>, sqlx::Error> {
        let rows = sqlx::query("SELECT destination, failing_since FROM federation_destination_failures")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((r.try_get("destination")?, r.try_get("failing_since")?))).collect()
    }

    /// Records that deliveries to `destination` fail, since `since` unless already recorded.
    pub async fn destination_failing(&self, destination: &str, since: i64) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO federation_destination_failures (destination, failing_since) VALUES ($1, $2)
             ON CONFLICT (destination) DO NOTHING",
        )
        .bind(destination)
        .bind(since)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// `destination` accepted a delivery again.
    pub async fn destination_recovered(&self, destination: &str) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        sqlx::query("DELETE FROM federation_destination_failures WHERE destination = $1")
            .bind(destination)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// Shrinks the backlog of a destination we gave up on to what it needs to catch up when
    /// it returns: the newest event of each room (it fetches the gap itself through
    /// `/get_missing_events`, as after any outage) and the EDUs that matter later (to-device
    /// messages, device list and signing key updates); typing, presence and receipts are
    /// stale by then and dropped. Returns how many queued items were dropped.
    pub async fn outbox_trim(&self, destination: &str) -> Result<u64, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        // As in `outbox_delivered`: a restarted server counts on from above what is removed.
        let highest: Option<i64> =
            sqlx::query("SELECT MAX(stream_ordering) AS p FROM federation_outbox WHERE destination = $1")
                .bind(destination)
                .fetch_one(&mut *tx)
                .await?
                .try_get("p")?;
        if let Some(highest) = highest {
            sqlx::query("UPDATE stream_high_water SET position = $1 WHERE id = 1 AND position < $1")
                .bind(highest)
                .execute(&mut *tx)
                .await?;
        }
        let dropped = sqlx::query(
            "DELETE FROM federation_outbox WHERE destination = $1 AND (
                 (event_id IS NOT NULL AND stream_ordering NOT IN (
                     SELECT MAX(o.stream_ordering) FROM federation_outbox o
                     JOIN events e ON e.event_id = o.event_id
                     WHERE o.destination = $1 GROUP BY e.room_id))
                 OR (edu IS NOT NULL AND (edu LIKE '%\"edu_type\":\"m.typing\"%'
                     OR edu LIKE '%\"edu_type\":\"m.presence\"%'
                     OR edu LIKE '%\"edu_type\":\"m.receipt\"%')))",
        )
        .bind(destination)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(dropped)
    }

    /// Removes what `destination` accepted: everything queued up to `upto`.
    pub async fn outbox_delivered(&self, destination: &str, upto: i64) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        sqlx::query("DELETE FROM federation_outbox WHERE destination = $1 AND stream_ordering <= $2")
            .bind(destination)
            .bind(upto)
            .execute(&mut *tx)
            .await?;
        // An EDU's position may be the highest one the stream ever handed out; once its row
        // is gone, a restarted server must still count on from above it (see
        // `max_stream_position`), or it would reuse positions clients already hold.
        sqlx::query("UPDATE stream_high_water SET position = $1 WHERE id = 1 AND position < $1")
            .bind(upto)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// The answer given to a transaction received earlier.
    pub async fn received_txn(&self, origin: &str, txn_id: &str) -> Result<Option<String>, sqlx::Error> {
        let row = sqlx::query("SELECT response FROM federation_received_txns WHERE origin = $1 AND txn_id = $2")
            .bind(origin)
            .bind(txn_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("response")).transpose()
    }

    /// Keeps the stripped state shown with an invite from another server.
    pub async fn set_remote_invite_state(&self, room_id: &str, user_id: &str, events: &str) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO remote_invite_state (room_id, user_id, events) VALUES ($1, $2, $3)
             ON CONFLICT (room_id, user_id) DO UPDATE SET events = $3",
        )
        .bind(room_id)
        .bind(user_id)
        .bind(events)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// The stripped state shown with an invite from another server (a JSON array).
    pub async fn remote_invite_state(&self, room_id: &str, user_id: &str) -> Result<Option<String>, sqlx::Error> {
        let row = sqlx::query("SELECT events FROM remote_invite_state WHERE room_id = $1 AND user_id = $2")
            .bind(room_id)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("events")).transpose()
    }

    /// Forgets transaction ids received before `cutoff`.
    pub async fn forget_received_txns(&self, cutoff: i64) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        sqlx::query("DELETE FROM federation_received_txns WHERE received_ts < $1")
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// Remembers the answer to a received transaction. Durably: the sender takes our answer
    /// as the transaction being ours for good and will not send it again.
    pub async fn store_received_txn(
        &self,
        origin: &str,
        txn_id: &str,
        response: &str,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        self.execute_write_durably(
            sqlx::query(
                "INSERT INTO federation_received_txns (origin, txn_id, response, received_ts) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (origin, txn_id) DO NOTHING",
            )
            .bind(origin)
            .bind(txn_id)
            .bind(response)
            .bind(now),
        )
        .await
        .map(|_| ())
    }
}

async fn upsert_room(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    room_id: &str,
    room_version: &str,
    creator: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO rooms (room_id, room_version, creator, published, created_ts) VALUES ($1, $2, $3, 0, $4)
         ON CONFLICT (room_id) DO UPDATE SET creator = $3",
    )
    .bind(room_id)
    .bind(room_version)
    .bind(creator)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// An event of a room's history from before everything we hold (backfilled on demand).
#[derive(Debug, Clone)]
pub struct BackfilledEvent {
    pub event_id: String,
    pub depth: i64,
    pub event_type: String,
    pub state_key: Option<String>,
    pub sender: String,
    pub origin_server_ts: i64,
    pub json: String,
}

/// Serialises backfill writes on PostgreSQL (SQLite's writes are serialised anyway): the
/// positions they take are read and written in one transaction.
const BACKFILL_ADVISORY_LOCK: i64 = 0x0b_4d1e_bacf;

impl Store {
    /// Stores backfilled events (newest first) before everything else in the stream:
    /// negative positions, each below all positions taken so far, so the room's pagination
    /// reaches them in order after its earliest event and no sync ever sees them as new.
    /// They change no current state, push counts or extremities. Events already held are
    /// skipped, outlier copies are dropped. Returns how many were stored.
    pub async fn insert_backfilled_events(
        &self,
        room_id: &str,
        events: &[BackfilledEvent],
    ) -> Result<usize, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        if self.backend == super::Backend::Postgres {
            sqlx::query("SELECT 1 AS locked FROM (SELECT pg_advisory_xact_lock($1)) AS l")
                .bind(BACKFILL_ADVISORY_LOCK)
                .execute(&mut *tx)
                .await?;
        }
        let lowest: i64 = sqlx::query("SELECT CAST(COALESCE(MIN(stream_ordering), 0) AS BIGINT) AS lowest FROM events")
            .fetch_one(&mut *tx)
            .await?
            .try_get("lowest")?;
        let mut next = lowest.min(0) - 1;
        let mut stored = 0;
        for e in events {
            let known = sqlx::query("SELECT 1 AS one FROM events WHERE event_id = $1")
                .bind(&e.event_id)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            if known {
                continue;
            }
            sqlx::query(
                "INSERT INTO events (stream_ordering, event_id, room_id, depth, type, state_key, sender, origin_server_ts, json)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(next)
            .bind(&e.event_id)
            .bind(room_id)
            .bind(e.depth)
            .bind(&e.event_type)
            .bind(e.state_key.as_deref())
            .bind(&e.sender)
            .bind(e.origin_server_ts)
            .bind(&e.json)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM event_outliers WHERE event_id = $1").bind(&e.event_id).execute(&mut *tx).await?;
            next -= 1;
            stored += 1;
        }
        tx.commit().await?;
        Ok(stored)
    }
}

impl Store {
    /// Every membership event in the room about a user whose id ends in `:{server}`, oldest
    /// first: (position, user id, membership). The caller keeps the users of exactly that
    /// server (a server name cannot hold the `%` or `_` that LIKE would read as wildcards).
    pub async fn member_events_of_server(
        &self,
        room_id: &str,
        server: &str,
    ) -> Result<Vec<(i64, String, String)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT stream_ordering, state_key, json FROM events
             WHERE room_id = $1 AND type = 'm.room.member' AND state_key LIKE $2 ORDER BY stream_ordering",
        )
        .bind(room_id)
        .bind(format!("%:{server}"))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let json: String = r.try_get("json")?;
                Ok((r.try_get("stream_ordering")?, r.try_get("state_key")?, super::rooms::membership_in(&json)))
            })
            .collect()
    }

    /// Outliers by id that were accepted (never soft-failed or rejected ones, which no server
    /// is to be handed as part of the room): (event id, room id, JSON).
    pub async fn accepted_outliers(&self, ids: &[String]) -> Result<Vec<(String, String, String)>, sqlx::Error> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let row = sqlx::query(
                "SELECT event_id, room_id, json FROM event_outliers
                 WHERE event_id = $1 AND soft_failed = 0 AND rejection IS NULL",
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(r) = row {
                out.push((r.try_get("event_id")?, r.try_get("room_id")?, r.try_get("json")?));
            }
        }
        Ok(out)
    }
}
