//! Whole trees between a local path and a guest path, as one tar stream
//! each way (the agent's `tar_get` and `tar_put`). The archive format is
//! the `tar` crate's (ustar with GNU long names, what the agent reads and
//! writes): writing our own would be a second, less tested copy of it.
//!
//! The local side follows `docker cp`'s rule for a destination: the
//! destination path becomes the copy. Which destination to pick when the
//! user names an existing directory is the CLI's business.

use std::fs as stdfs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use super::error::{Error, Result};
use super::fs::{from_io, is_clean_relative, FileWriter, Fs, TarOptions, TreeDone};
use crate::messages::{FsError, FsErrorKind};

/// Called with the number of archive bytes moved since the last call.
pub(crate) type Progress<'a> = &'a mut dyn FnMut(u64);

fn local(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

fn invalid(path: &Path, what: &str) -> Error {
    Error::Fs(FsError::new(
        FsErrorKind::InvalidRequest,
        what.to_owned(),
        None,
        Some(path.to_string_lossy().into_owned()),
    ))
}

/// A writer that counts what goes through it.
struct Counting<'a, W> {
    inner: W,
    progress: Progress<'a>,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that counts what goes through it.
pub(crate) struct CountingReader<'a, R> {
    pub(crate) inner: R,
    pub(crate) progress: Progress<'a>,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }
}

/// Every path under `root` (directories before their contents, names
/// sorted), relative to it.
fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let dir = root.join(rel);
    let mut names = Vec::new();
    for entry in stdfs::read_dir(&dir).map_err(local(format!("cannot list {}", dir.display())))? {
        let entry = entry.map_err(local(format!("cannot list {}", dir.display())))?;
        names.push(entry.file_name());
    }
    names.sort();
    for name in names {
        let r = rel.join(&name);
        let full = root.join(&r);
        let meta = stdfs::symlink_metadata(&full)
            .map_err(local(format!("cannot stat {}", full.display())))?;
        out.push(r.clone());
        if meta.is_dir() {
            walk(root, &r, out)?;
        }
    }
    Ok(())
}

/// The bytes of regular files under (or at) `path`: a transfer's size for
/// a progress bar.
pub fn local_size(path: &Path) -> u64 {
    let Ok(meta) = stdfs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return if meta.is_file() { meta.len() } else { 0 };
    }
    let mut paths = Vec::new();
    if walk(path, Path::new(""), &mut paths).is_err() {
        return 0;
    }
    paths
        .iter()
        .filter_map(|p| stdfs::symlink_metadata(path.join(p)).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

fn builder<'a>(w: Counting<'a, FileWriter>) -> tar::Builder<Counting<'a, FileWriter>> {
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    b
}

fn finish_archive(b: tar::Builder<Counting<'_, FileWriter>>) -> Result<TreeDone> {
    let w = b.into_inner().map_err(from_io)?;
    w.inner.finish()
}

/// Local `local` to guest `remote`, which becomes the copy.
pub(crate) fn upload(
    fs: &Fs,
    local_path: &Path,
    remote: &Path,
    options: TarOptions,
    progress: Progress<'_>,
) -> Result<TreeDone> {
    let meta = stdfs::symlink_metadata(local_path)
        .map_err(local(format!("cannot stat {}", local_path.display())))?;
    if meta.is_dir() {
        return upload_dir(fs, local_path, &meta, remote, options, progress);
    }
    let (Some(parent), Some(name)) = (remote.parent(), remote.file_name()) else {
        return Err(invalid(remote, "a file's destination needs a file name"));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let w = fs.tar_writer(parent, options)?;
    let mut b = builder(Counting { inner: w, progress });
    b.append_path_with_name(local_path, name).map_err(from_io)?;
    finish_archive(b)
}

fn upload_dir(
    fs: &Fs,
    local_path: &Path,
    meta: &stdfs::Metadata,
    remote: &Path,
    options: TarOptions,
    progress: Progress<'_>,
) -> Result<TreeDone> {
    let mut paths = Vec::new();
    walk(local_path, Path::new(""), &mut paths)?;
    let made = match fs.symlink_metadata(remote) {
        Ok(m) if m.is_dir() => false,
        Ok(_) => {
            return Err(Error::Fs(FsError::new(
                FsErrorKind::NotADirectory,
                "cannot copy a directory onto a file",
                Some(libc::ENOTDIR),
                Some(remote.to_string_lossy().into_owned()),
            )))
        }
        Err(e) if e.fs_error_kind() == Some(FsErrorKind::NotFound) => true,
        Err(e) => return Err(e),
    };
    let w = fs.tar_writer(
        remote,
        TarOptions {
            parents: true,
            ..options
        },
    )?;
    let mut b = builder(Counting { inner: w, progress });
    for rel in &paths {
        b.append_path_with_name(local_path.join(rel), rel)
            .map_err(from_io)?;
    }
    let done = finish_archive(b)?;
    // The top directory itself is not in the archive: give it the
    // source's mode and time when this copy made it.
    if made {
        fs.set_permissions(remote, meta.mode() & 0o7777)?;
        if options.owners {
            fs.chown(remote, Some(meta.uid()), Some(meta.gid()))?;
        }
        fs.set_times(remote, None, meta.modified().ok())?;
    }
    Ok(done)
}

/// Where an archive entry goes: its name after the first component
/// (`tar_get` names entries after the tree's top), under `dest`.
fn target_of(dest: &Path, name: &Path) -> Result<PathBuf> {
    let mut comps = name.components();
    match comps.next() {
        Some(Component::Normal(_)) => {}
        _ => return Err(invalid(name, "archive entry with an unexpected name")),
    }
    let rest = comps.as_path();
    if !is_clean_relative(rest) {
        return Err(invalid(name, "archive entry with a `..` or absolute name"));
    }
    Ok(if rest.as_os_str().is_empty() {
        dest.to_path_buf()
    } else {
        dest.join(rest)
    })
}

/// Refuses a target whose parent, through a symlink, is outside `root`.
fn check_inside(root: &Path, target: &Path) -> Result<()> {
    let Some(parent) = target.parent() else {
        return Ok(());
    };
    if target == root {
        return Ok(());
    }
    let canon_root =
        stdfs::canonicalize(root).map_err(local(format!("cannot resolve {}", root.display())))?;
    let canon = stdfs::canonicalize(parent)
        .map_err(local(format!("cannot resolve {}", parent.display())))?;
    if !canon.starts_with(&canon_root) {
        return Err(invalid(
            target,
            "archive entry would land outside the destination",
        ));
    }
    Ok(())
}

struct DirTimes {
    path: PathBuf,
    mode: u32,
    mtime: u64,
}

/// Guest `remote` to local `dest`, which becomes the copy.
pub(crate) fn download(
    fs: &Fs,
    remote: &Path,
    dest: &Path,
    options: TarOptions,
    progress: Progress<'_>,
) -> Result<TreeDone> {
    let reader = fs.tar_reader(remote)?;
    if options.parents {
        if let Some(p) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            stdfs::create_dir_all(p).map_err(local(format!("cannot create {}", p.display())))?;
        }
    }
    let mut counting = CountingReader {
        inner: reader,
        progress,
    };
    let mut ar = tar::Archive::new(&mut counting);
    ar.set_preserve_permissions(true);
    ar.set_preserve_mtime(true);
    ar.set_preserve_ownerships(options.owners);
    ar.set_overwrite(true);
    let mut dirs: Vec<DirTimes> = Vec::new();
    for entry in ar.entries().map_err(from_io)? {
        let mut entry = entry.map_err(from_io)?;
        let name = entry.path().map_err(from_io)?.into_owned();
        let target = target_of(dest, &name)?;
        if target != dest {
            check_inside(dest, &target)?;
        }
        let ctx = format!("cannot write {}", target.display());
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                match stdfs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        stdfs::remove_file(&target).map_err(local(ctx.clone()))?;
                        stdfs::create_dir(&target).map_err(local(ctx))?;
                    }
                    Err(_) => stdfs::create_dir_all(&target).map_err(local(ctx))?,
                }
                let h = entry.header();
                dirs.push(DirTimes {
                    path: target,
                    mode: h.mode().map_err(from_io)? & 0o7777,
                    mtime: h.mtime().map_err(from_io)?,
                });
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(from_io)?
                    .ok_or_else(|| invalid(&name, "hard link without a target"))?
                    .into_owned();
                let src = target_of(dest, &link)?;
                check_inside(dest, &src)?;
                let _ = stdfs::remove_file(&target);
                stdfs::hard_link(&src, &target).map_err(local(ctx))?;
            }
            _ => {
                if stdfs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                    return Err(Error::Fs(FsError::new(
                        FsErrorKind::IsADirectory,
                        "cannot replace a local directory with a file",
                        Some(libc::EISDIR),
                        Some(target.to_string_lossy().into_owned()),
                    )));
                }
                entry.unpack(&target).map_err(|e| match from_io(e) {
                    Error::Io { source, .. } => Error::Io {
                        context: ctx,
                        source,
                    },
                    other => other,
                })?;
            }
        }
    }
    // tar stops at the end-of-archive blocks; read what follows (padding)
    // up to the agent's FS_DONE, which carries the counts.
    io::copy(&mut counting, &mut io::sink()).map_err(from_io)?;
    // Directories last, deepest first: their modes may forbid writing, and
    // their times change with every entry made in them.
    for d in dirs.iter().rev() {
        let t = UNIX_EPOCH + Duration::from_secs(d.mtime);
        let ctx = format!("cannot set the time of {}", d.path.display());
        stdfs::File::open(&d.path)
            .and_then(|f| f.set_modified(t))
            .map_err(local(ctx))?;
        let ctx = format!("cannot set the mode of {}", d.path.display());
        stdfs::set_permissions(&d.path, stdfs::Permissions::from_mode(d.mode))
            .map_err(local(ctx))?;
    }
    let done = counting.inner.done().unwrap_or_default();
    Ok(done)
}
