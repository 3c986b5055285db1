//! A host of the `fs` extension (docs/PROTOCOL.md, "Extension `fs`") on
//! the loopback suite's [`Agent`]: requests built from [`req`], frames of
//! an operation collected until its final frame (FS_DONE or FS_ERROR),
//! data acknowledged as it comes (or not, for a host that does not read),
//! writes sent within READY's `stdin_window`. Frames are decoded with the
//! crate's own `agentd::messages` after the checker has passed them.

use std::time::Duration;

use agentd::codec::OwnedFrame;
use agentd::messages::{
    Ack, FsDone, FsEntry, FsError, FsEvent, FsMsg, FsRequest, FsStat, Kind, Message,
};

use super::agent::Agent;

/// An FS_REQUEST of `op` on `path`, every other key absent.
pub fn req(op: &str, path: impl AsRef<std::path::Path>) -> FsRequest {
    FsRequest {
        op: op.into(),
        path: path.as_ref().to_string_lossy().into_owned(),
        ..FsRequest::default()
    }
}

/// Whether `kind` is an agent → host kind of the fs extension.
pub fn is_fs_reply(kind: u8) -> bool {
    (Kind::FsOpened as u8..=Kind::FsError as u8).contains(&kind)
        && kind != Kind::FsDataAck as u8
        && kind != Kind::FsWrite as u8
        && kind != Kind::FsEnd as u8
}

/// Everything one operation sent, up to its final frame.
#[derive(Debug, Default)]
pub struct FsOutcome {
    pub opened: Option<Option<FsStat>>,
    pub data: Vec<u8>,
    pub entries: Vec<FsEntry>,
    pub events: Vec<FsEvent>,
    pub overflow: bool,
    /// Payload sizes of FS_DATA, FS_ENTRIES and FS_EVENTS frames.
    pub batch_sizes: Vec<usize>,
    pub write_acked: u64,
    pub result: Option<Result<FsDone, FsError>>,
    /// The kinds in order.
    pub kinds: Vec<u8>,
}

impl FsOutcome {
    #[track_caller]
    pub fn done(self) -> FsDone {
        match self.result {
            Some(Ok(d)) => d,
            other => panic!("expected FS_DONE, got {other:?}"),
        }
    }

    #[track_caller]
    pub fn error(&self) -> &FsError {
        match &self.result {
            Some(Err(e)) => e,
            other => panic!("expected FS_ERROR, got {other:?}"),
        }
    }

    /// Takes one frame of the operation in; true once it was the final one.
    pub fn take_frame(&mut self, f: &OwnedFrame) -> bool {
        self.take(f)
    }

    fn take(&mut self, f: &OwnedFrame) -> bool {
        self.kinds.push(f.kind);
        let Ok(Message::Fs(msg)) = Message::decode_from_agent(f.as_frame()) else {
            panic!("not an fs frame: {f:?}");
        };
        match msg {
            FsMsg::Opened(o) => self.opened = Some(o.stat),
            FsMsg::Data(d) => {
                self.batch_sizes.push(d.len());
                self.data.extend_from_slice(d);
            }
            FsMsg::WriteAck(a) => self.write_acked += u64::from(a.bytes),
            FsMsg::Entries(e) => {
                self.batch_sizes.push(f.payload.len());
                self.entries.extend(e.entries);
            }
            FsMsg::Events(e) => {
                self.batch_sizes.push(f.payload.len());
                self.overflow |= e.overflow;
                self.events.extend(e.events);
            }
            FsMsg::Done(d) => {
                self.result = Some(Ok(*d));
                return true;
            }
            FsMsg::Error(e) => {
                self.result = Some(Err(e));
                return true;
            }
            other => panic!("a host → agent fs message from the agent: {other:?}"),
        }
        false
    }
}

/// The fs operations of a host on an [`Agent`].
pub trait FsHost {
    fn fs_send(&self, id: u32, r: &FsRequest);
    fn fs_write_data(&self, id: u32, data: &[u8]);
    fn fs_end(&self, id: u32);
    fn fs_cancel(&self, id: u32);
    fn fs_ack(&self, id: u32, bytes: u32);
    /// The next frame of operation `id` (its kinds only), `None` after `limit`.
    fn fs_next(&mut self, id: u32, limit: Duration) -> Option<OwnedFrame>;
    /// Collects `id`'s frames until its final frame, acknowledging data.
    fn fs_collect(&mut self, id: u32) -> FsOutcome;
    /// Takes `id`'s frames into `out` until FS_OPENED (true) or the final
    /// frame (false).
    fn fs_until_opened(&mut self, id: u32, out: &mut FsOutcome) -> bool;
    /// Sends `r` on a new id and collects it.
    fn fs(&mut self, r: FsRequest) -> FsOutcome;
    /// A one-shot operation that must succeed.
    fn fs_ok(&mut self, r: FsRequest) -> FsDone;
    /// An operation that must fail with `kind`.
    fn fs_err(&mut self, r: FsRequest, kind: &str) -> FsError;
    /// Reads a whole file (or what `r` asks for).
    fn fs_read(&mut self, r: FsRequest) -> FsOutcome;
    /// A write of `data` (FS_WRITE within the window after FS_OPENED, then
    /// FS_END), collected.
    fn fs_write(&mut self, r: FsRequest, data: &[u8]) -> FsOutcome;
}

impl FsHost for Agent {
    fn fs_send(&self, id: u32, r: &FsRequest) {
        self.send(&Message::Fs(FsMsg::Request(Box::new(r.clone()))), id);
    }

    fn fs_write_data(&self, id: u32, data: &[u8]) {
        self.send(&Message::Fs(FsMsg::Write(data)), id);
    }

    fn fs_end(&self, id: u32) {
        self.send(&Message::Fs(FsMsg::End), id);
    }

    fn fs_cancel(&self, id: u32) {
        self.send(&Message::Fs(FsMsg::Cancel), id);
    }

    fn fs_ack(&self, id: u32, bytes: u32) {
        self.send(&Message::Fs(FsMsg::DataAck(Ack { bytes })), id);
    }

    fn fs_next(&mut self, id: u32, limit: Duration) -> Option<OwnedFrame> {
        self.recv_where_within(&|f| f.id == id && is_fs_reply(f.kind), limit)
    }

    #[track_caller]
    fn fs_collect(&mut self, id: u32) -> FsOutcome {
        let mut out = FsOutcome::default();
        loop {
            let f = self.recv_where(|f| f.id == id && is_fs_reply(f.kind), "an fs frame");
            let acked = match f.kind {
                k if k == Kind::FsData as u8
                    || k == Kind::FsEntries as u8
                    || k == Kind::FsEvents as u8 =>
                {
                    Some(f.payload.len() as u32)
                }
                _ => None,
            };
            if out.take(&f) {
                return out;
            }
            if let Some(n) = acked {
                self.fs_ack(id, n);
            }
        }
    }

    #[track_caller]
    fn fs_until_opened(&mut self, id: u32, out: &mut FsOutcome) -> bool {
        loop {
            let f = self.recv_where(|f| f.id == id && is_fs_reply(f.kind), "FS_OPENED");
            let opened = f.kind == Kind::FsOpened as u8;
            if out.take(&f) {
                return false;
            }
            if opened {
                return true;
            }
        }
    }

    #[track_caller]
    fn fs(&mut self, r: FsRequest) -> FsOutcome {
        let id = self.new_id();
        self.fs_send(id, &r);
        self.fs_collect(id)
    }

    #[track_caller]
    fn fs_ok(&mut self, r: FsRequest) -> FsDone {
        let what = format!("{} {}", r.op, r.path);
        match self.fs(r).result {
            Some(Ok(d)) => d,
            other => panic!("{what}: expected FS_DONE, got {other:?}"),
        }
    }

    #[track_caller]
    fn fs_err(&mut self, r: FsRequest, kind: &str) -> FsError {
        let what = format!("{} {}", r.op, r.path);
        match self.fs(r).result {
            Some(Err(e)) => {
                assert_eq!(e.kind, kind, "{what}: {e:?}");
                assert!(!e.message.is_empty(), "{what}: FS_ERROR without a message");
                assert!(e.message.len() <= 1024, "{what}: message over 1 KiB");
                e
            }
            other => panic!("{what}: expected FS_ERROR {kind}, got {other:?}"),
        }
    }

    #[track_caller]
    fn fs_read(&mut self, r: FsRequest) -> FsOutcome {
        self.fs(r)
    }

    #[track_caller]
    fn fs_write(&mut self, r: FsRequest, data: &[u8]) -> FsOutcome {
        let id = self.new_id();
        self.fs_send(id, &r);
        let mut out = FsOutcome::default();
        if !self.fs_until_opened(id, &mut out) {
            return out;
        }
        let window = u64::from(self.stdin_window());
        let mut sent = 0u64;
        for chunk in data.chunks(64 * 1024) {
            while sent + chunk.len() as u64 - out.write_acked > window {
                let f = self.recv_where(|f| f.id == id && is_fs_reply(f.kind), "FS_WRITE_ACK");
                if out.take(&f) {
                    return out;
                }
            }
            self.fs_write_data(id, chunk);
            sent += chunk.len() as u64;
        }
        self.fs_end(id);
        let rest = self.fs_collect(id);
        out.kinds.extend(rest.kinds);
        out.write_acked += rest.write_acked;
        out.result = rest.result;
        out
    }
}
