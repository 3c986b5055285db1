//! Whole trees as one stream: `tar_get` packs a directory (or a file) as a
//! tar archive, `tar_put` unpacks one, in a worker. The archive format is
//! the `tar` crate's (ustar with GNU long names): well kept, and what
//! `tar` itself reads and writes, so a host can pipe it anywhere.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::messages::{FsDone, FsError, FsErrorKind};

use super::ops::{io_error, lstat, safe_relative, Ctx};

/// Counts what goes through a writer.
struct Counted<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Counts what comes through a reader.
struct CountedRead<R> {
    inner: R,
    bytes: u64,
}

impl<R: io::Read> io::Read for CountedRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

fn other(message: String) -> FsError {
    FsError::new(FsErrorKind::Other, message, None, None)
}

/// Packs `path` (named by its last component) into the data pipe.
pub(crate) fn get(mut ctx: Ctx<'_>, data: Option<File>) -> Result<FsDone, FsError> {
    let out = data.ok_or_else(|| other("no data pipe".into()))?;
    let root = ctx.path.to_path_buf();
    let stat = lstat(&root).map_err(|e| ctx.fail(&e))?;
    let name = root
        .file_name()
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    ctx.opened(Some(stat))?;
    let mut builder = tar::Builder::new(Counted {
        inner: io::BufWriter::with_capacity(256 * 1024, out),
        bytes: 0,
    });
    builder.follow_symlinks(false);
    let mut entries = 0u64;
    let mut links = HashMap::new();
    add(&mut builder, &root, &name, &mut entries, &mut links)?;
    builder
        .finish()
        .map_err(|e| io_error(&e, Some(&ctx.req.path)))?;
    let mut counted = builder
        .into_inner()
        .map_err(|e| io_error(&e, Some(&ctx.req.path)))?;
    counted
        .flush()
        .map_err(|e| io_error(&e, Some(&ctx.req.path)))?;
    let bytes = counted.bytes;
    // The data pipe's end of file comes before FS_DONE.
    drop(counted);
    Ok(FsDone {
        bytes: Some(bytes),
        entries: Some(entries),
        ..FsDone::default()
    })
}

/// Adds `path` as `name`, and a directory's contents after it. A file
/// with several links that is already in the archive (same device and
/// inode) becomes a hard link entry to its first name, as `tar` does, so
/// that unpacking gives one file with several names again.
fn add<W: Write>(
    b: &mut tar::Builder<W>,
    path: &Path,
    name: &Path,
    entries: &mut u64,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<(), FsError> {
    use std::os::unix::fs::MetadataExt;
    let fail = |e: &io::Error| io_error(e, Some(&path.to_string_lossy()));
    let meta = fs::symlink_metadata(path).map_err(|e| fail(&e))?;
    let key = (meta.dev(), meta.ino());
    match links.get(&key) {
        Some(first) if meta.is_file() => {
            let mut h = tar::Header::new_gnu();
            h.set_metadata(&meta);
            h.set_entry_type(tar::EntryType::Link);
            h.set_size(0);
            b.append_link(&mut h, name, first).map_err(|e| fail(&e))?;
        }
        _ => {
            if meta.is_file() && meta.nlink() > 1 {
                links.insert(key, name.to_path_buf());
            }
            b.append_path_with_name(path, name).map_err(|e| fail(&e))?;
        }
    }
    *entries += 1;
    if meta.is_dir() {
        let mut children: Vec<_> = fs::read_dir(path)
            .map_err(|e| fail(&e))?
            .collect::<Result<_, _>>()
            .map_err(|e| fail(&e))?;
        // A stable order: the same tree gives the same archive.
        children.sort_by_key(|e| e.file_name());
        for child in children {
            let n = child.file_name();
            add(b, &path.join(&n), &name.join(&n), entries, links)?;
        }
    }
    Ok(())
}

/// The FS_ERROR for a failed unpack: the `tar` crate wraps the system
/// call's error in its own, so the errno (and what failed) is looked for
/// down the chain of sources.
fn unpack_error(e: &io::Error, path: &Path) -> FsError {
    let mut message = e.to_string();
    let mut errno = e.raw_os_error();
    let mut kind = e.kind();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        if let Some(io) = s.downcast_ref::<io::Error>() {
            errno = errno.or(io.raw_os_error());
            if io.kind() != io::ErrorKind::Other {
                kind = io.kind();
            }
        }
        source = s.source();
    }
    // The crate rewraps some errors with their kind only (the kinds Rust
    // 1.80 names).
    let errno = errno.or(match kind {
        io::ErrorKind::NotFound => Some(libc::ENOENT),
        io::ErrorKind::PermissionDenied => Some(libc::EACCES),
        io::ErrorKind::AlreadyExists => Some(libc::EEXIST),
        io::ErrorKind::InvalidInput => Some(libc::EINVAL),
        _ => None,
    });
    let cause = match errno {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::other(message.clone()),
    };
    let mut err = io_error(&cause, Some(&path.to_string_lossy()));
    err.message = crate::messages::cap_message(format!(
        "{}: {message}",
        crate::messages::clip(&path.to_string_lossy())
    ));
    err
}

/// Whether an entry at `rel` lands inside the destination: the deepest
/// existing directory on its way, symlinks resolved, is inside it (a
/// symlink an earlier entry made cannot carry later ones out).
fn lands_inside(dst_canon: &Path, dst: &Path, rel: &Path) -> bool {
    let mut p = dst.join(rel);
    while p.pop() {
        match p.canonicalize() {
            Ok(c) => return c.starts_with(dst_canon),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(_) => return false,
        }
    }
    false
}

/// A directory unpacked from an archive, whose mode and time are set once
/// its contents are in: until then its owner may write in it (a 0o555
/// directory still takes its files), and files made in it would change
/// its time.
struct PendingDir {
    path: PathBuf,
    mode: u32,
    mtime: Option<u64>,
}

fn open_dir(path: &Path, h: &tar::Header) -> io::Result<PendingDir> {
    use std::os::unix::fs::PermissionsExt;
    let mode = h.mode()? & 0o7777;
    if mode & 0o700 != 0o700 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o700))?;
    }
    Ok(PendingDir {
        path: path.to_path_buf(),
        mode,
        mtime: h.mtime().ok(),
    })
}

impl PendingDir {
    fn finish(&self) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&self.path, fs::Permissions::from_mode(self.mode))?;
        let Some(mtime) = self.mtime else {
            return Ok(());
        };
        let c = std::ffi::CString::new(self.path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let t = libc::timespec {
            tv_sec: mtime.min(i64::MAX as u64) as libc::time_t,
            tv_nsec: 0,
        };
        let omit = libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        };
        let times = [omit, t];
        // SAFETY: a NUL-terminated path and two valid timespecs.
        if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Unpacks the archive coming on the data pipe into `path`.
pub(crate) fn put(mut ctx: Ctx<'_>, data: Option<File>) -> Result<FsDone, FsError> {
    let input = data.ok_or_else(|| other("no data pipe".into()))?;
    let dst = ctx.path.to_path_buf();
    if ctx.req.parents.unwrap_or(false) {
        fs::create_dir_all(&dst).map_err(|e| ctx.fail(&e))?;
    }
    let meta = fs::metadata(&dst).map_err(|e| ctx.fail(&e))?;
    if !meta.is_dir() {
        return Err(ctx.fail(&io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    ctx.opened(None)?;
    let mut archive = tar::Archive::new(CountedRead {
        inner: io::BufReader::with_capacity(256 * 1024, input),
        bytes: 0,
    });
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(ctx.req.owners.unwrap_or(false));
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    let mut entries = 0u64;
    let dst_canon = dst.canonicalize().map_err(|e| ctx.fail(&e))?;
    let mut dirs = Vec::new();
    let iter = archive
        .entries()
        .map_err(|e| io_error(&e, Some(&ctx.req.path)))?;
    for entry in iter {
        let mut entry = entry.map_err(|e| io_error(&e, Some(&ctx.req.path)))?;
        let name = entry
            .path()
            .map_err(|e| io_error(&e, Some(&ctx.req.path)))?
            .into_owned();
        let rel = safe_relative(&name).map_err(|m| {
            FsError::new(
                FsErrorKind::InvalidRequest,
                m,
                None,
                Some(name.to_string_lossy().into_owned()),
            )
        })?;
        if rel.as_os_str().is_empty() {
            // "." itself: the destination, which exists.
            continue;
        }
        let outside = || {
            FsError::new(
                FsErrorKind::InvalidRequest,
                format!("{} would land outside {}", rel.display(), ctx.req.path),
                None,
                Some(rel.to_string_lossy().into_owned()),
            )
        };
        if !lands_inside(&dst_canon, &dst, &rel) {
            return Err(outside());
        }
        if entry.header().entry_type().is_hard_link() {
            // Replaced like any other file (the `tar` crate's link() would
            // fail with EEXIST).
            let at = dst.join(&rel);
            if fs::symlink_metadata(&at).is_ok_and(|m| !m.is_dir()) {
                fs::remove_file(&at).map_err(|e| ctx.fail(&e))?;
            }
        }
        let unpacked = entry
            .unpack_in(&dst)
            .map_err(|e| unpack_error(&e, &dst.join(&rel)))?;
        if !unpacked {
            return Err(outside());
        }
        if entry.header().entry_type().is_dir() {
            let full = dst.join(&rel);
            dirs.push(open_dir(&full, entry.header()).map_err(|e| ctx.fail(&e))?);
        }
        entries += 1;
    }
    // Deepest first: a directory's time and mode once nothing more is
    // made in it.
    for d in dirs.iter().rev() {
        d.finish().map_err(|e| ctx.fail(&e))?;
    }
    // Whatever follows the archive's end (padding) is read to the end, so
    // FS_DONE comes after the host's FS_END.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| io_error(&e, Some(&ctx.req.path)))?;
    let bytes = rest.bytes;
    Ok(FsDone {
        bytes: Some(bytes),
        entries: Some(entries),
        ..FsDone::default()
    })
}
