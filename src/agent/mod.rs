//! The agent (guest side).

pub mod init;
