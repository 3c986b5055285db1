//! agentd: the guest agent of a microVM, and the protocol and client that
//! hosts use to drive it.
//!
//! - [`codec`] and [`messages`]: protocol v1 (`docs/PROTOCOL.md`), shared by
//!   both ends.
//! - [`client`]: the host side: a client library that drives an agent
//!   over any transport, used by the `agentctl` CLI.
//! - [`fuzzing`]: the bodies of the fuzz targets, public so that `cargo test`
//!   replays the seed corpus on stable.

pub mod agent;
pub mod client;
pub mod codec;
pub mod fuzzing;
pub mod messages;
