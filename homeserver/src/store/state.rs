//! Room state per event: state groups (see `migrations/*/20261207000200_state_groups.sql`).
//!
//! A group is a full room state stored as a delta against an earlier group, or in full (a
//! snapshot) once the chain of deltas would pass [`MAX_DELTA_CHAIN`]: reading a group is one
//! recursive query over at most that many small deltas and one snapshot.

use std::collections::HashMap;

use sqlx::Row;

use super::Store;

/// Most deltas between a group and its snapshot. A room whose state changes often gets a
/// snapshot every this many state events: larger means fewer rows, smaller means cheaper reads.
pub const MAX_DELTA_CHAIN: i64 = 50;

/// A room state: (type, state key) -> event id.
pub type StateIds = HashMap<(String, String), String>;

/// A state group to create.
#[derive(Debug, Clone)]
pub struct NewStateGroup {
    /// The group this one is a delta of; `None` for a snapshot.
    pub prev: Option<GroupBase>,
    /// Deltas between this group and its snapshot (0 for a snapshot).
    pub chain_len: i64,
    /// (type, state key, event id): what differs from `prev`, or everything.
    pub entries: Vec<(String, String, String)>,
}

/// What a new group's delta is against.
#[derive(Debug, Clone, Copy)]
pub enum GroupBase {
    Id(i64),
    /// The event's state-before group (created in the same append).
    Before,
}

/// A state group that exists or is to be created.
#[derive(Debug, Clone)]
pub enum GroupRef {
    Existing(i64),
    New(NewStateGroup),
}

/// How the room's current state group changes with an event.
#[derive(Debug, Clone)]
pub enum CurrentGroup {
    Unchanged,
    /// The state after the event is the room's current state.
    EventAfter,
    /// Another group (state resolution decided it).
    Group(GroupRef),
}

/// The state groups of an event being stored.
#[derive(Debug, Clone)]
pub struct EventStateGroups {
    pub before: GroupRef,
    /// The state after a state event; `None` when it is the state before (any other event).
    pub after: Option<NewStateGroup>,
    pub current: CurrentGroup,
    /// For a state event: the event its (type, state key) held in the state before it.
    pub prev_state: Option<String>,
}

/// Where an event stands: on the timeline, an outlier, or unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventStatus {
    Unknown,
    Timeline,
    /// Known but not on the timeline: an auth event fetched from another server (neither
    /// flag), soft-failed, or rejected (with the reason).
    Outlier {
        soft_failed: bool,
        rejection: Option<String>,
    },
}

/// A stored event read for authorization or state resolution.
#[derive(Debug, Clone)]
pub struct StoredPdu {
    pub event_id: String,
    pub room_id: String,
    pub json: String,
    pub rejected: bool,
}

impl Store {
    /// The entries of a group with the deltas it is made of: (distance from the group, type,
    /// state key, event id); the nearest entry of each (type, state key) wins.
    pub async fn state_group_entries(&self, group: i64) -> Result<(StateIds, i64), sqlx::Error> {
        let rows = sqlx::query(
            "WITH RECURSIVE chain(id, prev, n) AS (
                SELECT id, prev_group, CAST(0 AS BIGINT) FROM state_groups WHERE id = $1
                UNION ALL
                SELECT g.id, g.prev_group, CAST(chain.n + 1 AS BIGINT) FROM state_groups g JOIN chain ON g.id = chain.prev
                WHERE chain.n < $2
             )
             SELECT chain.n AS n, e.type AS type, e.state_key AS state_key, e.event_id AS event_id
             FROM chain JOIN state_group_entries e ON e.group_id = chain.id",
        )
        .bind(group)
        .bind(MAX_DELTA_CHAIN * 4)
        .fetch_all(&self.pool)
        .await?;
        let mut best: HashMap<(String, String), (i64, String)> = HashMap::new();
        for r in &rows {
            let n: i64 = r.try_get("n")?;
            let key = (r.try_get::<String, _>("type")?, r.try_get::<String, _>("state_key")?);
            let event_id: String = r.try_get("event_id")?;
            match best.get(&key) {
                Some((m, _)) if *m <= n => {}
                _ => {
                    best.insert(key, (n, event_id));
                }
            }
        }
        let chain_len = self.state_group_chain_len(group).await?.unwrap_or(0);
        Ok((best.into_iter().map(|(k, (_, id))| (k, id)).collect(), chain_len))
    }

    /// The number of deltas between a group and its snapshot; `None` for an unknown group.
    pub async fn state_group_chain_len(&self, group: i64) -> Result<Option<i64>, sqlx::Error> {
        let row = sqlx::query("SELECT chain_len FROM state_groups WHERE id = $1")
            .bind(group)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("chain_len")).transpose()
    }

    /// The room's current state group, if known.
    pub async fn current_state_group(&self, room_id: &str) -> Result<Option<i64>, sqlx::Error> {
        let row = sqlx::query("SELECT current_state_group FROM rooms WHERE room_id = $1")
            .bind(room_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get::<Option<i64>, _>("current_state_group")).transpose()?.flatten())
    }

    /// (state before, state after) of events with known state, by event id: timeline events
    /// and outliers whose state we computed (soft-failed ones, and prev events fetched with
    /// the state at them).
    pub async fn event_state_groups(&self, ids: &[String]) -> Result<HashMap<String, (i64, i64)>, sqlx::Error> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let list = (1..=chunk.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
            let sql = format!(
                "SELECT event_id, state_before, state_group FROM events WHERE event_id IN ({list}) AND state_group IS NOT NULL
                 UNION ALL SELECT event_id, state_before, state_group FROM event_outliers
                 WHERE event_id IN ({list}) AND state_group IS NOT NULL AND rejection IS NULL"
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(id.as_str());
            }
            for r in query.fetch_all(&self.pool).await? {
                let after: i64 = r.try_get("state_group")?;
                let before: Option<i64> = r.try_get("state_before")?;
                out.insert(r.try_get("event_id")?, (before.unwrap_or(after), after));
            }
        }
        Ok(out)
    }

    /// The state group after the newest event of the room at or before stream position
    /// `at` whose state is known; else the state before the room's oldest such event (for
    /// positions inside history that came with a join or by backfill). With it, whether it is
    /// the room's current state group.
    pub async fn state_group_at(&self, room_id: &str, at: i64) -> Result<Option<(i64, bool)>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT (SELECT state_group FROM events WHERE room_id = $1 AND stream_ordering <= $2 AND state_group IS NOT NULL
                     ORDER BY stream_ordering DESC LIMIT 1) AS g,
                    (SELECT current_state_group FROM rooms WHERE room_id = $1) AS c",
        )
        .bind(room_id)
        .bind(at)
        .fetch_one(&self.pool)
        .await?;
        let current: Option<i64> = row.try_get("c")?;
        let group = match row.try_get::<Option<i64>, _>("g")? {
            Some(group) => Some(group),
            None => sqlx::query(
                "SELECT COALESCE(state_before, state_group) AS g FROM events WHERE room_id = $1 AND state_group IS NOT NULL
                 ORDER BY stream_ordering LIMIT 1",
            )
            .bind(room_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get::<i64, _>("g"))
            .transpose()?,
        };
        Ok(group.map(|g| (g, current == Some(g))))
    }

    /// Where an event stands (see [`EventStatus`]).
    pub async fn event_status(&self, event_id: &str) -> Result<EventStatus, sqlx::Error> {
        if sqlx::query("SELECT 1 AS one FROM events WHERE event_id = $1")
            .bind(event_id)
            .fetch_optional(&self.pool)
            .await?
            .is_some()
        {
            return Ok(EventStatus::Timeline);
        }
        let row = sqlx::query("SELECT soft_failed, rejection FROM event_outliers WHERE event_id = $1")
            .bind(event_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            None => EventStatus::Unknown,
            Some(r) => EventStatus::Outlier {
                soft_failed: r.try_get::<i64, _>("soft_failed")? != 0,
                rejection: r.try_get("rejection")?,
            },
        })
    }

    /// Events by id from the timeline or the outliers, with whether they were rejected.
    pub async fn pdus_for_auth(&self, ids: &[String]) -> Result<Vec<StoredPdu>, sqlx::Error> {
        let mut out = Vec::with_capacity(ids.len());
        // One statement per chunk: state resolution reads a room's whole auth graph.
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let list = (1..=chunk.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
            let sql = format!(
                "SELECT event_id, room_id, json, 0 AS rejected FROM events WHERE event_id IN ({list})
                 UNION ALL SELECT event_id, room_id, json, CASE WHEN rejection IS NULL THEN 0 ELSE 1 END AS rejected
                 FROM event_outliers WHERE event_id IN ({list})"
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(id.as_str());
            }
            let mut seen = std::collections::HashSet::new();
            for r in query.fetch_all(&self.pool).await? {
                let event_id: String = r.try_get("event_id")?;
                // An event on the timeline and still among the outliers counts once.
                if seen.insert(event_id.clone()) {
                    out.push(StoredPdu {
                        event_id,
                        room_id: r.try_get("room_id")?,
                        json: r.try_get("json")?,
                        rejected: r.try_get::<i64, _>("rejected")? != 0,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Of `ids`, the events that have their place in the room's graph: on the timeline, or
    /// outliers with known state, soft-failed or rejected (an auth event held as an outlier
    /// only does not count: it is still to be fetched as a PDU).
    pub async fn events_in_graph(&self, ids: &[String]) -> Result<std::collections::HashSet<String>, sqlx::Error> {
        let mut out = std::collections::HashSet::new();
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let list = (1..=chunk.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
            let sql = format!(
                "SELECT event_id FROM events WHERE event_id IN ({list})
                 UNION ALL SELECT event_id FROM event_outliers WHERE event_id IN ({list})
                    AND (state_group IS NOT NULL OR soft_failed = 1 OR rejection IS NOT NULL)"
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(id.as_str());
            }
            for r in query.fetch_all(&self.pool).await? {
                out.insert(r.try_get("event_id")?);
            }
        }
        Ok(out)
    }

    /// The room's current state as (type, state key) -> event id.
    pub async fn current_state_ids(&self, room_id: &str) -> Result<StateIds, sqlx::Error> {
        let rows = sqlx::query("SELECT type, state_key, event_id FROM room_current_state WHERE room_id = $1")
            .bind(room_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(((r.try_get("type")?, r.try_get("state_key")?), r.try_get("event_id")?))).collect()
    }

    /// Stores outliers in one transaction: fetched auth events (authorized, or rejected with
    /// the reason) and prev events fetched with the state at them. An event already held
    /// keeps what it has.
    pub async fn insert_outliers(&self, room_id: &str, outliers: &[NewOutlier], now: i64) -> Result<(), sqlx::Error> {
        if outliers.is_empty() {
            return Ok(());
        }
        let (_serialized, mut tx) = self.begin_write().await?;
        for o in outliers {
            let on_timeline = sqlx::query("SELECT 1 AS one FROM events WHERE event_id = $1")
                .bind(&o.event_id)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            let groups = match &o.state {
                Some(state) => Some(insert_event_groups(&mut tx, room_id, state).await?),
                None => None,
            };
            if on_timeline {
                // History whose state was not known (it came with a join) learns it.
                if let Some((before, after)) = groups {
                    sqlx::query(
                        "UPDATE events SET state_before = $1, state_group = $2 WHERE event_id = $3 AND state_group IS NULL",
                    )
                    .bind((before != after).then_some(before))
                    .bind(after)
                    .bind(&o.event_id)
                    .execute(&mut *tx)
                    .await?;
                }
                continue;
            }
            sqlx::query(
                "INSERT INTO event_outliers (event_id, room_id, json, soft_failed, received_ts, rejection, state_before, state_group)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (event_id) DO UPDATE SET
                    soft_failed = CASE WHEN $4 = 1 THEN 1 ELSE event_outliers.soft_failed END,
                    rejection = COALESCE(event_outliers.rejection, $6),
                    state_before = COALESCE(event_outliers.state_before, $7),
                    state_group = COALESCE(event_outliers.state_group, $8)",
            )
            .bind(&o.event_id)
            .bind(room_id)
            .bind(&o.json)
            .bind(i64::from(o.soft_failed))
            .bind(now)
            .bind(o.rejection.as_deref())
            .bind(groups.map(|(before, _)| before))
            .bind(groups.map(|(_, after)| after))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Computes the state groups of the rooms that existed before state groups did, once:
    /// every event of such a room gets the state the stream order gives it (what the server
    /// showed before, state events applied in the order they were stored), and the room's
    /// newest events the current state (where an earlier state resolution made it differ).
    /// History with negative positions (backfilled) stays without state.
    pub async fn build_pending_state_groups(&self) -> Result<usize, sqlx::Error> {
        let rooms: Vec<String> = sqlx::query("SELECT room_id FROM state_groups_pending ORDER BY room_id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get("room_id"))
            .collect::<Result<_, _>>()?;
        for room_id in &rooms {
            self.build_room_state_groups(room_id).await?;
        }
        Ok(rooms.len())
    }

    async fn build_room_state_groups(&self, room_id: &str) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let mut state: StateIds = HashMap::new();
        // The state before the create event: empty.
        let empty = NewStateGroup { prev: None, chain_len: 0, entries: Vec::new() };
        let mut group = insert_group(&mut tx, room_id, &empty, None).await?;
        let mut chain_len = 0;
        // Position of the last state event handled: the events after it share its group.
        let mut last_state_at: Option<i64> = None;
        let mut after = 0i64;
        const PAGE: i64 = 1000;
        loop {
            let rows = sqlx::query(
                "SELECT stream_ordering, event_id, type, state_key FROM events
                 WHERE room_id = $1 AND stream_ordering > $2 ORDER BY stream_ordering LIMIT $3",
            )
            .bind(room_id)
            .bind(after)
            .bind(PAGE)
            .fetch_all(&mut *tx)
            .await?;
            let Some(last) = rows.last() else { break };
            after = last.try_get("stream_ordering")?;
            for r in &rows {
                let Some(state_key) = r.try_get::<Option<String>, _>("state_key")? else { continue };
                let at: i64 = r.try_get("stream_ordering")?;
                let event_id: String = r.try_get("event_id")?;
                let kind: String = r.try_get("type")?;
                if let Some(from) = last_state_at {
                    set_group_between(&mut tx, room_id, from, at, group).await?;
                }
                state.insert((kind.clone(), state_key.clone()), event_id.clone());
                let new = if chain_len + 1 > MAX_DELTA_CHAIN {
                    chain_len = 0;
                    NewStateGroup { prev: None, chain_len: 0, entries: entries_of(&state) }
                } else {
                    chain_len += 1;
                    NewStateGroup {
                        prev: Some(GroupBase::Id(group)),
                        chain_len,
                        entries: vec![(kind, state_key, event_id.clone())],
                    }
                };
                let id = insert_group(&mut tx, room_id, &new, None).await?;
                sqlx::query("UPDATE events SET state_before = $1, state_group = $2 WHERE event_id = $3")
                    .bind(group)
                    .bind(id)
                    .bind(&event_id)
                    .execute(&mut *tx)
                    .await?;
                group = id;
                last_state_at = Some(at);
            }
        }
        if let Some(from) = last_state_at {
            set_group_between(&mut tx, room_id, from, i64::MAX, group).await?;
        }
        // The current state, where it differs from the stream order's (a resolved fork): a
        // snapshot of it becomes the state after the room's newest events.
        let current: StateIds =
            sqlx::query("SELECT type, state_key, event_id FROM room_current_state WHERE room_id = $1")
                .bind(room_id)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| Ok(((r.try_get("type")?, r.try_get("state_key")?), r.try_get("event_id")?)))
                .collect::<Result<_, sqlx::Error>>()?;
        let current_group = if current == state {
            Some(group)
        } else if current.is_empty() {
            None
        } else {
            let snapshot = NewStateGroup { prev: None, chain_len: 0, entries: entries_of(&current) };
            let id = insert_group(&mut tx, room_id, &snapshot, None).await?;
            sqlx::query(
                "UPDATE events SET state_group = $1 WHERE event_id IN
                    (SELECT event_id FROM room_forward_extremities WHERE room_id = $2)",
            )
            .bind(id)
            .bind(room_id)
            .execute(&mut *tx)
            .await?;
            Some(id)
        };
        sqlx::query("UPDATE rooms SET current_state_group = $1 WHERE room_id = $2")
            .bind(current_group)
            .bind(room_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM state_groups_pending WHERE room_id = $1").bind(room_id).execute(&mut *tx).await?;
        tx.commit().await
    }
}

/// An event to keep as an outlier.
#[derive(Debug, Clone)]
pub struct NewOutlier {
    pub event_id: String,
    pub json: String,
    pub soft_failed: bool,
    pub rejection: Option<String>,
    pub state: Option<EventStateGroups>,
}

fn entries_of(state: &StateIds) -> Vec<(String, String, String)> {
    state.iter().map(|((t, k), id)| (t.clone(), k.clone(), id.clone())).collect()
}

/// Gives the events that are not state events in `(from, to)` the group `group`.
async fn set_group_between(
    tx: &mut sqlx::AnyConnection,
    room_id: &str,
    from: i64,
    to: i64,
    group: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE events SET state_group = $1
         WHERE room_id = $2 AND stream_ordering > $3 AND stream_ordering < $4 AND state_key IS NULL",
    )
    .bind(group)
    .bind(room_id)
    .bind(from)
    .bind(to)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Creates a group; `before` resolves [`GroupBase::Before`].
pub(super) async fn insert_group(
    tx: &mut sqlx::AnyConnection,
    room_id: &str,
    group: &NewStateGroup,
    before: Option<i64>,
) -> Result<i64, sqlx::Error> {
    let prev = match group.prev {
        None => None,
        Some(GroupBase::Id(id)) => Some(id),
        Some(GroupBase::Before) => before,
    };
    let row = sqlx::query("INSERT INTO state_groups (room_id, prev_group, chain_len) VALUES ($1, $2, $3) RETURNING id")
        .bind(room_id)
        .bind(prev)
        .bind(if prev.is_some() { group.chain_len } else { 0 })
        .fetch_one(&mut *tx)
        .await?;
    let id: i64 = row.try_get("id")?;
    // Several rows per statement: a snapshot of a big room has thousands of entries.
    for chunk in group.entries.chunks(ENTRY_ROWS_PER_STATEMENT) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|i| {
                let p = i * 3;
                format!("($1, ${}, ${}, ${})", p + 2, p + 3, p + 4)
            })
            .collect();
        let sql =
            format!("INSERT INTO state_group_entries (group_id, type, state_key, event_id) VALUES {}", rows.join(", "));
        let mut insert = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id);
        for (kind, key, event_id) in chunk {
            insert = insert.bind(kind.as_str()).bind(key.as_str()).bind(event_id.as_str());
        }
        insert.execute(&mut *tx).await?;
    }
    Ok(id)
}

/// Ids bound in one `IN (...)` list.
const IDS_PER_STATEMENT: usize = 200;

/// Three parameters a row plus one; well under SQLite's and PostgreSQL's limits.
const ENTRY_ROWS_PER_STATEMENT: usize = 300;

/// Creates what an event's groups need: (state before, state after).
pub(super) async fn insert_event_groups(
    tx: &mut sqlx::AnyConnection,
    room_id: &str,
    groups: &EventStateGroups,
) -> Result<(i64, i64), sqlx::Error> {
    let before = match &groups.before {
        GroupRef::Existing(id) => *id,
        GroupRef::New(group) => insert_group(tx, room_id, group, None).await?,
    };
    let after = match &groups.after {
        None => before,
        Some(group) => insert_group(tx, room_id, group, Some(before)).await?,
    };
    Ok((before, after))
}

/// Records the room's new current state group, if it changes.
pub(super) async fn set_current_group(
    tx: &mut sqlx::AnyConnection,
    room_id: &str,
    current: &CurrentGroup,
    before: i64,
    after: i64,
) -> Result<Option<i64>, sqlx::Error> {
    let group = match current {
        CurrentGroup::Unchanged => return Ok(None),
        CurrentGroup::EventAfter => after,
        CurrentGroup::Group(GroupRef::Existing(id)) => *id,
        CurrentGroup::Group(GroupRef::New(group)) => insert_group(tx, room_id, group, Some(before)).await?,
    };
    sqlx::query("UPDATE rooms SET current_state_group = $1 WHERE room_id = $2")
        .bind(group)
        .bind(room_id)
        .execute(&mut *tx)
        .await?;
    Ok(Some(group))
}
