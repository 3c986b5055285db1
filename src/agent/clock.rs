//! The `clock` extension (docs/PROTOCOL.md, "Extension `clock`"): the
//! guest's clocks for a host, the wall clock stepped and entropy added
//! after a restore from a snapshot.
//!
//! CLOCK_SET and ENTROPY change the machine, so they are served only where
//! the machine is the agent's: as the init of a VM (PID 1 of the machine's
//! first pid namespace, on the init path), or with `--allow-clock`. An
//! agent on a developer's machine, or PID 1 of a test's pid namespace,
//! answers them with ERROR `not_permitted`, and never calls
//! `clock_settime`.
//!
//! Each is one system call (`clock_gettime`, `clock_settime`, an `ioctl`
//! on `/dev/urandom`), none of which blocks: they run on the loop.

use std::io;
use std::os::fd::AsRawFd;

use crate::messages::{Clock, ClockMsg, ClockSetDone, EntropyDone, ErrorKind, Kind};

use super::core::{push_map, Core};

/// The most bytes one ENTROPY may carry.
pub(crate) const MAX_ENTROPY: usize = 4096;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

impl Core {
    /// A frame of the clock extension from link `lk`. Replies carry the
    /// request's id; ids are not taken.
    pub(crate) fn on_clock_frame(&mut self, lk: usize, id: u32, msg: ClockMsg<'_>) {
        let frame_kind = Some(msg.kind() as u8);
        let result = match msg {
            ClockMsg::Get => Ok(self.clock_now()),
            ClockMsg::Set(s) => self.may_change_machine("CLOCK_SET").and_then(|()| {
                set_realtime(s.realtime_ns).map(|(old_ns, new_ns)| {
                    tracing::info!(old_ns, new_ns, "wall clock stepped by the host");
                    Reply::SetDone(ClockSetDone { old_ns, new_ns })
                })
            }),
            ClockMsg::Entropy(bytes) => self
                .may_change_machine("ENTROPY")
                .and_then(|()| add_entropy(bytes))
                .map(|n| Reply::EntropyDone(EntropyDone { bytes: n })),
            // decode_from_host lets only host → agent kinds through.
            ClockMsg::Clock(_) | ClockMsg::SetDone(_) | ClockMsg::EntropyDone(_) => return,
        };
        let Some(link) = self.links.get_mut(lk) else {
            return;
        };
        match result {
            Ok(Reply::Clock(c)) => push_map(link.frames(), Kind::Clock, id, &c),
            Ok(Reply::SetDone(d)) => push_map(link.frames(), Kind::ClockSetDone, id, &d),
            Ok(Reply::EntropyDone(d)) => push_map(link.frames(), Kind::EntropyDone, id, &d),
            Err((kind, message)) => self.send_error(lk, id, kind, message, frame_kind),
        }
    }

    fn clock_now(&self) -> Reply {
        Reply::Clock(Clock {
            realtime_ns: realtime_ns(),
            boottime_ns: boottime_ns(),
            restores: self.restores,
        })
    }

    fn may_change_machine(&self, what: &str) -> Result<(), (ErrorKind, String)> {
        if self.config.allow_clock {
            return Ok(());
        }
        Err((
            ErrorKind::NotPermitted,
            format!("{what} is served only by the init of a VM (or agentd --allow-clock): this agent does not change the machine it runs on"),
        ))
    }
}

enum Reply {
    Clock(Clock),
    SetDone(ClockSetDone),
    EntropyDone(EntropyDone),
}

fn now(clock: libc::clockid_t) -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime writes only
    // into it. Both clocks used here always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts
}

fn ns(ts: libc::timespec) -> i128 {
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// CLOCK_REALTIME in nanoseconds since the epoch (READY's `realtime_ns`).
pub(crate) fn realtime_ns() -> i64 {
    ns(now(libc::CLOCK_REALTIME)) as i64
}

fn boottime_ns() -> u64 {
    ns(now(libc::CLOCK_BOOTTIME)) as u64
}

/// Steps CLOCK_REALTIME to `target` ns: (the clock just before, just
/// after).
fn set_realtime(target: i64) -> Result<(i64, i64), (ErrorKind, String)> {
    let ts = libc::timespec {
        tv_sec: target.div_euclid(1_000_000_000),
        tv_nsec: target.rem_euclid(1_000_000_000),
    };
    let old = realtime_ns();
    // SAFETY: `ts` is a valid timespec the call only reads.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        let e = io::Error::last_os_error();
        let kind = match e.raw_os_error() {
            Some(libc::EINVAL) => ErrorKind::BadPayload,
            _ => ErrorKind::NotPermitted,
        };
        return Err((kind, format!("clock_settime to {target} ns: {e}")));
    }
    Ok((old, realtime_ns()))
}

/// Adds `bytes` to the kernel's pool, credited at 8 bits a byte.
fn add_entropy(bytes: &[u8]) -> Result<u32, (ErrorKind, String)> {
    if bytes.is_empty() || bytes.len() > MAX_ENTROPY {
        return Err((
            ErrorKind::BadPayload,
            format!(
                "ENTROPY carries 1 to {MAX_ENTROPY} bytes, not {}",
                bytes.len()
            ),
        ));
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len() + 3);
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    info.resize(8 + bytes.len().div_ceil(4) * 4, 0);
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| {
            (
                ErrorKind::NotPermitted,
                format!("opening /dev/urandom: {e}"),
            )
        })?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info of `buf_size` bytes of
    // data after its two ints; `info` holds exactly that, padded to whole
    // u32 words, and outlives the call.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } < 0 {
        let e = io::Error::last_os_error();
        return Err((ErrorKind::NotPermitted, format!("RNDADDENTROPY: {e}")));
    }
    Ok(bytes.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_read() {
        let a = realtime_ns();
        assert!(a > 1_600_000_000_000_000_000, "{a}");
        assert!(boottime_ns() > 0);
    }

    #[test]
    fn entropy_sizes_are_checked_before_anything_is_opened() {
        assert_eq!(add_entropy(&[]).unwrap_err().0, ErrorKind::BadPayload);
        let big = vec![0u8; MAX_ENTROPY + 1];
        assert_eq!(add_entropy(&big).unwrap_err().0, ErrorKind::BadPayload);
    }
}
