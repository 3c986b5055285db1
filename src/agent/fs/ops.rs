//! The file operations themselves, as a worker process runs them (see
//! `agent::worker`): with the user's credentials, blocking as they please.
//! Results go to the agent as whole frames on the control pipe (id 0: the
//! agent puts the operation's id in); bulk bytes go on the data pipes,
//! moved with splice(2) where the kernel allows it.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};

use crate::messages::{
    self, FsDone, FsEntry, FsError, FsErrorKind, FsEvent, FsEvents, FsOp, FsOpened, FsRequest,
    FsStat, Kind,
};

use super::super::user::Identity;
use super::super::worker::{self, SetupError, WorkerIo};

/// The most payload bytes one FS_ENTRIES or FS_EVENTS frame carries.
pub(crate) const BATCH_LIMIT: usize = 60 * 1024;

/// How much one splice or copy moves at a time.
const CHUNK: usize = 1 << 20;

/// What a failed operation reports.
type OpResult<T> = Result<T, FsError>;

/// The worker's frames to the agent.
struct Reply {
    ctl: File,
}

impl Reply {
    fn send<T: serde::Serialize>(&mut self, kind: Kind, msg: &T) -> io::Result<()> {
        let mut frame = Vec::new();
        messages::append_map(&mut frame, kind as u8, 0, msg)
            .map_err(|e| io::Error::other(e.to_string()))?;
        worker::send(&mut self.ctl, &frame)
    }
}

/// Runs `req` (whose `op` is `op`) in the worker and returns its exit
/// status. Every outcome is a frame: FS_DONE or FS_ERROR last.
pub(crate) fn run(
    req: &FsRequest,
    op: FsOp,
    io: WorkerIo,
    setup: Result<Option<Identity>, SetupError>,
) -> i32 {
    let WorkerIo {
        ctl,
        data_out,
        data_in,
    } = io;
    let mut reply = Reply { ctl };
    let home = match setup {
        Ok(id) => home_of(id.as_ref()),
        Err(e) => {
            let err = match e {
                SetupError::User(e) => {
                    FsError::new(FsErrorKind::BadUser, e.to_string(), None, None)
                }
                SetupError::Credentials(call, e) => os_error(call, &e, None),
            };
            let _ = reply.send(Kind::FsError, &err);
            return 1;
        }
    };
    let path = home.join(&req.path);
    let ctx = Ctx {
        req,
        path: &path,
        home: &home,
        reply: &mut reply,
    };
    let outcome = match op {
        FsOp::Read => read(ctx, data_out),
        FsOp::Write => write(ctx, data_in),
        FsOp::List => list(ctx),
        FsOp::TarGet => super::tree::get(ctx, data_out),
        FsOp::TarPut => super::tree::put(ctx, data_in),
        FsOp::Watch => super::watch::watch(ctx),
        _ => one_shot(ctx, op),
    };
    let frame = match outcome {
        Ok(done) => reply.send(Kind::FsDone, &done),
        Err(err) => reply.send(Kind::FsError, &err),
    };
    i32::from(frame.is_err())
}

/// What an operation works with.
pub(crate) struct Ctx<'a> {
    pub(crate) req: &'a FsRequest,
    /// `path`, made absolute against the user's home.
    pub(crate) path: &'a Path,
    /// What relative paths are relative to.
    pub(crate) home: &'a Path,
    reply: &'a mut Reply,
}

impl Ctx<'_> {
    /// Sends FS_OPENED.
    pub(crate) fn opened(&mut self, stat: Option<FsStat>) -> OpResult<()> {
        self.reply
            .send(Kind::FsOpened, &FsOpened { stat })
            .map_err(|e| io_error(&e, None))
    }

    /// Sends a batch frame (FS_ENTRIES or FS_EVENTS) whose payload is
    /// already encoded.
    pub(crate) fn batch(&mut self, kind: Kind, payload: &[u8]) -> OpResult<()> {
        let mut frame = Vec::with_capacity(payload.len() + 9);
        crate::codec::append_raw(&mut frame, kind as u8, 0, payload)
            .map_err(|e| FsError::new(FsErrorKind::Other, e.to_string(), None, None))?;
        worker::send(&mut self.reply.ctl, &frame).map_err(|e| io_error(&e, None))
    }

    pub(crate) fn events(&mut self, events: &FsEvents) -> OpResult<()> {
        self.reply
            .send(Kind::FsEvents, events)
            .map_err(|e| io_error(&e, None))
    }

    /// The error for `e`, about the request's path.
    pub(crate) fn fail(&self, e: &io::Error) -> FsError {
        io_error(e, Some(&self.req.path))
    }
}

/// The directory relative paths are taken from: the user's home, or `/`.
fn home_of(id: Option<&Identity>) -> PathBuf {
    let home = match id {
        Some(id) => id.home.clone(),
        None => std::env::var("HOME").ok(),
    };
    home.filter(|h| Path::new(h).is_dir())
        .map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

/// The FS_ERROR for an I/O error, about `path`.
pub(crate) fn io_error(e: &io::Error, path: Option<&str>) -> FsError {
    let errno = e.raw_os_error();
    let kind = errno.map_or(FsErrorKind::Other, FsErrorKind::from_errno);
    let message = match path {
        Some(p) => format!("{}: {e}", messages::clip(p)),
        None => e.to_string(),
    };
    FsError::new(kind, message, errno, path.map(str::to_owned))
}

/// The FS_ERROR for a failed system call `call`.
fn os_error(call: &str, e: &io::Error, path: Option<&str>) -> FsError {
    let mut err = io_error(e, path);
    err.message = messages::cap_message(format!("{call}: {}", err.message));
    err
}

fn invalid(message: impl Into<String>) -> FsError {
    FsError::new(FsErrorKind::InvalidRequest, message, None, None)
}

/// What a stat record says of `meta` (and a symlink's `target`).
pub(crate) fn stat_of(meta: &Metadata, target: Option<String>) -> FsStat {
    FsStat {
        kind: type_name(&meta.file_type()).to_owned(),
        size: meta.size(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: nanos(meta.mtime(), meta.mtime_nsec()),
        atime_ns: nanos(meta.atime(), meta.atime_nsec()),
        ctime_ns: nanos(meta.ctime(), meta.ctime_nsec()),
        nlink: meta.nlink(),
        ino: meta.ino(),
        target,
    }
}

fn nanos(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

pub(crate) fn type_name(t: &fs::FileType) -> &'static str {
    if t.is_symlink() {
        "symlink"
    } else if t.is_dir() {
        "dir"
    } else if t.is_file() {
        "file"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "char"
    } else if t.is_block_device() {
        "block"
    } else {
        "unknown"
    }
}

/// lstat with the symlink's target.
pub(crate) fn lstat(path: &Path) -> io::Result<FsStat> {
    let meta = fs::symlink_metadata(path)?;
    let target = meta
        .file_type()
        .is_symlink()
        .then(|| fs::read_link(path).ok())
        .flatten()
        .map(|t| t.to_string_lossy().into_owned());
    Ok(stat_of(&meta, target))
}

/// The operations that answer with FS_DONE alone.
fn one_shot(ctx: Ctx<'_>, op: FsOp) -> OpResult<FsDone> {
    let req = ctx.req;
    let path = ctx.path;
    let fail = |e: io::Error| ctx.fail(&e);
    let mut done = FsDone::default();
    match op {
        FsOp::Stat => {
            let meta = fs::metadata(path).map_err(fail)?;
            done.stat = Some(stat_of(&meta, None));
        }
        FsOp::Lstat => done.stat = Some(lstat(path).map_err(fail)?),
        FsOp::Readlink => {
            done.path = Some(
                fs::read_link(path)
                    .map_err(fail)?
                    .to_string_lossy()
                    .into_owned(),
            )
        }
        FsOp::Realpath => {
            done.path = Some(
                fs::canonicalize(path)
                    .map_err(fail)?
                    .to_string_lossy()
                    .into_owned(),
            )
        }
        FsOp::Mkdir => mkdir(req, path)?,
        FsOp::Remove => remove(req, path).map_err(fail)?,
        FsOp::Rename => rename(req, path, ctx.home)?,
        FsOp::Chmod => {
            let mode = req.mode.ok_or_else(|| invalid("chmod needs `mode`"))?;
            check_mode(mode)?;
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(fail)?;
        }
        FsOp::Chown => chown(req, path).map_err(|e| match e {
            Chown::Invalid(m) => invalid(m),
            Chown::Io(e) => fail(e),
        })?,
        FsOp::Utimes => utimes(req, path)?,
        FsOp::Symlink => {
            let target = req
                .target
                .as_deref()
                .ok_or_else(|| invalid("symlink needs `target`"))?;
            std::os::unix::fs::symlink(target, path).map_err(fail)?;
        }
        _ => {
            return Err(invalid(format!(
                "{} is not a one-shot operation",
                op.as_str()
            )))
        }
    }
    Ok(done)
}

fn check_mode(mode: u32) -> OpResult<()> {
    if mode > 0o7777 {
        return Err(invalid(format!("mode {mode:#o} is above 0o7777")));
    }
    Ok(())
}

/// mkdir with exactly `mode` (the umask does not apply: the new directory
/// is chmodded to it, setuid, setgid and sticky bits included); with
/// `parents`, missing parents get 0o755 and an existing directory is no
/// error (and keeps its mode).
fn mkdir(req: &FsRequest, path: &Path) -> OpResult<()> {
    let fail = |e: io::Error| io_error(&e, Some(&req.path));
    let mode = req.mode.unwrap_or(0o755);
    check_mode(mode)?;
    let parents = req.parents.unwrap_or(false);
    if parents {
        if let Some(parent) = path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(fail)?;
        }
    }
    match fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(fail),
        Err(e) if parents && e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(fail(e)),
    }
}

fn remove(req: &FsRequest, path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return fs::remove_file(path);
    }
    if req.recursive.unwrap_or(false) {
        fs::remove_dir_all(path)
    } else {
        fs::remove_dir(path)
    }
}

fn cstring(p: &Path) -> OpResult<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| invalid("a path contains a NUL byte"))
}

fn rename(req: &FsRequest, from: &Path, home: &Path) -> OpResult<()> {
    let to = req
        .to
        .as_deref()
        .ok_or_else(|| invalid("rename needs `to`"))?;
    let to = home.join(to);
    let (a, b) = (cstring(from)?, cstring(&to)?);
    let flags = if req.replace.unwrap_or(true) {
        0
    } else {
        libc::RENAME_NOREPLACE
    };
    // SAFETY: two NUL-terminated paths, relative to the cwd (they are
    // absolute), and flags.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if rc < 0 {
        return Err(io_error(&io::Error::last_os_error(), Some(&req.path)));
    }
    Ok(())
}

enum Chown {
    Invalid(&'static str),
    Io(io::Error),
}

fn chown(req: &FsRequest, path: &Path) -> Result<(), Chown> {
    if req.uid.is_none() && req.gid.is_none() {
        return Err(Chown::Invalid("chown needs `uid` or `gid`"));
    }
    let r = if req.follow.unwrap_or(true) {
        std::os::unix::fs::chown(path, req.uid, req.gid)
    } else {
        std::os::unix::fs::lchown(path, req.uid, req.gid)
    };
    r.map_err(Chown::Io)
}

fn timespec(ns: Option<i64>) -> libc::timespec {
    match ns {
        Some(ns) => libc::timespec {
            tv_sec: ns.div_euclid(1_000_000_000),
            tv_nsec: ns.rem_euclid(1_000_000_000),
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    }
}

fn utimes(req: &FsRequest, path: &Path) -> OpResult<()> {
    if req.atime_ns.is_none() && req.mtime_ns.is_none() {
        return Err(invalid("utimes needs `atime_ns` or `mtime_ns`"));
    }
    let times = [timespec(req.atime_ns), timespec(req.mtime_ns)];
    let flags = if req.follow.unwrap_or(true) {
        0
    } else {
        libc::AT_SYMLINK_NOFOLLOW
    };
    let c = cstring(path)?;
    // SAFETY: a NUL-terminated path and two valid timespecs.
    if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) } < 0 {
        return Err(io_error(&io::Error::last_os_error(), Some(&req.path)));
    }
    Ok(())
}

/// Moves bytes from `src` to `dst` until `src` ends or `limit` bytes have
/// moved: splice(2) when one side is a pipe and the kernel takes the pair,
/// read and write otherwise. Returns how many moved.
pub(crate) fn copy(src: &mut File, dst: &mut File, limit: u64) -> io::Result<u64> {
    let mut moved = 0u64;
    let mut can_splice = true;
    let mut buf = Vec::new();
    while moved < limit {
        let want = (limit - moved).min(CHUNK as u64) as usize;
        if can_splice {
            // SAFETY: splice between two fds we hold, null offsets (the
            // files' own positions are used and advanced).
            let n = unsafe {
                libc::splice(
                    src.as_raw_fd(),
                    std::ptr::null_mut(),
                    dst.as_raw_fd(),
                    std::ptr::null_mut(),
                    want,
                    libc::SPLICE_F_MOVE,
                )
            };
            if n > 0 {
                moved += n as u64;
                continue;
            }
            if n == 0 {
                return Ok(moved);
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                // This pair cannot be spliced: copy.
                Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {
                    can_splice = false
                }
                _ => return Err(io::Error::last_os_error()),
            }
        }
        buf.resize(want.min(256 * 1024), 0);
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(moved),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        dst.write_all(&buf[..n])?;
        moved += n as u64;
    }
    Ok(moved)
}

/// What a data pipe is grown to: the worker and the agent then hand over a
/// megabyte per wake-up.
const DATA_PIPE_SIZE: libc::c_int = 1 << 20;

fn read(mut ctx: Ctx<'_>, data: Option<File>) -> OpResult<FsDone> {
    let mut out = data.ok_or_else(|| invalid("no data pipe"))?;
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(ctx.path)
        .map_err(|e| ctx.fail(&e))?;
    let meta = file.metadata().map_err(|e| ctx.fail(&e))?;
    if meta.is_dir() {
        return Err(io_error(
            &io::Error::from_raw_os_error(libc::EISDIR),
            Some(&ctx.req.path),
        ));
    }
    ctx.opened(Some(stat_of(&meta, None)))?;
    let offset = ctx.req.offset.unwrap_or(0);
    if offset > 0 {
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| ctx.fail(&e))?;
    }
    super::super::sys::grow_pipe(out.as_raw_fd(), DATA_PIPE_SIZE);
    let limit = ctx.req.length.unwrap_or(u64::MAX);
    let bytes = copy(&mut file, &mut out, limit).map_err(|e| ctx.fail(&e))?;
    // The data pipe's end of file comes before FS_DONE.
    drop(out);
    Ok(FsDone {
        bytes: Some(bytes),
        ..FsDone::default()
    })
}

/// The temporary file of an atomic write, for the SIGTERM handler to
/// remove (a cancelled or abandoned upload leaves nothing).
static TEMP: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn remove_temp_and_exit(_: libc::c_int) {
    let p = TEMP.load(Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: `p` is a NUL-terminated path that is never freed (leaked
        // on purpose); unlink and _exit are async-signal-safe.
        unsafe { libc::unlink(p) };
    }
    // SAFETY: async-signal-safe.
    unsafe { libc::_exit(143) }
}

/// Notes `path` as the temporary file to remove on SIGTERM.
fn guard_temp(path: &Path) -> OpResult<()> {
    let c = cstring(path)?;
    TEMP.store(c.into_raw(), Ordering::SeqCst);
    // SAFETY: installs a handler that only calls async-signal-safe
    // functions.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = remove_temp_and_exit as *const () as usize;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGTERM, &act, std::ptr::null_mut());
        libc::sigaction(libc::SIGINT, &act, std::ptr::null_mut());
    }
    Ok(())
}

/// Removes an atomic write's temporary file, and forgets it (so the
/// SIGTERM handler does not unlink a name someone else may take).
fn drop_temp(temp: &Path) {
    hold_termination(true);
    let _ = fs::remove_file(temp);
    TEMP.store(std::ptr::null_mut(), Ordering::SeqCst);
    hold_termination(false);
}

/// Blocks (or unblocks) SIGTERM and SIGINT, so a commit is not cut short
/// between its steps.
fn hold_termination(hold: bool) {
    // SAFETY: a local sigset and sigprocmask on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let how = if hold {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::sigprocmask(how, &set, std::ptr::null_mut());
    }
}

/// A name for an atomic write's temporary file beside `path`.
fn temp_beside(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or(OsStr::new("file"));
    let mut t = OsString::from(".");
    t.push(name);
    // SAFETY: getpid cannot fail.
    t.push(format!(".agentd-{}", unsafe { libc::getpid() }));
    path.with_file_name(t)
}

fn write(mut ctx: Ctx<'_>, data: Option<File>) -> OpResult<FsDone> {
    let mut input = data.ok_or_else(|| invalid("no data pipe"))?;
    let req = ctx.req;
    let atomic = req.atomic.unwrap_or(false);
    let append = req.append.unwrap_or(false);
    let exclusive = req.exclusive.unwrap_or(false);
    let create = req.create.unwrap_or(true) || exclusive;
    if atomic && append {
        return Err(invalid("atomic and append cannot go together"));
    }
    if let Some(m) = req.mode {
        check_mode(m)?;
    }
    if req.parents.unwrap_or(false) {
        if let Some(parent) = ctx.path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|e| ctx.fail(&e))?;
        }
    }
    let existing = fs::metadata(ctx.path).ok();
    let (mut file, temp) = if atomic {
        if existing.is_none() && !create {
            return Err(ctx.fail(&io::Error::from_raw_os_error(libc::ENOENT)));
        }
        if existing.is_some() && exclusive {
            return Err(ctx.fail(&io::Error::from_raw_os_error(libc::EEXIST)));
        }
        let temp = temp_beside(ctx.path);
        guard_temp(&temp)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&temp)
            .map_err(|e| ctx.fail(&e))?;
        (file, Some(temp))
    } else {
        let mut o = OpenOptions::new();
        o.write(true)
            .mode(req.mode.unwrap_or(0o644))
            .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY);
        if exclusive {
            o.create_new(true);
        } else {
            o.create(create);
        }
        if append {
            o.append(true);
        } else {
            o.truncate(true);
        }
        (o.open(ctx.path).map_err(|e| ctx.fail(&e))?, None)
    };
    let copied = ctx.opened(None).and_then(|()| {
        super::super::sys::grow_pipe(input.as_raw_fd(), DATA_PIPE_SIZE);
        copy(&mut input, &mut file, u64::MAX).map_err(|e| ctx.fail(&e))
    });
    let bytes = match copied {
        Ok(bytes) => bytes,
        Err(e) => {
            if let Some(temp) = &temp {
                // A failed atomic upload leaves nothing (ENOSPC, EIO...).
                drop_temp(temp);
            }
            return Err(e);
        }
    };
    if let Some(temp) = temp {
        commit(ctx.req, ctx.path, &temp, &file, existing.as_ref())?;
    } else if let Some(mode) = req.mode.filter(|_| existing.is_none()) {
        // A new file gets exactly `mode`, whatever the umask.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| ctx.fail(&e))?;
    }
    Ok(FsDone {
        bytes: Some(bytes),
        ..FsDone::default()
    })
}

/// Renames an atomic write's temporary file into place: with the mode the
/// request gives, else that of the file it replaces, else 0o644.
fn commit(
    req: &FsRequest,
    path: &Path,
    temp: &Path,
    file: &File,
    existing: Option<&Metadata>,
) -> OpResult<()> {
    let mode = req
        .mode
        .or(existing.map(|m| m.mode() & 0o7777))
        .unwrap_or(0o644);
    let fail = |e: io::Error| {
        drop_temp(temp);
        io_error(&e, Some(&req.path))
    };
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(fail)?;
    hold_termination(true);
    let flags = if req.exclusive.unwrap_or(false) {
        libc::RENAME_NOREPLACE
    } else {
        0
    };
    let (a, b) = (cstring(temp)?, cstring(path)?);
    // SAFETY: two NUL-terminated absolute paths and flags.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    let result = if rc < 0 {
        Err(fail(io::Error::last_os_error()))
    } else {
        TEMP.store(std::ptr::null_mut(), Ordering::SeqCst);
        Ok(())
    };
    hold_termination(false);
    result
}

/// Encodes `entries` as the payload of an FS_ENTRIES frame:
/// `{"entries": [...]}` around entries already encoded one by one.
fn entries_payload(count: usize, encoded: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(encoded.len() + 16);
    p.push(0x81);
    p.push(0xa7);
    p.extend_from_slice(b"entries");
    if count < 16 {
        p.push(0x90 | count as u8);
    } else if count <= 0xffff {
        p.push(0xdc);
        p.extend_from_slice(&(count as u16).to_be_bytes());
    } else {
        p.push(0xdd);
        p.extend_from_slice(&(count as u32).to_be_bytes());
    }
    p.extend_from_slice(encoded);
    p
}

/// One directory entry as FS_ENTRIES carries it.
fn entry_of(dir: &Path, e: &fs::DirEntry, with_stat: bool) -> io::Result<FsEntry> {
    let raw = e.file_name();
    let (name, name_bin) = match raw.to_str() {
        Some(s) => (s.to_owned(), None),
        None => (
            raw.to_string_lossy().into_owned(),
            Some(raw.clone().into_vec()),
        ),
    };
    let ft = e.file_type()?;
    let stat = if with_stat {
        Some(lstat(&dir.join(&raw))?)
    } else {
        None
    };
    Ok(FsEntry {
        name,
        name_bin,
        kind: type_name(&ft).to_owned(),
        stat,
    })
}

fn list(mut ctx: Ctx<'_>) -> OpResult<FsDone> {
    let window = ctx.req.window.unwrap_or(1 << 20) as usize;
    let limit = BATCH_LIMIT.min(window);
    let dir = fs::read_dir(ctx.path).map_err(|e| ctx.fail(&e))?;
    let with_stat = ctx.req.stat.unwrap_or(false);
    let mut encoded = Vec::new();
    let mut count = 0usize;
    let mut total = 0u64;
    for e in dir {
        let e = e.map_err(|e| ctx.fail(&e))?;
        let entry = match entry_of(ctx.path, &e, with_stat) {
            Ok(entry) => entry,
            // Gone between readdir and lstat: it is not listed.
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(err) => return Err(ctx.fail(&err)),
        };
        let one = rmp_serde::to_vec_named(&entry)
            .map_err(|e| FsError::new(FsErrorKind::Other, e.to_string(), None, None))?;
        if count > 0 && encoded.len() + one.len() + 16 > limit {
            ctx.batch(Kind::FsEntries, &entries_payload(count, &encoded))?;
            encoded.clear();
            count = 0;
        }
        encoded.extend_from_slice(&one);
        count += 1;
        total += 1;
    }
    if count > 0 {
        ctx.batch(Kind::FsEntries, &entries_payload(count, &encoded))?;
    }
    Ok(FsDone {
        entries: Some(total),
        ..FsDone::default()
    })
}

/// The parts of a tar entry's name, refusing what could leave the
/// destination: absolute names and `..`.
pub(crate) fn safe_relative(name: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in name.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "{:?} is an absolute name",
                    name.display().to_string()
                ))
            }
            Component::ParentDir => {
                return Err(format!(
                    "{:?} has a `..` component",
                    name.display().to_string()
                ))
            }
        }
    }
    Ok(out)
}

/// The FS_EVENTS batches of a watch, at most [`BATCH_LIMIT`] each.
pub(crate) fn send_events(ctx: &mut Ctx<'_>, events: Vec<FsEvent>, overflow: bool) -> OpResult<()> {
    let window = ctx.req.window.unwrap_or(1 << 20) as usize;
    let limit = BATCH_LIMIT.min(window);
    let mut batch = FsEvents {
        events: Vec::new(),
        overflow,
    };
    let mut size = 0usize;
    for ev in events {
        let len = ev.path.len() + 48;
        if !batch.events.is_empty() && size + len > limit {
            ctx.events(&batch)?;
            batch = FsEvents::default();
            size = 0;
        }
        size += len;
        batch.events.push(ev);
    }
    if !batch.events.is_empty() || batch.overflow {
        ctx.events(&batch)?;
    }
    Ok(())
}
