//! What the fs and net handles share: an extension stream's id, its
//! receiver of raw frames (see `conn::Shared::register_stream`), and the
//! state its frames update, driven by whichever thread needs progress.
//!
//! A net connection is read on one thread and written on another (the
//! forwarder does exactly that), and both wait on frames of the same id:
//! a reader for NET_RECV, a writer for NET_SEND_ACK. So frames are not
//! read by a thread of their own: the first thread that must wait takes
//! the receiver ("pumps"), applies each frame to the shared state and
//! wakes the others, which wait on a condition variable meanwhile. No
//! frame is read that nobody waits for, so a caller that stops reading
//! stops acknowledging, and the agent's window holds the bytes back.

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use super::conn::{lock, Conn, StreamFrame};
use super::error::{Error, Result};
use crate::messages::Message;

/// A frame handler: applies one frame of the stream to its state.
pub(crate) trait Apply {
    /// Applies a frame (kind, payload) of this stream's id.
    fn apply(&mut self, kind: u8, payload: Vec<u8>);
    /// The transport closed (no frame will come any more).
    fn disconnected(&mut self, err: Error);
}

struct Pumped<S> {
    s: S,
    pumping: bool,
}

/// One extension stream on a connection.
pub(crate) struct Stream<S> {
    pub(crate) id: u32,
    pub(crate) conn: Arc<Conn>,
    state: Mutex<Pumped<S>>,
    cond: Condvar,
    rx: Mutex<mpsc::Receiver<StreamFrame>>,
}

impl<S: Apply> Stream<S> {
    pub(crate) fn new(
        conn: Arc<Conn>,
        id: u32,
        rx: mpsc::Receiver<StreamFrame>,
        s: S,
    ) -> Stream<S> {
        Stream {
            id,
            conn,
            state: Mutex::new(Pumped { s, pumping: false }),
            cond: Condvar::new(),
            rx: Mutex::new(rx),
        }
    }

    /// Runs `f` on the state without waiting.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut S) -> T) -> T {
        f(&mut lock(&self.state).s)
    }

    /// Waits until `check` returns `Some`, applying frames as they come.
    pub(crate) fn wait_for<T>(&self, mut check: impl FnMut(&mut S) -> Option<T>) -> T {
        let mut g = lock(&self.state);
        loop {
            if let Some(t) = check(&mut g.s) {
                return t;
            }
            if g.pumping {
                g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            g.pumping = true;
            drop(g);
            let frame = lock(&self.rx).recv();
            g = lock(&self.state);
            g.pumping = false;
            match frame {
                Ok((kind, payload)) => g.s.apply(kind, payload),
                Err(_) => {
                    let err = self
                        .conn
                        .shared
                        .closed_error()
                        .unwrap_or_else(Error::closed);
                    g.s.disconnected(err);
                }
            }
            self.cond.notify_all();
        }
    }

    /// Applies every frame already received, without waiting.
    pub(crate) fn poll(&self) {
        let mut g = lock(&self.state);
        if g.pumping {
            return;
        }
        loop {
            let frame = lock(&self.rx).try_recv();
            match frame {
                Ok((kind, payload)) => g.s.apply(kind, payload),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    let err = self
                        .conn
                        .shared
                        .closed_error()
                        .unwrap_or_else(Error::closed);
                    g.s.disconnected(err);
                    break;
                }
            }
        }
        self.cond.notify_all();
    }

    /// Sends a frame on this stream's id.
    pub(crate) fn send(&self, msg: &Message<'_>) -> Result<()> {
        self.conn.shared.send(self.id, msg)
    }
}
