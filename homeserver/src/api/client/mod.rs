//! Client-Server API endpoints, one module per area of the spec.

pub mod account;
pub mod account_data;
pub mod devices;
pub mod discovery;
pub mod keys;
pub mod media;
pub mod messages;
pub mod presence;
pub mod profile;
pub mod push;
pub mod register;
pub mod relations;
pub mod rooms;
pub mod search;
pub mod session;
pub mod sliding_sync;
pub mod sync;
pub mod user_directory;
pub mod voip;
