//! Rooms and their events: appending signed PDUs, current state, timelines.

use ruma::events::room::member::MembershipState;
use sqlx::{Row, any::AnyRow};

use super::Store;

/// One row of `rooms`.
#[derive(Debug, Clone)]
pub struct RoomRow {
    pub room_id: String,
    pub room_version: String,
    pub creator: String,
    pub published: bool,
}

/// One stored event.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub stream_ordering: i64,
    pub event_id: String,
    pub room_id: String,
    pub depth: i64,
    pub event_type: String,
    pub state_key: Option<String>,
    pub sender: String,
    pub origin_server_ts: i64,
    pub json: String,
    pub prev_state_event_id: Option<String>,
    pub redacted_by: Option<String>,
    pub txn_user: Option<String>,
    pub txn_device: Option<String>,
    pub txn_id: Option<String>,
}

/// Three parameters a row (plus four shared); SQLite allows 32766 parameters in a statement,
/// PostgreSQL 65535.
const PUSH_ACTION_ROWS_PER_STATEMENT: usize = 500;

const EVENT_COLUMNS: &str = "stream_ordering, event_id, room_id, depth, type, state_key, sender, origin_server_ts, json, prev_state_event_id, redacted_by, txn_user, txn_device, txn_id";

pub(super) fn event_row(r: &AnyRow) -> Result<EventRow, sqlx::Error> {
    Ok(EventRow {
        stream_ordering: r.try_get("stream_ordering")?,
        event_id: r.try_get("event_id")?,
        room_id: r.try_get("room_id")?,
        depth: r.try_get("depth")?,
        event_type: r.try_get("type")?,
        state_key: r.try_get("state_key")?,
        sender: r.try_get("sender")?,
        origin_server_ts: r.try_get("origin_server_ts")?,
        json: r.try_get("json")?,
        prev_state_event_id: r.try_get("prev_state_event_id")?,
        redacted_by: r.try_get("redacted_by")?,
        txn_user: r.try_get("txn_user")?,
        txn_device: r.try_get("txn_device")?,
        txn_id: r.try_get("txn_id")?,
    })
}

/// A room row to create in the same transaction as its first event.
#[derive(Debug, Clone)]
pub struct NewRoom<'a> {
    pub room_version: &'a str,
    pub creator: &'a str,
    pub published: bool,
}

/// One entry of a room's current state: (type, state key, event id, membership).
pub type CurrentStateEntry = (String, String, String, Option<String>);

/// A signed event to append to its room.
#[derive(Debug, Clone)]
pub struct AppendEvent<'a> {
    pub stream_ordering: i64,
    pub event_id: &'a str,
    pub room_id: &'a str,
    pub depth: i64,
    pub event_type: &'a str,
    pub state_key: Option<&'a str>,
    pub sender: &'a str,
    pub origin_server_ts: i64,
    pub json: &'a str,
    pub prev_events: &'a [String],
    /// For `m.room.member` events: the new membership.
    pub membership: Option<&'a str>,
    /// (user, device, transaction id) of a client send, for idempotent retries.
    /// (user, device, scope, transaction id) of a client's send; see `service::timeline::Txn`.
    pub txn: Option<(&'a str, &'a str, &'a str, &'a str)>,
    pub redacts: Option<&'a str>,
    pub new_room: Option<NewRoom<'a>>,
    /// `m.relates_to` of the content: (target event id, rel_type).
    pub relates_to: Option<(&'a str, &'a str)>,
    /// Local members this event notifies: (user, highlight, actions JSON).
    pub push_actions: &'a [(String, bool, String)],
    /// Searchable text: (`content.body` | `content.name` | `content.topic`, text).
    pub search_text: Option<(&'a str, &'a str)>,
    /// Other servers this event must be sent to: queued in the same transaction, so an
    /// acknowledged event is never lost for them.
    pub destinations: &'a [String],
    /// Where branches of the room met and state resolution decided the current state: these
    /// (type, state key, event id, membership) entries replace the usual update by the event.
    pub resolved_state: Option<&'a [CurrentStateEntry]>,
    /// The state before and after the event (`None`: not known, as for history fetched with
    /// a join; the event then updates the current state by its own key, if any).
    pub state: Option<&'a super::state::EventStateGroups>,
    /// The event was held as an outlier (an auth event fetched earlier): it leaves them.
    pub promotes_outlier: bool,
    /// Outliers that state resolution put into the current state: they join the timeline
    /// just before the event (every read of the state expects its events there, and syncs
    /// so show the change).
    pub state_from_outliers: &'a [StateFromOutlier<'a>],
}

/// An outlier entering the timeline because the current state now holds it.
#[derive(Debug, Clone)]
pub struct StateFromOutlier<'a> {
    pub stream_ordering: i64,
    pub event_id: &'a str,
    pub depth: i64,
    pub event_type: &'a str,
    pub state_key: &'a str,
    pub sender: &'a str,
    pub origin_server_ts: i64,
    pub json: &'a str,
}

/// The result of an append.
#[derive(Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored; for a state event, the event it replaced in the state before it; the event's
    /// (state before, state after) groups, and the room's new current state group if it
    /// changed; a redaction stored before the event that redacts it.
    Appended {
        prev_state: Option<String>,
        groups: Option<(i64, i64)>,
        current_group: Option<i64>,
        redacted_by: Option<String>,
    },
    /// The same client transaction was already stored as this event.
    DuplicateTransaction(String),
}

impl Store {
    pub async fn room(&self, room_id: &str) -> Result<Option<RoomRow>, sqlx::Error> {
        let row = sqlx::query("SELECT room_id, room_version, creator, published FROM rooms WHERE room_id = $1")
            .bind(room_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(RoomRow {
                room_id: r.try_get("room_id")?,
                room_version: r.try_get("room_version")?,
                creator: r.try_get("creator")?,
                published: r.try_get::<i64, _>("published")? != 0,
            })
        })
        .transpose()
    }

    pub async fn set_room_published(&self, room_id: &str, published: bool) -> Result<(), sqlx::Error> {
        self.execute_write(
            sqlx::query("UPDATE rooms SET published = $1 WHERE room_id = $2").bind(i64::from(published)).bind(room_id),
        )
        .await?;
        Ok(())
    }

    /// Published rooms, oldest first.
    pub async fn published_rooms(&self) -> Result<Vec<String>, sqlx::Error> {
        let rows = sqlx::query("SELECT room_id FROM rooms WHERE published = 1 ORDER BY created_ts, room_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| r.try_get("room_id")).collect()
    }

    /// Appends one event: the event row, the current state, the forward extremities and the
    /// transaction id, in one transaction.
    pub async fn append_event(&self, ev: AppendEvent<'_>) -> Result<AppendOutcome, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let outcome = self.append_in_tx(&mut tx, &ev).await?;
        if matches!(outcome, AppendOutcome::Appended { .. }) {
            tx.commit().await?;
        }
        Ok(outcome)
    }

    /// The writes of [`Store::append_event`], inside the caller's transaction.
    pub(super) async fn append_in_tx(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        ev: &AppendEvent<'_>,
    ) -> Result<AppendOutcome, sqlx::Error> {
        let tx: &mut sqlx::AnyConnection = tx;
        if let Some((user, device, scope, txn_id)) = ev.txn {
            let existing = sqlx::query(
                "SELECT event_id FROM events WHERE txn_user = $1 AND txn_device = $2 AND txn_scope = $3 AND txn_id = $4",
            )
            .bind(user)
            .bind(device)
            .bind(scope)
            .bind(txn_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = existing {
                return Ok(AppendOutcome::DuplicateTransaction(row.try_get("event_id")?));
            }
        }
        if let Some(room) = &ev.new_room {
            sqlx::query(
                "INSERT INTO rooms (room_id, room_version, creator, published, created_ts) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(ev.room_id)
            .bind(room.room_version)
            .bind(room.creator)
            .bind(i64::from(room.published))
            .bind(ev.origin_server_ts)
            .execute(&mut *tx)
            .await?;
        }
        let mut prev_state = ev.state.and_then(|s| s.prev_state.clone());
        if let (Some(state_key), None) = (ev.state_key, ev.state) {
            let row = sqlx::query(
                "SELECT event_id FROM room_current_state WHERE room_id = $1 AND type = $2 AND state_key = $3",
            )
            .bind(ev.room_id)
            .bind(ev.event_type)
            .bind(state_key)
            .fetch_optional(&mut *tx)
            .await?;
            prev_state = row.map(|r| r.try_get::<String, _>("event_id")).transpose()?;
        }
        for outlier in ev.state_from_outliers {
            // Its state groups come along (known when it was fetched with the state at it).
            sqlx::query(
                "INSERT INTO events (stream_ordering, event_id, room_id, depth, type, state_key, sender, origin_server_ts, json,
                                     state_group, state_before)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, o.state_group, o.state_before
                 FROM event_outliers o WHERE o.event_id = $2",
            )
            .bind(outlier.stream_ordering)
            .bind(outlier.event_id)
            .bind(ev.room_id)
            .bind(outlier.depth)
            .bind(outlier.event_type)
            .bind(outlier.state_key)
            .bind(outlier.sender)
            .bind(outlier.origin_server_ts)
            .bind(outlier.json)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM event_outliers WHERE event_id = $1")
                .bind(outlier.event_id)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(resolved) = ev.resolved_state {
            for (kind, state_key, event_id, membership) in resolved {
                sqlx::query(
                    "INSERT INTO room_current_state (room_id, type, state_key, event_id, membership) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (room_id, type, state_key) DO UPDATE SET event_id = $4, membership = $5",
                )
                .bind(ev.room_id)
                .bind(kind)
                .bind(state_key)
                .bind(event_id)
                .bind(membership.as_deref())
                .execute(&mut *tx)
                .await?;
            }
        } else if let Some(state_key) = ev.state_key {
            sqlx::query(
                "INSERT INTO room_current_state (room_id, type, state_key, event_id, membership) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (room_id, type, state_key) DO UPDATE SET event_id = $4, membership = $5",
            )
            .bind(ev.room_id)
            .bind(ev.event_type)
            .bind(state_key)
            .bind(ev.event_id)
            .bind(ev.membership)
            .execute(&mut *tx)
            .await?;
        }
        let mut groups = None;
        let mut current_group = None;
        if let Some(state) = ev.state {
            let (before, after) = super::state::insert_event_groups(&mut *tx, ev.room_id, state).await?;
            current_group =
                super::state::set_current_group(&mut *tx, ev.room_id, &state.current, before, after).await?;
            groups = Some((before, after));
        } else if ev.state_key.is_some() {
            // The current state changed by a key outside the state model: no group is it.
            sqlx::query("UPDATE rooms SET current_state_group = NULL WHERE room_id = $1")
                .bind(ev.room_id)
                .execute(&mut *tx)
                .await?;
        }
        let (txn_user, txn_device, txn_scope, txn_id) = match ev.txn {
            Some((u, d, s, t)) => (Some(u), Some(d), Some(s), Some(t)),
            None => (None, None, None, None),
        };
        sqlx::query(
            "INSERT INTO events (stream_ordering, event_id, room_id, depth, type, state_key, sender, origin_server_ts, json,
                                 prev_state_event_id, txn_user, txn_device, txn_id, txn_scope, state_group, state_before)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        )
        .bind(ev.stream_ordering)
        .bind(ev.event_id)
        .bind(ev.room_id)
        .bind(ev.depth)
        .bind(ev.event_type)
        .bind(ev.state_key)
        .bind(ev.sender)
        .bind(ev.origin_server_ts)
        .bind(ev.json)
        .bind(prev_state.as_deref())
        .bind(txn_user)
        .bind(txn_device)
        .bind(txn_id)
        .bind(txn_scope)
        .bind(groups.map(|(_, after)| after))
        // Only a state event's state before differs from its state after.
        .bind(groups.filter(|(before, after)| before != after).map(|(before, _)| before))
        .execute(&mut *tx)
        .await?;
        if ev.promotes_outlier {
            sqlx::query("DELETE FROM event_outliers WHERE event_id = $1").bind(ev.event_id).execute(&mut *tx).await?;
        }
        for prev in ev.prev_events {
            sqlx::query("DELETE FROM room_forward_extremities WHERE room_id = $1 AND event_id = $2")
                .bind(ev.room_id)
                .bind(prev)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("INSERT INTO room_forward_extremities (room_id, event_id) VALUES ($1, $2)")
            .bind(ev.room_id)
            .bind(ev.event_id)
            .execute(&mut *tx)
            .await?;
        if let Some((target, rel_type)) = ev.relates_to {
            sqlx::query(
                "INSERT INTO event_relations (event_id, relates_to_id, rel_type, room_id, event_type, sender, stream_ordering)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(ev.event_id)
            .bind(target)
            .bind(rel_type)
            .bind(ev.room_id)
            .bind(ev.event_type)
            .bind(ev.sender)
            .bind(ev.stream_ordering)
            .execute(&mut *tx)
            .await?;
        }
        if (ev.membership == Some("join") || ev.membership == Some("invite"))
            && let Some(target) = ev.state_key
        {
            {
                sqlx::query("DELETE FROM forgotten_rooms WHERE user_id = $1 AND room_id = $2")
                    .bind(target)
                    .bind(ev.room_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        // A redaction already on the timeline that was waiting for this event redacts it now.
        let redacted_by = super::redactions::take_pending_for_target(&mut *tx, ev.room_id, ev.event_id).await?;
        if let Some(redaction) = &redacted_by {
            sqlx::query("UPDATE events SET redacted_by = $1 WHERE event_id = $2")
                .bind(redaction)
                .bind(ev.event_id)
                .execute(&mut *tx)
                .await?;
        }
        if let (Some((key, value)), None) = (ev.search_text, &redacted_by) {
            let sql = match self.backend {
                super::Backend::Sqlite => {
                    "INSERT INTO event_search (event_id, room_id, key, value) VALUES ($1, $2, $3, $4)"
                }
                super::Backend::Postgres => {
                    "INSERT INTO event_search (event_id, room_id, key, value, vector) VALUES ($1, $2, $3, $4, to_tsvector('simple', $4))"
                }
            };
            sqlx::query(sql).bind(ev.event_id).bind(ev.room_id).bind(key).bind(value).execute(&mut *tx).await?;
        }
        // One statement per chunk of recipients, not one per recipient: a message to a room
        // of 200 wrote 200 statements inside the room's write transaction.
        for chunk in ev.push_actions.chunks(PUSH_ACTION_ROWS_PER_STATEMENT) {
            // Numbered placeholders written out: sqlx's QueryBuilder for `Any` writes `?`,
            // which PostgreSQL does not accept. Only placeholders go into the text.
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let p = i * 3;
                    format!("(${}, $1, $2, $3, ${}, ${}, $4)", p + 5, p + 6, p + 7)
                })
                .collect();
            let sql = format!(
                "INSERT INTO event_push_actions (user_id, room_id, event_id, stream_ordering, highlight, actions, ts) VALUES {}",
                rows.join(", ")
            );
            let mut insert = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(ev.room_id)
                .bind(ev.event_id)
                .bind(ev.stream_ordering)
                .bind(ev.origin_server_ts);
            for (user, highlight, actions) in chunk {
                insert = insert.bind(user.as_str()).bind(i64::from(*highlight)).bind(actions.as_str());
            }
            insert.execute(&mut *tx).await?;
        }
        // A redaction that was waiting for its target (soft-failed until then) is decided.
        sqlx::query("DELETE FROM pending_redactions WHERE redaction_id = $1")
            .bind(ev.event_id)
            .execute(&mut *tx)
            .await?;
        if let Some(redacts) = ev.redacts {
            // A redacted message is no longer searchable.
            sqlx::query("DELETE FROM event_search WHERE event_id = $1").bind(redacts).execute(&mut *tx).await?;
            sqlx::query(
                "UPDATE events SET redacted_by = $1 WHERE event_id = $2 AND room_id = $3 AND redacted_by IS NULL",
            )
            .bind(ev.event_id)
            .bind(redacts)
            .bind(ev.room_id)
            .execute(&mut *tx)
            .await?;
            // A target we do not hold yet is redacted when it arrives.
            super::redactions::remember_if_unheld(&mut *tx, ev.room_id, redacts, ev.event_id).await?;
        }
        for destination in ev.destinations {
            sqlx::query("INSERT INTO federation_outbox (destination, stream_ordering, event_id) VALUES ($1, $2, $3)")
                .bind(destination)
                .bind(ev.stream_ordering)
                .bind(ev.event_id)
                .execute(&mut *tx)
                .await?;
        }
        Ok(AppendOutcome::Appended { prev_state, groups, current_group, redacted_by })
    }

    pub async fn event_id_for_txn(
        &self,
        user: &str,
        device: &str,
        scope: &str,
        txn_id: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT event_id FROM events WHERE txn_user = $1 AND txn_device = $2 AND txn_scope = $3 AND txn_id = $4",
        )
        .bind(user)
        .bind(device)
        .bind(scope)
        .bind(txn_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.try_get("event_id")).transpose()
    }

    /// The room's forward extremities with their depths.
    pub async fn forward_extremities(&self, room_id: &str) -> Result<Vec<(String, i64)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT f.event_id, e.depth FROM room_forward_extremities f JOIN events e ON e.event_id = f.event_id
             WHERE f.room_id = $1 ORDER BY e.stream_ordering",
        )
        .bind(room_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("event_id")?, r.try_get("depth")?))).collect()
    }

    pub async fn event(&self, event_id: &str) -> Result<Option<EventRow>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {EVENT_COLUMNS} FROM events WHERE event_id = $1"));
        let row = sqlx::query(sql).bind(event_id).fetch_optional(&self.pool).await?;
        row.as_ref().map(event_row).transpose()
    }

    /// The current state event for (type, state key).
    pub async fn current_state_event(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<EventRow>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM room_current_state s JOIN events e ON e.event_id = s.event_id
             WHERE s.room_id = $1 AND s.type = $2 AND s.state_key = $3",
            prefixed_columns("e")
        ));
        let row = sqlx::query(sql).bind(room_id).bind(event_type).bind(state_key).fetch_optional(&self.pool).await?;
        row.as_ref().map(event_row).transpose()
    }

    /// The whole current state of a room.
    pub async fn current_state(&self, room_id: &str) -> Result<Vec<EventRow>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM room_current_state s JOIN events e ON e.event_id = s.event_id WHERE s.room_id = $1",
            prefixed_columns("e")
        ));
        let rows = sqlx::query(sql).bind(room_id).fetch_all(&self.pool).await?;
        rows.iter().map(event_row).collect()
    }

    /// State events of a room after `after` (exclusive), newest first: what to roll back to
    /// rebuild the state at `after`.
    pub async fn state_events_after(&self, room_id: &str, after: i64) -> Result<Vec<EventRow>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE room_id = $1 AND stream_ordering > $2 AND state_key IS NOT NULL
             ORDER BY stream_ordering DESC"
        ));
        let rows = sqlx::query(sql).bind(room_id).bind(after).fetch_all(&self.pool).await?;
        rows.iter().map(event_row).collect()
    }

    /// Timeline events by id, in no particular order.
    pub async fn events_by_id(&self, ids: &[String]) -> Result<Vec<EventRow>, sqlx::Error> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(200) {
            let list = (1..=chunk.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
            let sql = sqlx::AssertSqlSafe(format!("SELECT {EVENT_COLUMNS} FROM events WHERE event_id IN ({list})"));
            let mut query = sqlx::query(sql);
            for id in chunk {
                query = query.bind(id.as_str());
            }
            for row in query.fetch_all(&self.pool).await? {
                out.push(event_row(&row)?);
            }
        }
        Ok(out)
    }

    /// Events of a room with `from < stream_ordering <= to`: the newest `limit` of them when
    /// `newest_first`, else the oldest; always returned in the order they were read.
    pub async fn room_events(
        &self,
        room_id: &str,
        from: i64,
        to: i64,
        limit: i64,
        newest_first: bool,
    ) -> Result<Vec<EventRow>, sqlx::Error> {
        let order = if newest_first { "DESC" } else { "ASC" };
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE room_id = $1 AND stream_ordering > $2 AND stream_ordering <= $3
             ORDER BY stream_ordering {order} LIMIT $4"
        ));
        let rows = sqlx::query(sql).bind(room_id).bind(from).bind(to).bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(event_row).collect()
    }

    /// The user's membership events with `from < stream_ordering <= to`, oldest first.
    pub async fn membership_changes(&self, user_id: &str, from: i64, to: i64) -> Result<Vec<EventRow>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE type = 'm.room.member' AND state_key = $1
             AND stream_ordering > $2 AND stream_ordering <= $3 ORDER BY stream_ordering"
        ));
        let rows = sqlx::query(sql).bind(user_id).bind(from).bind(to).fetch_all(&self.pool).await?;
        rows.iter().map(event_row).collect()
    }

    /// The user's current membership in every room they ever were in: (room, membership).
    pub async fn rooms_for_user(&self, user_id: &str) -> Result<Vec<(String, MembershipState)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT room_id, membership FROM room_current_state WHERE type = 'm.room.member' AND state_key = $1",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let membership = r.try_get::<Option<String>, _>("membership")?.unwrap_or_default();
                Ok((r.try_get("room_id")?, MembershipState::from(membership)))
            })
            .collect()
    }

    /// Current members of a room with a given membership.
    pub async fn room_members(&self, room_id: &str, membership: &MembershipState) -> Result<Vec<String>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT state_key FROM room_current_state WHERE room_id = $1 AND type = 'm.room.member' AND membership = $2",
        )
        .bind(room_id)
        .bind(membership.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| r.try_get("state_key")).collect()
    }

    /// Highest position of the persistent streams, to resume the sequence after a restart.
    pub async fn max_stream_position(&self) -> Result<i64, sqlx::Error> {
        let row = sqlx::query(
            "SELECT MAX(p) AS p FROM (
                SELECT MAX(stream_ordering) AS p FROM events
                UNION ALL SELECT MAX(stream_id) AS p FROM account_data
                UNION ALL SELECT MAX(stream_id) AS p FROM receipts
                UNION ALL SELECT MAX(stream_id) AS p FROM presence
                UNION ALL SELECT MAX(stream_id) AS p FROM device_list_changes
                UNION ALL SELECT MAX(stream_id) AS p FROM to_device_messages
                UNION ALL SELECT MAX(position) AS p FROM stream_high_water) AS positions",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<Option<i64>, _>("p")?.unwrap_or(0))
    }

    /// Records, durably, that stream positions up to `upto` may be handed out: a restarted
    /// server counts on from above it (see [`Store::max_stream_position`]) even if the
    /// commits that used those positions were lost in a power cut, so no client ever holds a
    /// token past the position the restarted server starts from.
    pub async fn reserve_stream_positions(&self, upto: i64) -> Result<(), sqlx::Error> {
        self.execute_write_durably(
            sqlx::query("UPDATE stream_high_water SET position = $1 WHERE id = 1 AND position < $1").bind(upto),
        )
        .await
        .map(|_| ())
    }

    // Aliases.

    /// Creates an alias; false if it exists.
    pub async fn create_alias(&self, alias: &str, room_id: &str, creator: &str, now: i64) -> Result<bool, sqlx::Error> {
        let done = self.execute_write(sqlx::query(
            "INSERT INTO room_aliases (alias, room_id, creator, created_ts) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(alias)
        .bind(room_id)
        .bind(creator)
        .bind(now)
        )
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// (room id, creator) of an alias.
    pub async fn alias(&self, alias: &str) -> Result<Option<(String, String)>, sqlx::Error> {
        let row = sqlx::query("SELECT room_id, creator FROM room_aliases WHERE alias = $1")
            .bind(alias)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get("room_id")?, r.try_get("creator")?))).transpose()
    }

    pub async fn delete_alias(&self, alias: &str) -> Result<bool, sqlx::Error> {
        let done = self.execute_write(sqlx::query("DELETE FROM room_aliases WHERE alias = $1").bind(alias)).await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn room_aliases(&self, room_id: &str) -> Result<Vec<String>, sqlx::Error> {
        let rows = sqlx::query("SELECT alias FROM room_aliases WHERE room_id = $1 ORDER BY alias")
            .bind(room_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| r.try_get("alias")).collect()
    }
}

pub(super) fn prefixed_columns(prefix: &str) -> String {
    EVENT_COLUMNS.split(", ").map(|c| format!("{prefix}.{c}")).collect::<Vec<_>>().join(", ")
}

impl Store {
    /// Every membership event of `user_id` in the room: (position, membership), oldest first.
    pub async fn membership_history(
        &self,
        room_id: &str,
        user_id: &str,
    ) -> Result<Vec<(i64, MembershipState)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT stream_ordering, json FROM events WHERE room_id = $1 AND type = 'm.room.member' AND state_key = $2
             ORDER BY stream_ordering",
        )
        .bind(room_id)
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let json: String = r.try_get("json")?;
                Ok((r.try_get("stream_ordering")?, MembershipState::from(membership_in(&json))))
            })
            .collect()
    }

    /// Every state event of one type (state key '') in the room: (position, content JSON).
    pub async fn state_history(
        &self,
        room_id: &str,
        event_type: &str,
    ) -> Result<Vec<(i64, serde_json::Value)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT stream_ordering, json FROM events WHERE room_id = $1 AND type = $2 AND state_key = ''
             ORDER BY stream_ordering",
        )
        .bind(room_id)
        .bind(event_type)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let json: String = r.try_get("json")?;
                let content =
                    serde_json::from_str::<serde_json::Value>(&json).map(|v| v["content"].clone()).unwrap_or_default();
                Ok((r.try_get("stream_ordering")?, content))
            })
            .collect()
    }
}

/// Which relations [`Store::relations`] reads: those pointing at `target`, of one relation
/// type and one event type when given.
#[derive(Debug, Clone, Copy)]
pub struct RelationsOf<'a> {
    pub target: &'a str,
    pub rel_type: Option<&'a str>,
    pub event_type: Option<&'a str>,
}

impl Store {
    /// Events relating to `of.target`, with `from < stream_ordering <= to`, filtered by
    /// relation and event type; newest first when `newest_first`.
    pub async fn relations(
        &self,
        of: RelationsOf<'_>,
        from: i64,
        to: i64,
        limit: i64,
        newest_first: bool,
    ) -> Result<Vec<EventRow>, sqlx::Error> {
        let RelationsOf { target, rel_type, event_type } = of;
        let order = if newest_first { "DESC" } else { "ASC" };
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM event_relations r JOIN events e ON e.event_id = r.event_id
             WHERE r.relates_to_id = $1 AND ($2 IS NULL OR r.rel_type = $2) AND ($3 IS NULL OR r.event_type = $3)
               AND r.stream_ordering > $4 AND r.stream_ordering <= $5
             ORDER BY r.stream_ordering {order} LIMIT $6",
            prefixed_columns("e")
        ));
        let rows = sqlx::query(sql)
            .bind(target)
            .bind(rel_type)
            .bind(event_type)
            .bind(from)
            .bind(to)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(event_row).collect()
    }

    /// Thread roots of a room with the position of their latest reply, latest first:
    /// (root event id, latest reply position), restricted to threads `participant` took
    /// part in when given.
    pub async fn thread_roots(
        &self,
        room_id: &str,
        participant: Option<&str>,
        before: i64,
        limit: i64,
    ) -> Result<Vec<(String, i64)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT r.relates_to_id AS root, MAX(r.stream_ordering) AS latest FROM event_relations r
             WHERE r.room_id = $1 AND r.rel_type = 'm.thread'
             GROUP BY r.relates_to_id
             HAVING MAX(r.stream_ordering) < $3 AND ($2 IS NULL OR SUM(CASE WHEN r.sender = $2 THEN 1 ELSE 0 END) > 0
                OR EXISTS (SELECT 1 FROM events root WHERE root.event_id = r.relates_to_id AND root.sender = $2))
             ORDER BY latest DESC LIMIT $4",
        )
        .bind(room_id)
        .bind(participant)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("root")?, r.try_get("latest")?))).collect()
    }

    pub async fn forget_room(&self, user_id: &str, room_id: &str) -> Result<(), sqlx::Error> {
        self.execute_write(
            sqlx::query("INSERT INTO forgotten_rooms (user_id, room_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(user_id)
                .bind(room_id),
        )
        .await?;
        Ok(())
    }

    pub async fn forgotten_rooms(&self, user_id: &str) -> Result<Vec<String>, sqlx::Error> {
        let rows = sqlx::query("SELECT room_id FROM forgotten_rooms WHERE user_id = $1")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| r.try_get("room_id")).collect()
    }

    /// Users matching `term` (in the user id or display name) who share a room with
    /// `requester`, are in a public room, or (with `all_users`) any active user.
    pub async fn search_users(
        &self,
        requester: &str,
        term: &str,
        all_users: bool,
        limit: i64,
    ) -> Result<Vec<(String, Option<String>, Option<String>)>, sqlx::Error> {
        let pattern =
            format!("%{}%", term.to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
        let rows = sqlx::query(
            "SELECT u.user_id,
                    (SELECT value FROM profile_fields p WHERE p.user_id = u.user_id AND p.field = 'displayname') AS displayname,
                    (SELECT value FROM profile_fields p WHERE p.user_id = u.user_id AND p.field = 'avatar_url') AS avatar_url
             FROM users u
             WHERE u.deactivated = 0
               AND (LOWER(u.user_id) LIKE $2 ESCAPE '\\' OR EXISTS (
                    SELECT 1 FROM profile_fields p WHERE p.user_id = u.user_id AND p.field = 'displayname'
                    AND LOWER(p.value) LIKE $2 ESCAPE '\\'))
               AND ($3 = 1 OR u.user_id = $1 OR u.user_id IN (
                    SELECT other.state_key FROM room_current_state other
                    WHERE other.type = 'm.room.member' AND other.membership = 'join' AND other.room_id IN (
                        SELECT mine.room_id FROM room_current_state mine
                        WHERE mine.type = 'm.room.member' AND mine.state_key = $1 AND mine.membership = 'join'
                        UNION
                        SELECT jr.room_id FROM room_current_state jr JOIN events e ON e.event_id = jr.event_id
                        -- public rooms: the stored PDU is canonical JSON, without spaces
                        WHERE jr.type = 'm.room.join_rules' AND e.json LIKE '%\"join_rule\":\"public\"%')))
             ORDER BY u.user_id LIMIT $4",
        )
        .bind(requester)
        .bind(pattern)
        .bind(i64::from(all_users))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("user_id")?, r.try_get("displayname")?, r.try_get("avatar_url")?))).collect()
    }
}

impl Store {
    /// Joined members of a room with the display name of their membership event.
    pub async fn joined_members_with_names(&self, room_id: &str) -> Result<Vec<(String, Option<String>)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT s.state_key, e.json FROM room_current_state s JOIN events e ON e.event_id = s.event_id
             WHERE s.room_id = $1 AND s.type = 'm.room.member' AND s.membership = 'join'",
        )
        .bind(room_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let json: String = r.try_get("json")?;
                let name = serde_json::from_str::<serde_json::Value>(&json)
                    .ok()
                    .and_then(|v| v["content"]["displayname"].as_str().map(str::to_owned));
                Ok((r.try_get("state_key")?, name))
            })
            .collect()
    }

    /// (notifications, highlights) for `user_id` in a room after their read receipt.
    /// Counted up to position `upto`, so the answer for a given `upto` never changes
    /// until the user's read receipt does.
    pub async fn unread_counts(&self, user_id: &str, room_id: &str, upto: i64) -> Result<(i64, i64), sqlx::Error> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(highlight), 0) AS BIGINT) AS h FROM event_push_actions
             WHERE user_id = $1 AND room_id = $2 AND stream_ordering <= $3 AND stream_ordering > COALESCE((
                SELECT MAX(e.stream_ordering) FROM receipts r JOIN events e ON e.event_id = r.event_id
                WHERE r.room_id = $2 AND r.user_id = $1 AND r.receipt_type IN ('m.read', 'm.read.private')), 0)",
        )
        .bind(user_id)
        .bind(room_id)
        .bind(upto)
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get("n")?, row.try_get("h")?))
    }

    /// The user's notifications before `before`, newest first: (event row, actions, ts, read).
    pub async fn notifications(
        &self,
        user_id: &str,
        before: i64,
        limit: i64,
        only_highlight: bool,
    ) -> Result<Vec<(EventRow, String, i64, bool)>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {}, a.actions AS push_actions, a.ts AS push_ts,
                    CASE WHEN a.stream_ordering <= COALESCE((
                        SELECT MAX(re.stream_ordering) FROM receipts r JOIN events re ON re.event_id = r.event_id
                        WHERE r.room_id = a.room_id AND r.user_id = $1 AND r.receipt_type IN ('m.read', 'm.read.private')), 0)
                    THEN 1 ELSE 0 END AS is_read
             FROM event_push_actions a JOIN events e ON e.event_id = a.event_id
             WHERE a.user_id = $1 AND a.stream_ordering < $2 AND ($3 = 0 OR a.highlight = 1)
             ORDER BY a.stream_ordering DESC LIMIT $4",
            prefixed_columns("e")
        ));
        let rows = sqlx::query(sql)
            .bind(user_id)
            .bind(before)
            .bind(i64::from(only_highlight))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    event_row(r)?,
                    r.try_get("push_actions")?,
                    r.try_get("push_ts")?,
                    r.try_get::<i64, _>("is_read")? != 0,
                ))
            })
            .collect()
    }
}

impl Store {
    /// Full-text search in the rooms `user_id` is joined to: (event row, rank), best or
    /// newest first, skipping `offset`. `keys` are fixed identifiers chosen by the caller.
    pub async fn search_events(
        &self,
        user_id: &str,
        terms: &[String],
        keys: &[&'static str],
        by_rank: bool,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<(EventRow, f64)>, sqlx::Error> {
        let keys_sql = keys.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ");
        let (query, sql) = match self.backend {
            super::Backend::Sqlite => {
                // Each term as a quoted prefix query: the user's text is never FTS syntax.
                let query =
                    terms.iter().map(|t| format!("\"{}\"*", t.replace('"', "\"\""))).collect::<Vec<_>>().join(" ");
                let order = if by_rank { "rank ASC" } else { "e.stream_ordering DESC" };
                let sql = format!(
                    "SELECT {}, bm25(event_search) AS rank FROM event_search s JOIN events e ON e.event_id = s.event_id
                     WHERE event_search MATCH $1 AND s.key IN ({keys_sql}) AND s.room_id IN (
                        SELECT room_id FROM room_current_state WHERE type = 'm.room.member' AND state_key = $2 AND membership = 'join')
                     ORDER BY {order} LIMIT $3 OFFSET $4",
                    prefixed_columns("e")
                );
                (query, sql)
            }
            super::Backend::Postgres => {
                // Prefix terms joined with AND; everything that is tsquery syntax is dropped.
                let query = terms
                    .iter()
                    .map(|t| t.chars().filter(|c| c.is_alphanumeric()).collect::<String>())
                    .filter(|t| !t.is_empty())
                    .map(|t| format!("{t}:*"))
                    .collect::<Vec<_>>()
                    .join(" & ");
                let order = if by_rank { "rank DESC" } else { "e.stream_ordering DESC" };
                let sql = format!(
                    "SELECT {}, CAST(ts_rank(s.vector, to_tsquery('simple', $1)) AS DOUBLE PRECISION) AS rank
                     FROM event_search s JOIN events e ON e.event_id = s.event_id
                     WHERE s.vector @@ to_tsquery('simple', $1) AND s.key IN ({keys_sql}) AND s.room_id IN (
                        SELECT room_id FROM room_current_state WHERE type = 'm.room.member' AND state_key = $2 AND membership = 'join')
                     ORDER BY {order} LIMIT $3 OFFSET $4",
                    prefixed_columns("e")
                );
                (query, sql)
            }
        };
        if query.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(query)
            .bind(user_id)
            .bind(limit)
            .bind(offset)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((event_row(r)?, r.try_get::<f64, _>("rank")?))).collect()
    }
}

/// The `membership` of a stored `m.room.member` PDU ("" if it has none).
pub(super) fn membership_in(pdu_json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(pdu_json)
        .ok()
        .and_then(|v| v["content"]["membership"].as_str().map(str::to_owned))
        .unwrap_or_default()
}
