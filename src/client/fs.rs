//! The `fs` extension on the host side: an API shaped like `std::fs`
//! ([`Fs`], from [`super::Client::fs`]) over FS_REQUEST streams.
//!
//! Each call is one operation on an id of its own (docs/PROTOCOL.md,
//! "Extension fs"). One-shot operations wait for FS_DONE or FS_ERROR;
//! streamed ones are handles: [`FileReader`] and [`TarReader`] implement
//! `std::io::Read` and acknowledge FS_DATA only as the caller consumes it
//! (a caller that stops reading stops the agent's worker: memory stays
//! bounded by the request's window), [`FileWriter`] implements
//! `std::io::Write` and never has more than READY's `stdin_window` sent
//! and not acknowledged. [`ReadDir`] and [`Watch`] are iterators whose
//! batches are acknowledged as they are taken. Trees move as tar streams
//! ([`Fs::upload`], [`Fs::download`], and the raw archive forms); the
//! archive format is the `tar` crate's, as on the agent's side.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::conn::Conn;
use super::error::{Error, Result};
use super::stream::{Apply, Stream};
use crate::messages::{
    decode_map, Ack, ErrorMsg, FsDone, FsEntries, FsEntry, FsError, FsErrorKind, FsEvents, FsMsg,
    FsOp, FsOpened, FsRequest, FsStat, Kind, Message,
};

/// The frames that end an fs operation's id.
const FINALS: &[u8] = &[Kind::FsDone as u8, Kind::FsError as u8];

/// The most FS_WRITE payload in one frame.
const WRITE_CHUNK: usize = 64 * 1024;

/// How often a request is retried on a fresh id when the agent says the id
/// is in use (only a previous host's leftovers on a device port can do it).
const ID_RETRIES: usize = 16;

/// What the frames of one operation have said so far.
#[derive(Default)]
struct OpState {
    opened: Option<FsOpened>,
    data: VecDeque<Vec<u8>>,
    entries: VecDeque<(FsEntries, u32)>,
    events: VecDeque<(FsEvents, u32)>,
    write_credit: u32,
    /// FS_DONE or FS_ERROR (or the transport's end), once it came.
    done: Option<Result<FsDone>>,
    /// ERROR frames for this id (window_exceeded, ...): none is expected.
    errors: Vec<ErrorMsg>,
}

impl OpState {
    fn progressed(&self) -> bool {
        self.opened.is_some()
            || self.done.is_some()
            || !self.data.is_empty()
            || !self.entries.is_empty()
            || !self.events.is_empty()
    }
}

fn violation(kind: u8, e: impl std::fmt::Display) -> Error {
    Error::AgentViolation(format!("fs frame of kind {kind:#04x}: {e}"))
}

impl Apply for OpState {
    fn apply(&mut self, kind: u8, payload: Vec<u8>) {
        if self.done.is_some() {
            return;
        }
        let Some(k) = Kind::from_u8(kind) else {
            self.done = Some(Err(violation(kind, "unknown kind")));
            return;
        };
        match k {
            // The payload is the data: keep it without a copy.
            Kind::FsData => {
                if !payload.is_empty() {
                    self.data.push_back(payload);
                }
                return;
            }
            Kind::Error => {
                match decode_map::<ErrorMsg>(k, &payload) {
                    Ok(e) => {
                        tracing::warn!("agent error {}: {}", e.kind, e.message);
                        self.errors.push(e);
                    }
                    Err(e) => self.done = Some(Err(violation(kind, e))),
                }
                return;
            }
            _ => {}
        }
        let len = payload.len() as u32;
        match FsMsg::decode(k, &payload) {
            Ok(FsMsg::Opened(o)) => self.opened = Some(o),
            Ok(FsMsg::WriteAck(Ack { bytes })) => {
                self.write_credit = self.write_credit.saturating_add(bytes)
            }
            Ok(FsMsg::Entries(e)) => self.entries.push_back((e, len)),
            Ok(FsMsg::Events(e)) => self.events.push_back((e, len)),
            Ok(FsMsg::Done(d)) => self.done = Some(Ok(*d)),
            Ok(FsMsg::Error(e)) => self.done = Some(Err(Error::Fs(e))),
            Ok(other) => self.done = Some(Err(violation(kind, format!("{other:?}")))),
            Err(e) => self.done = Some(Err(violation(kind, e))),
        }
    }

    fn disconnected(&mut self, err: Error) {
        if self.done.is_none() {
            self.done = Some(Err(err));
        }
    }
}

/// One operation in flight.
struct Op {
    stream: Stream<OpState>,
    /// FS_DONE or FS_ERROR has been taken by the caller, or FS_CANCEL sent.
    ended: bool,
}

impl Op {
    /// Sends `req` on a fresh id and waits for its first frame (so that a
    /// failure to open is the caller's error, and a `duplicate_id` is
    /// retried on another id).
    fn start(conn: &Arc<Conn>, req: &FsRequest) -> Result<Op> {
        let shared = &conn.shared;
        if !shared
            .ready()
            .is_some_and(|r| r.features.iter().any(|f| f == "fs"))
        {
            return Err(Error::Unsupported("fs"));
        }
        let credit = shared.ready().map(|r| r.stdin_window).unwrap_or(0);
        for _ in 0..ID_RETRIES {
            let (id, rx) = shared.register_stream(FINALS)?;
            let msg = Message::Fs(FsMsg::Request(Box::new(req.clone())));
            if let Err(e) = shared.send(id, &msg) {
                shared.unregister_stream(id);
                return Err(e);
            }
            let state = OpState {
                write_credit: credit,
                ..OpState::default()
            };
            let op = Op {
                stream: Stream::new(conn.clone(), id, rx, state),
                ended: false,
            };
            let dup = op.stream.wait_for(|s| {
                s.progressed().then(|| {
                    matches!(&s.done, Some(Err(e))
                        if e.fs_error_kind() == Some(FsErrorKind::DuplicateId))
                })
            });
            if dup {
                tracing::debug!(id, "fs id in use on the agent; retrying");
                continue;
            }
            // Failed before anything else: the call fails (as File::open).
            let failed = op.stream.with(|s| {
                if s.opened.is_none() && matches!(s.done, Some(Err(_))) {
                    s.done.take()
                } else {
                    None
                }
            });
            if let Some(Err(e)) = failed {
                let mut op = op;
                op.ended = true;
                return Err(e);
            }
            return Ok(op);
        }
        Err(Error::AgentViolation(
            "FS_ERROR duplicate_id for every id tried".into(),
        ))
    }

    /// Waits for the final frame.
    fn finish(&mut self) -> Result<FsDone> {
        let r = self.stream.wait_for(|s| s.done.take());
        self.ended = true;
        r
    }

    /// The final result if it has come (data before it is still queued).
    fn take_done_if_drained(s: &mut OpState) -> Option<Result<FsDone>> {
        if s.data.is_empty() && s.entries.is_empty() && s.events.is_empty() {
            s.done.take()
        } else {
            None
        }
    }

    fn ack(&self, bytes: u32) {
        if bytes == 0 || self.ended || self.stream.with(|s| s.done.is_some()) {
            return;
        }
        let _ = self
            .stream
            .send(&Message::Fs(FsMsg::DataAck(Ack { bytes })));
    }

    fn cancel(&mut self) {
        if !self.ended {
            self.ended = true;
            if self.stream.with(|s| s.done.is_none()) {
                let _ = self.stream.send(&Message::Fs(FsMsg::Cancel));
            }
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        self.cancel();
    }
}

// ---------------------------------------------------------------------------
// Metadata.

/// What kind of file a path is (`st_mode & S_IFMT`, as the agent names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FileType {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A type this client does not know.
    Unknown,
}

impl FileType {
    fn parse(s: &str) -> FileType {
        match s {
            "file" => FileType::File,
            "dir" => FileType::Dir,
            "symlink" => FileType::Symlink,
            "fifo" => FileType::Fifo,
            "socket" => FileType::Socket,
            "char" => FileType::Char,
            "block" => FileType::Block,
            _ => FileType::Unknown,
        }
    }

    /// Whether it is a directory.
    pub fn is_dir(self) -> bool {
        self == FileType::Dir
    }

    /// Whether it is a regular file.
    pub fn is_file(self) -> bool {
        self == FileType::File
    }

    /// Whether it is a symbolic link.
    pub fn is_symlink(self) -> bool {
        self == FileType::Symlink
    }

    /// The agent's name for it (`file`, `dir`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            FileType::File => "file",
            FileType::Dir => "dir",
            FileType::Symlink => "symlink",
            FileType::Fifo => "fifo",
            FileType::Socket => "socket",
            FileType::Char => "char",
            FileType::Block => "block",
            FileType::Unknown => "unknown",
        }
    }
}

fn ns_to_time(ns: i64) -> SystemTime {
    let d = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH - d
    }
}

fn time_to_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

/// Metadata of a guest path, like `std::fs::Metadata` (with the Unix
/// extras as plain methods).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    stat: FsStat,
}

impl Metadata {
    /// From the agent's stat record.
    pub fn from_stat(stat: FsStat) -> Metadata {
        Metadata { stat }
    }

    /// The agent's stat record.
    pub fn stat(&self) -> &FsStat {
        &self.stat
    }

    /// The file type.
    pub fn file_type(&self) -> FileType {
        FileType::parse(&self.stat.kind)
    }

    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        self.file_type().is_dir()
    }

    /// Whether it is a regular file.
    pub fn is_file(&self) -> bool {
        self.file_type().is_file()
    }

    /// Whether it is a symbolic link (only from `symlink_metadata`).
    pub fn is_symlink(&self) -> bool {
        self.file_type().is_symlink()
    }

    /// The size in bytes.
    pub fn len(&self) -> u64 {
        self.stat.size
    }

    /// Whether the size is 0.
    pub fn is_empty(&self) -> bool {
        self.stat.size == 0
    }

    /// Permission bits with setuid, setgid and sticky (`st_mode & 0o7777`).
    pub fn mode(&self) -> u32 {
        self.stat.mode
    }

    /// The permissions, as std has them.
    pub fn permissions(&self) -> std::fs::Permissions {
        std::os::unix::fs::PermissionsExt::from_mode(self.stat.mode)
    }

    /// Owner.
    pub fn uid(&self) -> u32 {
        self.stat.uid
    }

    /// Group.
    pub fn gid(&self) -> u32 {
        self.stat.gid
    }

    /// Last modification.
    pub fn modified(&self) -> SystemTime {
        ns_to_time(self.stat.mtime_ns)
    }

    /// Last access.
    pub fn accessed(&self) -> SystemTime {
        ns_to_time(self.stat.atime_ns)
    }

    /// Last status change.
    pub fn changed(&self) -> SystemTime {
        ns_to_time(self.stat.ctime_ns)
    }

    /// Number of hard links.
    pub fn nlink(&self) -> u64 {
        self.stat.nlink
    }

    /// Inode number.
    pub fn ino(&self) -> u64 {
        self.stat.ino
    }

    /// A symlink's target (from `symlink_metadata` and listings).
    pub fn symlink_target(&self) -> Option<&str> {
        self.stat.target.as_deref()
    }
}

// ---------------------------------------------------------------------------
// The API.

/// File operations on the guest, shaped like `std::fs`; from
/// [`super::Client::fs`]. Paths are guest paths (a relative one is relative
/// to the user's home directory). Every operation runs with the agent's
/// credentials, or those of [`Fs::as_user`]'s user.
///
/// ```no_run
/// use agentd::client::Client;
///
/// # fn main() -> Result<(), agentd::client::Error> {
/// let client = Client::spawn_agent("target/debug/agentd")?;
/// let fs = client.fs();
/// fs.create_dir_all("/tmp/demo/sub")?;
/// fs.write("/tmp/demo/sub/hello.txt", b"hello\n")?;
/// assert_eq!(fs.read("/tmp/demo/sub/hello.txt")?, b"hello\n");
/// for entry in fs.read_dir("/tmp/demo")? {
///     println!("{}", entry?.file_name().to_string_lossy());
/// }
/// fs.remove_dir_all("/tmp/demo")?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Fs {
    conn: Arc<Conn>,
    user: Option<String>,
    window: Option<u32>,
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str().map(str::to_owned).ok_or_else(|| {
        Error::Fs(FsError::new(
            FsErrorKind::InvalidRequest,
            "guest paths must be valid UTF-8",
            None,
            Some(p.to_string_lossy().into_owned()),
        ))
    })
}

/// An error the client reports itself, typed like the agent's.
fn local_error(kind: FsErrorKind, errno: i32, path: &str, what: &str) -> Error {
    Error::Fs(FsError::new(
        kind,
        what.to_owned(),
        Some(errno),
        Some(path.to_owned()),
    ))
}

impl Fs {
    pub(crate) fn new(conn: Arc<Conn>) -> Fs {
        Fs {
            conn,
            user: None,
            window: None,
        }
    }

    /// The same operations as `user` (`name`, `uid`, `name:group`,
    /// `uid:gid`): the kernel's permission checks apply as for a process
    /// of that user.
    pub fn as_user(&self, user: impl Into<String>) -> Fs {
        Fs {
            user: Some(user.into()),
            ..self.clone()
        }
    }

    /// The agent → host window of streamed operations (reads, listings,
    /// downloads, watches); default the agent's (1 MiB). 0 is refused by
    /// the agent (`invalid_request`).
    pub fn with_window(&self, window: u32) -> Fs {
        Fs {
            window: Some(window),
            ..self.clone()
        }
    }

    fn request(&self, op: FsOp, path: &Path) -> Result<FsRequest> {
        let mut req = FsRequest::new(op, path_str(path)?);
        req.user = self.user.clone();
        req.window = self.window;
        Ok(req)
    }

    fn start(&self, req: &FsRequest) -> Result<Op> {
        Op::start(&self.conn, req)
    }

    fn run(&self, req: &FsRequest) -> Result<FsDone> {
        self.start(req)?.finish()
    }

    /// The metadata of `path`, following symlinks (`stat`).
    pub fn metadata(&self, path: impl AsRef<Path>) -> Result<Metadata> {
        self.stat_op(FsOp::Stat, path.as_ref())
    }

    /// The metadata of `path` itself, a symlink not followed (`lstat`).
    pub fn symlink_metadata(&self, path: impl AsRef<Path>) -> Result<Metadata> {
        self.stat_op(FsOp::Lstat, path.as_ref())
    }

    fn stat_op(&self, op: FsOp, path: &Path) -> Result<Metadata> {
        let done = self.run(&self.request(op, path)?)?;
        done.stat
            .map(Metadata::from_stat)
            .ok_or_else(|| Error::AgentViolation("FS_DONE of a stat without `stat`".into()))
    }

    /// Whether `path` exists (a broken symlink does not).
    pub fn exists(&self, path: impl AsRef<Path>) -> Result<bool> {
        match self.metadata(path) {
            Ok(_) => Ok(true),
            Err(e) if e.fs_error_kind() == Some(FsErrorKind::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The whole file.
    pub fn read(&self, path: impl AsRef<Path>) -> Result<Vec<u8>> {
        let mut r = self.open(path)?;
        let mut buf = Vec::with_capacity(r.len().map_or(0, |n| n.min(1 << 24) as usize));
        r.read_to_end_checked(&mut buf)?;
        Ok(buf)
    }

    /// The whole file, which must be UTF-8.
    pub fn read_to_string(&self, path: impl AsRef<Path>) -> Result<String> {
        let path = path.as_ref();
        let bytes = self.read(path)?;
        String::from_utf8(bytes).map_err(|_| {
            Error::Fs(FsError::new(
                FsErrorKind::InvalidRequest,
                "the file is not valid UTF-8",
                None,
                Some(path.to_string_lossy().into_owned()),
            ))
        })
    }

    /// Opens the file for reading as a stream.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<FileReader> {
        self.open_range(path, 0, None)
    }

    /// Opens `length` bytes (at most; `None`: to the end) from `offset`.
    pub fn open_range(
        &self,
        path: impl AsRef<Path>,
        offset: u64,
        length: Option<u64>,
    ) -> Result<FileReader> {
        let mut req = self.request(FsOp::Read, path.as_ref())?;
        req.offset = (offset > 0).then_some(offset);
        req.length = length;
        let op = self.start(&req)?;
        let stat = op
            .stream
            .with(|s| s.opened.as_ref().and_then(|o| o.stat.clone()));
        Ok(FileReader {
            inner: DataReader::new(op),
            stat: stat.map(Metadata::from_stat),
        })
    }

    /// Writes `contents` to the file, creating it (mode 0o644) or
    /// truncating it.
    pub fn write(&self, path: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> Result<()> {
        let mut w = self.create(path)?;
        w.write_all_checked(contents.as_ref())?;
        w.finish().map(|_| ())
    }

    /// Opens the file for writing, created or truncated, like
    /// `std::fs::File::create`. Call [`FileWriter::finish`] at the end.
    pub fn create(&self, path: impl AsRef<Path>) -> Result<FileWriter> {
        self.options().open(path)
    }

    /// Options for writing a file, like `std::fs::OpenOptions`.
    pub fn options(&self) -> OpenOptions {
        OpenOptions {
            fs: self.clone(),
            create: true,
            exclusive: false,
            append: false,
            atomic: false,
            parents: false,
            mode: None,
        }
    }

    /// The entries of a directory (not `.` and `..`), streamed in batches.
    pub fn read_dir(&self, path: impl AsRef<Path>) -> Result<ReadDir> {
        self.list(path.as_ref(), false)
    }

    /// As [`Fs::read_dir`], each entry with its metadata (lstat).
    pub fn read_dir_with_metadata(&self, path: impl AsRef<Path>) -> Result<ReadDir> {
        self.list(path.as_ref(), true)
    }

    fn list(&self, path: &Path, stat: bool) -> Result<ReadDir> {
        let mut req = self.request(FsOp::List, path)?;
        req.stat = stat.then_some(true);
        Ok(ReadDir {
            op: self.start(&req)?,
            dir: path.to_path_buf(),
            batch: VecDeque::new(),
            batch_bytes: 0,
            done: false,
        })
    }

    /// Creates a directory (mode 0o755); its parent must exist.
    pub fn create_dir(&self, path: impl AsRef<Path>) -> Result<()> {
        self.run(&self.request(FsOp::Mkdir, path.as_ref())?)
            .map(|_| ())
    }

    /// Creates a directory and its missing parents; an existing directory
    /// is no error.
    pub fn create_dir_all(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut req = self.request(FsOp::Mkdir, path.as_ref())?;
        req.parents = Some(true);
        self.run(&req).map(|_| ())
    }

    /// Creates a directory with permission bits `mode`.
    pub fn create_dir_mode(&self, path: impl AsRef<Path>, mode: u32, parents: bool) -> Result<()> {
        let mut req = self.request(FsOp::Mkdir, path.as_ref())?;
        req.parents = parents.then_some(true);
        req.mode = Some(mode);
        self.run(&req).map(|_| ())
    }

    /// Removes a file or symlink (a directory is `is_a_directory`, as
    /// with `std::fs::remove_file`).
    pub fn remove_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        if self.symlink_metadata(path)?.is_dir() {
            return Err(local_error(
                FsErrorKind::IsADirectory,
                libc::EISDIR,
                &path.to_string_lossy(),
                "is a directory (use remove_dir or remove_dir_all)",
            ));
        }
        self.remove_op(path, false)
    }

    /// Removes an empty directory (anything else is `not_a_directory`).
    pub fn remove_dir(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        if !self.symlink_metadata(path)?.is_dir() {
            return Err(local_error(
                FsErrorKind::NotADirectory,
                libc::ENOTDIR,
                &path.to_string_lossy(),
                "not a directory (use remove_file)",
            ));
        }
        self.remove_op(path, false)
    }

    /// Removes a directory and everything in it (or a file or symlink).
    pub fn remove_dir_all(&self, path: impl AsRef<Path>) -> Result<()> {
        self.remove_op(path.as_ref(), true)
    }

    /// Removes whatever `path` is: a file, a symlink, an empty directory,
    /// or with `recursive` a whole tree (the wire's `remove`).
    pub fn remove(&self, path: impl AsRef<Path>, recursive: bool) -> Result<()> {
        self.remove_op(path.as_ref(), recursive)
    }

    fn remove_op(&self, path: &Path, recursive: bool) -> Result<()> {
        let mut req = self.request(FsOp::Remove, path)?;
        req.recursive = recursive.then_some(true);
        self.run(&req).map(|_| ())
    }

    /// Renames `from` to `to`, replacing an existing `to`.
    pub fn rename(&self, from: impl AsRef<Path>, to: impl AsRef<Path>) -> Result<()> {
        self.rename_with(from, to, true)
    }

    /// Renames; with `replace` false an existing `to` is `exists`.
    pub fn rename_with(
        &self,
        from: impl AsRef<Path>,
        to: impl AsRef<Path>,
        replace: bool,
    ) -> Result<()> {
        let mut req = self.request(FsOp::Rename, from.as_ref())?;
        req.to = Some(path_str(to.as_ref())?);
        req.replace = (!replace).then_some(false);
        self.run(&req).map(|_| ())
    }

    /// Sets the permission bits (`chmod`; `mode` up to 0o7777).
    pub fn set_permissions(&self, path: impl AsRef<Path>, mode: u32) -> Result<()> {
        let mut req = self.request(FsOp::Chmod, path.as_ref())?;
        req.mode = Some(mode);
        self.run(&req).map(|_| ())
    }

    /// Changes owner and/or group (`None`: unchanged), following a symlink.
    pub fn chown(&self, path: impl AsRef<Path>, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        self.chown_op(path.as_ref(), uid, gid, true)
    }

    /// As [`Fs::chown`], on a symlink itself.
    pub fn lchown(&self, path: impl AsRef<Path>, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        self.chown_op(path.as_ref(), uid, gid, false)
    }

    fn chown_op(
        &self,
        path: &Path,
        uid: Option<u32>,
        gid: Option<u32>,
        follow: bool,
    ) -> Result<()> {
        let mut req = self.request(FsOp::Chown, path)?;
        req.uid = uid;
        req.gid = gid;
        req.follow = (!follow).then_some(false);
        self.run(&req).map(|_| ())
    }

    /// Sets access and/or modification times (`None`: unchanged), with
    /// nanoseconds, following a symlink.
    pub fn set_times(
        &self,
        path: impl AsRef<Path>,
        accessed: Option<SystemTime>,
        modified: Option<SystemTime>,
    ) -> Result<()> {
        self.utimes(path.as_ref(), accessed, modified, true)
    }

    /// As [`Fs::set_times`], on a symlink itself.
    pub fn set_symlink_times(
        &self,
        path: impl AsRef<Path>,
        accessed: Option<SystemTime>,
        modified: Option<SystemTime>,
    ) -> Result<()> {
        self.utimes(path.as_ref(), accessed, modified, false)
    }

    fn utimes(
        &self,
        path: &Path,
        accessed: Option<SystemTime>,
        modified: Option<SystemTime>,
        follow: bool,
    ) -> Result<()> {
        let mut req = self.request(FsOp::Utimes, path)?;
        req.atime_ns = accessed.map(time_to_ns);
        req.mtime_ns = modified.map(time_to_ns);
        req.follow = (!follow).then_some(false);
        self.run(&req).map(|_| ())
    }

    /// Creates a symlink at `link` pointing to `target` (argument order as
    /// `std::os::unix::fs::symlink`).
    pub fn symlink(&self, target: impl AsRef<Path>, link: impl AsRef<Path>) -> Result<()> {
        let mut req = self.request(FsOp::Symlink, link.as_ref())?;
        req.target = Some(path_str(target.as_ref())?);
        self.run(&req).map(|_| ())
    }

    /// A symlink's target.
    pub fn read_link(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        self.path_op(FsOp::Readlink, path.as_ref())
    }

    /// The absolute path with every symlink resolved (`realpath`).
    pub fn canonicalize(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        self.path_op(FsOp::Realpath, path.as_ref())
    }

    fn path_op(&self, op: FsOp, path: &Path) -> Result<PathBuf> {
        let done = self.run(&self.request(op, path)?)?;
        done.path
            .map(PathBuf::from)
            .ok_or_else(|| Error::AgentViolation(format!("FS_DONE of {op:?} without `path`")))
    }

    /// Watches `path` (with `recursive`, its subdirectories too, including
    /// ones created later) until the [`Watch`] is cancelled or dropped.
    pub fn watch(&self, path: impl AsRef<Path>, recursive: bool) -> Result<Watch> {
        let mut req = self.request(FsOp::Watch, path.as_ref())?;
        req.recursive = recursive.then_some(true);
        Ok(Watch {
            op: self.start(&req)?,
            batch: VecDeque::new(),
            batch_bytes: 0,
            done: false,
        })
    }

    // -- trees --------------------------------------------------------------

    /// The tree at `path` (a directory, a file, a symlink) as a tar stream
    /// (`tar_get`): entries named `NAME`, `NAME/...` after `path`'s last
    /// component; symlinks are not followed.
    pub fn tar_reader(&self, path: impl AsRef<Path>) -> Result<TarReader> {
        let op = self.start(&self.request(FsOp::TarGet, path.as_ref())?)?;
        let stat = op
            .stream
            .with(|s| s.opened.as_ref().and_then(|o| o.stat.clone()));
        Ok(TarReader {
            inner: DataReader::new(op),
            stat: stat.map(Metadata::from_stat),
        })
    }

    /// Writes the tar stream of `path` to `out`; returns the bytes written.
    pub fn download_tar(&self, path: impl AsRef<Path>, mut out: impl Write) -> Result<u64> {
        let mut r = self.tar_reader(path)?;
        copy_checked(&mut r, &mut out)
    }

    /// Extracts a tar stream into the guest directory `dir` (`tar_put`):
    /// see [`TarOptions`].
    pub fn upload_tar(
        &self,
        dir: impl AsRef<Path>,
        archive: impl Read,
        options: TarOptions,
    ) -> Result<TreeDone> {
        let mut w = self.tar_writer(dir, options)?;
        let mut archive = archive;
        copy_into_writer(&mut archive, &mut w)?;
        w.finish()
    }

    /// A writer for a tar stream that the agent extracts into `dir`.
    pub fn tar_writer(&self, dir: impl AsRef<Path>, options: TarOptions) -> Result<FileWriter> {
        let mut req = self.request(FsOp::TarPut, dir.as_ref())?;
        req.parents = options.parents.then_some(true);
        req.owners = options.owners.then_some(true);
        FileWriter::start(self.start(&req)?)
    }

    /// Copies the local tree `local` (a directory, a file or a symlink)
    /// to the guest path `remote`, which becomes the copy (a directory is
    /// created with missing parents, or merged into when it exists; a file
    /// is replaced). Modes, times, symlinks and empty directories are kept;
    /// owners only with `options.owners`.
    pub fn upload(
        &self,
        local: impl AsRef<Path>,
        remote: impl AsRef<Path>,
        options: TarOptions,
    ) -> Result<TreeDone> {
        super::tree::upload(self, local.as_ref(), remote.as_ref(), options, &mut |_| {})
    }

    /// As [`Fs::upload`], calling `progress` with the archive bytes sent
    /// since its last call (for a progress bar).
    pub fn upload_with_progress(
        &self,
        local: impl AsRef<Path>,
        remote: impl AsRef<Path>,
        options: TarOptions,
        progress: &mut dyn FnMut(u64),
    ) -> Result<TreeDone> {
        super::tree::upload(self, local.as_ref(), remote.as_ref(), options, progress)
    }

    /// As [`Fs::download`], calling `progress` with the archive bytes
    /// received since its last call.
    pub fn download_with_progress(
        &self,
        remote: impl AsRef<Path>,
        local: impl AsRef<Path>,
        options: TarOptions,
        progress: &mut dyn FnMut(u64),
    ) -> Result<TreeDone> {
        super::tree::download(self, remote.as_ref(), local.as_ref(), options, progress)
    }

    /// Copies the guest tree `remote` to the local path `local`, which
    /// becomes the copy (a directory is created or merged into; a file is
    /// replaced). Modes, times, symlinks, hard links and empty directories
    /// are kept; owners only with `options.owners` (and the rights to).
    pub fn download(
        &self,
        remote: impl AsRef<Path>,
        local: impl AsRef<Path>,
        options: TarOptions,
    ) -> Result<TreeDone> {
        super::tree::download(self, remote.as_ref(), local.as_ref(), options, &mut |_| {})
    }
}

/// How a tree moves (tar_put's keys, and the same choices for downloads).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TarOptions {
    /// Create missing parent directories of the destination.
    pub parents: bool,
    /// Keep the archive's uid and gid (the agent needs a root `user` for
    /// it; locally, the rights to chown).
    pub owners: bool,
}

/// What a tree transfer moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeDone {
    /// Archive bytes.
    pub bytes: u64,
    /// Entries (files, directories, links).
    pub entries: u64,
}

fn io_err(e: Error) -> io::Error {
    e.into()
}

/// The `Error` inside an io::Error made from one, or the io::Error as a
/// local failure.
pub(crate) fn from_io(e: io::Error) -> Error {
    if !e.get_ref().is_some_and(|r| r.is::<Error>()) {
        return Error::Io {
            context: "local I/O".into(),
            source: e,
        };
    }
    let kind = e.kind();
    match e.into_inner().map(|inner| inner.downcast::<Error>()) {
        Some(Ok(err)) => *err,
        Some(Err(other)) => Error::Io {
            context: "local I/O".into(),
            source: io::Error::new(kind, other),
        },
        None => Error::Io {
            context: "local I/O".into(),
            source: io::Error::from(kind),
        },
    }
}

fn copy_checked(r: &mut impl Read, w: &mut impl Write) -> Result<u64> {
    io::copy(r, w).map_err(from_io)
}

fn copy_into_writer(r: &mut impl Read, w: &mut FileWriter) -> Result<u64> {
    let mut buf = vec![0u8; WRITE_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(from_io(e)),
        };
        w.write_all_checked(&buf[..n])?;
        total += n as u64;
    }
}

// ---------------------------------------------------------------------------
// Reading.

/// FS_DATA as a byte stream, acknowledged chunk by chunk as consumed.
struct DataReader {
    op: Op,
    cur: Vec<u8>,
    pos: usize,
    done: Option<FsDone>,
}

impl DataReader {
    fn new(op: Op) -> DataReader {
        DataReader {
            op,
            cur: Vec::new(),
            pos: 0,
            done: None,
        }
    }

    fn read_checked(&mut self, buf: &mut [u8]) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos < self.cur.len() {
                let n = buf.len().min(self.cur.len() - self.pos);
                buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
                self.pos += n;
                if self.pos == self.cur.len() {
                    // The whole chunk is the caller's now: return its window.
                    self.op.ack(self.cur.len() as u32);
                }
                return Ok(n);
            }
            if self.done.is_some() {
                return Ok(0);
            }
            enum Next {
                Chunk(Vec<u8>),
                Done(Result<FsDone>),
            }
            let next = self.op.stream.wait_for(|s| {
                if let Some(c) = s.data.pop_front() {
                    return Some(Next::Chunk(c));
                }
                s.done.take().map(Next::Done)
            });
            match next {
                Next::Chunk(c) => {
                    self.cur = c;
                    self.pos = 0;
                }
                Next::Done(r) => {
                    self.op.ended = true;
                    self.done = Some(r?);
                }
            }
        }
    }
}

/// A guest file being read: `std::io::Read`. Dropping it before the end
/// cancels the read.
pub struct FileReader {
    inner: DataReader,
    stat: Option<Metadata>,
}

impl FileReader {
    /// The open file's metadata (from FS_OPENED).
    pub fn metadata(&self) -> Option<&Metadata> {
        self.stat.as_ref()
    }

    /// The file's size, when the agent gave it.
    pub fn len(&self) -> Option<u64> {
        self.stat.as_ref().map(Metadata::len)
    }

    /// Whether the file is empty (when the agent gave its size).
    pub fn is_empty(&self) -> Option<bool> {
        self.len().map(|n| n == 0)
    }

    /// Reads to the end with the client's typed errors.
    pub fn read_to_end_checked(&mut self, buf: &mut Vec<u8>) -> Result<u64> {
        let mut chunk = vec![0u8; WRITE_CHUNK];
        let mut total = 0u64;
        loop {
            let n = self.inner.read_checked(&mut chunk)?;
            if n == 0 {
                return Ok(total);
            }
            buf.extend_from_slice(&chunk[..n]);
            total += n as u64;
        }
    }

    /// The bytes the agent reported at the end (once read to the end).
    pub fn bytes_done(&self) -> Option<u64> {
        self.inner.done.as_ref().and_then(|d| d.bytes)
    }
}

impl Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read_checked(buf).map_err(io_err)
    }
}

/// A guest tree as a tar stream: `std::io::Read` (see [`Fs::tar_reader`]).
/// Dropping it before the end cancels the transfer.
pub struct TarReader {
    inner: DataReader,
    stat: Option<Metadata>,
}

impl TarReader {
    /// The metadata of the tree's top (from FS_OPENED).
    pub fn metadata(&self) -> Option<&Metadata> {
        self.stat.as_ref()
    }

    /// Bytes and entries, once read to the end.
    pub fn done(&self) -> Option<TreeDone> {
        self.inner.done.as_ref().map(|d| TreeDone {
            bytes: d.bytes.unwrap_or(0),
            entries: d.entries.unwrap_or(0),
        })
    }
}

impl Read for TarReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read_checked(buf).map_err(io_err)
    }
}

// ---------------------------------------------------------------------------
// Writing.

/// How a file is written, like `std::fs::OpenOptions` (from
/// [`Fs::options`]). The default creates (mode 0o644) or truncates.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let client = agentd::client::Client::spawn_agent("agentd")?;
/// use std::io::Write;
/// let mut w = client.fs().options().atomic(true).mode(0o600).open("/etc/app.conf")?;
/// w.write_all(b"key = value\n")?;
/// w.finish()?; // renamed into place only now
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct OpenOptions {
    fs: Fs,
    create: bool,
    exclusive: bool,
    append: bool,
    atomic: bool,
    parents: bool,
    mode: Option<u32>,
}

impl OpenOptions {
    /// Create the file when missing (default true; false: `not_found`).
    pub fn create(&mut self, yes: bool) -> &mut Self {
        self.create = yes;
        self
    }

    /// The file must not exist (`exists` otherwise), like `create_new`.
    pub fn create_new(&mut self, yes: bool) -> &mut Self {
        self.exclusive = yes;
        self
    }

    /// Append instead of truncating.
    pub fn append(&mut self, yes: bool) -> &mut Self {
        self.append = yes;
        self
    }

    /// Write a temporary file beside it and rename it into place on
    /// [`FileWriter::finish`]: a reader never sees half a file, a failed
    /// or dropped writer leaves nothing (not with `append`).
    pub fn atomic(&mut self, yes: bool) -> &mut Self {
        self.atomic = yes;
        self
    }

    /// Create missing parent directories (mode 0o755).
    pub fn parents(&mut self, yes: bool) -> &mut Self {
        self.parents = yes;
        self
    }

    /// Permission bits of a created file (default 0o644).
    pub fn mode(&mut self, mode: u32) -> &mut Self {
        self.mode = Some(mode);
        self
    }

    /// Opens the file; returns once the agent has it open.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<FileWriter> {
        let mut req = self.fs.request(FsOp::Write, path.as_ref())?;
        req.create = (!self.create).then_some(false);
        req.exclusive = self.exclusive.then_some(true);
        req.append = self.append.then_some(true);
        req.atomic = self.atomic.then_some(true);
        req.parents = self.parents.then_some(true);
        req.mode = self.mode;
        FileWriter::start(self.fs.start(&req)?)
    }
}

/// A guest file (or, from [`Fs::tar_writer`], an archive) being written:
/// `std::io::Write`. [`FileWriter::finish`] ends it (FS_END, and for an
/// atomic write the rename) and reports the agent's result; dropping it
/// without `finish` cancels it (an atomic write leaves nothing).
pub struct FileWriter {
    op: Op,
    chunk: usize,
}

impl FileWriter {
    fn start(op: Op) -> Result<FileWriter> {
        // An FS_ERROR instead of FS_OPENED: the open failed.
        if let Some(Err(e)) = op.stream.with(|s| {
            if s.opened.is_none() {
                s.done.take()
            } else {
                None
            }
        }) {
            let mut op = op;
            op.ended = true;
            return Err(e);
        }
        let max = op
            .stream
            .conn
            .shared
            .ready()
            .map_or(WRITE_CHUNK, |r| r.max_payload as usize);
        Ok(FileWriter {
            op,
            chunk: WRITE_CHUNK.min(max).max(1),
        })
    }

    /// Writes some of `buf`, waiting for window; returns how much.
    fn write_some(&mut self, buf: &[u8]) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.op.ended {
            return Err(Error::StdinClosed);
        }
        let chunk = self.chunk;
        let credit = self.op.stream.wait_for(|s| {
            if matches!(s.done, Some(Err(_))) {
                if let Some(Err(e)) = s.done.take() {
                    return Some(Err(e));
                }
            }
            if s.done.is_some() {
                return Some(Err(Error::AgentViolation("FS_DONE before FS_END".into())));
            }
            if s.write_credit > 0 {
                let n = (s.write_credit as usize).min(chunk).min(buf.len());
                s.write_credit -= n as u32;
                return Some(Ok(n));
            }
            None
        });
        let credit = match credit {
            Ok(n) => n,
            Err(e) => {
                self.op.ended = true;
                return Err(e);
            }
        };
        self.op
            .stream
            .send(&Message::Fs(FsMsg::Write(&buf[..credit])))?;
        Ok(credit)
    }

    /// Writes all of `buf` with the client's typed errors.
    pub fn write_all_checked(&mut self, mut buf: &[u8]) -> Result<()> {
        while !buf.is_empty() {
            let n = self.write_some(buf)?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Ends the data (FS_END) and waits for the agent's result: the bytes
    /// written (and for an archive, its entries).
    pub fn finish(mut self) -> Result<TreeDone> {
        let pending = self.op.stream.with(|s| s.done.is_some());
        if !pending {
            self.op.stream.send(&Message::Fs(FsMsg::End))?;
        }
        let done = self.op.finish()?;
        Ok(TreeDone {
            bytes: done.bytes.unwrap_or(0),
            entries: done.entries.unwrap_or(0),
        })
    }

    /// Cancels the write now (FS_CANCEL): an atomic write leaves nothing,
    /// another leaves what was written.
    pub fn cancel(mut self) {
        self.op.cancel();
    }
}

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_some(buf).map_err(io_err)
    }

    /// Bytes are with the agent's connection once written; nothing to do.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Listing.

/// One entry of a directory, like `std::fs::DirEntry`.
#[derive(Debug, Clone)]
pub struct DirEntry {
    dir: PathBuf,
    name: OsString,
    kind: FileType,
    metadata: Option<Metadata>,
}

impl DirEntry {
    fn from_wire(dir: &Path, e: FsEntry) -> DirEntry {
        let name = match e.name_bin {
            Some(bytes) => OsString::from_vec(bytes),
            None => OsString::from(e.name),
        };
        DirEntry {
            dir: dir.to_path_buf(),
            name,
            kind: FileType::parse(&e.kind),
            metadata: e.stat.map(Metadata::from_stat),
        }
    }

    /// The name (exact bytes, also when not UTF-8).
    pub fn file_name(&self) -> &std::ffi::OsStr {
        &self.name
    }

    /// The directory's path joined with the name.
    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// The entry's type (not following a symlink).
    pub fn file_type(&self) -> FileType {
        self.kind
    }

    /// Metadata (lstat), with [`Fs::read_dir_with_metadata`].
    pub fn metadata(&self) -> Option<&Metadata> {
        self.metadata.as_ref()
    }
}

/// The entries of a directory: an iterator that reads batches as it goes
/// (acknowledging each once all its entries are taken). Dropping it early
/// cancels the listing.
pub struct ReadDir {
    op: Op,
    dir: PathBuf,
    batch: VecDeque<FsEntry>,
    batch_bytes: u32,
    done: bool,
}

impl ReadDir {
    /// The entry count the agent reported, once the end is reached.
    fn next_checked(&mut self) -> Option<Result<DirEntry>> {
        loop {
            if let Some(e) = self.batch.pop_front() {
                if self.batch.is_empty() {
                    self.op.ack(std::mem::take(&mut self.batch_bytes));
                }
                return Some(Ok(DirEntry::from_wire(&self.dir, e)));
            }
            if self.done {
                return None;
            }
            let next = self.op.stream.wait_for(|s| {
                if let Some(b) = s.entries.pop_front() {
                    return Some(Ok(b));
                }
                Op::take_done_if_drained(s).map(Err)
            });
            match next {
                Ok((batch, bytes)) => {
                    if batch.entries.is_empty() {
                        self.op.ack(bytes);
                    }
                    self.batch = batch.entries.into();
                    self.batch_bytes = bytes;
                }
                Err(done) => {
                    self.done = true;
                    self.op.ended = true;
                    if let Err(e) = done {
                        return Some(Err(e));
                    }
                }
            }
        }
    }
}

impl Iterator for ReadDir {
    type Item = Result<DirEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_checked()
    }
}

// ---------------------------------------------------------------------------
// Watching.

/// What a watch saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchKind {
    /// A file or directory was created.
    Created,
    /// A file was written.
    Modified,
    /// Removed.
    Removed,
    /// Moved away (pairs with a `MovedTo` of the same cookie).
    MovedFrom,
    /// Moved here.
    MovedTo,
    /// Metadata changed.
    Attrib,
    /// Events were lost before the next ones (the host did not read in
    /// time): rescan to know the state.
    Overflow,
    /// A type this client does not know.
    Other(String),
}

/// One change under a watched path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// What happened.
    pub kind: WatchKind,
    /// Relative to the watched path (empty for [`WatchKind::Overflow`]).
    pub path: PathBuf,
    /// Whether it is a directory.
    pub dir: bool,
    /// Pairs `MovedFrom` with `MovedTo`.
    pub cookie: Option<u32>,
}

fn watch_kind(s: &str) -> WatchKind {
    match s {
        "created" => WatchKind::Created,
        "modified" => WatchKind::Modified,
        "removed" => WatchKind::Removed,
        "moved_from" => WatchKind::MovedFrom,
        "moved_to" => WatchKind::MovedTo,
        "attrib" => WatchKind::Attrib,
        other => WatchKind::Other(other.to_owned()),
    }
}

/// A watch: an iterator of events until [`Watch::cancel`] (or the drop,
/// which cancels too). Events not read wait in the guest's kernel, bounded;
/// an overflow is reported as [`WatchKind::Overflow`].
pub struct Watch {
    op: Op,
    batch: VecDeque<WatchEvent>,
    batch_bytes: u32,
    done: bool,
}

impl Watch {
    /// Ends the watch and waits for the agent's FS_DONE.
    pub fn cancel(mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.op.stream.send(&Message::Fs(FsMsg::Cancel))?;
        self.op.finish().map(|_| ())
    }

    /// The next event, waiting for one.
    pub fn next_event(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if let Some(e) = self.batch.pop_front() {
                if self.batch.is_empty() {
                    self.op.ack(std::mem::take(&mut self.batch_bytes));
                }
                return Some(Ok(e));
            }
            if self.done {
                return None;
            }
            let next = self.op.stream.wait_for(|s| {
                if let Some(b) = s.events.pop_front() {
                    return Some(Ok(b));
                }
                Op::take_done_if_drained(s).map(Err)
            });
            match next {
                Ok((batch, bytes)) => self.take_batch(batch, bytes),
                Err(done) => {
                    self.done = true;
                    self.op.ended = true;
                    if let Err(e) = done {
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    fn take_batch(&mut self, batch: FsEvents, bytes: u32) {
        if batch.overflow {
            self.batch.push_back(WatchEvent {
                kind: WatchKind::Overflow,
                path: PathBuf::new(),
                dir: false,
                cookie: None,
            });
        }
        self.batch
            .extend(batch.events.into_iter().map(|e| WatchEvent {
                kind: watch_kind(&e.kind),
                path: PathBuf::from(e.path),
                dir: e.dir,
                cookie: e.cookie,
            }));
        if self.batch.is_empty() {
            self.op.ack(bytes);
        } else {
            self.batch_bytes = bytes;
        }
    }

    /// Events already received, without waiting (possibly none).
    pub fn try_next_event(&mut self) -> Option<Result<WatchEvent>> {
        if self.batch.is_empty() && !self.done {
            self.op.stream.poll();
            let has = self
                .op
                .stream
                .with(|s| !s.events.is_empty() || s.done.is_some());
            if !has {
                return None;
            }
        }
        self.next_event()
    }
}

impl Iterator for Watch {
    type Item = Result<WatchEvent>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_event()
    }
}

// ---------------------------------------------------------------------------
// Helpers for the tree module.

/// Whether a relative archive path is made of normal components only.
pub(crate) fn is_clean_relative(p: &Path) -> bool {
    p.components().all(|c| matches!(c, Component::Normal(_)))
}

macro_rules! debug_by_id {
    ($($t:ident . $($field:ident).+),* $(,)?) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t)).field("id", &self.$($field).+.stream.id).finish()
            }
        }
    )*};
}

debug_by_id!(
    FileReader.inner.op,
    TarReader.inner.op,
    FileWriter.op,
    ReadDir.op,
    Watch.op
);

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs").field("user", &self.user).finish()
    }
}

impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenOptions")
            .field("create", &self.create)
            .field("exclusive", &self.exclusive)
            .field("append", &self.append)
            .field("atomic", &self.atomic)
            .field("parents", &self.parents)
            .field("mode", &self.mode)
            .finish()
    }
}
