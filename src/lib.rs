//! agentd: the guest agent of a microVM, and the protocol and client that
//! hosts use to drive it.
//!
//! - [`codec`] and [`messages`]: protocol v1 (`docs/PROTOCOL.md`), shared by
//!   both ends.
//! - [`agent`]: the agent (what the `agentd` binary runs).
//! - [`client`]: the host side: a client library that drives an agent
//!   over any transport, used by the `agentctl` CLI.
//! - `fuzzing` (with the `fuzzing` feature): the bodies of the fuzz
//!   targets, so that `cargo test` replays the seed corpus on stable.

#![warn(unreachable_pub, unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod agent;
pub mod client;
pub mod codec;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod messages;
