//! The `clock` extension (kinds 0x70–0x7F): the guest's clock and entropy,
//! for a VM restored from a snapshot. See docs/PROTOCOL.md, "Extension
//! clock".

use serde::{Deserialize, Serialize};

use super::{append_bytes, append_map, check_empty, decode_map, EncodeError, Kind, ProtocolError};

/// CLOCK: the guest's clocks now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clock {
    /// CLOCK_REALTIME, nanoseconds since the epoch.
    pub realtime_ns: i64,
    /// CLOCK_BOOTTIME, nanoseconds since boot.
    pub boottime_ns: u64,
    /// How many times the agent has seen the VM restored.
    pub restores: u32,
}

/// CLOCK_SET: step the guest's wall clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockSet {
    /// CLOCK_REALTIME to set, nanoseconds since the epoch.
    pub realtime_ns: i64,
}

/// CLOCK_SET_DONE: the clock was stepped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockSetDone {
    /// The guest's clock just before, and just after.
    pub old_ns: i64,
    pub new_ns: i64,
}

/// ENTROPY_DONE: the bytes were added to the guest's entropy pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntropyDone {
    pub bytes: u32,
}

/// A decoded frame of the clock extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClockMsg<'a> {
    Get,
    Clock(Clock),
    Set(ClockSet),
    SetDone(ClockSetDone),
    Entropy(&'a [u8]),
    EntropyDone(EntropyDone),
}

impl<'a> ClockMsg<'a> {
    /// The frame kind of this message.
    pub fn kind(&self) -> Kind {
        match self {
            ClockMsg::Get => Kind::ClockGet,
            ClockMsg::Clock(_) => Kind::Clock,
            ClockMsg::Set(_) => Kind::ClockSet,
            ClockMsg::SetDone(_) => Kind::ClockSetDone,
            ClockMsg::Entropy(_) => Kind::Entropy,
            ClockMsg::EntropyDone(_) => Kind::EntropyDone,
        }
    }

    /// Decodes a payload of `kind` (one of this extension's kinds).
    pub(crate) fn decode(kind: Kind, p: &'a [u8]) -> Result<Self, ProtocolError> {
        Ok(match kind {
            Kind::ClockGet => {
                check_empty(kind, p)?;
                ClockMsg::Get
            }
            Kind::Clock => ClockMsg::Clock(decode_map(kind, p)?),
            Kind::ClockSet => ClockMsg::Set(decode_map(kind, p)?),
            Kind::ClockSetDone => ClockMsg::SetDone(decode_map(kind, p)?),
            Kind::Entropy => ClockMsg::Entropy(p),
            Kind::EntropyDone => ClockMsg::EntropyDone(decode_map(kind, p)?),
            _ => return Err(ProtocolError::UnknownKind(kind as u8)),
        })
    }

    /// Appends this message as a frame with id `id`.
    pub(crate) fn encode(&self, id: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let kind = self.kind() as u8;
        match self {
            ClockMsg::Get => append_bytes(out, self.kind(), id, &[]),
            ClockMsg::Clock(m) => append_map(out, kind, id, m),
            ClockMsg::Set(m) => append_map(out, kind, id, m),
            ClockMsg::SetDone(m) => append_map(out, kind, id, m),
            ClockMsg::Entropy(p) => append_bytes(out, self.kind(), id, p),
            ClockMsg::EntropyDone(m) => append_map(out, kind, id, m),
        }
    }
}
