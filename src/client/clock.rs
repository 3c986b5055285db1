//! The `clock` extension from the host: read the guest's clock, step it to
//! the host's, feed its entropy pool. For a VM restored from a snapshot,
//! whose wall clock is stale and whose entropy was cloned.
//!
//! Each call is one request and one reply under an id of its own (the
//! protocol lets any id carry them; taking a fresh one keeps replies apart
//! when several threads ask at once).

use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::conn::{Conn, Routed, SessState, SessionShared, Shared};
use super::error::{Error, Result};
use super::Client;
use crate::messages::{Clock, ClockMsg, ClockSet, ClockSetDone, EntropyDone, Message};

/// The most bytes one ENTROPY frame carries; [`Client::entropy`] splits
/// larger buffers.
pub const ENTROPY_CHUNK: usize = 4096;

/// Bytes of entropy the client feeds after each READY.
pub const SYNC_ENTROPY_BYTES: usize = 32;

/// Fills `buf` from the host kernel's random pool.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom(2) writes at most `rest.len()` bytes to the
        // pointer, which points to that many writable bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// How long connecting waits for the first sync before going on without it
/// (an agent that announces `clock_set` but does not answer).
pub(super) const FIRST_SYNC_WAIT: Duration = Duration::from_secs(10);

/// Runs [`Client::sync_after_ready`] now, then after every later READY (a
/// restored VM's agent sends READY again), on a thread of its own, until
/// the connection closes or no handle to it is left (the thread holds none
/// between syncs). Waits for the first sync at most `wait`.
pub(super) fn watch_readies(conn: Weak<Conn>, shared: Arc<Shared>, mut gen: u64, wait: Duration) {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("agentd-client-clock".into())
        .spawn(move || {
            if let Some(conn) = conn.upgrade() {
                Client { conn }.sync_after_ready();
            }
            let _ = done_tx.send(());
            while let Some(g) = shared.wait_ready_after(gen) {
                gen = g;
                let Some(conn) = conn.upgrade() else { return };
                Client { conn }.sync_after_ready();
            }
        });
    match spawned {
        Ok(_) => {
            if done_rx.recv_timeout(wait).is_err() {
                tracing::warn!("the agent did not answer the clock sync within {wait:?}; going on");
            }
        }
        Err(e) => {
            tracing::warn!("cannot start the clock thread: {e}; the guest's clock is not synced")
        }
    }
}

/// An agent → host frame of the clock extension.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ClockReply {
    Clock(Clock),
    SetDone(ClockSetDone),
    EntropyDone(EntropyDone),
}

impl ClockReply {
    pub(crate) fn from_msg(m: &ClockMsg<'_>) -> Option<ClockReply> {
        match m {
            ClockMsg::Clock(c) => Some(ClockReply::Clock(*c)),
            ClockMsg::SetDone(d) => Some(ClockReply::SetDone(*d)),
            ClockMsg::EntropyDone(d) => Some(ClockReply::EntropyDone(*d)),
            ClockMsg::Get | ClockMsg::Set(_) | ClockMsg::Entropy(_) => None,
        }
    }
}

/// The guest's clocks as [`Client::clock`] read them, next to the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestClock {
    /// The guest's CLOCK_REALTIME, nanoseconds since the epoch.
    pub realtime_ns: i64,
    /// The guest's CLOCK_BOOTTIME, nanoseconds since its boot.
    pub boottime_ns: u64,
    /// How many times the agent has seen the VM restored from a snapshot.
    pub restores: u32,
    /// The host's CLOCK_REALTIME halfway between sending CLOCK_GET and
    /// receiving CLOCK, nanoseconds since the epoch: the best estimate of
    /// the host's time when the guest read its clock.
    pub host_ns: i64,
    /// The request's round trip (the offset is uncertain by half of it).
    pub round_trip: Duration,
}

impl GuestClock {
    /// Guest minus host, nanoseconds: positive when the guest is ahead.
    pub fn offset_ns(&self) -> i64 {
        self.realtime_ns.saturating_sub(self.host_ns)
    }
}

/// What [`Client::set_clock`] did: the guest's clock just before and just
/// after it was stepped (CLOCK_SET_DONE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockStep {
    /// The guest's CLOCK_REALTIME just before, ns since the epoch.
    pub old_ns: i64,
    /// Just after.
    pub new_ns: i64,
}

impl ClockStep {
    /// How far the clock was stepped (new minus old), nanoseconds.
    pub fn step_ns(&self) -> i64 {
        self.new_ns.saturating_sub(self.old_ns)
    }
}

/// `t` as nanoseconds since the epoch (negative before it), saturating.
pub fn system_time_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

impl Client {
    /// Sends one request under a fresh id and waits for its one reply.
    pub(super) fn request(
        &self,
        encode: impl FnOnce(u32, &mut Vec<u8>) -> std::result::Result<(), crate::messages::EncodeError>,
    ) -> Result<Routed> {
        let (id, rx) = self.request_id()?;
        let shared = &self.conn.shared;
        let sent = shared.send_with(|buf| encode(id, buf));
        let reply = sent.and_then(|()| {
            rx.recv()
                .map_err(|_| shared.closed_error().unwrap_or_else(Error::closed))
        });
        shared.unregister(id);
        reply
    }

    /// Takes an id for a request (LIST, CLOCK_GET, ...): routed like a
    /// session's, with no stdin and no handles.
    pub(super) fn request_id(&self) -> Result<(u32, mpsc::Receiver<Routed>)> {
        let (id, _, rx) = self.conn.shared.register(|id| {
            Arc::new(SessionShared::new(
                id,
                SessState {
                    stdin_credit: 0,
                    stdin_window: 0,
                    stdin_chunk: 1,
                    stdin_closed: true,
                    ended: false,
                    closed: false,
                    detached: false,
                    output_window: 0,
                    handles: 0,
                    lost: None,
                },
            ))
        })?;
        Ok((id, rx))
    }

    fn clock_request(&self, msg: ClockMsg<'_>) -> Result<ClockReply> {
        let kind = msg.kind();
        match self.request(|id, buf| Message::Clock(msg).encode(id, buf))? {
            Routed::Clock(reply) => Ok(reply),
            Routed::Error(e) => Err(Error::Protocol(e)),
            other => Err(Error::AgentViolation(format!(
                "{other:?} in answer to {kind:?}"
            ))),
        }
    }

    /// Reads the guest's clocks (CLOCK_GET), with the host's time at the
    /// same moment: [`GuestClock::offset_ns`] is the guest's skew. An agent
    /// without the `clock` extension answers ERROR `unknown_kind`
    /// ([`Error::Protocol`]).
    ///
    /// ```no_run
    /// # fn main() -> Result<(), agentd::client::Error> {
    /// let client = agentd::client::Client::connect("hvsock:/run/fc/v.sock:1024")?;
    /// let clock = client.clock()?;
    /// if clock.offset_ns().abs() > 50_000_000 {
    ///     client.sync_clock()?; // served by a VM's init only
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn clock(&self) -> Result<GuestClock> {
        let sent_at = SystemTime::now();
        let start = Instant::now();
        let reply = self.clock_request(ClockMsg::Get)?;
        let round_trip = start.elapsed();
        let ClockReply::Clock(c) = reply else {
            return Err(Error::AgentViolation(format!(
                "{reply:?} in answer to CLOCK_GET"
            )));
        };
        Ok(GuestClock {
            realtime_ns: c.realtime_ns,
            boottime_ns: c.boottime_ns,
            restores: c.restores,
            host_ns: system_time_ns(sent_at + round_trip / 2),
            round_trip,
        })
    }

    /// Steps the guest's wall clock to `to` (CLOCK_SET). Served only by an
    /// agent that is a VM's init or runs with `--allow-clock` (READY's
    /// `clock_set`); any other answers ERROR `not_permitted`, so an agent
    /// on a developer's machine never changes that machine's clock.
    pub fn set_clock(&self, to: SystemTime) -> Result<ClockStep> {
        self.set_clock_ns(system_time_ns(to))
    }

    /// [`set_clock`](Self::set_clock) in nanoseconds since the epoch.
    pub fn set_clock_ns(&self, realtime_ns: i64) -> Result<ClockStep> {
        match self.clock_request(ClockMsg::Set(ClockSet { realtime_ns }))? {
            ClockReply::SetDone(d) => Ok(ClockStep {
                old_ns: d.old_ns,
                new_ns: d.new_ns,
            }),
            other => Err(Error::AgentViolation(format!(
                "{other:?} in answer to CLOCK_SET"
            ))),
        }
    }

    /// Sets the guest's wall clock to the host's: the host's time plus half
    /// a round trip (measured with a CLOCK_GET first), so that it is right
    /// when the agent applies it. As [`set_clock`](Self::set_clock).
    pub fn sync_clock(&self) -> Result<ClockStep> {
        let rtt = self.clock()?.round_trip;
        self.set_clock(SystemTime::now() + rtt / 2)
    }

    /// What the client does after READY unless
    /// [`Builder::clock_sync`](super::Builder::clock_sync) turned it off:
    /// when the agent serves CLOCK_SET (READY's `clock_set`), sets the
    /// guest's clock to the host's and feeds it [`SYNC_ENTROPY_BYTES`] of
    /// the host's randomness, so a VM restored from a snapshot has neither
    /// a stale clock nor a cloned entropy pool. Failures are logged (with
    /// `tracing`): the connection stays usable.
    pub(super) fn sync_after_ready(&self) {
        if self.ready().clock_set != Some(true) {
            return;
        }
        match self.sync_clock() {
            Ok(step) => tracing::info!(step_ns = step.step_ns(), "guest clock set to the host's"),
            Err(e) => tracing::warn!("cannot set the guest's clock: {e}"),
        }
        let mut seed = [0u8; SYNC_ENTROPY_BYTES];
        match fill_random(&mut seed) {
            Ok(()) => {
                if let Err(e) = self.entropy(&seed) {
                    tracing::warn!("cannot feed the guest's entropy pool: {e}");
                }
            }
            Err(e) => tracing::warn!("no host randomness for the guest: {e}"),
        }
    }

    /// Adds `data` to the guest kernel's entropy pool, credited (ENTROPY,
    /// [`ENTROPY_CHUNK`] bytes per frame); returns the bytes added. Served
    /// as [`set_clock`](Self::set_clock) is. Empty `data` is refused here.
    pub fn entropy(&self, data: &[u8]) -> Result<u64> {
        if data.is_empty() {
            return Err(Error::InvalidArgument(
                "entropy needs at least one byte".into(),
            ));
        }
        let mut added = 0u64;
        for chunk in data.chunks(ENTROPY_CHUNK) {
            match self.clock_request(ClockMsg::Entropy(chunk))? {
                ClockReply::EntropyDone(d) => added += u64::from(d.bytes),
                other => {
                    return Err(Error::AgentViolation(format!(
                        "{other:?} in answer to ENTROPY"
                    )))
                }
            }
        }
        Ok(added)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_nanos() {
        assert_eq!(system_time_ns(UNIX_EPOCH), 0);
        assert_eq!(
            system_time_ns(UNIX_EPOCH + Duration::from_millis(1500)),
            1_500_000_000
        );
        assert_eq!(
            system_time_ns(UNIX_EPOCH - Duration::from_secs(1)),
            -1_000_000_000
        );
    }
}
