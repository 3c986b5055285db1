//! The `fs` extension over the wire (docs/PROTOCOL.md, "Extension `fs`"),
//! against the real agent: every operation, every error kind, users,
//! windows both ways, trees as tar, watches, and the rules that the loop
//! never blocks on a file and that a cancelled or abandoned operation
//! leaves no worker, fd or temporary file. The checker sees every frame:
//! FS_OPENED first, FS_DATA and FS_WRITE_ACK only after it, never more
//! than the request's window unacknowledged.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentd::messages::{FsMsg, FsRequest, Kind, Message};

use crate::support::agent::*;
use crate::support::fs::*;
use crate::support::listen::Listening;
use crate::support::util::{mkfifo, pseudo_random, Rng, TempDir};
use crate::support::{timeout, wait_until};

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).expect("lstat").mode() & 0o7777
}

fn set_times(p: &Path, mtime_ns: i64) {
    let c = CString::new(p.as_os_str().as_bytes()).expect("no NUL");
    let t = libc::timespec {
        tv_sec: mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: mtime_ns.rem_euclid(1_000_000_000),
    };
    let times = [t, t];
    // SAFETY: a valid path and two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", p.display());
}

fn mtime_ns(p: &Path) -> i64 {
    let m = std::fs::symlink_metadata(p).expect("lstat");
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

/// Entries of `dir` (names), for checking that nothing was left behind.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A scratch tmpfs of `size` bytes (read-only with `ro`), mounted before
/// the agent starts (a pid-namespaced agent gets a copy of the mounts),
/// lazily unmounted on drop.
struct Tmpfs(TempDir);

impl Tmpfs {
    fn mount(tag: &str, options: &str, ro: bool) -> Tmpfs {
        let dir = TempDir::new(tag);
        let target = CString::new(dir.path().as_os_str().as_bytes()).expect("no NUL");
        let opts = CString::new(options).expect("no NUL");
        let flags = if ro { libc::MS_RDONLY } else { 0 };
        // SAFETY: valid C strings; tmpfs takes its options as a string.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let c = CString::new(self.0.path().as_os_str().as_bytes()).expect("no NUL");
        // SAFETY: a valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// FS_REQUEST and the first FS_WRITE in one write, as a pipelining host
/// sends them: the agent must still send FS_OPENED before any ack.
fn pipelined_write(agent: &Agent, id: u32, r: &FsRequest, data: &[u8]) {
    let mut bytes = Message::Fs(FsMsg::Request(Box::new(r.clone()))).to_bytes(id);
    bytes.extend_from_slice(&Message::Fs(FsMsg::Write(data)).to_bytes(id));
    bytes.extend_from_slice(&Message::Fs(FsMsg::End).to_bytes(id));
    agent.send_raw(&bytes);
}

both! {
    /// A write whose FS_WRITE and FS_END come right behind its FS_REQUEST:
    /// FS_OPENED comes first (the checker fails any FS_WRITE_ACK before
    /// it), every byte is acknowledged, and the file has them all.
    fn write_acks_follow_opened_when_pipelined(opts: Opts) {
        let dir = TempDir::new("fs-pipelined");
        let mut agent = Agent::start_with(opts);
        let data = pseudo_random(200 * 1024, 7);
        let mut ids = Vec::new();
        for i in 0..16 {
            let id = agent.new_id();
            let path = dir.join(&format!("f{i}"));
            pipelined_write(&agent, id, &req("write", &path), &data[..(i + 1) * 4096]);
            ids.push((id, path, (i + 1) * 4096));
        }
        for (id, path, len) in ids {
            let out = agent.fs_collect(id);
            assert_eq!(out.kinds.first(), Some(&(Kind::FsOpened as u8)), "{:?}", out.kinds);
            assert_eq!(out.write_acked, len as u64);
            assert_eq!(out.done().bytes, Some(len as u64));
            assert_eq!(std::fs::read(&path).expect("written"), &data[..len]);
        }
    }

    /// mkdir applies `mode` exactly (no umask: 0o777, sticky and setgid
    /// bits too); parents get 0o755; an existing directory is no error with
    /// `parents` and `exists` without; a mode above 0o7777 is refused.
    fn mkdir_modes_and_parents(opts: Opts) {
        let dir = TempDir::new("fs-mkdir");
        let mut agent = Agent::start_with(opts);
        for mode in [0o777, 0o1777, 0o2750, 0o700] {
            let p = dir.join(&format!("d{mode:o}"));
            agent.fs_ok(FsRequest { mode: Some(mode), ..req("mkdir", &p) });
            assert_eq!(mode_of(&p), mode, "{}", p.display());
            assert!(p.is_dir());
        }
        let deep = dir.join("a/b/c");
        agent.fs_err(req("mkdir", &deep), "not_found");
        agent.fs_ok(FsRequest { mode: Some(0o711), parents: Some(true), ..req("mkdir", &deep) });
        assert_eq!(mode_of(&deep), 0o711);
        assert_eq!(mode_of(&dir.join("a")), 0o755);
        assert_eq!(mode_of(&dir.join("a/b")), 0o755);
        // Existing: fine with parents (its mode kept), `exists` without.
        agent.fs_ok(FsRequest { mode: Some(0o700), parents: Some(true), ..req("mkdir", &deep) });
        assert_eq!(mode_of(&deep), 0o711);
        agent.fs_err(req("mkdir", &deep), "exists");
        // A file in the way is not a directory that exists.
        std::fs::write(dir.join("file"), b"x").expect("write");
        agent.fs_err(FsRequest { parents: Some(true), ..req("mkdir", dir.join("file")) }, "exists");
        agent.fs_err(req("mkdir", dir.join("file/sub")), "not_a_directory");
        let e = agent.fs_err(FsRequest { mode: Some(0o10000), ..req("mkdir", dir.join("big")) }, "invalid_request");
        assert!(e.message.contains("0o10000") || e.message.contains("10000"), "{e:?}");
        assert!(!dir.join("big").exists());
    }

    /// read: a whole file with FS_OPENED's stat first, an offset and a
    /// length, an offset past the end, frames of at most 64 KiB.
    fn read_whole_and_ranges(opts: Opts) {
        let dir = TempDir::new("fs-read");
        let data = pseudo_random(3 * 1024 * 1024 + 17, 1);
        let p = dir.join("data");
        std::fs::write(&p, &data).expect("write");
        let mut agent = Agent::start_with(opts);
        let out = agent.fs_read(req("read", &p));
        let stat = out.opened.clone().flatten().expect("FS_OPENED with stat");
        assert_eq!((stat.kind.as_str(), stat.size), ("file", data.len() as u64));
        assert!(out.batch_sizes.iter().all(|&n| n > 0 && n <= 64 * 1024));
        assert!(out.data == data, "content differs");
        assert_eq!(out.done().bytes, Some(data.len() as u64));

        let r = FsRequest { offset: Some(1_000_000), length: Some(123_456), ..req("read", &p) };
        let out = agent.fs_read(r);
        assert!(out.data == data[1_000_000..1_123_456]);
        assert_eq!(out.done().bytes, Some(123_456));
        let r = FsRequest { offset: Some(data.len() as u64 - 10), length: Some(1000), ..req("read", &p) };
        assert_eq!(agent.fs_read(r).data, &data[data.len() - 10..]);
        let r = FsRequest { offset: Some(1 << 40), ..req("read", &p) };
        let out = agent.fs_read(r);
        assert!(out.data.is_empty());
        assert_eq!(out.done().bytes, Some(0));
        let r = FsRequest { length: Some(0), ..req("read", &p) };
        assert_eq!(agent.fs_read(r).done().bytes, Some(0));
    }

    /// The agent never has more than the request's window unacknowledged:
    /// without acks it stops at the window; each ack lets exactly that much
    /// more come (the checker counts every byte).
    fn read_respects_the_window(opts: Opts) {
        let dir = TempDir::new("fs-window");
        let data = pseudo_random(512 * 1024, 2);
        let p = dir.join("data");
        std::fs::write(&p, &data).expect("write");
        let mut agent = Agent::start_with(opts);
        let id = agent.new_id();
        agent.fs_send(id, &FsRequest { window: Some(10_000), ..req("read", &p) });
        let mut got = Vec::new();
        let mut acked = 0usize;
        let mut stalls = 0;
        while acked < 24_000 {
            match agent.fs_next(id, Duration::from_millis(150)) {
                Some(f) if f.kind == Kind::FsData as u8 => {
                    got.extend_from_slice(&f.payload);
                    assert!(got.len() - acked <= 10_000, "{} unacknowledged", got.len() - acked);
                }
                Some(f) => assert_eq!(f.kind, Kind::FsOpened as u8),
                None => {
                    // Nothing more without an ack: some of it back.
                    stalls += 1;
                    let n = (got.len() - acked).min(4_000);
                    agent.fs_ack(id, n as u32);
                    acked += n;
                }
            }
        }
        assert!(stalls >= 6, "{stalls} stalls");
        agent.fs_ack(id, (got.len() - acked) as u32);
        got.extend_from_slice(&agent.fs_collect(id).data);
        assert!(got == data, "{} bytes of {}", got.len(), data.len());
    }

    /// write: create with an exact mode, truncate, append, exclusive,
    /// create: false; the mode of an existing file is kept.
    fn write_modes(opts: Opts) {
        let dir = TempDir::new("fs-write");
        let mut agent = Agent::start_with(opts);
        let p = dir.join("f");
        let out = agent.fs_write(FsRequest { mode: Some(0o666), ..req("write", &p) }, b"hello world");
        assert_eq!(out.kinds.first(), Some(&(Kind::FsOpened as u8)));
        assert_eq!(out.done().bytes, Some(11));
        assert_eq!(std::fs::read(&p).expect("read"), b"hello world");
        assert_eq!(mode_of(&p), 0o666, "the umask must not apply");
        // Truncate: shorter content replaces it; the mode stays.
        agent.fs_write(FsRequest { mode: Some(0o600), ..req("write", &p) }, b"bye").done();
        assert_eq!(std::fs::read(&p).expect("read"), b"bye");
        assert_eq!(mode_of(&p), 0o666);
        agent.fs_write(FsRequest { append: Some(true), ..req("write", &p) }, b" now").done();
        assert_eq!(std::fs::read(&p).expect("read"), b"bye now");
        let out = agent.fs_write(FsRequest { exclusive: Some(true), ..req("write", &p) }, b"x");
        assert_eq!(out.error().kind, "exists");
        assert_eq!(std::fs::read(&p).expect("read"), b"bye now");
        let q = dir.join("missing");
        let out = agent.fs_write(FsRequest { create: Some(false), ..req("write", &q) }, b"x");
        assert_eq!(out.error().kind, "not_found");
        assert!(!q.exists());
        agent.fs_write(FsRequest { exclusive: Some(true), ..req("write", &q) }, b"new").done();
        assert_eq!(std::fs::read(&q).expect("read"), b"new");
        assert_eq!(mode_of(&q), 0o644, "the default mode");
        // Parents made on the way, a default mode, a big file in frames.
        let big = pseudo_random(5 * 1024 * 1024, 3);
        let deep = dir.join("x/y/z.bin");
        agent.fs_write(FsRequest { parents: Some(true), ..req("write", &deep) }, &big).done();
        assert!(std::fs::read(&deep).expect("read") == big);
        let e = agent.fs_write(FsRequest { mode: Some(0o20000), ..req("write", dir.join("m")) }, b"");
        assert_eq!(e.error().kind, "invalid_request");
        let e = agent.fs_write(FsRequest { atomic: Some(true), append: Some(true), ..req("write", &p) }, b"");
        assert_eq!(e.error().kind, "invalid_request");
        let out = agent.fs_write(req("write", dir.path()), b"");
        assert_eq!(out.error().kind, "is_a_directory");
        // FS_WRITE after FS_END is ERROR stdin_closed.
        let id = agent.new_id();
        agent.fs_send(id, &req("write", dir.join("late")));
        let mut o = FsOutcome::default();
        assert!(agent.fs_until_opened(id, &mut o));
        // In one write: the agent reads FS_WRITE before the worker ends.
        let mut bytes = Message::Fs(FsMsg::End).to_bytes(id);
        bytes.extend_from_slice(&Message::Fs(FsMsg::Write(b"late")).to_bytes(id));
        agent.send_raw(&bytes);
        agent.expect_error_kind(id, "stdin_closed", Some(Kind::FsWrite as u8));
        agent.fs_collect(id).done();
    }

    /// atomic: while the upload is in flight the path still has its old
    /// content (the new bytes are in a temporary file beside it); FS_END
    /// renames it into place with the old file's mode; a cancelled upload
    /// leaves the old file and no temporary file.
    fn atomic_writes_are_all_or_nothing(opts: Opts) {
        let dir = TempDir::new("fs-atomic");
        let p = dir.join("conf");
        std::fs::write(&p, b"old").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let mut agent = Agent::start_with(opts);
        let new = pseudo_random(300 * 1024, 4);
        let mut current = b"old".to_vec();
        for cancel in [false, true] {
            let id = agent.new_id();
            agent.fs_send(id, &FsRequest { atomic: Some(true), ..req("write", &p) });
            let mut out = FsOutcome::default();
            assert!(agent.fs_until_opened(id, &mut out));
            agent.fs_write_data(id, &new[..100 * 1024]);
            assert!(wait_until(timeout(), || names(dir.path()).len() == 2), "{:?}", names(dir.path()));
            assert!(std::fs::read(&p).expect("read") == current, "half a file is visible");
            if cancel {
                agent.fs_cancel(id);
                let out = agent.fs_collect(id);
                assert_eq!(out.error().kind, "cancelled");
                agent.wait_no_children(timeout());
                assert_eq!(names(dir.path()), ["conf"]);
                assert!(std::fs::read(&p).expect("read") == current);
            } else {
                agent.fs_write_data(id, &new[100 * 1024..]);
                agent.fs_end(id);
                assert_eq!(agent.fs_collect(id).done().bytes, Some(new.len() as u64));
                assert!(std::fs::read(&p).expect("read") == new);
                assert_eq!(mode_of(&p), 0o640, "the replaced file's mode");
                assert_eq!(names(dir.path()), ["conf"]);
                current = new.clone();
            }
        }
        // A new file, atomically and exclusively.
        let q = dir.join("fresh");
        agent.fs_write(FsRequest { atomic: Some(true), exclusive: Some(true), mode: Some(0o600), ..req("write", &q) }, b"1").done();
        assert_eq!(mode_of(&q), 0o600);
        let out = agent.fs_write(FsRequest { atomic: Some(true), exclusive: Some(true), ..req("write", &q) }, b"2");
        assert_eq!(out.error().kind, "exists");
        assert_eq!(std::fs::read(&q).expect("read"), b"1");
        assert_eq!(names(dir.path()), ["conf", "fresh"]);
    }

    /// stat and lstat: type, size, mode, uid, gid, mtime to the
    /// nanosecond, nlink, ino; a symlink's target with lstat, what it
    /// points to with stat.
    fn stat_and_lstat(opts: Opts) {
        let dir = TempDir::new("fs-stat");
        let f = dir.join("f");
        std::fs::write(&f, b"12345").expect("write");
        // chown first: it clears setuid.
        std::os::unix::fs::chown(&f, Some(1234), Some(5678)).expect("chown");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o4751)).expect("chmod");
        set_times(&f, 1_600_000_000_123_456_789);
        let l = dir.join("l");
        std::os::unix::fs::symlink("f", &l).expect("symlink");
        let mut agent = Agent::start_with(opts);
        let s = agent.fs_ok(req("stat", &f)).stat.expect("stat");
        let meta = std::fs::metadata(&f).expect("stat");
        assert_eq!((s.kind.as_str(), s.size, s.mode, s.uid, s.gid), ("file", 5, 0o4751, 1234, 5678));
        assert_eq!(s.mtime_ns, 1_600_000_000_123_456_789);
        assert_eq!((s.ino, s.nlink), (meta.ino(), 1));
        assert_eq!(s.target, None);
        let s = agent.fs_ok(req("lstat", &l)).stat.expect("stat");
        assert_eq!((s.kind.as_str(), s.size, s.target.as_deref()), ("symlink", 1, Some("f")));
        let s = agent.fs_ok(req("stat", &l)).stat.expect("stat");
        assert_eq!((s.kind.as_str(), s.mode), ("file", 0o4751));
        let s = agent.fs_ok(req("stat", dir.path())).stat.expect("stat");
        assert_eq!(s.kind, "dir");
        let fifo = dir.join("p");
        mkfifo(&fifo);
        assert_eq!(agent.fs_ok(req("stat", &fifo)).stat.expect("stat").kind, "fifo");
        assert_eq!(agent.fs_ok(req("stat", "/dev/null")).stat.expect("stat").kind, "char");
        // Relative paths are relative to the user's home (root's here:
        // whatever it is, `.` is a directory).
        assert_eq!(agent.fs_ok(req("stat", ".")).stat.expect("stat").kind, "dir");
        let e = agent.fs_err(req("stat", dir.join("none")), "not_found");
        assert_eq!(e.errno, Some(libc::ENOENT));
        assert_eq!(e.path.as_deref(), Some(dir.join("none").to_str().expect("utf-8")));
        agent.fs_err(req("stat", f.join("x")), "not_a_directory");
        let a = dir.join("loop-a");
        std::os::unix::fs::symlink("loop-b", &a).expect("symlink");
        std::os::unix::fs::symlink("loop-a", dir.join("loop-b")).expect("symlink");
        let e = agent.fs_err(req("stat", &a), "other");
        assert_eq!(e.errno, Some(libc::ELOOP));
        let dangling = dir.join("dangling");
        std::os::unix::fs::symlink("nowhere", &dangling).expect("symlink");
        agent.fs_err(req("stat", &dangling), "not_found");
        assert_eq!(agent.fs_ok(req("lstat", &dangling)).stat.expect("stat").target.as_deref(), Some("nowhere"));
    }

    /// A directory of 100,000 entries comes as many FS_ENTRIES frames of at
    /// most 64 KiB, every name once; FS_DONE counts them. With `stat`,
    /// each entry has its metadata; a symlink its target.
    fn list_a_big_directory(opts: Opts) {
        // On a tmpfs: 100,000 files are made (and removed) in a blink.
        let fast = Tmpfs::mount("fs-list", "size=64m,nr_inodes=200k", false);
        let dir = TempDir::new("fs-list");
        let big = fast.0.join("big");
        std::fs::create_dir(&big).expect("mkdir");
        for i in 0..100_000 {
            std::fs::File::create(big.join(format!("entry-with-a-long-name-{i:06}"))).expect("create");
        }
        let mut agent = Agent::start_with(opts);
        let out = agent.fs(req("list", &big));
        assert!(out.batch_sizes.len() > 40, "{} frames", out.batch_sizes.len());
        assert!(out.batch_sizes.iter().all(|&n| n <= 64 * 1024));
        let mut names: Vec<&str> = out.entries.iter().map(|e| e.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 100_000);
        assert!(out.entries.iter().all(|e| e.kind == "file" && e.stat.is_none()));
        assert_eq!(out.done().entries, Some(100_000));

        let small = dir.join("small");
        std::fs::create_dir(&small).expect("mkdir");
        std::fs::write(small.join("a"), b"abc").expect("write");
        std::fs::create_dir(small.join("d")).expect("mkdir");
        std::os::unix::fs::symlink("a", small.join("l")).expect("symlink");
        // A name that is not UTF-8: its exact bytes in name_bin.
        let raw: &[u8] = b"bad-\xff\xfe";
        std::fs::write(small.join(std::ffi::OsStr::from_bytes(raw)), b"").expect("write");
        let out = agent.fs(FsRequest { stat: Some(true), ..req("list", &small) });
        let bad = out.entries.iter().find(|e| e.name.starts_with("bad-")).expect("the non-UTF-8 name");
        assert_eq!(bad.name_bin.as_deref(), Some(raw));
        assert!(out.entries.iter().filter(|e| !e.name.starts_with("bad-")).all(|e| e.name_bin.is_none()));
        let by: BTreeMap<_, _> = out.entries.iter().filter(|e| e.name_bin.is_none()).map(|e| (e.name.clone(), e.clone())).collect();
        assert_eq!(by.keys().collect::<Vec<_>>(), ["a", "d", "l"]);
        assert_eq!(by["a"].stat.as_ref().map(|s| s.size), Some(3));
        assert_eq!(by["d"].kind, "dir");
        assert_eq!(by["l"].kind, "symlink");
        assert_eq!(by["l"].stat.as_ref().and_then(|s| s.target.as_deref()), Some("a"));
        assert_eq!(agent.fs(req("list", &small)).done().entries, Some(4));
        agent.fs_err(req("list", small.join("a")), "not_a_directory");
        agent.fs_err(req("list", small.join("none")), "not_found");
        agent.fs_err(FsRequest { window: Some(1000), ..req("list", &small) }, "invalid_request");
    }

    /// remove: a file, a symlink (not its target), an empty directory; a
    /// full one is `not_empty` without `recursive` and goes with it.
    fn remove_files_and_trees(opts: Opts) {
        let dir = TempDir::new("fs-remove");
        let mut agent = Agent::start_with(opts);
        let f = dir.join("f");
        std::fs::write(&f, b"x").expect("write");
        std::os::unix::fs::symlink(&f, dir.join("l")).expect("symlink");
        agent.fs_ok(req("remove", dir.join("l")));
        assert!(f.exists());
        agent.fs_ok(req("remove", &f));
        assert!(!f.exists());
        agent.fs_err(req("remove", &f), "not_found");
        let empty = dir.join("empty");
        std::fs::create_dir(&empty).expect("mkdir");
        agent.fs_ok(req("remove", &empty));
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("a/b/c")).expect("mkdir");
        std::fs::write(tree.join("a/b/c/f"), b"x").expect("write");
        std::os::unix::fs::symlink("/", tree.join("a/root")).expect("symlink");
        agent.fs_err(req("remove", &tree), "not_empty");
        assert!(tree.join("a/b/c/f").exists());
        agent.fs_ok(FsRequest { recursive: Some(true), ..req("remove", &tree) });
        assert!(!tree.exists());
        assert_eq!(names(dir.path()), Vec::<String>::new());
    }

    /// rename: moves a file; `replace: false` refuses an existing `to`
    /// (`exists`), the default replaces it; a missing source is `not_found`.
    fn rename_with_and_without_replace(opts: Opts) {
        let dir = TempDir::new("fs-rename");
        let mut agent = Agent::start_with(opts);
        std::fs::write(dir.join("a"), b"A").expect("write");
        std::fs::write(dir.join("b"), b"B").expect("write");
        let r = FsRequest { to: Some(dir.join("b").to_string_lossy().into_owned()), replace: Some(false), ..req("rename", dir.join("a")) };
        agent.fs_err(r.clone(), "exists");
        assert_eq!(std::fs::read(dir.join("b")).expect("read"), b"B");
        agent.fs_ok(FsRequest { replace: None, ..r.clone() });
        assert_eq!(names(dir.path()), ["b"]);
        assert_eq!(std::fs::read(dir.join("b")).expect("read"), b"A");
        agent.fs_err(r, "not_found");
        let to_c = FsRequest { to: Some(dir.join("sub/c").to_string_lossy().into_owned()), ..req("rename", dir.join("b")) };
        agent.fs_err(to_c.clone(), "not_found");
        std::fs::create_dir(dir.join("sub")).expect("mkdir");
        agent.fs_ok(to_c);
        assert_eq!(std::fs::read(dir.join("sub/c")).expect("read"), b"A");
        agent.fs_err(req("rename", dir.join("sub")), "invalid_request");
    }

    /// chmod, chown and utimes change exactly what they say, through a
    /// symlink or (`follow: false`) on it.
    fn chmod_chown_utimes(opts: Opts) {
        let dir = TempDir::new("fs-attrs");
        let f = dir.join("f");
        std::fs::write(&f, b"x").expect("write");
        let l = dir.join("l");
        std::os::unix::fs::symlink("f", &l).expect("symlink");
        let mut agent = Agent::start_with(opts);
        agent.fs_ok(FsRequest { mode: Some(0o2741), ..req("chmod", &f) });
        assert_eq!(mode_of(&f), 0o2741);
        agent.fs_err(req("chmod", &f), "invalid_request");
        agent.fs_err(FsRequest { mode: Some(0o17777), ..req("chmod", &f) }, "invalid_request");
        assert_eq!(mode_of(&f), 0o2741);
        agent.fs_ok(FsRequest { uid: Some(4321), ..req("chown", &f) });
        let m = std::fs::metadata(&f).expect("stat");
        assert_eq!((m.uid(), m.gid()), (4321, 0));
        agent.fs_ok(FsRequest { gid: Some(99), ..req("chown", &l) });
        let m = std::fs::metadata(&f).expect("stat");
        assert_eq!((m.uid(), m.gid()), (4321, 99));
        agent.fs_ok(FsRequest { uid: Some(7), gid: Some(8), follow: Some(false), ..req("chown", &l) });
        let lm = std::fs::symlink_metadata(&l).expect("lstat");
        assert_eq!((lm.uid(), lm.gid()), (7, 8));
        assert_eq!(std::fs::metadata(&f).expect("stat").uid(), 4321);
        agent.fs_err(req("chown", &f), "invalid_request");

        agent.fs_ok(FsRequest { mtime_ns: Some(1_500_000_000_987_654_321), ..req("utimes", &f) });
        assert_eq!(mtime_ns(&f), 1_500_000_000_987_654_321);
        let atime_before = std::fs::metadata(&f).expect("stat").atime();
        agent.fs_ok(FsRequest { atime_ns: Some(-1_000_000_000), follow: Some(false), ..req("utimes", &l) });
        assert_eq!(std::fs::symlink_metadata(&l).expect("lstat").atime(), -1);
        assert_eq!(std::fs::metadata(&f).expect("stat").atime(), atime_before);
        assert_eq!(mtime_ns(&f), 1_500_000_000_987_654_321);
        agent.fs_err(req("utimes", &f), "invalid_request");
        agent.fs_err(FsRequest { mode: Some(0o600), ..req("chmod", dir.join("none")) }, "not_found");
    }

    /// symlink makes a link to any target (dangling too), readlink reads it
    /// back, realpath resolves links, `.` and `..`.
    fn symlink_readlink_realpath(opts: Opts) {
        let dir = TempDir::new("fs-links");
        std::fs::create_dir_all(dir.join("real/sub")).expect("mkdir");
        let mut agent = Agent::start_with(opts);
        let link = dir.join("link");
        agent.fs_ok(FsRequest { target: Some("real/sub".into()), ..req("symlink", &link) });
        assert_eq!(std::fs::read_link(&link).expect("readlink"), Path::new("real/sub"));
        assert_eq!(agent.fs_ok(req("readlink", &link)).path.as_deref(), Some("real/sub"));
        let twisted = format!("{}/link/../sub/./", dir.path().display());
        let resolved = std::fs::canonicalize(dir.join("real/sub")).expect("canonicalize");
        assert_eq!(agent.fs_ok(req("realpath", &twisted)).path.as_deref(), resolved.to_str());
        agent.fs_err(FsRequest { target: Some("x".into()), ..req("symlink", &link) }, "exists");
        agent.fs_err(req("symlink", dir.join("no-target")), "invalid_request");
        agent.fs_err(req("readlink", dir.join("real")), "invalid_request");
        agent.fs_err(req("realpath", dir.join("none")), "not_found");
        let dangling = dir.join("dangling");
        agent.fs_ok(FsRequest { target: Some("/nonexistent/x".into()), ..req("symlink", &dangling) });
        assert_eq!(agent.fs_ok(req("readlink", &dangling)).path.as_deref(), Some("/nonexistent/x"));
    }

    /// A random tree (modes, mtimes, symlinks, empty directories, unicode
    /// and long names, a large file) goes out with tar_get and back in with
    /// tar_put; the copy matches byte for byte and by metadata, and the
    /// archive is one `tar` reads.
    fn tar_round_trip(opts: Opts) {
        let dir = TempDir::new("fs-tar");
        let src = dir.join("src");
        make_tree(&src, 11);
        let mut agent = Agent::start_with(opts);
        let out = agent.fs(req("tar_get", &src));
        let stat = out.opened.clone().flatten().expect("FS_OPENED with stat");
        assert_eq!(stat.kind, "dir");
        let archive = out.data.clone();
        let done = out.done();
        assert_eq!(done.bytes, Some(archive.len() as u64));
        // `tar` agrees on the entries.
        let mut listed = 0u64;
        for e in tar::Archive::new(archive.as_slice()).entries().expect("entries") {
            let e = e.expect("an entry");
            assert!(e.path().expect("a name").starts_with("src"));
            listed += 1;
        }
        assert_eq!(done.entries, Some(listed));

        let dst = dir.join("dst");
        let out = agent.fs_write(FsRequest { parents: Some(true), ..req("tar_put", &dst) }, &archive);
        let done = out.done();
        assert_eq!(done.entries, Some(listed));
        assert_eq!(done.bytes, Some(archive.len() as u64));
        compare_trees(&src, &dst.join("src"));
        // A hard link stays one file with two names.
        let (x, h) = (dst.join("src/x.txt"), dst.join("src/a/b/hard"));
        let (mx, mh) = (std::fs::metadata(&x).expect("stat"), std::fs::metadata(&h).expect("stat"));
        assert_eq!((mx.ino(), mx.nlink()), (mh.ino(), 2), "a/b/hard is not x.txt's hard link");
        // Into an existing tree: files are replaced.
        std::fs::write(dst.join("src/big.bin"), b"changed").expect("write");
        agent.fs_write(req("tar_put", &dst), &archive).done();
        compare_trees(&src, &dst.join("src"));
        // A file alone.
        let out = agent.fs(req("tar_get", src.join("big.bin")));
        let mut a = tar::Archive::new(out.data.as_slice());
        let names: Vec<PathBuf> = a.entries().expect("entries").map(|e| e.expect("entry").path().expect("name").into_owned()).collect();
        assert_eq!(names, [PathBuf::from("big.bin")]);
        agent.fs_err(req("tar_get", dir.join("none")), "not_found");
        agent.fs_write(req("tar_put", dir.join("nowhere")), &archive).error();
    }

    /// tar_put refuses what would land outside its directory: an absolute
    /// name, a `..` component, a path through a symlink that leaves it.
    fn tar_put_refuses_escapes(opts: Opts) {
        let dir = TempDir::new("fs-tar-escape");
        let dst = dir.join("dst");
        std::fs::create_dir(&dst).expect("mkdir");
        let mut agent = Agent::start_with(opts);
        for name in ["../evil", "a/../../evil"] {
            let archive = raw_tar_file(name, b"evil");
            let out = agent.fs_write(req("tar_put", &dst), &archive);
            assert_eq!(out.error().kind, "invalid_request", "{name}");
        }
        let archive = raw_tar_file("/tmp/agentd-evil-absolute", b"evil");
        let out = agent.fs_write(req("tar_put", &dst), &archive);
        assert_eq!(out.error().kind, "invalid_request");
        assert!(!Path::new("/tmp/agentd-evil-absolute").exists());
        // Through a symlink.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "out", dir.path()).expect("link");
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        b.append_data(&mut h, "out/evil", &b"evil"[..]).expect("data");
        let out = agent.fs_write(req("tar_put", &dst), &b.into_inner().expect("archive"));
        assert_eq!(out.error().kind, "invalid_request");
        assert!(!dir.join("evil").exists());
        assert_eq!(names(dir.path()), ["dst"]);
    }

    /// tar_put keeps the archive's owners only with `owners`; otherwise, and
    /// as another user, files belong to the user who unpacks.
    fn tar_put_owners(opts: Opts) {
        let dir = TempDir::new("fs-tar-owners");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o640);
        h.set_uid(1234);
        h.set_gid(4321);
        h.set_mtime(1_000_000_000);
        b.append_data(&mut h, "owned", &b"hi"[..]).expect("data");
        let archive = b.into_inner().expect("archive");
        let mut agent = Agent::start_with(opts);
        for (sub, owners, user, want) in [
            ("kept", Some(true), None, (1234, 4321)),
            ("mine", None, None, (0, 0)),
            ("nobody", None, Some("nobody"), (65534, 65534)),
        ] {
            let d = dir.join(sub);
            std::fs::create_dir(&d).expect("mkdir");
            std::os::unix::fs::chown(&d, Some(65534), Some(65534)).expect("chown");
            let r = FsRequest { owners, user: user.map(str::to_owned), ..req("tar_put", &d) };
            agent.fs_write(r, &archive).done();
            let m = std::fs::metadata(d.join("owned")).expect("stat");
            assert_eq!((m.uid(), m.gid()), want, "{sub}");
            assert_eq!((m.mode() & 0o7777, m.mtime()), (0o640, 1_000_000_000), "{sub}");
        }
        let r = FsRequest { owners: Some(true), user: Some("nobody".into()), ..req("tar_put", dir.join("nobody")) };
        assert_eq!(agent.fs_write(r, &archive).error().kind, "permission_denied");
    }

    /// A watch reports created, modified, moved_from/moved_to (paired by
    /// cookie) and removed, in subdirectories made later too when
    /// recursive; FS_CANCEL ends it with FS_DONE.
    fn watch_reports_changes(opts: Opts) {
        let dir = TempDir::new("fs-watch");
        let mut agent = Agent::start_with(opts);
        let id = agent.new_id();
        agent.fs_send(id, &FsRequest { recursive: Some(true), ..req("watch", dir.path()) });
        let mut out = FsOutcome::default();
        assert!(agent.fs_until_opened(id, &mut out));
        std::fs::write(dir.join("a"), b"1").expect("write");
        std::fs::rename(dir.join("a"), dir.join("b")).expect("rename");
        std::fs::create_dir(dir.join("sub")).expect("mkdir");
        // Made right after its directory: seen by the watch or by its scan.
        std::fs::write(dir.join("sub/early"), b"x").expect("write");
        let want = |evs: &[agentd::messages::FsEvent], kind: &str, path: &str| {
            evs.iter().any(|e| e.kind == kind && e.path == path)
        };
        let mut events = Vec::new();
        let gather = |agent: &mut Agent, events: &mut Vec<agentd::messages::FsEvent>, cond: &dyn Fn(&[agentd::messages::FsEvent]) -> bool| {
            while !cond(events) {
                let f = agent.fs_next(id, timeout()).unwrap_or_else(|| panic!("no more events; have {events:?}"));
                assert_eq!(f.kind, Kind::FsEvents as u8);
                agent.fs_ack(id, f.payload.len() as u32);
                let Ok(Message::Fs(FsMsg::Events(e))) = Message::decode_from_agent(f.as_frame()) else { panic!("FS_EVENTS") };
                events.extend(e.events);
            }
        };
        gather(&mut agent, &mut events, &|e| want(e, "created", "sub/early") && want(e, "moved_to", "b"));
        // Sub is watched now: later changes in it come too.
        std::fs::write(dir.join("sub/late"), b"x").expect("write");
        std::fs::OpenOptions::new().append(true).open(dir.join("sub/late")).and_then(|mut f| std::io::Write::write_all(&mut f, b"more")).expect("append");
        std::fs::remove_file(dir.join("b")).expect("remove");
        std::fs::set_permissions(dir.join("sub/late"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
        gather(&mut agent, &mut events, &|e| want(e, "removed", "b") && want(e, "modified", "sub/late") && want(e, "attrib", "sub/late"));
        assert!(want(&events, "created", "a"), "{events:?}");
        assert!(want(&events, "created", "sub"), "{events:?}");
        assert!(events.iter().any(|e| e.path == "sub" && e.dir), "{events:?}");
        let from = events.iter().find(|e| e.kind == "moved_from" && e.path == "a").expect("moved_from");
        let to = events.iter().find(|e| e.kind == "moved_to" && e.path == "b").expect("moved_to");
        assert!(from.cookie.is_some() && from.cookie == to.cookie, "{from:?} {to:?}");
        agent.fs_cancel(id);
        let rest = agent.fs_collect(id);
        rest.done();
        agent.wait_no_children(timeout());
        agent.fs_err(req("watch", dir.join("none")), "not_found");
        std::fs::write(dir.join("file"), b"").expect("write");
        agent.fs_err(req("watch", dir.join("file")), "not_a_directory");
    }

    /// A watch whose host does not acknowledge stops at its window; events
    /// wait in the kernel, whose overflow is reported once the host reads
    /// again; the agent's memory does not grow meanwhile.
    fn watch_is_bounded_without_acks(opts: Opts) {
        let fast = Tmpfs::mount("fs-watch-bound", "size=64m,nr_inodes=100k", false);
        let dir = &fast.0;
        let mut agent = Agent::start_with(opts);
        let id = agent.new_id();
        agent.fs_send(id, &FsRequest { window: Some(64 * 1024), ..req("watch", dir.path()) });
        let mut out = FsOutcome::default();
        assert!(agent.fs_until_opened(id, &mut out));
        agent.ping();
        let idle = agent.rss_kib();
        let max_events = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .ok().and_then(|s| s.trim().parse::<usize>().ok()).unwrap_or(16384);
        // Two events per file (created, then modified at close): well
        // over the kernel's queue. Empty: no tmpfs pages.
        for i in 0..(max_events + 2000) {
            std::fs::write(dir.join(&format!("file-with-a-longish-name-{i:06}")), b"").expect("write");
        }
        // The window holds: at most 64 KiB of events unacknowledged.
        let mut unacked = 0usize;
        while let Some(f) = agent.fs_next(id, Duration::from_millis(300)) {
            unacked += f.payload.len();
            assert!(unacked <= 64 * 1024);
        }
        agent.ping();
        assert!(agent.rss_kib() <= idle + 8 * 1024, "RSS {} KiB, idle {idle} KiB", agent.rss_kib());
        // Reading again: the overflow is reported.
        agent.fs_ack(id, unacked as u32);
        let mut overflow = false;
        while !overflow {
            let f = agent.fs_next(id, timeout()).expect("events");
            agent.fs_ack(id, f.payload.len() as u32);
            let Ok(Message::Fs(FsMsg::Events(e))) = Message::decode_from_agent(f.as_frame()) else { panic!("FS_EVENTS") };
            overflow = e.overflow;
        }
        agent.fs_cancel(id);
        agent.fs_collect(id).done();
    }

    /// Every error kind the spec lists that a request can produce here,
    /// with its errno and path where a call failed.
    fn error_kinds(opts: Opts) {
        let dir = TempDir::new("fs-errors");
        std::fs::write(dir.join("f"), b"x").expect("write");
        std::fs::create_dir_all(dir.join("d/sub")).expect("mkdir");
        let mut agent = Agent::start_with(opts);
        let p = |n: &str| dir.join(n);
        let e = agent.fs_err(req("read", p("none")), "not_found");
        assert_eq!(e.errno, Some(libc::ENOENT));
        agent.fs_err(req("read", p("d")), "is_a_directory");
        agent.fs_err(req("list", p("f")), "not_a_directory");
        agent.fs_err(req("mkdir", p("d")), "exists");
        agent.fs_err(req("remove", p("d")), "not_empty");
        agent.fs_err(req("frobnicate", p("f")), "invalid_request");
        agent.fs_err(req("stat", ""), "invalid_request");
        agent.fs_err(FsRequest { window: Some(0), ..req("read", p("f")) }, "invalid_request");
        agent.fs_err(req("stat", format!("{}/{}", dir.path().display(), "n".repeat(300))), "invalid_request");
        let e = agent.fs_err(FsRequest { user: Some("no-such-user-here".into()), ..req("stat", p("f")) }, "bad_user");
        assert!(e.message.contains("no-such-user-here"), "{e:?}");
        // id 0 is the connection's.
        agent.fs_send(0, &req("stat", p("f")));
        let f = agent.recv_where(|f| f.id == 0 && f.kind == Kind::FsError as u8, "FS_ERROR on id 0");
        let Ok(Message::Fs(FsMsg::Error(e))) = Message::decode_from_agent(f.as_frame()) else { panic!("FS_ERROR") };
        assert_eq!(e.kind, "invalid_request");
        // A live id: duplicate_id, the live operation unaffected.
        let fifo = p("fifo");
        mkfifo(&fifo);
        let id = agent.new_id();
        agent.fs_send(id, &req("read", &fifo));
        agent.fs_send(id, &req("stat", p("f")));
        let f = agent.recv_where(|f| f.id == id && f.kind == Kind::FsError as u8, "FS_ERROR duplicate_id");
        let Ok(Message::Fs(FsMsg::Error(e))) = Message::decode_from_agent(f.as_frame()) else { panic!("FS_ERROR") };
        assert_eq!(e.kind, "duplicate_id");
        agent.fs_cancel(id);
        assert_eq!(agent.fs_collect(id).error().kind, "cancelled");
        agent.fs_cancel(id);
        agent.expect_error_kind(id, "unknown_session", Some(Kind::FsCancel as u8));
        agent.fs_ack(987_654, 10);
        agent.expect_error_kind(987_654, "unknown_session", Some(Kind::FsDataAck as u8));
        agent.fs_write_data(987_655, b"x");
        agent.expect_error_kind(987_655, "unknown_session", Some(Kind::FsWrite as u8));
        // FS_WRITE on an operation that takes no data.
        let id = agent.new_id();
        agent.fs_send(id, &req("read", &fifo));
        agent.fs_write_data(id, b"x");
        agent.expect_error_kind(id, "stdin_closed", Some(Kind::FsWrite as u8));
        agent.fs_cancel(id);
        agent.fs_collect(id).error();
        agent.wait_no_children(timeout());
    }

    /// As `nobody`, the kernel's checks apply: a root-only file cannot be
    /// read, a root-owned directory not written, chmod and chown of root's
    /// files refused; the same requests as root succeed.
    fn operations_as_nobody(opts: Opts) {
        let dir = TempDir::new("fs-nobody");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let secret = dir.join("secret");
        std::fs::write(&secret, b"root only").expect("write");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut agent = Agent::start_with(opts);
        let nobody = |r: FsRequest| FsRequest { user: Some("nobody".into()), ..r };
        let e = agent.fs_err(nobody(req("read", &secret)), "permission_denied");
        assert_eq!(e.errno, Some(libc::EACCES));
        assert_eq!(agent.fs_read(req("read", &secret)).data, b"root only");
        let out = agent.fs_write(nobody(req("write", dir.join("new"))), b"x");
        assert_eq!(out.error().kind, "permission_denied");
        assert!(!dir.join("new").exists());
        agent.fs_err(nobody(req("mkdir", dir.join("sub"))), "permission_denied");
        agent.fs_err(nobody(FsRequest { mode: Some(0o777), ..req("chmod", &secret) }), "permission_denied");
        agent.fs_err(nobody(FsRequest { uid: Some(65534), ..req("chown", &secret) }), "permission_denied");
        agent.fs_err(nobody(req("remove", &secret)), "permission_denied");
        assert!(secret.exists());
        // What nobody owns, nobody may change; and the stat of a readable
        // file works.
        let mine = dir.join("mine");
        std::fs::create_dir(&mine).expect("mkdir");
        std::os::unix::fs::chown(&mine, Some(65534), Some(65534)).expect("chown");
        let out = agent.fs_write(nobody(FsRequest { mode: Some(0o640), ..req("write", mine.join("f")) }), b"hi");
        out.done();
        let m = std::fs::metadata(mine.join("f")).expect("stat");
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (65534, 65534, 0o640));
        agent.fs_ok(nobody(req("stat", &secret)));
        agent.fs_ok(req("mkdir", dir.join("sub")));
        agent.fs_ok(FsRequest { mode: Some(0o700), ..req("chmod", &secret) });
    }

    /// A read of a FIFO with no writer (and a write to one with no reader)
    /// blocks its worker only: PING and an exec session go on; FS_CANCEL
    /// ends both, leaving no worker.
    fn a_blocked_fifo_stalls_nothing_else(opts: Opts) {
        let dir = TempDir::new("fs-fifo");
        let fifo = dir.join("fifo");
        mkfifo(&fifo);
        let fifo2 = dir.join("fifo2");
        mkfifo(&fifo2);
        let mut agent = Agent::start_with(opts);
        let (r, w) = (agent.new_id(), agent.new_id());
        agent.fs_send(r, &req("read", &fifo));
        agent.fs_send(w, &req("write", &fifo2));
        agent.fs_write_data(w, b"queued");
        agent.ping();
        assert!(wait_until(timeout(), || agent.children().len() == 2));
        let out = agent.sh("echo still running");
        out.assert_success();
        assert_eq!(out.stdout, b"still running\n");
        agent.ping();
        assert!(agent.fs_next(r, Duration::from_millis(200)).is_none());
        assert!(wait_until(timeout(), || agent.children().len() == 2));
        for id in [r, w] {
            agent.fs_cancel(id);
            assert_eq!(agent.fs_collect(id).error().kind, "cancelled");
        }
        agent.wait_no_children(timeout());
    }

    /// A write into a FIFO whose reader does not read blocks its worker;
    /// the host's bytes stop at READY's `stdin_window` unacknowledged, the
    /// agent's memory stays flat, PING and a session go on; FS_CANCEL ends
    /// it.
    fn a_full_pipe_stalls_only_its_write(opts: Opts) {
        let dir = TempDir::new("fs-full-pipe");
        let fifo = dir.join("fifo");
        mkfifo(&fifo);
        let c = CString::new(fifo.as_os_str().as_bytes()).expect("no NUL");
        // SAFETY: a valid path; the fd is closed below.
        let reader = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        assert!(reader >= 0, "open the FIFO's reader");
        let mut agent = Agent::start_with(opts);
        agent.ping();
        let idle = agent.rss_kib();
        let id = agent.new_id();
        agent.fs_send(id, &req("write", &fifo));
        let mut out = FsOutcome::default();
        assert!(agent.fs_until_opened(id, &mut out));
        let window = u64::from(agent.stdin_window());
        let chunk = vec![b'z'; 32 * 1024];
        let mut sent = 0u64;
        // Far more than the FIFO and the agent's pipe hold.
        for _ in 0..200 {
            while sent + chunk.len() as u64 - out.write_acked > window {
                match agent.fs_next(id, Duration::from_millis(300)) {
                    Some(f) => assert!(!out.take_frame(&f), "ended: {:?}", out.result),
                    None => break,
                }
            }
            if sent + chunk.len() as u64 - out.write_acked > window {
                break;
            }
            agent.fs_write_data(id, &chunk);
            sent += chunk.len() as u64;
        }
        assert!(sent - out.write_acked > 0, "everything was acknowledged: nothing stalled");
        assert!(sent < 200 * 32 * 1024, "never stalled");
        agent.ping();
        agent.sh("true").assert_success();
        assert!(agent.rss_kib() <= idle + 8 * 1024, "RSS {} KiB, idle {idle} KiB", agent.rss_kib());
        agent.fs_cancel(id);
        assert_eq!(agent.fs_collect(id).error().kind, "cancelled");
        agent.wait_no_children(timeout());
        // SAFETY: our fd.
        unsafe { libc::close(reader) };
    }

    /// At most 256 operations run at once: the next is `resource`, and
    /// once they end there is room again.
    fn too_many_operations_is_resource(opts: Opts) {
        let dir = TempDir::new("fs-many");
        let fifo = dir.join("fifo");
        mkfifo(&fifo);
        let mut agent = Agent::start_with(opts);
        let ids: Vec<u32> = (0..256).map(|_| agent.new_id()).collect();
        for &id in &ids {
            agent.fs_send(id, &req("read", &fifo));
        }
        agent.fs_err(req("stat", dir.path()), "resource");
        for &id in &ids {
            agent.fs_cancel(id);
        }
        for &id in &ids {
            assert_eq!(agent.fs_collect(id).error().kind, "cancelled");
        }
        agent.wait_no_children(timeout());
        agent.fs_ok(req("stat", dir.path()));
    }

    /// FS_CANCEL of a read stalled on its window, and of an atomic upload,
    /// leaves no worker and no fd behind (and no file).
    fn cancel_leaves_nothing_behind(opts: Opts) {
        let dir = TempDir::new("fs-cancel");
        let big = dir.join("big");
        std::fs::File::create(&big).and_then(|f| f.set_len(64 << 20)).expect("sparse file");
        let mut agent = Agent::start_with(opts);
        agent.ping();
        let fds = agent.fd_count();
        for _ in 0..2 {
            let id = agent.new_id();
            agent.fs_send(id, &FsRequest { window: Some(100_000), ..req("read", &big) });
            let mut out = FsOutcome::default();
            assert!(agent.fs_until_opened(id, &mut out));
            assert_eq!(agent.children().len(), 1);
            agent.fs_cancel(id);
            let out = agent.fs_collect(id);
            assert_eq!(out.error().kind, "cancelled");
            assert!(out.data.len() <= 100_000);
            let up = agent.new_id();
            let target = dir.join("upload");
            agent.fs_send(up, &FsRequest { atomic: Some(true), ..req("write", &target) });
            let mut out = FsOutcome::default();
            assert!(agent.fs_until_opened(up, &mut out));
            agent.fs_write_data(up, &[7u8; 50_000]);
            agent.fs_cancel(up);
            assert_eq!(agent.fs_collect(up).error().kind, "cancelled");
            agent.wait_no_children(timeout());
            assert_eq!(names(dir.path()), ["big"]);
        }
        agent.ping();
        assert!(wait_until(timeout(), || agent.fd_count() == fds), "fds {} then {}", fds, agent.fd_count());
    }

    /// A host that goes away mid-transfer (on a listening agent, which
    /// stays): its workers are stopped, its fds closed, its atomic upload
    /// leaves nothing.
    fn a_host_that_goes_away_leaves_nothing(opts: Opts) {
        let dir = TempDir::new("fs-gone");
        let big = dir.join("big");
        std::fs::File::create(&big).and_then(|f| f.set_len(64 << 20)).expect("sparse file");
        let agent = Listening::start(&opts);
        let idle = agent.connect();
        let fds = agent.process.fd_count();
        let mut c = agent.connect();
        c.conn.send(&Message::Fs(FsMsg::Request(Box::new(FsRequest { window: Some(100_000), ..req("read", &big) }))), 1);
        c.conn.send(&Message::Fs(FsMsg::Request(Box::new(FsRequest { atomic: Some(true), ..req("write", dir.join("up")) }))), 2);
        let mut opened = 0;
        while opened < 2 {
            let f = c.conn.next_frame(timeout()).expect("frames");
            if f.kind == Kind::FsOpened as u8 {
                opened += 1;
            }
        }
        c.conn.send(&Message::Fs(FsMsg::Write(&[1u8; 30_000])), 2);
        assert!(wait_until(timeout(), || names(dir.path()).len() == 2), "{:?}", names(dir.path()));
        assert_eq!(agent.process.children().len(), 2);
        drop(c);
        agent.process.wait_no_children(timeout());
        assert_eq!(names(dir.path()), ["big"]);
        assert!(wait_until(timeout(), || agent.process.fd_count() == fds), "fds {} then {}", fds, agent.process.fd_count());
        drop(idle);
    }

    /// A large download to a host that stops reading, with a window far
    /// above the file: the agent stops at its link's limit, and its RSS
    /// stays within idle + 8 MiB; once the host reads again every byte
    /// arrives.
    fn rss_is_bounded_when_the_host_stops_reading(opts: Opts) {
        let dir = TempDir::new("fs-rss");
        let big = dir.join("big");
        let len: u64 = 32 << 20;
        std::fs::File::create(&big).and_then(|f| f.set_len(len)).expect("sparse file");
        let mut agent = Agent::start_with(opts);
        agent.ping();
        let idle = agent.rss_kib();
        agent.pause_reading();
        let id = agent.new_id();
        agent.fs_send(id, &FsRequest { window: Some(u32::MAX), ..req("read", &big) });
        let mut peak = 0;
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(50));
            peak = peak.max(agent.rss_kib());
        }
        assert!(peak <= idle + 8 * 1024, "RSS {peak} KiB, idle {idle} KiB");
        agent.resume_reading();
        let mut total = 0u64;
        loop {
            let f = agent.fs_next(id, timeout()).expect("frames");
            if f.kind == Kind::FsData as u8 {
                assert!(f.payload.iter().all(|&b| b == 0));
                total += f.payload.len() as u64;
            } else if f.kind == Kind::FsDone as u8 {
                break;
            }
        }
        assert_eq!(total, len);
        peak = peak.max(agent.rss_kib());
        assert!(peak <= idle + 8 * 1024, "RSS {peak} KiB, idle {idle} KiB");
    }
}

/// A tar archive of one regular file with exactly `name` (what a hostile
/// host may send: the `tar` crate's builder refuses such names).
fn raw_tar_file(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
    }
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mtime(0);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// A random tree under `root`: nested directories (some empty, some
/// read-only), files of random sizes and modes, symlinks (one dangling),
/// unicode and long names, a 16 MiB file; mtimes with nanoseconds.
fn make_tree(root: &Path, seed: u64) {
    let mut rng = Rng(seed);
    std::fs::create_dir_all(root).expect("mkdir");
    let dirs = [
        "a",
        "a/b",
        "a/b/c",
        "empty",
        "données",
        "données/日本語",
        "a/empty-too",
        "ro",
    ];
    for d in dirs {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    let long = format!("a/{}", "long-name-".repeat(16));
    let files = [
        "x.txt",
        "a/y.bin",
        "a/b/z",
        "a/b/c/deep",
        "données/ü€𝄞.txt",
        "données/日本語/ファイル",
        "ro/frozen",
        long.as_str(),
    ];
    let modes = [0o644, 0o600, 0o755, 0o640, 0o700, 0o444, 0o4755, 0o664];
    for (i, f) in files.iter().enumerate() {
        let len = rng.below(200_000) as usize;
        let p = root.join(f);
        std::fs::write(&p, rng.bytes(len)).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(modes[i % modes.len()]))
            .expect("chmod");
    }
    std::fs::write(root.join("big.bin"), pseudo_random(16 << 20, seed)).expect("write");
    std::os::unix::fs::symlink("x.txt", root.join("link")).expect("symlink");
    std::os::unix::fs::symlink("../../x.txt", root.join("a/b/up")).expect("symlink");
    std::os::unix::fs::symlink("/nonexistent", root.join("dangling")).expect("symlink");
    std::fs::hard_link(root.join("x.txt"), root.join("a/b/hard")).expect("link");
    let mut all = Vec::new();
    walk(root, Path::new(""), &mut all);
    // Deepest first, so a directory's time is set after its contents.
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for rel in &all {
        let p = root.join(rel);
        let t = 1_000_000_000 + rng.below(700_000_000) as i64;
        set_times(&p, t * 1_000_000_000 + rng.below(1_000_000_000) as i64);
    }
    set_times(root, 1_234_567_890_000_000_000);
    std::fs::set_permissions(root.join("ro"), std::fs::Permissions::from_mode(0o555))
        .expect("chmod");
    std::fs::set_permissions(root.join("a/b"), std::fs::Permissions::from_mode(0o750))
        .expect("chmod");
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(root.join(rel)).expect("read_dir") {
        let e = e.expect("entry");
        let r = rel.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            walk(root, &r, out);
        }
        out.push(r);
    }
}

/// Compares two trees: the same paths, types, modes, contents, symlink
/// targets, and mtimes (to the second: ustar keeps seconds) of everything
/// but symlinks.
fn compare_trees(a: &Path, b: &Path) {
    let (mut pa, mut pb) = (Vec::new(), Vec::new());
    walk(a, Path::new(""), &mut pa);
    walk(b, Path::new(""), &mut pb);
    pa.sort();
    pb.sort();
    assert_eq!(pa, pb, "different paths");
    for rel in std::iter::once(PathBuf::new()).chain(pa) {
        let (x, y) = (a.join(&rel), b.join(&rel));
        let (mx, my) = (
            std::fs::symlink_metadata(&x).expect("lstat"),
            std::fs::symlink_metadata(&y).expect("lstat"),
        );
        assert_eq!(mx.file_type(), my.file_type(), "{}", rel.display());
        if mx.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&x).expect("readlink"),
                std::fs::read_link(&y).expect("readlink"),
                "{}",
                rel.display()
            );
            continue;
        }
        assert_eq!(
            mx.mode() & 0o7777,
            my.mode() & 0o7777,
            "mode of {}",
            rel.display()
        );
        assert_eq!(mx.mtime(), my.mtime(), "mtime of {}", rel.display());
        if mx.is_file() {
            assert_eq!(mx.len(), my.len(), "size of {}", rel.display());
            assert!(
                std::fs::read(&x).expect("read") == std::fs::read(&y).expect("read"),
                "content of {}",
                rel.display()
            );
        }
    }
}

both! {
    /// A full file system is `no_space` (and an atomic upload that fails
    /// so leaves no temporary file); a read-only one is `read_only`.
    fn no_space_and_read_only(opts: Opts) {
        let small = Tmpfs::mount("fs-full", "size=256k", false);
        let ro = Tmpfs::mount("fs-ro", "size=64k", true);
        let mut agent = Agent::start_with(opts);
        let data = pseudo_random(1 << 20, 5);
        let target = small.0.join("f");
        for atomic in [false, true] {
            let out = agent.fs_write(FsRequest { atomic: Some(atomic), ..req("write", &target) }, &data);
            let e = out.error();
            assert_eq!(e.kind, "no_space", "{e:?}");
            assert_eq!(e.errno, Some(libc::ENOSPC));
            if atomic {
                assert_eq!(names(small.0.path()), Vec::<String>::new(), "the failed atomic upload left a file");
            }
            let _ = std::fs::remove_file(&target);
        }
        agent.wait_no_children(timeout());
        assert_eq!(names(small.0.path()), Vec::<String>::new());
        let e = agent.fs_err(req("mkdir", ro.0.join("d")), "read_only");
        assert_eq!(e.errno, Some(libc::EROFS));
        assert_eq!(agent.fs_write(req("write", ro.0.join("f")), b"x").error().kind, "read_only");
    }
}
