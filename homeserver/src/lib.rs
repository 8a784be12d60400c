//! The Obmin homeserver: configuration, storage, services and the HTTP API.
//!
//! Layers (see DESIGN.md): `api` parses and answers HTTP with ruma types and calls
//! `service`; `service` holds the domain logic and calls `store`; `store` holds all SQL.

pub mod api;
pub mod cli;
pub mod config;
pub mod error;
pub mod listener;
pub mod metrics;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;

#[cfg(test)]
mod parser_props;
