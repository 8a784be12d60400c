//! The Obmin desktop client core: everything the app does except drawing. Pure Rust, no
//! window, testable against a real homeserver process.
//!
//! ```no_run
//! # async fn demo() -> obmin_client::Result<()> {
//! use obmin_client::{Client, Update};
//! let client = Client::open("/home/me/.local/share/obmin").await?;
//! if client.session().is_none() {
//!     client.login("http://localhost:8008", "alice", "secret").await?;
//! }
//! let mut updates = client.subscribe();
//! client.start()?;                                   // sync loop + outbox in the background
//! for room in client.rooms().await? { println!("{} ({} unread)", room.name, room.unread); }
//! while let Ok(update) = updates.recv().await {
//!     if let Update::Timeline { item } = update { println!("{:?}", item.content); }
//! }
//! # Ok(()) }
//! ```
//!
//! One [`Client`] per data directory (one signed-in account). It is cheap to clone (an `Arc`)
//! and every method takes `&self`, so the app can call it from any task.
//!
//! * Storage: `<data_dir>/client.db` (SQLite: session, rooms, members, timelines, outbox,
//!   users) and `<data_dir>/crypto.db` (the `e2ee` crate's encrypted store), sealed with a key
//!   from the OS keyring ([`Client::open_with_keyring`], [`SecretServiceKeyring`]) or a
//!   passphrase ([`Client::open_with_passphrase`], [`Client::unlock`]); see [`KeyStorage`].
//! * Sending: [`Client::send_text`] / [`Client::send_file`] queue into a persistent outbox
//!   keyed by transaction id and return at once; the item shows [`SendState::Sending`], then
//!   `Sent` (✓, the server has it) and `Read` (✓✓, the other side read it). A retry after a
//!   network failure or a restart reuses the transaction id, so nothing is sent twice.
//! * Every room this client creates is end-to-end encrypted (Megolm, keys shared over Olm).

mod client;
mod crypto;
mod error;
mod http;
mod keyring;
mod media;
mod mime;
mod notification;
mod outbox;
mod rooms;
mod security;
mod session;
mod social;
mod store;
mod sync;
mod timeline;
mod types;
mod verification;

pub use client::Client;
pub use crypto::{KeyState, KeyStorage, MIN_PASSPHRASE_CHARS};
pub use e2ee::store::{KeyringHook, StoreKey};
pub use error::{Error, Result};
pub use keyring::{KEYRING_SERVICE, SecretServiceKeyring};
pub use notification::{NOTIFICATION_BODY_CHARS, notification_body, notification_title};
pub use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
pub use types::*;
