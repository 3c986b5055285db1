//! Fixtures: scratch directories, deterministic data, checksums by the
//! host's tools, pseudo-terminals and FIFOs, the user databases, the fuzz
//! corpora.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "agentd-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A small deterministic generator (xorshift64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// `len` bytes: each step's 8 bytes, little endian.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// Deterministic pseudo-random bytes, for exact-content checks (any seed,
/// 0 included: it is mixed first).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1).bytes(len)
}

/// Expected output of `seq 1 n`.
pub fn seq_output(n: u32) -> Vec<u8> {
    (1..=n)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes()
}

/// What the host's `sha256sum` prints for `data` on its stdin (the hash,
/// two spaces, `-`, a newline).
pub fn sha256sum(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum on the host");
    let mut stdin = child.stdin.take().expect("sha256sum's stdin is piped");
    let out = std::thread::scope(|s| {
        s.spawn(move || stdin.write_all(data).expect("writing to sha256sum"));
        child.wait_with_output().expect("waiting for sha256sum")
    });
    assert!(out.status.success(), "sha256sum: {}", out.status);
    String::from_utf8(out.stdout).expect("sha256sum prints text")
}

/// The SHA-256 of `data` in hex, by the host's `sha256sum`.
pub fn sha256_hex(data: &[u8]) -> String {
    sha256sum(data)
        .split_whitespace()
        .next()
        .expect("sha256sum printed a hash")
        .to_owned()
}

/// A new pseudo-terminal, both ends close-on-exec from the moment they
/// exist (openpty's are inheritable until fixed up, and an agent another
/// test starts in between would inherit them): (master, slave, slave path).
pub fn cloexec_pty() -> (OwnedFd, OwnedFd, PathBuf) {
    // SAFETY: posix_openpt returns a new fd or -1; grantpt and unlockpt
    // take that fd; ptsname_r writes a NUL-terminated path into the buffer
    // of the given length; open returns a new fd or -1.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(
            master >= 0,
            "posix_openpt: {}",
            std::io::Error::last_os_error()
        );
        let master = OwnedFd::from_raw_fd(master);
        assert_eq!(libc::grantpt(master.as_raw_fd()), 0, "grantpt");
        assert_eq!(libc::unlockpt(master.as_raw_fd()), 0, "unlockpt");
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(
            libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
            0,
            "ptsname_r"
        );
        let slave = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        assert!(
            slave >= 0,
            "open the slave: {}",
            std::io::Error::last_os_error()
        );
        let path = std::ffi::CStr::from_ptr(name.as_ptr())
            .to_str()
            .expect("a UTF-8 slave path")
            .into();
        (master, OwnedFd::from_raw_fd(slave), path)
    }
}

/// Sets a terminal's size (on either end).
pub fn set_winsize(fd: &OwnedFd, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one struct winsize from the pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(r, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
}

/// Makes a FIFO at `path`.
pub fn mkfifo(path: &Path) {
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("a path without NUL");
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// (uid, gid) of `name` in /etc/passwd.
pub fn passwd_entry(name: &str) -> Option<(u32, u32)> {
    std::fs::read_to_string("/etc/passwd")
        .expect("reading /etc/passwd")
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && f[0] == name)
        .map(|f| {
            let id = |s: &str| {
                s.parse()
                    .unwrap_or_else(|e| panic!("/etc/passwd: {name}: {e}"))
            };
            (id(f[2]), id(f[3]))
        })
}

/// The groups the contract gives `user`: its primary group and every group
/// of the group database that lists it.
pub fn db_groups(name: &str, primary: u32) -> BTreeSet<u32> {
    let mut set = BTreeSet::from([primary]);
    for line in std::fs::read_to_string("/etc/group")
        .expect("reading /etc/group")
        .lines()
    {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
            if let Ok(g) = f[2].parse() {
                set.insert(g);
            }
        }
    }
    set
}

/// The seed files of fuzz target `target` (fuzz/corpus/TARGET), sorted.
pub fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}
