//! Conformance tests: each starts real homeserver processes and drives them over HTTP.
//! Every test in a `backend_tests!` list runs twice, on SQLite and on PostgreSQL.

mod account;
mod aggregations;
mod attackers;
mod cli;
mod desktop_core;
mod desktop_keys;
mod devices;
mod discovery;
mod e2ee;
mod e2ee_client;
mod errors;
mod federation;
mod federation_e2ee;
mod federation_rooms;
mod hostile_acl;
mod hostile_redactions;
mod hostile_state;
mod hostile_templates;
mod hostile_visibility;
mod limits;
mod login;
mod malformed;
mod media;
mod operations;
mod presence;
mod profile;
mod push;
mod pushers;
mod register;
mod room_extras;
mod rooms;
mod search;
mod sliding_sync;
mod state_model;
mod sync;
