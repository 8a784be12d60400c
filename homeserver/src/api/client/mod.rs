//! Client-Server API endpoints, one module per area of the spec.

pub mod account;
pub mod devices;
pub mod discovery;
pub mod profile;
pub mod register;
pub mod session;
