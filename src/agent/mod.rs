//! The guest agent: one thread, one `mio::Poll`, sessions in a slab.
//!
//! - [`event_loop`]: the poll loop, frame dispatch, reaping, deadlines.
//! - [`session`]: one child's fds and flow control, as a state machine.
//! - [`spawn`]: from EXEC to a running child (fork, execve, error pipe).
//! - [`transport`]: the host stream and the output queue.
//! - [`user`]: `user` resolution from /etc/passwd and /etc/group.
//! - [`process`]: process-wide setup (signal mask, fd hygiene, subreaper).
//! - [`init`]: PID-1 duties (mounts, kernel command line, modules, the
//!   virtio port, logging, power-off).

pub mod event_loop;
pub mod init;
pub mod process;
pub mod session;
pub mod spawn;
pub mod transport;
pub mod user;

pub use event_loop::{Config, EventLoop, Exit};
