//! The client library's `fs` API (`client.fs()`) against the real agent
//! (`agentd --stdio`, the "guest" being this machine): every operation,
//! every error kind the API can meet, streams big enough to go through the
//! windows many times, trees both ways, watches.

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentd::client::{Client, Error, FileType, FsErrorKind, TarOptions, WatchKind};
use support::util::{pseudo_random, TempDir};
use support::AGENTD;

fn agent() -> Client {
    Client::spawn_agent(AGENTD).expect("agentd --stdio starts")
}

fn kind(e: &Error) -> Option<FsErrorKind> {
    e.fs_error_kind()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn write_read_metadata() {
    let c = agent();
    let fs = c.fs();
    let d = TempDir::new("fs-rw");
    let f = d.join("a.txt");
    fs.write(&f, b"hello\n").unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"hello\n");
    assert_eq!(fs.read(&f).unwrap(), b"hello\n");
    assert_eq!(fs.read_to_string(&f).unwrap(), "hello\n");
    let m = fs.metadata(&f).unwrap();
    let local = std::fs::metadata(&f).unwrap();
    assert!(m.is_file() && !m.is_dir());
    assert_eq!(m.file_type(), FileType::File);
    assert_eq!(m.len(), 6);
    assert_eq!(m.mode(), 0o644);
    assert_eq!(m.uid(), local.uid());
    assert_eq!(m.ino(), local.ino());
    assert_eq!(m.nlink(), 1);
    assert_eq!(m.modified(), local.modified().unwrap());
    assert!(fs.exists(&f).unwrap());
    assert!(!fs.exists(d.join("nope")).unwrap());
    // An empty file reads as nothing.
    fs.write(d.join("empty"), b"").unwrap();
    assert_eq!(fs.read(d.join("empty")).unwrap(), b"");
}

#[test]
fn errors_are_typed_with_errno_and_path() {
    let c = agent();
    let fs = c.fs();
    let d = TempDir::new("fs-err");
    let missing = d.join("missing");
    let e = fs.read(&missing).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::NotFound), "{e}");
    assert_eq!(e.errno(), Some(libc::ENOENT));
    match &e {
        Error::Fs(f) => assert_eq!(f.path.as_deref(), Some(s(&missing))),
        other => panic!("{other:?}"),
    }
    let io: std::io::Error = e.into();
    assert_eq!(io.kind(), std::io::ErrorKind::NotFound);

    // exists
    fs.create_dir(d.join("dir")).unwrap();
    let e = fs.create_dir(d.join("dir")).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::Exists), "{e}");
    assert_eq!(
        std::io::Error::from(e).kind(),
        std::io::ErrorKind::AlreadyExists
    );
    // is_a_directory
    let e = fs.read(d.join("dir")).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::IsADirectory), "{e}");
    let e = fs.remove_file(d.join("dir")).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::IsADirectory), "{e}");
    // not_a_directory
    fs.write(d.join("file"), b"x").unwrap();
    let e = fs.metadata(d.join("file/below")).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::NotADirectory), "{e}");
    let e = fs.read_dir(d.join("file")).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::NotADirectory), "{e}");
    let e = fs.remove_dir(d.join("file")).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::NotADirectory), "{e}");
    // not_empty
    fs.write(d.join("dir/inside"), b"x").unwrap();
    let e = fs.remove_dir(d.join("dir")).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::NotEmpty), "{e}");
    // invalid_request: chmod beyond 0o7777
    let e = fs.set_permissions(d.join("file"), 0o17777).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::InvalidRequest), "{e}");
    // bad_user
    let e = fs
        .as_user("no-such-user-here")
        .read(d.join("file"))
        .unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::BadUser), "{e}");
    // read_only: /proc/version is on a read-only... it is not writable even for root.
    let e = fs.write("/proc/version", b"x").unwrap_err();
    assert!(
        matches!(
            kind(&e),
            Some(FsErrorKind::PermissionDenied)
                | Some(FsErrorKind::ReadOnly)
                | Some(FsErrorKind::Other)
        ),
        "{e}"
    );
    // The one-line message names the path.
    let text = fs.read(&missing).unwrap_err().to_string();
    assert!(text.contains(s(&missing)) && !text.contains('\n'), "{text}");
}

#[test]
fn permission_denied_as_nobody() {
    let c = agent();
    let d = TempDir::new("fs-nobody");
    let f = d.join("secret");
    std::fs::write(&f, b"s").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let nobody = c.fs().as_user("nobody");
    let e = nobody.read(&f).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::PermissionDenied), "{e}");
    assert_eq!(
        std::io::Error::from(e).kind(),
        std::io::ErrorKind::PermissionDenied
    );
    let e = nobody.write(d.join("new"), b"x").unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::PermissionDenied), "{e}");
    // A directory nobody may write to: its files are created as nobody.
    let open = d.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    nobody.write(open.join("mine"), b"x").unwrap();
    let m = std::fs::metadata(open.join("mine")).unwrap();
    assert_eq!(m.uid(), 65534);
    assert_eq!(c.fs().metadata(open.join("mine")).unwrap().uid(), 65534);
}

#[test]
fn directories_listing_and_removal() {
    let c = agent();
    let fs = c.fs();
    let d = TempDir::new("fs-dirs");
    let deep = d.join("a/b/c");
    let e = fs.create_dir(&deep).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::NotFound), "{e}");
    fs.create_dir_all(&deep).unwrap();
    fs.create_dir_all(&deep).unwrap(); // an existing directory is fine
    assert!(std::fs::metadata(&deep).unwrap().is_dir());
    fs.create_dir_mode(d.join("m"), 0o700, false).unwrap();
    assert_eq!(fs.metadata(d.join("m")).unwrap().mode(), 0o700);
    fs.write(d.join("a/f1"), b"1").unwrap();
    fs.symlink("f1", d.join("a/l1")).unwrap();
    let mut names: Vec<(String, FileType)> = fs
        .read_dir(d.join("a"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            assert_eq!(e.path(), d.join("a").join(e.file_name()));
            assert!(e.metadata().is_none());
            (e.file_name().to_string_lossy().into_owned(), e.file_type())
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("b".to_owned(), FileType::Dir),
            ("f1".to_owned(), FileType::File),
            ("l1".to_owned(), FileType::Symlink)
        ]
    );
    let with: Vec<_> = fs
        .read_dir_with_metadata(d.join("a"))
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    let l1 = with.iter().find(|e| e.file_name() == "l1").unwrap();
    assert_eq!(l1.metadata().unwrap().symlink_target(), Some("f1"));
    let f1 = with.iter().find(|e| e.file_name() == "f1").unwrap();
    assert_eq!(f1.metadata().unwrap().len(), 1);

    fs.remove_file(d.join("a/l1")).unwrap();
    assert!(std::fs::symlink_metadata(d.join("a/l1")).is_err());
    fs.remove_dir(&deep).unwrap();
    assert!(!deep.exists());
    let e = fs.remove_file(d.join("a/nope")).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::NotFound), "{e}");
    fs.remove_dir_all(d.join("a")).unwrap();
    assert!(!d.join("a").exists());
    // remove() of a plain file, and recursive of a tree.
    fs.write(d.join("x"), b"").unwrap();
    fs.remove(d.join("x"), false).unwrap();
    assert!(!d.join("x").exists());
}

#[test]
fn a_big_directory_streams_in_many_batches_with_a_small_window() {
    let c = agent();
    let d = TempDir::new("fs-bigdir");
    for i in 0..3000 {
        std::fs::write(d.join(&format!("file-with-a-longish-name-{i:05}")), b"").unwrap();
    }
    // The smallest window the agent takes for a listing (64 KiB): with
    // metadata the listing must be acknowledged many times over.
    let e = c.fs().with_window(4096).read_dir(d.path()).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::InvalidRequest), "{e}");
    let fs = c.fs().with_window(65536);
    let mut n = 0;
    for e in fs.read_dir_with_metadata(d.path()).unwrap() {
        let e = e.unwrap();
        assert!(e.metadata().is_some());
        n += 1;
    }
    assert_eq!(n, 3000);
    // Dropping a listing in the middle cancels it; the client goes on.
    let mut it = fs.read_dir(d.path()).unwrap();
    assert!(it.next().unwrap().is_ok());
    drop(it);
    assert!(c.ping().is_ok());
    assert_eq!(c.fs().read_dir(d.path()).unwrap().count(), 3000);
}

#[test]
fn rename_chmod_chown_times_links() {
    let c = agent();
    let fs = c.fs();
    let d = TempDir::new("fs-meta");
    let a = d.join("a");
    fs.write(&a, b"A").unwrap();
    fs.write(d.join("b"), b"B").unwrap();
    let e = fs.rename_with(&a, d.join("b"), false).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::Exists), "{e}");
    fs.rename(&a, d.join("b")).unwrap();
    assert!(!a.exists());
    assert_eq!(std::fs::read(d.join("b")).unwrap(), b"A");
    let e = fs.rename(&a, d.join("c")).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::NotFound), "{e}");

    let b = d.join("b");
    fs.set_permissions(&b, 0o4751).unwrap();
    assert_eq!(std::fs::metadata(&b).unwrap().mode() & 0o7777, 0o4751);
    fs.chown(&b, Some(65534), Some(65534)).unwrap();
    let m = std::fs::metadata(&b).unwrap();
    assert_eq!((m.uid(), m.gid()), (65534, 65534));
    fs.chown(&b, None, Some(0)).unwrap();
    let m = std::fs::metadata(&b).unwrap();
    assert_eq!((m.uid(), m.gid()), (65534, 0));

    let t = UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
    let at = UNIX_EPOCH + Duration::new(1_500_000_000, 5);
    fs.set_times(&b, Some(at), Some(t)).unwrap();
    let m = fs.metadata(&b).unwrap();
    assert_eq!(m.modified(), t);
    assert_eq!(m.accessed(), at);
    assert_eq!(std::fs::metadata(&b).unwrap().modified().unwrap(), t);

    // Links: the link itself, not its target.
    fs.symlink("b", d.join("l")).unwrap();
    assert_eq!(fs.read_link(d.join("l")).unwrap(), Path::new("b"));
    assert!(fs.symlink_metadata(d.join("l")).unwrap().is_symlink());
    assert_eq!(
        fs.symlink_metadata(d.join("l")).unwrap().symlink_target(),
        Some("b")
    );
    assert!(fs.metadata(d.join("l")).unwrap().is_file());
    fs.lchown(d.join("l"), Some(65534), None).unwrap();
    assert_eq!(std::fs::symlink_metadata(d.join("l")).unwrap().uid(), 65534);
    assert_eq!(std::fs::metadata(&b).unwrap().uid(), 65534);
    fs.set_symlink_times(d.join("l"), None, Some(at)).unwrap();
    assert_eq!(
        std::fs::symlink_metadata(d.join("l"))
            .unwrap()
            .modified()
            .unwrap(),
        at
    );
    assert_eq!(std::fs::metadata(&b).unwrap().modified().unwrap(), t);
    let e = fs.symlink("b", d.join("l")).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::Exists), "{e}");
    let e = fs.read_link(&b).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::InvalidRequest), "{e}");
    assert_eq!(
        fs.canonicalize(d.join("l")).unwrap(),
        std::fs::canonicalize(&b).unwrap()
    );
    let e = fs.canonicalize(d.join("nope")).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::NotFound), "{e}");
    let _ = SystemTime::now();
}

#[test]
fn large_streams_through_both_windows() {
    let c = agent();
    let fs = c.fs();
    let d = TempDir::new("fs-large");
    let data = pseudo_random(12 << 20, 7);
    let f = d.join("big");
    // Writer: 12 MiB through READY's stdin_window many times over, in
    // odd-sized writes.
    let mut w = fs.create(&f).unwrap();
    for chunk in data.chunks(100_003) {
        w.write_all(chunk).unwrap();
    }
    let done = w.finish().unwrap();
    assert_eq!(done.bytes, data.len() as u64);
    assert!(std::fs::read(&f).unwrap() == data);
    // Reader with a 64 KiB window, read in small pieces.
    let mut r = fs.with_window(65536).open(&f).unwrap();
    assert_eq!(r.len(), Some(data.len() as u64));
    let mut back = Vec::new();
    let mut buf = vec![0u8; 7777];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
    }
    assert!(back == data);
    assert_eq!(r.bytes_done(), Some(data.len() as u64));
    // A range.
    let mut part = Vec::new();
    fs.open_range(&f, 1000, Some(5000))
        .unwrap()
        .read_to_end(&mut part)
        .unwrap();
    assert_eq!(part, &data[1000..6000]);
    // A reader dropped half way cancels; the connection goes on.
    let mut r = fs.with_window(65536).open(&f).unwrap();
    let mut some = [0u8; 1000];
    r.read_exact(&mut some).unwrap();
    drop(r);
    assert_eq!(fs.read(&f).unwrap().len(), data.len());
}

#[test]
fn open_options() {
    let c = agent();
    let fs = c.fs();
    let d = TempDir::new("fs-opts");
    let f = d.join("f");
    let e = fs.options().create(false).open(&f).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::NotFound), "{e}");
    let mut w = fs.options().mode(0o600).create_new(true).open(&f).unwrap();
    w.write_all(b"one\n").unwrap();
    w.finish().unwrap();
    assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
    let e = fs.options().create_new(true).open(&f).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::Exists), "{e}");
    let mut w = fs.options().append(true).open(&f).unwrap();
    w.write_all(b"two\n").unwrap();
    w.finish().unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"one\ntwo\n");
    fs.write(&f, b"three\n").unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"three\n");
    // parents
    let deep = d.join("p/q/r");
    let e = fs.write(&deep, b"x").unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::NotFound), "{e}");
    fs.options()
        .parents(true)
        .open(&deep)
        .unwrap()
        .finish()
        .unwrap();
    assert!(deep.is_file());
    // atomic: nothing visible until finish; a dropped writer leaves the
    // old file and no temporary.
    let mut w = fs.options().atomic(true).open(&f).unwrap();
    w.write_all(b"new contents\n").unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"three\n");
    drop(w);
    assert!(c.ping().is_ok());
    assert_eq!(std::fs::read(&f).unwrap(), b"three\n");
    let mut w = fs.options().atomic(true).open(&f).unwrap();
    w.write_all(b"new contents\n").unwrap();
    w.finish().unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"new contents\n");
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "no temporary files left: {left:?}");
    // Writing a directory.
    let e = fs.write(d.path(), b"x").unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::IsADirectory), "{e}");
}

fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/empty")).unwrap();
    std::fs::create_dir_all(root.join("ünïcödé dir")).unwrap();
    std::fs::write(root.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(root.join("ünïcödé dir/ファイル"), b"unicode\n").unwrap();
    std::fs::write(root.join("sub/big.bin"), pseudo_random(3 << 20, 3)).unwrap();
    std::fs::write(root.join("sub/exec.sh"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        root.join("sub/exec.sh"),
        std::fs::Permissions::from_mode(0o751),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("sub/empty"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::os::unix::fs::symlink("../a.txt", root.join("sub/link")).unwrap();
    std::os::unix::fs::symlink("/nowhere", root.join("dangling")).unwrap();
    let long = "n".repeat(150);
    std::fs::write(root.join(&long), b"long name").unwrap();
    let t = UNIX_EPOCH + Duration::from_secs(1_234_567_890);
    std::fs::File::open(root.join("a.txt"))
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// Every path under `root` with its type, mode, size, mtime (seconds),
/// link target and contents.
fn describe(root: &Path) -> Vec<String> {
    fn go(root: &Path, rel: &Path, out: &mut Vec<String>) {
        let mut names: Vec<_> = std::fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let p = root.join(&r);
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                format!("dir {:o}", m.mode() & 0o7777)
            } else {
                let data = std::fs::read(&p).unwrap();
                let sum: u64 = data.iter().map(|&b| b as u64).sum();
                format!(
                    "file {:o} {} {} sum={sum}",
                    m.mode() & 0o7777,
                    m.len(),
                    m.mtime()
                )
            };
            out.push(format!("{} {what}", r.display()));
            if m.is_dir() {
                go(root, &r, out);
            }
        }
    }
    let mut out = Vec::new();
    go(root, Path::new(""), &mut out);
    out
}

#[test]
fn tree_round_trip_by_path_and_by_tar_stream() {
    let c = agent();
    let fs = c.fs();
    let d = TempDir::new("fs-tree");
    let src = d.join("src");
    make_tree(&src);
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).unwrap();
    // Upload to a path that does not exist: it becomes the copy.
    let up = d.join("guest/app");
    let done = fs
        .upload(
            &src,
            &up,
            TarOptions {
                parents: true,
                owners: false,
            },
        )
        .unwrap();
    assert!(done.entries >= 10, "{done:?}");
    assert_eq!(describe(&src), describe(&up));
    assert_eq!(std::fs::metadata(&up).unwrap().mode() & 0o7777, 0o750);
    // Download it back.
    let back = d.join("back");
    let done = fs.download(&up, &back, TarOptions::default()).unwrap();
    assert!(done.bytes > 3 << 20, "{done:?}");
    assert_eq!(describe(&src), describe(&back));
    assert_eq!(std::fs::metadata(&back).unwrap().mode() & 0o7777, 0o750);
    // A single file both ways, keeping mode and time.
    fs.upload(
        src.join("sub/exec.sh"),
        d.join("one.sh"),
        TarOptions::default(),
    )
    .unwrap();
    let m = std::fs::metadata(d.join("one.sh")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o751);
    fs.download(d.join("one.sh"), d.join("two.sh"), TarOptions::default())
        .unwrap();
    assert_eq!(std::fs::read(d.join("two.sh")).unwrap(), b"#!/bin/sh\n");
    assert_eq!(
        std::fs::metadata(d.join("two.sh")).unwrap().mode() & 0o7777,
        0o751
    );
    // As tar streams: what tar_get gives, tar_put takes.
    let mut archive = Vec::new();
    let n = fs.download_tar(&src, &mut archive).unwrap();
    assert_eq!(n, archive.len() as u64);
    let names: Vec<String> = tar::Archive::new(&archive[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(names.iter().all(|n| n.starts_with("src")), "{names:?}");
    let dest = d.join("from-tar");
    std::fs::create_dir(&dest).unwrap();
    let done = fs
        .upload_tar(&dest, &archive[..], TarOptions::default())
        .unwrap();
    assert_eq!(done.bytes, archive.len() as u64);
    assert_eq!(describe(&src), describe(&dest.join("src")));
    // Errors: a missing source, a directory onto a file, a bad archive.
    let e = fs
        .download(d.join("nope"), d.join("x"), TarOptions::default())
        .unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::NotFound), "{e}");
    let e = fs
        .upload(&src, d.join("one.sh"), TarOptions::default())
        .unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::NotADirectory), "{e}");
    let e = fs
        .upload(d.join("no-such-local"), d.join("z"), TarOptions::default())
        .unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    let mut evil = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    // set_path refuses `..`; write the name field by hand.
    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
    h.set_cksum();
    evil.append(&h, &b"x"[..]).unwrap();
    let evil = evil.into_inner().unwrap();
    let e = fs
        .upload_tar(&dest, &evil[..], TarOptions::default())
        .unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::InvalidRequest), "{e}");
    assert!(!d.join("escape").exists());
}

#[test]
fn watch_reports_changes_until_cancelled() {
    let c = agent();
    let fs = c.fs();
    let d = TempDir::new("fs-watch");
    std::fs::create_dir(d.join("sub")).unwrap();
    let mut w = fs.watch(d.path(), true).unwrap();
    std::fs::write(d.join("new.txt"), b"x").unwrap();
    std::fs::write(d.join("sub/deep.txt"), b"y").unwrap();
    std::fs::rename(d.join("new.txt"), d.join("moved.txt")).unwrap();
    std::fs::remove_file(d.join("moved.txt")).unwrap();
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|(k, p): &(WatchKind, String)| *k == WatchKind::Removed && p == "moved.txt")
    {
        let e = w.next().expect("events until cancelled").unwrap();
        seen.push((e.kind, e.path.display().to_string()));
    }
    let has = |k: WatchKind, p: &str| seen.iter().any(|(a, b)| *a == k && b == p);
    assert!(has(WatchKind::Created, "new.txt"), "{seen:?}");
    assert!(has(WatchKind::Created, "sub/deep.txt"), "{seen:?}");
    assert!(has(WatchKind::MovedFrom, "new.txt"), "{seen:?}");
    assert!(has(WatchKind::MovedTo, "moved.txt"), "{seen:?}");
    w.cancel().unwrap();
    assert!(c.ping().is_ok());
    // A watch of a missing path fails typed.
    let e = fs.watch(d.join("nope"), false).unwrap_err();
    assert_eq!(kind(&e), Some(FsErrorKind::NotFound), "{e}");
}

#[test]
fn relative_paths_are_relative_to_the_users_home() {
    let c = agent();
    // The agent runs as root here: its home is root's, from the passwd file.
    let p = c.fs().canonicalize(".").unwrap();
    assert_eq!(p, std::fs::canonicalize("/root").unwrap());
}

#[test]
fn transport_gone_fails_every_call() {
    let c = agent();
    let fs = c.fs();
    c.close();
    let e = fs.metadata("/").unwrap_err();
    assert!(matches!(e, Error::TransportClosed(_)), "{e:?}");
}

// ---------------------------------------------------------------------------
// Against a scripted fake agent: the windows, observed frame by frame.

mod fake {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use agentd::codec::{Decoder, OwnedFrame};
    use agentd::messages::{Message, Ready};

    pub struct Fake {
        pub sock: UnixStream,
        dec: Decoder,
    }

    pub fn start(stdin_window: u32, features: &[&str]) -> (agentd::client::Client, Fake) {
        let (a, b) = UnixStream::pair().unwrap();
        let mut fake = Fake {
            sock: b,
            dec: Decoder::new(),
        };
        let ready = Ready {
            protocol: 1,
            agent: "fake/0".into(),
            pid: 1,
            max_payload: 1 << 20,
            stdin_window,
            max_sessions: 16,
            features: features.iter().map(|s| s.to_string()).collect(),
            ..Ready::default()
        };
        fake.send(0, &Message::Ready(ready));
        let client = agentd::client::Client::from_stream(a).unwrap();
        (client, fake)
    }

    impl Fake {
        pub fn send(&mut self, id: u32, msg: &Message<'_>) {
            self.sock.write_all(&msg.to_bytes(id)).unwrap();
        }

        /// The next frame within `t`, or None.
        pub fn recv_within(&mut self, t: Duration) -> Option<OwnedFrame> {
            let deadline = Instant::now() + t;
            loop {
                if let Some(item) = self.dec.next_frame() {
                    return Some(item.unwrap().to_owned());
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                self.sock.set_read_timeout(Some(left)).unwrap();
                match self.dec.read_from(&mut self.sock) {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
        }

        pub fn recv(&mut self) -> OwnedFrame {
            self.recv_within(Duration::from_secs(10)).expect("a frame")
        }
    }
}

#[test]
fn writes_stay_within_the_stdin_window_and_reads_ack_only_what_was_consumed() {
    use agentd::messages::{Ack, FsDone, FsMsg, FsOpened, Kind, Message};
    let (c, mut fake) = fake::start(1000, &["fs"]);
    // Write: 5000 bytes with a 1000-byte window.
    let fs = c.fs();
    let writer = std::thread::spawn(move || {
        let mut w = fs.create("/x").unwrap();
        w.write_all(&[1u8; 5000]).unwrap();
        w.finish().unwrap()
    });
    let req = fake.recv();
    assert_eq!(req.kind, Kind::FsRequest as u8);
    fake.send(req.id, &Message::Fs(FsMsg::Opened(FsOpened::default())));
    let mut total = 0usize;
    let mut unacked = 0usize;
    loop {
        match fake.recv_within(Duration::from_millis(300)) {
            Some(f) if f.kind == Kind::FsWrite as u8 => {
                unacked += f.payload.len();
                total += f.payload.len();
                assert!(unacked <= 1000, "{unacked} bytes beyond the window");
            }
            Some(f) if f.kind == Kind::FsEnd as u8 => break,
            Some(f) => panic!("unexpected {f:?}"),
            None => {
                // The client waits for window: return it.
                assert_eq!(unacked, 1000);
                fake.send(
                    req.id,
                    &Message::Fs(FsMsg::WriteAck(Ack {
                        bytes: unacked as u32,
                    })),
                );
                unacked = 0;
            }
        }
    }
    assert_eq!(total, 5000);
    let done = FsDone {
        bytes: Some(5000),
        ..FsDone::default()
    };
    fake.send(req.id, &Message::Fs(FsMsg::Done(Box::new(done))));
    assert_eq!(writer.join().unwrap().bytes, 5000);

    // Read: three chunks sent; the caller consumes only the first.
    let mut r = {
        let fs = c.fs();
        let t = std::thread::spawn(move || fs.open("/y").unwrap());
        let req = fake.recv();
        fake.send(req.id, &Message::Fs(FsMsg::Opened(FsOpened::default())));
        let r = t.join().unwrap();
        for _ in 0..3 {
            fake.send(req.id, &Message::Fs(FsMsg::Data(&[7u8; 100])));
        }
        r
    };
    let mut buf = [0u8; 100];
    r.read_exact(&mut buf).unwrap();
    let ack = fake.recv();
    assert_eq!(ack.kind, Kind::FsDataAck as u8);
    let Ok(Message::Fs(FsMsg::DataAck(Ack { bytes }))) = Message::decode_from_host(ack.as_frame())
    else {
        panic!("{ack:?}")
    };
    assert_eq!(bytes, 100);
    // Nothing more is acknowledged while the caller does not read.
    assert!(fake.recv_within(Duration::from_millis(300)).is_none());
    // A drop before the end cancels.
    drop(r);
    assert_eq!(fake.recv().kind, Kind::FsCancel as u8);
}

#[test]
fn an_agent_without_the_feature_is_refused_typed() {
    let (c, _fake) = fake::start(1000, &[]);
    let e = c.fs().metadata("/").unwrap_err();
    assert!(matches!(e, Error::Unsupported("fs")), "{e:?}");
    let e = c.connect_tcp("127.0.0.1:80").unwrap_err();
    assert!(matches!(e, Error::Unsupported("net")), "{e:?}");
}
