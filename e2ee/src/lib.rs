//! Client-side end-to-end encryption for the Obmin desktop client.
//!
//! Nothing is implemented yet: this crate is built by issue 7 (Olm/Megolm on vodozemac,
//! sans-I/O). It exists now only so the workspace has the shape described in DESIGN.md.
