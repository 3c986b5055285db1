//! What a readiness event is about: every fd the loop registers gets a
//! `mio::Token` that encodes a [`Source`], and every event is turned back
//! into one before anything is done with it.
//!
//! Layout of a token: `key << 8 | class << 3 | sub`. `class` says which
//! table the key indexes (a host link, a session, ...), `sub` which of the
//! owner's fds (a session's stdin, stdout, stderr or status pipe). A key is
//! a slab index, so it may be reused once its owner is gone: an event for a
//! key whose owner was removed earlier in the same batch is dropped by the
//! loop, and one for a key reused since is only a spurious "try again",
//! which every handler tolerates (edge-triggered readiness is a hint, and
//! every read or write handles EAGAIN).

use mio::Token;

/// Which fd of a session a token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionFd {
    /// The stdin pipe's write end.
    Stdin,
    /// The stdout pipe's read end, or the PTY master.
    Stdout,
    /// The stderr pipe's read end.
    Stderr,
    /// The close-on-exec status pipe of a child not yet known to run.
    Start,
}

/// Which fd of a host link a token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkFd {
    /// The read side (and the write side too, when it is the same fd).
    Read,
    /// The write side, when it is a separate fd (stdio, a FIFO pair).
    Write,
}

/// Which pipe of a file operation's worker a token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FsFd {
    /// Frames from the worker.
    Ctl,
    /// Bytes from the worker (read, tar_get).
    Out,
    /// Bytes to the worker (write, tar_put).
    In,
}

/// Which fd of a connection a token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NetFd {
    /// The guest socket.
    Socket,
    /// The control socket of a worker connecting for it.
    Worker,
}

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The signalfd (SIGCHLD and the shutdown signals).
    Signals,
    /// A host link's transport.
    Link(usize, LinkFd),
    /// One of a session's fds.
    Session(usize, SessionFd),
    /// One of a file operation's pipes.
    Fs(usize, FsFd),
    /// A connection's socket, or its connector's.
    Net(usize, NetFd),
    /// A listening socket.
    Listener(usize),
    /// The kernel's uevents (a restore from a snapshot, see restore.rs).
    Uevents,
}

const CLASS_SIGNALS: usize = 0;
const CLASS_LINK: usize = 1;
const CLASS_SESSION: usize = 2;
const CLASS_FS: usize = 3;
const CLASS_NET: usize = 4;
const CLASS_LISTENER: usize = 5;

fn token(key: usize, class: usize, sub: usize) -> Token {
    Token(key << 8 | class << 3 | sub)
}

impl Source {
    /// The token to register this source's fd under.
    pub(crate) fn token(self) -> Token {
        match self {
            Source::Signals => token(0, CLASS_SIGNALS, 0),
            Source::Link(key, fd) => token(key, CLASS_LINK, fd as usize),
            Source::Session(key, fd) => token(key, CLASS_SESSION, fd as usize),
            Source::Fs(key, fd) => token(key, CLASS_FS, fd as usize),
            Source::Net(key, fd) => token(key, CLASS_NET, fd as usize),
            Source::Listener(key) => token(key, CLASS_LISTENER, 0),
            Source::Uevents => token(0, CLASS_SIGNALS, 1),
        }
    }

    /// The source a token was made for; `None` for a token no source makes.
    pub(crate) fn from_token(t: Token) -> Option<Source> {
        let (key, class, sub) = (t.0 >> 8, (t.0 >> 3) & 0x1f, t.0 & 7);
        Some(match (class, sub) {
            (CLASS_SIGNALS, 0) if key == 0 => Source::Signals,
            (CLASS_SIGNALS, 1) if key == 0 => Source::Uevents,
            (CLASS_LINK, 0) => Source::Link(key, LinkFd::Read),
            (CLASS_LINK, 1) => Source::Link(key, LinkFd::Write),
            (CLASS_SESSION, 0) => Source::Session(key, SessionFd::Stdin),
            (CLASS_SESSION, 1) => Source::Session(key, SessionFd::Stdout),
            (CLASS_SESSION, 2) => Source::Session(key, SessionFd::Stderr),
            (CLASS_SESSION, 3) => Source::Session(key, SessionFd::Start),
            (CLASS_FS, 0) => Source::Fs(key, FsFd::Ctl),
            (CLASS_FS, 1) => Source::Fs(key, FsFd::Out),
            (CLASS_FS, 2) => Source::Fs(key, FsFd::In),
            (CLASS_NET, 0) => Source::Net(key, NetFd::Socket),
            (CLASS_NET, 1) => Source::Net(key, NetFd::Worker),
            (CLASS_LISTENER, 0) => Source::Listener(key),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_round_trips() {
        let mut all = vec![Source::Signals, Source::Uevents];
        for key in [0, 1, 7, 1 << 20, usize::MAX >> 8] {
            all.push(Source::Link(key, LinkFd::Read));
            all.push(Source::Link(key, LinkFd::Write));
            for fd in [
                SessionFd::Stdin,
                SessionFd::Stdout,
                SessionFd::Stderr,
                SessionFd::Start,
            ] {
                all.push(Source::Session(key, fd));
            }
            for fd in [FsFd::Ctl, FsFd::Out, FsFd::In] {
                all.push(Source::Fs(key, fd));
            }
            all.push(Source::Net(key, NetFd::Socket));
            all.push(Source::Net(key, NetFd::Worker));
            all.push(Source::Listener(key));
        }
        let mut tokens = std::collections::HashSet::new();
        for s in all {
            assert!(tokens.insert(s.token()), "{s:?} shares a token");
            assert_eq!(Source::from_token(s.token()), Some(s));
        }
        assert_eq!(Source::from_token(Token(0b1111_1111)), None);
    }
}
