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
pub mod register;
pub mod rooms;
pub mod session;
pub mod sync;
