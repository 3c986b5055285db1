//! The `fs` extension in the loop: what its frames do to the agent's
//! tables, and how a task is serviced, reaped and ended.

use crate::messages::{FsError, FsErrorKind, FsMsg, FsRequest, Kind};

use super::super::core::{Child, Core, Owned};
use super::super::stream::InflowError;
use super::{check_request, error_frame, Progress, Task, MAX_TASKS};

impl Core {
    /// A frame of the fs extension from link `lk`.
    pub(crate) fn on_fs_frame(&mut self, lk: usize, id: u32, msg: FsMsg<'_>) {
        match msg {
            FsMsg::Request(req) => self.fs_request(lk, id, *req),
            FsMsg::DataAck(ack) => self.with_task(lk, id, Kind::FsDataAck, |core, key| {
                core.fs[key].ack(ack.bytes);
                core.service_fs(key);
                Ok(())
            }),
            FsMsg::Write(data) => self.with_task(lk, id, Kind::FsWrite, |core, key| {
                let window = core.config.stdin_window;
                let frames = core.links[lk].frames();
                core.fs[key]
                    .push_write(data, window, frames, &core.registry)
                    .map_err(|e| write_refusal(e, data.len()))
            }),
            FsMsg::End => self.with_task(lk, id, Kind::FsEnd, |core, key| {
                let frames = core.links[lk].frames();
                core.fs[key]
                    .end_write(frames, &core.registry)
                    .map_err(|_| {
                        (
                            crate::messages::ErrorKind::StdinClosed,
                            "FS_END was sent already, or the operation takes no data".to_owned(),
                        )
                    })?;
                core.service_fs(key);
                Ok(())
            }),
            FsMsg::Cancel => self.with_task(lk, id, Kind::FsCancel, |core, key| {
                core.fs[key].cancel();
                core.service_fs(key);
                Ok(())
            }),
            // decode_from_host lets only host → agent kinds through.
            FsMsg::Opened(_)
            | FsMsg::Data(_)
            | FsMsg::WriteAck(_)
            | FsMsg::Entries(_)
            | FsMsg::Events(_)
            | FsMsg::Done(_)
            | FsMsg::Error(_) => {}
        }
    }

    /// Runs `f` on the task `id` names on link `lk`, answering ERROR for an
    /// id that names none or for what `f` refuses.
    fn with_task(
        &mut self,
        lk: usize,
        id: u32,
        kind: Kind,
        f: impl FnOnce(&mut Core, usize) -> Result<(), (crate::messages::ErrorKind, String)>,
    ) {
        let Some(&Owned::Fs(key)) = self.ids.get(&(lk, id)) else {
            let msg = format!("no file operation with id {id}");
            let err = crate::messages::ErrorKind::UnknownSession;
            return self.send_error(lk, id, err, msg, Some(kind as u8));
        };
        if let Err((err, message)) = f(self, key) {
            self.send_error(lk, id, err, message, Some(kind as u8));
        }
    }

    /// FS_REQUEST: checks it and starts its worker.
    fn fs_request(&mut self, lk: usize, id: u32, req: FsRequest) {
        let refuse = |core: &mut Core, kind, message: String| {
            let e = FsError::new(kind, message, None, None);
            let frame = error_frame(id, &e);
            core.links[lk].frames().extend_from_slice(&frame);
        };
        if id == 0 {
            let msg = "id 0 is the connection's";
            return refuse(self, FsErrorKind::InvalidRequest, msg.into());
        }
        if self.ids.contains_key(&(lk, id)) {
            let msg = format!("id {id} is in use");
            return refuse(self, FsErrorKind::DuplicateId, msg);
        }
        if self.is_shutting_down() {
            let msg = "the agent is shutting down";
            return refuse(self, FsErrorKind::Cancelled, msg.into());
        }
        if self.fs.len() >= MAX_TASKS {
            let msg = format!("{MAX_TASKS} file operations are running, the agent's maximum");
            return refuse(self, FsErrorKind::Resource, msg);
        }
        let op = match check_request(&req) {
            Ok(op) => op,
            Err(e) => {
                let frame = error_frame(id, &e);
                return self.links[lk].frames().extend_from_slice(&frame);
            }
        };
        let seq = self.take_seq();
        let key = self.fs.vacant_key();
        match Task::start(req, op, id, lk, seq, key, &self.registry) {
            Ok(task) => {
                self.by_pid.insert(task.pid(), Child::FsWorker(key, seq));
                self.ids.insert((lk, id), Owned::Fs(key));
                self.fs.insert(task);
                self.service_fs(key);
            }
            Err(e) => {
                let frame = error_frame(id, &e);
                self.links[lk].frames().extend_from_slice(&frame);
            }
        }
    }

    /// Does what task `key` can do now; ends it when it is done.
    pub(crate) fn service_fs(&mut self, key: usize) {
        let Some(task) = self.fs.get_mut(key) else {
            return;
        };
        let Some(link) = self.links.get_mut(task.link()) else {
            return;
        };
        match task.service(&mut link.output(), &self.registry) {
            Progress::Idle => {}
            Progress::Stalled => {
                if task.mark_stalled() {
                    link.stall(Owned::Fs(key));
                }
            }
            Progress::Done => self.end_task(key),
        }
    }

    /// Frees an ended task's id. Its worker, if not yet reaped (it exits
    /// right after its final frame), is reaped later; its `by_pid` entry
    /// then finds no task of its number.
    fn end_task(&mut self, key: usize) {
        let mut task = self.fs.remove(key);
        task.close(&self.registry);
        self.ids.remove(&(task.link(), task.id()));
        self.after_session_gone();
    }

    /// A file worker was reaped.
    pub(crate) fn fs_worker_reaped(&mut self, key: usize, seq: u64, status: libc::c_int) {
        match self.fs.get_mut(key) {
            Some(task) if task.seq() == seq => {
                task.reaped(status);
                self.service_fs(key);
            }
            _ => tracing::debug!(key, "reaped the worker of an ended file operation"),
        }
    }

    /// The host of link `lk` went away: its file operations end, without
    /// a word to anyone (their workers are stopped and reaped).
    pub(crate) fn drop_link_tasks(&mut self, lk: usize) {
        let keys: Vec<usize> = self
            .fs
            .iter()
            .filter(|(_, t)| t.link() == lk)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            let mut task = self.fs.remove(key);
            task.cancel();
            task.close(&self.registry);
            self.ids.remove(&(lk, task.id()));
        }
    }

    /// A shutdown: every file operation is cancelled (each ends with its
    /// final frame as its worker exits).
    pub(crate) fn cancel_all_tasks(&mut self) {
        let keys: Vec<usize> = self.fs.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.fs[key].cancel();
            self.service_fs(key);
        }
    }
}

/// The ERROR for an FS_WRITE the operation's input refused.
fn write_refusal(e: InflowError, len: usize) -> (crate::messages::ErrorKind, String) {
    use crate::messages::ErrorKind;
    match e {
        InflowError::Closed => (
            ErrorKind::StdinClosed,
            "this operation takes no more data (FS_END was sent, or it takes none)".to_owned(),
        ),
        InflowError::WindowExceeded { in_use, window } => (
            ErrorKind::WindowExceeded,
            format!(
                "{len} bytes with {in_use} unacknowledged exceed the window of {window}; frame dropped"
            ),
        ),
    }
}
