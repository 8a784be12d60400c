//! All SQL of the homeserver lives under this module.
//!
//! One [`Store`] wraps a sqlx `Any` pool over SQLite or PostgreSQL, chosen by the database
//! URL. Queries are written once in the SQL both engines accept (`$1` placeholders, BIGINT
//! times in milliseconds, 0/1 booleans); the few places that differ ask [`Store::backend`].
//! Schema changes are migrations under `migrations/sqlite` and `migrations/postgres`,
//! embedded in the binary and applied at start.

mod account_data;
mod aggregations;
mod devices;
mod federation;
mod inbound;
mod keys;
mod media;
mod presence;
mod profile;
mod pushers;
mod redactions;
mod registration_tokens;
mod rooms;
mod server_keys;
mod sliding_sync;
mod state;
mod txn_retention;
mod uiaa;
mod users;

use std::{str::FromStr, time::Duration};

use sqlx::{
    Any, AnyPool, Transaction,
    any::{AnyConnectOptions, AnyPoolOptions},
    migrate::Migrator,
};

pub use account_data::{AccountDataRow, ReceiptRow};
pub use devices::{AccessTokenOwner, DeviceRow, NewDevice};
pub use federation::{BackfilledEvent, JoinedRoom, OutboxRow};
pub use inbound::InboundPdu;
pub use keys::{BackupVersionRow, NewToDevice, ToDeviceRow};
pub use media::{Completion, MediaRow, MediaUsageRow, NewMedia, RemoteMediaRow, ThumbnailRow};
pub use presence::PresenceRow;
pub use pushers::{NewPusher, PendingPush, PusherRow};
pub use registration_tokens::RegistrationTokenRow;
pub use rooms::{
    AppendEvent, AppendOutcome, CurrentStateEntry, EventRow, NewRoom, RelationsOf, RoomRow, StateFromOutlier,
};
pub use server_keys::{NewServerKeys, ServerKeyRow};
pub use state::{
    CurrentGroup, EventStateGroups, EventStatus, GroupBase, GroupRef, MAX_DELTA_CHAIN, NewOutlier, NewStateGroup,
    StateIds, StoredPdu,
};
pub use uiaa::UiaaSessionRow;
pub use users::{CreateAccountOutcome, LogoutDevices, NewAccount, UserRow};

use crate::config::SqliteSynchronous;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres");

/// Which database engine the store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Options for opening the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Read pool size; `None` for the backend's default.
    pub max_connections: Option<u32>,
    pub sqlite_synchronous: SqliteSynchronous,
}

/// Default read connections on SQLite: reads run on this machine's cores and each connection
/// has a page cache of its own that a connection handed out in turn rarely finds warm.
const SQLITE_READERS: u32 = 4;
/// Default connections to PostgreSQL, which does the work in its own processes.
const POSTGRES_CONNECTIONS: u32 = 16;

/// The database handle shared by all services.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// Where write transactions run: on SQLite one dedicated connection (SQLite has one
    /// writer at a time anyway, and a connection that made the last write keeps its page
    /// cache, where any other connection's write would make it start cold); on PostgreSQL
    /// the same pool as reads.
    writer: AnyPool,
    backend: Backend,
    /// SQLite has one writer at a time; see [`Store::begin_write`].
    sqlite_writer: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// SQLite's configured `synchronous` setting, restored after a durable write.
    sqlite_synchronous: SqliteSynchronous,
}

impl Store {
    /// Opens (and for SQLite creates) the database. Does not run migrations.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") { Backend::Sqlite } else { Backend::Postgres };
        let max_connections = options.max_connections.unwrap_or(match backend {
            Backend::Sqlite => SQLITE_READERS,
            Backend::Postgres => POSTGRES_CONNECTIONS,
        });
        let pool_options =
            AnyPoolOptions::new().max_connections(max_connections).acquire_timeout(Duration::from_secs(30));
        let pools = match backend {
            Backend::Sqlite => {
                let url = sqlite_url_with_create(url);
                let synchronous = match options.sqlite_synchronous {
                    SqliteSynchronous::Normal => "NORMAL",
                    SqliteSynchronous::Full => "FULL",
                };
                // temp_store: statement journals in memory, not a temporary file created and
                // deleted per statement (measured: open/unlink/close on every append).
                // wal_autocheckpoint = 0: the commit that filled the WAL would otherwise copy it
                // into the database and fsync, inside the writer's turn, stalling every writer
                // queued behind it; `checkpoint_wal` does it in the background instead.
                let pragmas = match synchronous {
                    "FULL" => {
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000; PRAGMA temp_store = MEMORY; PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 67108864;"
                    }
                    _ => {
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000; PRAGMA temp_store = MEMORY; PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 67108864;"
                    }
                };
                let connect_options = AnyConnectOptions::from_str(&url)?;
                let sqlite_pool = |options: AnyPoolOptions| {
                    options
                        // A local file cannot drop a connection; sqlx would otherwise ping the
                        // connection worker before every query (measured: 7% of a sync's CPU).
                        .test_before_acquire(false)
                        .after_connect(move |conn, _meta| {
                            Box::pin(async move {
                                sqlx::raw_sql(pragmas).execute(conn).await?;
                                Ok(())
                            })
                        })
                        .connect_with(connect_options.clone())
                };
                let pool = sqlite_pool(pool_options).await?;
                let writer = sqlite_pool(
                    AnyPoolOptions::new()
                        .max_connections(1)
                        .min_connections(1)
                        .acquire_timeout(Duration::from_secs(30)),
                )
                .await?;
                (pool, writer)
            }
            Backend::Postgres => {
                let pool = pool_options.connect_with(AnyConnectOptions::from_str(url)?).await?;
                (pool.clone(), pool)
            }
        };
        let (pool, writer) = pools;
        let sqlite_writer = std::sync::Arc::new(tokio::sync::Mutex::new(()));
        if backend == Backend::Sqlite {
            tokio::spawn(checkpoint_wal(pool.clone(), writer.clone(), sqlite_writer.clone()));
        }
        Ok(Self { pool, writer, backend, sqlite_writer, sqlite_synchronous: options.sqlite_synchronous })
    }

    /// Applies every migration not yet applied.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        match self.backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&self.pool).await,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&self.pool).await,
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A trivial query, for `/health`.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    /// (open connections, idle connections), for metrics.
    pub fn pool_stats(&self) -> (u32, usize) {
        (self.pool.size(), self.pool.num_idle())
    }

    /// Waits for in-flight queries and closes every connection (SQLite checkpoints its WAL).
    pub async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }

    /// Runs one writing statement on its own (autocommit). On SQLite it queues for the
    /// writer's turn and runs on the writer's connection like a transaction would (see
    /// [`Store::begin_write`]): run on a read connection, it met the writer in SQLite's busy
    /// handler, whose sleeps (1, 2, 5 ms ...) stalled sends behind every presence or
    /// last-seen update (measured: 8 ms per update under `deliver`), and it made the writer's
    /// page cache stale.
    pub(crate) async fn execute_write<'q>(
        &self,
        query: sqlx::query::Query<'q, Any, <Any as sqlx::Database>::Arguments>,
    ) -> Result<sqlx::any::AnyQueryResult, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => {
                let _turn = self.sqlite_writer.lock().await;
                query.execute(&self.writer).await
            }
            Backend::Postgres => query.execute(&self.pool).await,
        }
    }

    /// Like [`Store::execute_write`], but answers only once the write (and every commit
    /// before it) would survive a power cut, whatever `sqlite_synchronous` says: for the few
    /// writes whose loss after an acknowledgement would do lasting harm (a federation
    /// transaction we answered, the stream positions we may hand out).
    ///
    /// On SQLite with `synchronous = NORMAL` a commit reaches the disk at the next WAL
    /// checkpoint; this commit is made with `FULL`, which syncs the WAL, and with it every
    /// earlier commit. On PostgreSQL the commit waits for its WAL flush even if the server
    /// runs with `synchronous_commit = off`.
    pub(crate) async fn execute_write_durably<'q>(
        &self,
        query: sqlx::query::Query<'q, Any, <Any as sqlx::Database>::Arguments>,
    ) -> Result<sqlx::any::AnyQueryResult, sqlx::Error> {
        match self.backend {
            Backend::Sqlite if self.sqlite_synchronous == SqliteSynchronous::Full => self.execute_write(query).await,
            Backend::Sqlite => {
                let _turn = self.sqlite_writer.lock().await;
                let mut conn = self.writer.acquire().await?;
                sqlx::raw_sql("PRAGMA synchronous = FULL").execute(&mut *conn).await?;
                let result = query.execute(&mut *conn).await;
                // Back to the configured setting even if the write failed; a connection left
                // at FULL would only be slower, never less safe.
                sqlx::raw_sql("PRAGMA synchronous = NORMAL").execute(&mut *conn).await?;
                result
            }
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::raw_sql("SET LOCAL synchronous_commit TO on").execute(&mut *tx).await?;
                let result = query.execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(result)
            }
        }
    }

    /// Starts a transaction that will write; keep the returned guard until it is committed
    /// or dropped. On SQLite, which has one writer at a time, writers first queue here in
    /// arrival order (tokio's mutex is fair) and then take the write lock up front
    /// (`BEGIN IMMEDIATE`, so a read lock never has to be upgraded). Without the queue they
    /// would meet in SQLite's busy handler, which sleeps in growing steps of up to 100 ms:
    /// measured as second-long tails under 50 concurrent senders.
    async fn begin_write(
        &self,
    ) -> Result<(Option<tokio::sync::MutexGuard<'_, ()>>, Transaction<'static, Any>), sqlx::Error> {
        match self.backend {
            Backend::Sqlite => {
                let guard = self.sqlite_writer.lock().await;
                Ok((Some(guard), self.writer.begin_with("BEGIN IMMEDIATE").await?))
            }
            Backend::Postgres => Ok((None, self.pool.begin().await?)),
        }
    }
}

/// How often the background checkpoint copies the WAL into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);

/// WAL size (in frames, one per page written) above which the background checkpoint makes
/// sure SQLite can start the WAL over: 16384 frames of 4 KiB, 64 MiB.
const WAL_RESTART_FRAMES: i64 = 16384;

/// Copies committed WAL frames into the SQLite database file in the background, in place of
/// SQLite's automatic checkpoint (switched off on every connection, see [`Store::connect`]).
/// PASSIVE never waits for readers or the writer.
///
/// SQLite starts the WAL over from its beginning only when a write begins after a checkpoint
/// caught up with every frame. Under a steady stream of writes a PASSIVE checkpoint never
/// catches up (frames keep arriving while it copies), so the WAL grew without bound (measured:
/// 681 MB after 10,000 messages) and every page read searched its whole index (initial syncs
/// 99 ms instead of 82 ms). So once the WAL is past [`WAL_RESTART_FRAMES`], the checkpoint
/// makes a second, short pass, then queues for the write lock like any writer and, holding it,
/// copies the few frames written since: the next write then restarts the WAL, and
/// `journal_size_limit` gives the file's excess back to the disk. Holding the lock only for
/// that remainder matters:
/// a TRUNCATE checkpoint under the lock every 16 MiB stalled sends behind it (`deliver`
/// send p99 57 ms instead of 16 ms), and a PASSIVE one right after the long pass still did
/// (32–50 ms). Ends when the pool closes.
async fn checkpoint_wal(pool: AnyPool, writer: AnyPool, write_lock: std::sync::Arc<tokio::sync::Mutex<()>>) {
    let mut ticks = tokio::time::interval(CHECKPOINT_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if pool.is_closed() {
            return;
        }
        // Columns: busy (0/1), frames in the WAL, frames checkpointed.
        let checkpoint = "PRAGMA wal_checkpoint(PASSIVE)";
        let frames = match sqlx::query_as::<_, (i64, i64, i64)>(checkpoint).fetch_one(&pool).await {
            Ok((_, frames, _)) => frames,
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                continue;
            }
        };
        if frames > WAL_RESTART_FRAMES {
            // Once more without the lock: that pass only copies what arrived during the long
            // one above, so the pass under the lock has next to nothing left but its two fsyncs.
            if let Err(e) = sqlx::query(checkpoint).execute(&pool).await {
                tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                continue;
            }
            let waited = std::time::Instant::now();
            let _turn = write_lock.lock().await;
            let held = std::time::Instant::now();
            match sqlx::query_as::<_, (i64, i64, i64)>(checkpoint).fetch_one(&writer).await {
                Ok((_, frames, done)) if done < frames => {
                    tracing::debug!(frames, done, "WAL restart postponed: a reader still uses older frames")
                }
                Ok(_) => tracing::debug!(
                    frames,
                    lock_wait_ms = (held - waited).as_secs_f64() * 1e3,
                    lock_held_ms = held.elapsed().as_secs_f64() * 1e3,
                    "WAL checkpointed under the write lock; the next write starts it over"
                ),
                Err(sqlx::Error::PoolClosed) => return,
                Err(e) => tracing::warn!(error = %e, "WAL checkpoint under the write lock failed; will retry"),
            }
        }
    }
}

/// sqlx refuses to create a missing SQLite file unless asked to (`mode=rwc`).
fn sqlite_url_with_create(url: &str) -> String {
    if url.contains("mode=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    }
}

/// Milliseconds since the Unix epoch, as stored in every `*_ts` column.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
