//! Domain logic, one module per concern. Services know nothing of HTTP; they take parsed
//! values, talk to the [`Store`] and return [`crate::error::Result`].
//!
//! # The shape of a domain
//!
//! Each domain (timeline, rooms, keys, media, ...) is one struct in its own module that owns
//! its state, caches and locks, and is reached by name: `services.registration_tokens.create(..)`.
//! What every domain shares (settings, the store, the signing key, metrics, stream positions)
//! stays on [`Services`]. A domain that needs another domain or a shared part reaches it
//! through its [`Hub`]:
//!
//! ```ignore
//! pub struct RegistrationTokens { hub: Hub }
//! impl RegistrationTokens {
//!     pub async fn create(&self, ..) -> Result<..> {
//!         let s = self.hub.services();
//!         s.store.create_registration_token(..).await
//!     }
//! }
//! ```
//!
//! Handlers in `api/` call domains only, never the store.

pub mod account_data;
pub mod accounts;
pub mod aggregations;
pub mod auth;
pub mod backfill;
pub mod cache;
pub mod credentials;
pub mod devices;
pub mod event_content;
pub mod event_fields;
pub mod events;
pub mod fed;
pub mod inbound;
pub mod key_backups;
pub mod keys;
pub mod media;
pub mod notifier;
pub mod presence;
pub mod profile;
pub mod push;
pub mod push_gateway;
pub mod pushers;
pub mod rate_limit;
pub mod received;
pub mod redactions;
pub mod registration_tokens;
pub mod remote_cache;
pub mod remote_rooms;
pub mod room_cache;
pub mod rooms;
pub mod send_queue;
pub mod server_acl;
pub mod server_visibility;
pub mod servers;
pub mod sliding_sync;
pub mod state;
pub mod streams;
pub mod sync;
pub mod timeline;
pub mod txn_retention;
pub mod typing;
pub mod uiaa;

use std::sync::{Arc, Weak};

use federation::SigningKey;

use crate::{config::Settings, metrics::Metrics, store::Store};

/// A domain's way back to the other domains and the shared parts.
///
/// [`Services`] is built once with [`Arc::new_cyclic`], so each domain can hold a weak
/// reference to the whole without a cycle of strong references. Every call into a domain
/// comes from a holder of the `Arc<Services>` (a request handler, a background task, the
/// CLI), so while a domain method runs the upgrade cannot fail.
#[derive(Clone)]
pub struct Hub(Weak<Services>);

impl Hub {
    pub fn services(&self) -> Arc<Services> {
        self.0.upgrade().expect("a domain is only called while its Services are alive")
    }
}

/// Everything a request handler may need, built once at start and shared by reference.
pub struct Services {
    pub registration_tokens: registration_tokens::RegistrationTokens,
    pub accounts: accounts::Accounts,
    pub uiaa: uiaa::Uiaa,
    pub devices: devices::Devices,
    pub profile: profile::Profiles,
    pub account_data: account_data::AccountData,
    pub presence: presence::Presence,
    pub push: push::Push,
    pub keys: keys::Keys,
    pub key_backups: key_backups::KeyBackups,
    /// Building, authorizing and appending events; the room locks.
    pub timeline: timeline::Timeline,
    /// Creating and upgrading rooms, memberships, aliases, the directory; each user's rooms.
    pub rooms: rooms::Rooms,
    /// State groups, the state at events, resolution; the state cache.
    pub state: state::State,
    /// Events in the client format.
    pub events: events::Events,
    pub redactions: redactions::Redactions,
    /// Bundled aggregations and related events.
    pub relations: aggregations::Relations,
    /// Access tokens.
    pub auth: auth::Auth,
    /// `/sync` with its unread-count and filter caches.
    pub sync: sync::Sync,
    /// Sliding sync with its connections.
    pub sliding_sync: sliding_sync::SlidingSync,
    pub settings: Settings,
    pub store: Store,
    pub signing_key: SigningKey,
    pub rate_limits: rate_limit::RateLimits,
    pub metrics: Metrics,
    pub streams: Arc<streams::Streams>,
    pub typing: typing::Typing,
    pub hashing: credentials::Hashing,
    pub media: media::Media,
    /// Federation: the outbound client and the key-fetch bookkeeping.
    pub fed: fed::Federation,
    /// Delivery of our rooms' events to other servers (the queue is a table).
    pub send_queue: send_queue::SendQueue,
    /// The federation receiver: incoming `/send` transactions (turns per origin, the per-room
    /// queues' workers), received PDUs and EDUs, backfill and missing events.
    pub receiver: inbound::Receiver,
    /// Other servers in our rooms: ACLs, what they may see, what we serve them.
    pub servers: servers::Servers,
    /// Joins, leaves and invites across servers.
    pub remote_rooms: remote_rooms::RemoteRooms,
    pub room_cache: room_cache::RoomCaches,
}

impl Services {
    /// `max_stream_position` is the highest stream position already in the database.
    pub fn new(
        settings: Settings,
        store: Store,
        signing_key: SigningKey,
        max_stream_position: i64,
        outbound: fed::Outbound,
    ) -> Arc<Self> {
        Arc::new_cyclic(|weak| {
            Self::build(Hub(weak.clone()), settings, store, signing_key, max_stream_position, outbound)
        })
    }

    fn build(
        hub: Hub,
        settings: Settings,
        store: Store,
        signing_key: SigningKey,
        max_stream_position: i64,
        outbound: fed::Outbound,
    ) -> Self {
        let rate_limits = rate_limit::RateLimits::new(&settings.rate_limits);
        let media = media::Media::new(hub.clone(), settings.media_dir(), settings.media.thumbnail_concurrency);
        Self {
            registration_tokens: registration_tokens::RegistrationTokens::new(hub.clone()),
            timeline: timeline::Timeline::new(hub.clone()),
            rooms: rooms::Rooms::new(hub.clone()),
            state: state::State::new(hub.clone()),
            events: events::Events::new(hub.clone()),
            redactions: redactions::Redactions::new(hub.clone()),
            relations: aggregations::Relations::new(hub.clone()),
            auth: auth::Auth::new(hub.clone()),
            sync: sync::Sync::new(hub.clone()),
            sliding_sync: sliding_sync::SlidingSync::new(hub.clone()),
            accounts: accounts::Accounts::new(hub.clone()),
            uiaa: uiaa::Uiaa::new(hub.clone()),
            devices: devices::Devices::new(hub.clone()),
            profile: profile::Profiles::new(hub.clone()),
            account_data: account_data::AccountData::new(hub.clone()),
            presence: presence::Presence::new(hub.clone()),
            push: push::Push::new(hub.clone(), &settings.push),
            keys: keys::Keys::new(hub.clone()),
            key_backups: key_backups::KeyBackups::new(hub.clone()),
            settings,
            store,
            signing_key,
            rate_limits,
            metrics: Metrics::new(),
            streams: streams::Streams::new(max_stream_position),
            typing: typing::Typing::default(),
            hashing: credentials::Hashing::new(),
            media,
            fed: fed::Federation::new(hub.clone(), outbound),
            send_queue: send_queue::SendQueue::new(hub.clone()),
            receiver: inbound::Receiver::new(hub.clone()),
            servers: servers::Servers::new(hub.clone()),
            remote_rooms: remote_rooms::RemoteRooms::new(hub.clone()),
            room_cache: room_cache::RoomCaches::new(hub.clone()),
        }
    }
}
