//! A watch: inotify in the worker, events to the host as FS_EVENTS until
//! the host cancels. The worker blocks writing to the agent while the host
//! does not acknowledge; meanwhile events wait in the kernel's inotify
//! queue, whose overflow (IN_Q_OVERFLOW) is reported as `overflow`: memory
//! never grows with them.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::messages::{FsDone, FsError, FsErrorKind, FsEvent};

use super::ops::{send_events, Ctx};

const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

struct Watches {
    fd: libc::c_int,
    /// Watch descriptor → path relative to the root ("" for the root).
    paths: HashMap<libc::c_int, PathBuf>,
    root: PathBuf,
    recursive: bool,
}

impl Watches {
    /// Watches `rel` (and, recursively, every directory below it).
    fn add(&mut self, rel: &Path) -> io::Result<()> {
        let full = self.root.join(rel);
        let c = CString::new(full.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a valid fd and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd, c.as_ptr(), MASK) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.paths.insert(wd, rel.to_path_buf());
        if !self.recursive {
            return Ok(());
        }
        let Ok(dir) = fs::read_dir(&full) else {
            return Ok(());
        };
        for e in dir.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                // A subdirectory that cannot be watched (gone, no access)
                // is skipped; the rest are watched.
                let _ = self.add(&rel.join(e.file_name()));
            }
        }
        Ok(())
    }
}

/// Reports what is in a new directory (created before its watch existed).
fn scan_new(root: &Path, rel: &Path, out: &mut Vec<FsEvent>) {
    let Ok(dir) = fs::read_dir(root.join(rel)) else {
        return;
    };
    for e in dir.flatten() {
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        let child = rel.join(e.file_name());
        out.push(FsEvent {
            kind: "created".into(),
            path: child.to_string_lossy().into_owned(),
            dir: is_dir,
            cookie: None,
        });
        if is_dir {
            scan_new(root, &child, out);
        }
    }
}

fn kind_of(mask: u32) -> Option<&'static str> {
    Some(if mask & (libc::IN_CREATE) != 0 {
        "created"
    } else if mask & libc::IN_DELETE != 0 {
        "removed"
    } else if mask & (libc::IN_MODIFY | libc::IN_CLOSE_WRITE) != 0 {
        "modified"
    } else if mask & libc::IN_MOVED_FROM != 0 {
        "moved_from"
    } else if mask & libc::IN_MOVED_TO != 0 {
        "moved_to"
    } else if mask & libc::IN_ATTRIB != 0 {
        "attrib"
    } else {
        return None;
    })
}

pub(crate) fn watch(mut ctx: Ctx<'_>) -> Result<FsDone, FsError> {
    // SAFETY: plain call; the fd is checked.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(ctx.fail(&io::Error::last_os_error()));
    }
    let mut w = Watches {
        fd,
        paths: HashMap::new(),
        root: ctx.path.to_path_buf(),
        recursive: ctx.req.recursive.unwrap_or(false),
    };
    w.add(Path::new("")).map_err(|e| ctx.fail(&e))?;
    ctx.opened(None)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: reading into a buffer of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(ctx.fail(&e));
        }
        let (events, overflow, gone) = parse(&mut w, &buf[..n as usize]);
        send_events(&mut ctx, events, overflow)?;
        if gone {
            return Err(FsError::new(
                FsErrorKind::NotFound,
                format!("{}: the watched path was removed or moved", ctx.req.path),
                None,
                Some(ctx.req.path.clone()),
            ));
        }
    }
}

/// The events in one read of the inotify fd (consecutive `modified` of the
/// same path coalesced); whether the queue overflowed; whether the watched
/// root went away.
fn parse(w: &mut Watches, mut buf: &[u8]) -> (Vec<FsEvent>, bool, bool) {
    let head = std::mem::size_of::<libc::inotify_event>();
    let mut events: Vec<FsEvent> = Vec::new();
    let (mut overflow, mut gone) = (false, false);
    while buf.len() >= head {
        // SAFETY: the kernel writes whole inotify_event records; an
        // unaligned read copies one out of the buffer.
        let ev: libc::inotify_event =
            unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<libc::inotify_event>()) };
        let len = head + ev.len as usize;
        let name = &buf[head..len.min(buf.len())];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        buf = &buf[len.min(buf.len())..];
        if ev.mask & libc::IN_Q_OVERFLOW != 0 {
            overflow = true;
            continue;
        }
        let Some(dir) = w.paths.get(&ev.wd).cloned() else {
            continue;
        };
        if ev.mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 && dir.as_os_str().is_empty()
        {
            gone = true;
            continue;
        }
        if ev.mask & libc::IN_IGNORED != 0 {
            w.paths.remove(&ev.wd);
            continue;
        }
        let Some(kind) = kind_of(ev.mask) else {
            continue;
        };
        let rel = dir.join(std::ffi::OsStr::from_bytes(name));
        let is_dir = ev.mask & libc::IN_ISDIR != 0;
        let path = rel.to_string_lossy().into_owned();
        let repeat = events
            .last()
            .is_some_and(|e| kind == "modified" && e.kind == "modified" && e.path == path);
        if !repeat {
            events.push(FsEvent {
                kind: kind.into(),
                path,
                dir: is_dir,
                cookie: (ev.cookie != 0).then_some(ev.cookie),
            });
        }
        if w.recursive && is_dir && ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
            // Entries made in it before its watch was set: the host hears
            // of them as created.
            if w.add(&rel).is_ok() {
                scan_new(&w.root, &rel, &mut events);
            }
        }
    }
    (events, overflow, gone)
}
