//! PID-1 duties of the agent, as plain functions (no event loop in here).
//!
//! When `agentd` is the first process of a microVM (`getpid() == 1`, or
//! `--init` for tests), it has to do what an init system would before it can
//! serve the host:
//!
//! 1. [`mount_basics`]: `/proc`, `/sys`, `/dev`, `/dev/pts`, `/dev/shm`,
//!    `/tmp`, `/run` and cgroup2, each only if not already mounted.
//! 2. [`read_boot_config`] / [`parse_cmdline`]: the `agentd.*` options of the
//!    kernel command line.
//! 3. [`init_logging`] / [`logger_target`]: logs go to `/dev/kmsg` (or the
//!    console), never to the agent port.
//! 4. [`install_panic_hook`]: PID 1 must never exit, so a panic logs, syncs and
//!    powers the machine off (`agentd` installs it before anything else).
//! 5. [`load_modules`]: a stock distribution kernel has its virtio drivers as
//!    modules (`agentd.modules=`).
//! 6. [`set_hostname`], [`bring_up_loopback`], [`default_env`].
//! 7. [`open_port`]: the virtio-console port named `agentd.port=` (default
//!    `agent`), opened once, nonblocking, and kept open for the agent's life.
//! 8. [`power_off`] / [`fatal`]: the end of the machine.
//!
//! [`boot`] runs steps 1 to 6 (the hook first) and is what the agent's
//! PID-1 path calls; each step is public on its own as well.
//!
//! # How a virtio-console port signals the host's open and close
//!
//! Measured in the VM of `tests/vm/run.sh` (Debian 6.1 kernel, QEMU 7.2,
//! `virtserialport` on a `-chardev socket,server=on,wait=off`), with the port
//! opened `O_RDWR | O_NONBLOCK` once and kept open; `tests/vm/probe/` holds
//! the probe and `docs/VM.md` the full trace. "Host connected" means a
//! program has the QEMU chardev socket open.
//!
//! | state | `poll` revents | `read` | `write` |
//! |---|---|---|---|
//! | no host connected (never, or since it left) | `POLLIN \| POLLHUP` (level: every poll) | `0` (after any bytes still buffered) | `-1 EAGAIN`, nothing sent |
//! | host connected, nothing to read | `POLLOUT` | `-1 EAGAIN` | accepted, at most 32 KiB per call |
//! | host connected, bytes waiting | `POLLIN \| POLLOUT` | the bytes | accepted |
//! | host connected, guest→host queue full (host not reading) | `POLLIN` if bytes waiting, no `POLLOUT` | as above | `-1 EAGAIN` (about 4.4 MB were queued first) |
//!
//! With edge-triggered epoll (`EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET`, as
//! mio registers it):
//!
//! - Registering the fd while no host is connected reports `EPOLLIN |
//!   EPOLLHUP` once (mio: readable, read-closed and write-closed). Then
//!   nothing more until the state changes: no spinning.
//! - A host connecting reports one event `EPOLLOUT` alone (mio: writable, not
//!   closed). No `POLLIN`, and `read` gives `EAGAIN`, so "the port became
//!   writable without HUP after having been HUP" is the only sign of a new
//!   host: that is when to send READY again.
//! - A host disconnecting reports `EPOLLIN | EPOLLHUP`; `read` returns the
//!   bytes still buffered, then `0`. That `0` is **not** a permanent end of
//!   file: keep the fd open and registered (never close and reopen it).
//! - Go by the event's HUP bit, not by `read() == 0`: when the next host
//!   connects quickly, `read` may already return `EAGAIN` right after an
//!   `EPOLLIN | EPOLLHUP` event (a separate `EPOLLOUT` event follows for the
//!   new host).
//! - Bytes a host sent stay in the port after it leaves, until read: on HUP,
//!   read them (serve the whole frames, drop the rest) before accepting the
//!   next host, or its stream starts with the old host's leftovers.
//! - Every completed guest→host write also wakes the queue, so `EPOLLOUT`
//!   events arrive often while connected (after each write the host
//!   consumes); they carry no HUP and mean nothing new.
//! - QEMU discards guest→host bytes that the departing host had not read, and
//!   bytes the guest writes while no host is connected (`EAGAIN` anyway): a
//!   new host never receives bytes written to the old one. But a frame that
//!   the agent had only partly written when the host left must not be
//!   finished on the next host: on HUP, drop the unsent rest of the frame in
//!   progress (keep whole queued frames if you like), and on the next
//!   connection write READY before anything else.
//! - A disconnect and a reconnect that both happen before the guest handles
//!   the first coalesce into a single `EPOLLOUT` event: the agent cannot see
//!   that the host changed. Measured with an idle guest: a reconnect 10 ms or
//!   more after the previous host's close was always seen; 1 ms after, 2-3 in
//!   10 were missed; at once, 5 in 10. A busy guest widens the window. Hosts
//!   should wait for READY with a timeout (and on timeout close, pause,
//!   reconnect) and not reconnect right after another host closed.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::level_filters::LevelFilter;
use tracing::{debug, error, info, warn};

use super::rootfs::{self, RootOptions};
use super::{log, sys};
use crate::messages::MountStatus;

/// Where [`load_modules`] looks for `NAME.ko`.
pub const MODULE_DIR: &str = "/lib/modules/agentd";

/// The port name used when the command line has no `agentd.port=`.
pub const DEFAULT_PORT: &str = "agent";

/// `PATH` of [`default_env`].
pub const DEFAULT_PATH: &str = super::spawn::DEFAULT_PATH;

/// How long [`power_off`] waits for processes to exit after SIGTERM.
pub const POWER_OFF_GRACE: Duration = Duration::from_millis(1000);

/// Errors of the PID-1 steps that can fail.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// No virtio-console port with that name showed up in time.
    #[error("no virtio-console port named {name:?} appeared within {timeout:?} (are the virtio modules loaded? see agentd.modules=)")]
    PortTimeout { name: String, timeout: Duration },
    /// Opening the port's device node failed.
    #[error("cannot open {path}: {source}")]
    OpenPort { path: PathBuf, source: io::Error },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys { what: String, source: Errno },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// A string holds a NUL byte.
    #[error("{what}: contains a NUL byte")]
    Nul { what: String },
}

/// Result of this module.
pub type Result<T, E = InitError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------
// Kernel command line
// ---------------------------------------------------------------------------

/// Settings from the kernel command line (`agentd.*` options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// `agentd.port=NAME`: the virtio-console port name (default `agent`),
    /// or `vsock:PORT`: listen for hosts on that vsock port instead.
    pub port: String,
    /// `agentd.log=LEVEL`: `error`, `warn`, `info` (default), `debug`, `trace`.
    pub log: Option<String>,
    /// `agentd.hostname=NAME`: set as the machine's hostname.
    pub hostname: Option<String>,
    /// `agentd.modules=a,b,c`: modules to load from [`MODULE_DIR`], in order.
    pub modules: Vec<String>,
    /// `agentd.root=`, `agentd.rootfstype=`, `agentd.rootflags=`,
    /// `agentd.rootwait=`, `agentd.overlay=`, `agentd.mount=` (repeatable):
    /// see [`rootfs`](super::rootfs).
    pub root: RootOptions,
    /// `agentd.test_panic=1`: a test hook. The agent panics on purpose right
    /// after [`boot`], so a test can check that the panic hook logs and
    /// powers off (`tests/vm/run.sh` boots a VM with it). Only the exact
    /// value `1` sets it.
    pub test_panic: bool,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            port: DEFAULT_PORT.to_owned(),
            log: None,
            hostname: None,
            modules: Vec::new(),
            root: RootOptions::default(),
            test_panic: false,
        }
    }
}

/// Splits a kernel command line into parameters as the kernel does:
/// whitespace separates them, and double quotes protect whitespace (the quotes
/// themselves are dropped).
fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut params = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                any = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if any {
                    params.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        params.push(cur);
    }
    params
}

/// Reads the `agentd.*` options of a kernel command line (the contents of
/// `/proc/cmdline`). Unknown options are ignored; a later option overrides an
/// earlier one, except `agentd.modules=`, whose lists add up. Parameters after
/// a lone `--` belong to init's argv, not to the kernel, and are ignored too.
/// Empty values (`agentd.hostname=`) count as absent.
pub fn parse_cmdline(cmdline: &str) -> BootConfig {
    let mut cfg = BootConfig::default();
    for param in split_cmdline(cmdline) {
        if param == "--" {
            break;
        }
        let Some((key, value)) = param.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let non_empty = || (!value.is_empty()).then(|| value.to_owned());
        match key {
            "agentd.port" => {
                if let Some(v) = non_empty() {
                    cfg.port = v;
                }
            }
            "agentd.log" => cfg.log = non_empty(),
            "agentd.hostname" => cfg.hostname = non_empty(),
            "agentd.modules" => cfg.modules.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned),
            ),
            "agentd.test_panic" => cfg.test_panic = value == "1",
            "agentd.root" => cfg.root.root = non_empty(),
            "agentd.rootfstype" => cfg.root.fstype = non_empty(),
            "agentd.rootflags" => cfg.root.flags = non_empty(),
            "agentd.rootwait" => cfg.root.wait = non_empty(),
            "agentd.overlay" => cfg.root.overlay = non_empty(),
            "agentd.mount" => cfg.root.mounts.extend(non_empty()),
            _ => {}
        }
    }
    cfg
}

/// Environment variable that stands in for `/proc/cmdline` when the agent
/// runs with `--init` but is not PID 1 (tests on a developer's machine,
/// which cannot choose the running kernel's command line). PID 1 never
/// reads it.
pub const TEST_CMDLINE_ENV: &str = "AGENTD_TEST_CMDLINE";

/// Reads `/proc/cmdline` (so `/proc` must be mounted) and parses it with
/// [`parse_cmdline`]. An unreadable command line gives the defaults. A
/// process that is not PID 1 reads [`TEST_CMDLINE_ENV`] instead when it is
/// set.
pub fn read_boot_config() -> BootConfig {
    if !sys::is_pid1() {
        if let Some(cmdline) = std::env::var_os(TEST_CMDLINE_ENV) {
            return parse_cmdline(&cmdline.to_string_lossy());
        }
    }
    match fs::read_to_string("/proc/cmdline") {
        Ok(s) => parse_cmdline(&s),
        Err(e) => {
            warn!("cannot read /proc/cmdline: {e}; using defaults");
            BootConfig::default()
        }
    }
}

// ---------------------------------------------------------------------------
// Mounts
// ---------------------------------------------------------------------------

/// Paths that [`mount_basics`] mounted, remembered for [`fatal`] and the panic
/// hook, which have no list of their own.
static MOUNTED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// One filesystem that [`mount_basics`] wants.
struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
    /// Mode of the mount point when it has to be created.
    mode: u32,
}

/// Whether `path` is a mount point: listed in `/proc/self/mountinfo` when
/// that is readable, otherwise when it lives on another device than its
/// parent (true for every fresh mount of a pseudo filesystem).
fn is_mount_point(path: &Path) -> bool {
    if let Ok(info) = fs::read_to_string("/proc/self/mountinfo") {
        // Field 5 is the mount point, with spaces etc. escaped as \040;
        // our paths have none.
        return info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .any(|mp| Path::new(mp) == path);
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    match (fs::metadata(path), fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev(),
        _ => false,
    }
}

/// Creates `path` (and its parents) as a directory with `mode` if missing.
fn ensure_dir(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if path.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
}

/// Mounts one filesystem unless its target already is a mount point.
/// Returns whether it mounted it.
fn mount_one(m: &MountSpec) -> bool {
    let target = Path::new(m.target);
    if let Err(e) = ensure_dir(target, m.mode) {
        warn!("cannot create mount point {}: {e}", m.target);
        return false;
    }
    if is_mount_point(target) {
        debug!("{} is already mounted", m.target);
        return false;
    }
    let data = (!m.data.is_empty()).then_some(m.data);
    match nix::mount::mount(Some(m.source), target, Some(m.fstype), m.flags, data) {
        Ok(()) => {
            debug!("mounted {} on {}", m.fstype, m.target);
            true
        }
        Err(Errno::EBUSY) => {
            debug!("{} is already mounted (EBUSY)", m.target);
            false
        }
        Err(e) => {
            warn!("cannot mount {} on {}: {e}", m.fstype, m.target);
            false
        }
    }
}

/// Makes `link` a symbolic link to `target` unless something is already
/// there.
fn ensure_symlink(target: &str, link: &str) {
    if fs::symlink_metadata(link).is_ok() {
        return;
    }
    if let Err(e) = std::os::unix::fs::symlink(target, link) {
        warn!("cannot link {link} -> {target}: {e}");
    }
}

/// Points `/dev/ptmx` at `pts/ptmx`, the multiplexer of the devpts instance
/// mounted on `/dev/pts` (devtmpfs made `/dev/ptmx` a device node; that node
/// works too on kernels since 4.7, but the link is what the instance's
/// `ptmxmode=0666` applies to).
fn link_ptmx() {
    let ptmx = Path::new("/dev/ptmx");
    match fs::symlink_metadata(ptmx) {
        Ok(md) if md.file_type().is_symlink() => return,
        Ok(md) if md.file_type().is_char_device() || md.file_type().is_file() => {
            if let Err(e) = fs::remove_file(ptmx) {
                warn!("cannot replace /dev/ptmx: {e}");
                return;
            }
        }
        Ok(_) => {
            warn!("/dev/ptmx is neither a device nor a link; left alone");
            return;
        }
        Err(_) => {}
    }
    if let Err(e) = std::os::unix::fs::symlink("pts/ptmx", ptmx) {
        warn!("cannot link /dev/ptmx -> pts/ptmx: {e}");
    }
}

/// Whether the running kernel knows filesystem type `fstype`
/// (`/proc/filesystems`).
fn kernel_has_fs(fstype: &str) -> bool {
    fs::read_to_string("/proc/filesystems")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().last() == Some(fstype))
        })
        .unwrap_or(false)
}

/// Mounts what programs expect of a Linux system, each only if not already
/// mounted: `/proc`, `/sys`, `/dev` (devtmpfs), `/dev/pts` (a new devpts
/// instance, `ptmxmode=0666,mode=0620`, with `/dev/ptmx` -> `pts/ptmx`),
/// `/dev/shm`, `/tmp` and `/run` (tmpfs), and cgroup2 on `/sys/fs/cgroup` when
/// `/proc/filesystems` lists it. Creates the links `/dev/fd` ->
/// `/proc/self/fd` and `/dev/stdin`, `/dev/stdout`, `/dev/stderr`.
///
/// Never fails: a step that fails is logged and skipped. Returns the mount
/// points it mounted, in mount order, for [`power_off`] to unmount in reverse
/// (also remembered for [`fatal`]).
pub fn mount_basics() -> Vec<PathBuf> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let pseudo = nosuid_nodev | MsFlags::MS_NOEXEC;
    let before_dev = [
        MountSpec {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: pseudo,
            data: "",
            mode: 0o555,
        },
        MountSpec {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: pseudo,
            data: "",
            mode: 0o555,
        },
        MountSpec {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: "mode=0755",
            mode: 0o755,
        },
        MountSpec {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: "newinstance,ptmxmode=0666,mode=0620",
            mode: 0o755,
        },
        MountSpec {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: nosuid_nodev,
            data: "mode=1777",
            mode: 0o1777,
        },
        MountSpec {
            source: "tmpfs",
            target: "/tmp",
            fstype: "tmpfs",
            flags: nosuid_nodev,
            data: "mode=1777",
            mode: 0o1777,
        },
        MountSpec {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: nosuid_nodev,
            data: "mode=0755",
            mode: 0o755,
        },
    ];
    let mut mounted = Vec::new();
    for m in &before_dev {
        if mount_one(m) {
            mounted.push(PathBuf::from(m.target));
        }
    }
    // Replace /dev/ptmx only on a /dev of our own: in a container or a test
    // namespace, /dev may be the host's (a devpts of our own on the host's
    // /dev is not enough: the link would change the host's /dev/ptmx).
    if mounted.iter().any(|p| p == Path::new("/dev")) {
        link_ptmx();
    }
    ensure_symlink("/proc/self/fd", "/dev/fd");
    ensure_symlink("/proc/self/fd/0", "/dev/stdin");
    ensure_symlink("/proc/self/fd/1", "/dev/stdout");
    ensure_symlink("/proc/self/fd/2", "/dev/stderr");
    if kernel_has_fs("cgroup2") {
        let cg = MountSpec {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: pseudo,
            data: "",
            mode: 0o555,
        };
        if mount_one(&cg) {
            mounted.push(PathBuf::from(cg.target));
        }
    } else {
        debug!("the kernel has no cgroup2");
    }
    if let Ok(mut m) = MOUNTED.lock() {
        m.extend(mounted.iter().cloned());
    }
    mounted
}

// ---------------------------------------------------------------------------
// Modules, hostname, environment
// ---------------------------------------------------------------------------

/// Loads the kernel modules `names`, in order, from
/// `/lib/modules/agentd/NAME.ko` with `finit_module(2)` (no parameters).
/// `NAME` is tried as given, then with `_` and `-` swapped. A module that is
/// already loaded (`EEXIST`) is fine; any other failure is logged and the
/// next module is tried: a missing driver shows up later as a missing port.
/// The files must be uncompressed (the harness decompresses `.ko.xz`/`.ko.zst`).
pub fn load_modules(names: &[String]) {
    for name in names {
        let candidates = [name.clone(), name.replace('_', "-"), name.replace('-', "_")];
        let file = candidates.iter().find_map(|n| {
            let path = Path::new(MODULE_DIR).join(format!("{n}.ko"));
            File::open(&path).ok().map(|f| (f, path))
        });
        let Some((file, path)) = file else {
            warn!("module {name}: no {MODULE_DIR}/{name}.ko");
            continue;
        };
        let started = Instant::now();
        match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) => debug!(
                "loaded module {} in {:?}",
                path.display(),
                started.elapsed()
            ),
            Err(Errno::EEXIST) => debug!("module {name} was already loaded"),
            Err(e) => warn!("cannot load module {}: {e}", path.display()),
        }
    }
}

/// Sets the machine's hostname (`sethostname(2)`).
pub fn set_hostname(name: &str) -> Result<()> {
    if name.contains('\0') {
        return Err(InitError::Nul {
            what: "hostname".into(),
        });
    }
    nix::unistd::sethostname(name).map_err(|source| InitError::Sys {
        what: format!("sethostname({name:?})"),
        source,
    })
}

/// Brings the loopback interface up, as every init does: the kernel starts
/// it down, and without it nothing in the guest reaches `127.0.0.1` (a
/// server a session starts, or the `net` extension connecting to it).
/// Leaves every other flag as it is; a no-op when it is up already.
pub fn bring_up_loopback() -> Result<()> {
    let sys = |what: &str, source: Errno| InitError::Sys {
        what: what.into(),
        source,
    };
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sys("socket(AF_INET)", Errno::last()));
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: ifreq is plain data, valid all zeros.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags of the interface `req` names
    // into `req`, which lives for the call.
    if unsafe { libc::ioctl(raw, libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(sys("SIOCGIFFLAGS lo", Errno::last()));
    }
    // SAFETY: the kernel filled in `ifru_flags` just above.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    if flags & up == up {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: SIOCSIFFLAGS reads `req`, which lives for the call.
    if unsafe { libc::ioctl(raw, libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(sys("SIOCSIFFLAGS lo", Errno::last()));
    }
    Ok(())
}

/// The base environment of sessions when the agent is PID 1 (the kernel gives
/// init almost none): `PATH` and `HOME=/root`. Sessions on a terminal should
/// get `TERM` as well (the agent adds it for `tty` sessions).
pub fn default_env() -> Vec<(String, String)> {
    vec![
        ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
        ("HOME".to_owned(), "/root".to_owned()),
    ]
}

// ---------------------------------------------------------------------------
// The virtio-console port
// ---------------------------------------------------------------------------

/// Looks for the virtio-console port whose `/sys/class/virtio-ports/*/name`
/// equals `name`, and returns its device node (`/dev/vportNpM`).
pub fn find_port(name: &str) -> Option<PathBuf> {
    let dir = fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in dir.flatten() {
        let Ok(port_name) = fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if port_name.trim_end_matches(['\n', '\0']) == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// Opens the virtio-console port named `name`: once, read-write,
/// `O_NONBLOCK | O_CLOEXEC | O_NOCTTY`. Keep the file for the agent's whole
/// life: data that the host sends while the port is closed is lost (see the
/// module documentation for what poll reports on it).
///
/// The port shows up a few hundred milliseconds after the virtio modules are
/// loaded (first in sysfs, then as a device node): this waits for both, up to
/// `timeout`, sleeping between looks (5 ms, doubling up to 50 ms; no busy
/// loop).
pub fn open_port(name: &str, timeout: Duration) -> Result<File> {
    let started = Instant::now();
    let mut nap = Duration::from_millis(5);
    loop {
        if let Some(path) = find_port(name) {
            let opened = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
                .open(&path);
            match opened {
                Ok(file) => {
                    info!(
                        "opened virtio port {name:?} at {} after {:?}",
                        path.display(),
                        started.elapsed()
                    );
                    return Ok(file);
                }
                // The sysfs entry exists but devtmpfs has not made the node yet.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(InitError::OpenPort { path, source }),
            }
        }
        let elapsed = started.elapsed();
        if elapsed >= timeout {
            return Err(InitError::PortTimeout {
                name: name.to_owned(),
                timeout,
            });
        }
        std::thread::sleep(nap.min(timeout - elapsed));
        nap = (nap * 2).min(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------

/// Longest line written to `/dev/kmsg` in one record (the kernel refuses
/// records over about 1 KiB); longer lines are split.
const KMSG_CHUNK: usize = 900;

/// Where PID 1 logs: `/dev/kmsg` (the kernel log, read with `dmesg`) or,
/// failing that, `/dev/console`. Never the agent port.
///
/// It is a [`tracing_subscriber::fmt::MakeWriter`]: give it to
/// `tracing_subscriber::fmt().with_writer(..)`. On kmsg each line becomes one
/// record, tagged with the event's level (`<3>` error, `<4>` warn, `<6>` info,
/// `<7>` debug and trace). Note that the kernel rate-limits writes to
/// `/dev/kmsg` (10 records per 5 s) unless the command line has
/// `printk.devkmsg=on`, which the harness passes.
#[derive(Debug)]
pub struct LogTarget {
    /// `None` only when not even standard error could be duplicated: logs
    /// are dropped.
    file: Option<File>,
    kmsg: bool,
}

impl LogTarget {
    /// Whether this logs to `/dev/kmsg` (else to the console).
    pub fn is_kmsg(&self) -> bool {
        self.kmsg
    }

    fn write_record(&self, priority: u8, buf: &[u8]) -> io::Result<usize> {
        let Some(mut f) = self.file.as_ref() else {
            return Ok(buf.len());
        };
        if !self.kmsg {
            f.write_all(buf)?;
            return Ok(buf.len());
        }
        for line in buf.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            for chunk in line.chunks(KMSG_CHUNK) {
                let mut rec = Vec::with_capacity(chunk.len() + 12);
                rec.extend_from_slice(format!("<{priority}>agentd: ").as_bytes());
                rec.extend_from_slice(chunk);
                // A record the kernel refuses is dropped, not retried.
                let _ = f.write(&rec);
            }
        }
        Ok(buf.len())
    }
}

/// A writer for one log event, made by [`LogTarget`].
#[derive(Debug)]
pub struct LogWriter<'a> {
    target: &'a LogTarget,
    priority: u8,
}

impl Write for LogWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.target.write_record(self.priority, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogTarget {
    type Writer = LogWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter {
            target: self,
            priority: 6,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        let priority = match *meta.level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        LogWriter {
            target: self,
            priority,
        }
    }
}

/// Inode number of the initial PID namespace's `/proc/self/ns/pid`
/// (`PROC_PID_INIT_INO` in the kernel's `include/linux/proc_ns.h`, fixed
/// since Linux 3.8).
const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;

/// Whether this process is in a PID namespace other than the machine's
/// first (PID 1 of `unshare --pid` in a test). `false` when it cannot tell
/// (no `/proc` yet, as early in a VM's boot).
fn in_child_pid_namespace() -> bool {
    fs::metadata("/proc/self/ns/pid").is_ok_and(|md| md.ino() != PROC_PID_INIT_INO)
}

/// Whether this process is the init of its machine: PID 1 of the
/// machine's first pid namespace (not of a test's `unshare --pid`). What
/// decides that the agent may change the machine (its clock, its cgroups).
pub fn is_machine_init() -> bool {
    super::sys::is_pid1() && !in_child_pid_namespace()
}

/// Opens the log target: for PID 1, `/dev/kmsg`, else `/dev/console`, else
/// a duplicate of standard error (which the kernel opens on the console for
/// init). A process that is not PID 1 (`agentd --init` in tests), or PID 1
/// of a PID namespace other than the machine's first (a test under
/// `unshare --pid`), logs to its standard error, never to the machine's
/// kernel log.
pub fn logger_target() -> LogTarget {
    let stderr = || {
        use std::os::fd::AsFd;
        io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .map(File::from)
    };
    if !sys::is_pid1() || in_child_pid_namespace() {
        return LogTarget {
            file: stderr(),
            kmsg: false,
        };
    }
    let open_w = |p: &str| {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(p)
    };
    if let Ok(file) = open_w("/dev/kmsg") {
        return LogTarget {
            file: Some(file),
            kmsg: true,
        };
    }
    let file = open_w("/dev/console").ok().or_else(stderr);
    LogTarget { file, kmsg: false }
}

/// Installs the global tracing subscriber of PID 1: plain text (no colours, no
/// timestamps: the kernel log stamps records) to [`logger_target`], at the
/// level `flag` (`--log-level`) names, else `cmdline` (`agentd.log=`), else
/// info. A value that is not a level is reported and info is used. Does
/// nothing if a subscriber is already set.
pub fn init_logging(flag: Option<&str>, cmdline: Option<&str>) {
    let (source, value) = match flag {
        Some(v) => ("--log-level", Some(v)),
        None => ("agentd.log", cmdline),
    };
    let (level, complaint) = log::level_or(source, value, LevelFilter::INFO);
    let target = logger_target();
    let kmsg = target.is_kmsg();
    let builder = tracing_subscriber::fmt()
        .with_writer(target)
        .with_ansi(false)
        .with_target(false)
        .with_max_level(level);
    let res = if kmsg {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
    if res.is_err() {
        debug!("a tracing subscriber was already installed");
    }
    if let Some(c) = complaint {
        warn!("{c}");
    }
}

/// Writes one line straight to the log target, bypassing tracing (for the
/// panic hook and [`fatal`], which must not depend on the subscriber).
fn log_direct(priority: u8, msg: &str) {
    let target = logger_target();
    let _ = target.write_record(priority, format!("{msg}\n").as_bytes());
}

// ---------------------------------------------------------------------------
// The end: panic hook, fatal errors, power-off
// ---------------------------------------------------------------------------

/// Installs the panic hook of PID 1 (once; later calls do nothing): a panic
/// anywhere, in any thread, logs the panic (to kmsg or the console) and
/// [`power_off`]s the machine, unmounting what [`mount_basics`] has mounted
/// by then. With it, PID 1 never unwinds or aborts out of `main` (which
/// would make the kernel panic with "Attempted to kill init!").
///
/// `agentd` installs it first thing in `main` when it is PID 1, before it
/// reads its arguments or mounts anything, so no panic can come before it;
/// [`boot`] installs it too (for `--init` when not PID 1, where a panic ends
/// the process with status 101, as an ordinary panic would).
pub fn install_panic_hook() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            // One line, one kernel log record (the message follows a
            // newline in `info`'s text).
            let what = info.to_string().replace('\n', " ");
            log_direct(0, &format!("PID 1 panicked: {what}; powering off"));
            // `try_lock`: the panic may have come while the list was locked.
            let mounted = MOUNTED.try_lock().map(|m| m.clone()).unwrap_or_default();
            // Not PID 1 (`--init` in a test): exit 101, as a panic would.
            end(&mounted, 101);
        }));
    });
}

/// Logs `msg` as a fatal error and powers the machine off, unmounting what
/// [`mount_basics`] mounted. For errors PID 1 cannot serve through (no
/// agent port, for example).
pub fn fatal(msg: &str) -> ! {
    if tracing::dispatcher::has_been_set() {
        error!("fatal: {msg}; powering off");
    } else {
        log_direct(2, &format!("fatal: {msg}; powering off"));
    }
    let mounted = MOUNTED.lock().map(|m| m.clone()).unwrap_or_default();
    end(&mounted, 1)
}

/// Ends the machine: `kill(-1, SIGTERM)` (every process but PID 1), up to
/// [`POWER_OFF_GRACE`] reaping them, `kill(-1, SIGKILL)`, reaping, `sync`,
/// unmounting `mounted` in reverse order (lazily, `MNT_DETACH`, when busy),
/// then `reboot(RB_POWER_OFF)`. Never returns: if the reboot call fails, it
/// logs and sleeps forever (PID 1 must not exit).
///
/// Only PID 1 kills everything and powers off. Any other process (the
/// agent run with `--init` for tests) syncs, unmounts and exits with status 0
/// instead, so a test can never power off or empty the machine it runs on.
pub fn power_off(mounted: &[PathBuf]) -> ! {
    end(mounted, 0)
}

/// [`power_off`], with the exit status a process that is not PID 1 exits
/// with.
fn end(mounted: &[PathBuf], status: i32) -> ! {
    let pid1 = sys::is_pid1();
    if pid1 {
        info!("powering off: terminating all processes");
        let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
        sys::reap_until_gone(POWER_OFF_GRACE);
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        sys::reap_until_gone(Duration::from_millis(500));
    }
    nix::unistd::sync();
    for path in mounted.iter().rev() {
        match nix::mount::umount2(path, MntFlags::empty()) {
            Ok(()) => debug!("unmounted {}", path.display()),
            Err(e) => {
                debug!("unmount {}: {e}; detaching", path.display());
                if let Err(e) = nix::mount::umount2(path, MntFlags::MNT_DETACH) {
                    warn!("cannot unmount {}: {e}", path.display());
                }
            }
        }
    }
    rootfs::remount_root_read_only();
    nix::unistd::sync();
    if !pid1 {
        info!("not PID 1: exiting instead of powering off");
        std::process::exit(status);
    }
    info!("power off");
    let err = match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    if in_child_pid_namespace() {
        // PID 1 of a container without CAP_SYS_BOOT: exiting ends the
        // namespace, and only it (the machine's kernel is not affected).
        log_direct(
            2,
            &format!("reboot(RB_POWER_OFF) failed: {err}; PID 1 of a pid namespace: exiting"),
        );
        std::process::exit(status);
    }
    log_direct(
        2,
        &format!("reboot(RB_POWER_OFF) failed: {err}; halting here"),
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

// ---------------------------------------------------------------------------
// Everything in order
// ---------------------------------------------------------------------------

/// What [`boot`] set up.
#[derive(Debug, Clone)]
pub struct Boot {
    /// The `agentd.*` settings of the kernel command line.
    pub config: BootConfig,
    /// What [`mount_basics`] mounted (and the shared folders), for
    /// [`power_off`].
    pub mounted: Vec<PathBuf>,
    /// The root and shared folders asked for, for READY's `mounts`.
    pub mounts: Vec<MountStatus>,
}

/// Runs the PID-1 setup in order: [`install_panic_hook`] (a no-op when
/// `main` already did), [`mount_basics`] (logging to the console
/// meanwhile), [`read_boot_config`], [`init_logging`] at `log_level` (the
/// `--log-level` option) or else `agentd.log=`, [`load_modules`],
/// [`set_hostname`]. Then the caller opens the port with [`open_port`] (or
/// calls [`fatal`]) and starts serving. Never fails.
///
/// Only a real PID 1 (of the machine, or of a PID namespace, which comes
/// with its own mount namespace under `unshare --mount-proc`) mounts, loads
/// modules and sets the hostname; any other process (`agentd --init` in a
/// test) only reads the command line (or [`TEST_CMDLINE_ENV`]) and sets up
/// logging and the panic hook.
pub fn boot(log_level: Option<&str>) -> Boot {
    install_panic_hook();
    if !sys::is_pid1() {
        // `agentd --init` outside a VM: mounting, loading modules or
        // setting the hostname would change the machine the tests run on.
        let config = read_boot_config();
        init_logging(log_level, config.log.as_deref());
        info!(
            "agentd {} with --init; command line: {config:?}",
            env!("CARGO_PKG_VERSION")
        );
        warn!("--init but not PID 1: no mounts, modules or hostname");
        let mounts = rootfs::prepare(&config.root, false).mounts;
        return Boot {
            config,
            mounted: Vec::new(),
            mounts,
        };
    }
    // Until /proc is up there is no command line and so no log level: log
    // the mounts at info to the console the kernel gave us.
    let early = tracing_subscriber::fmt()
        .with_writer(logger_target())
        .with_ansi(false)
        .with_target(false)
        .without_time()
        .with_max_level(tracing::Level::INFO)
        .finish();
    let mounted = tracing::subscriber::with_default(early, mount_basics);
    let config = read_boot_config();
    init_logging(log_level, config.log.as_deref());
    info!(
        "agentd {} as PID 1; command line: {config:?}",
        env!("CARGO_PKG_VERSION")
    );
    load_modules(&config.modules);
    if let Some(name) = &config.hostname {
        if let Err(e) = set_hostname(name) {
            warn!("{e}");
        }
    }
    if is_machine_init() {
        match bring_up_loopback() {
            Ok(()) => debug!("loopback interface up"),
            Err(e) => warn!("cannot bring the loopback interface up: {e}"),
        }
    }
    let mut mounted = mounted;
    let outcome = rootfs::prepare(&config.root, is_machine_init());
    mounted.extend(
        outcome
            .mounts
            .iter()
            .filter(|m| m.error.is_none() && m.path != "/")
            .map(|m| PathBuf::from(&m.path)),
    );
    Boot {
        config,
        mounted,
        mounts: outcome.mounts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn defaults_when_nothing_given() {
        let c = parse_cmdline("console=ttyS0 quiet panic=-1\n");
        assert_eq!(c, BootConfig::default());
        assert_eq!(c.port, "agent");
        assert!(c.log.is_none() && c.hostname.is_none() && c.modules.is_empty());
    }

    #[test]
    fn reads_every_option() {
        let c = parse_cmdline(
            "console=ttyS0 agentd.port=ctl agentd.log=debug agentd.hostname=vm1 \
             agentd.modules=virtio_ring,virtio,virtio_console quiet\n",
        );
        assert_eq!(c.port, "ctl");
        assert_eq!(c.log.as_deref(), Some("debug"));
        assert_eq!(c.hostname.as_deref(), Some("vm1"));
        assert_eq!(c.modules, s(&["virtio_ring", "virtio", "virtio_console"]));
        assert!(!c.test_panic);
    }

    #[test]
    fn test_panic_needs_exactly_1() {
        assert!(parse_cmdline("quiet agentd.test_panic=1").test_panic);
        for off in [
            "agentd.test_panic=0",
            "agentd.test_panic=yes",
            "agentd.test_panic=",
            "agentd.test_panic",
            "agentd.test_panic=1 agentd.test_panic=0",
            "-- agentd.test_panic=1",
        ] {
            assert!(!parse_cmdline(off).test_panic, "{off}");
        }
    }

    #[test]
    fn later_options_win_and_module_lists_add_up() {
        let c = parse_cmdline(
            "agentd.port=a agentd.port=b agentd.modules=x, agentd.modules=,y,,z agentd.log=info agentd.log=",
        );
        assert_eq!(c.port, "b");
        assert_eq!(c.modules, s(&["x", "y", "z"]));
        assert_eq!(c.log, None);
    }

    #[test]
    fn empty_values_are_absent_and_port_keeps_default() {
        let c = parse_cmdline("agentd.port= agentd.hostname= agentd.modules=");
        assert_eq!(c, BootConfig::default());
    }

    #[test]
    fn ignores_lookalikes_and_init_args() {
        let c = parse_cmdline(
            "xagentd.port=no agentd.portx=no agentd.hostname agentd= -- agentd.port=init-arg",
        );
        assert_eq!(c, BootConfig::default());
    }

    #[test]
    fn quotes_protect_spaces() {
        let c = parse_cmdline(r#"foo="a b" agentd.hostname="my host" agentd.port="p""#);
        assert_eq!(c.hostname.as_deref(), Some("my host"));
        assert_eq!(c.port, "p");
        assert_eq!(
            split_cmdline(r#"a "b c" d="e f"g"#),
            s(&["a", "b c", "d=e fg"])
        );
    }

    #[test]
    fn values_may_contain_equals_signs() {
        let c = parse_cmdline("agentd.hostname=a=b");
        assert_eq!(c.hostname.as_deref(), Some("a=b"));
    }

    #[test]
    fn default_env_has_path_and_home() {
        let env = default_env();
        assert!(env.contains(&("PATH".into(), DEFAULT_PATH.into())));
        assert!(env.contains(&("HOME".into(), "/root".into())));
    }

    #[test]
    fn mount_point_detection() {
        // `/` is always a mount point; a plain directory in a temporary
        // directory is not (unless the temporary directory itself is one).
        assert!(is_mount_point(Path::new("/")));
        let dir = std::env::temp_dir().join(format!("agentd-init-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert!(!is_mount_point(&dir));
        fs::remove_dir(&dir).unwrap();
    }

    /// Set in the child of [`mount_basics_twice_mounts_nothing_the_second_time`]
    /// (the test binary re-executed in a private mount namespace).
    const MOUNT_NS_CHILD_ENV: &str = "AGENTD_INIT_TEST_MOUNT_NS_CHILD";

    /// "Each only if not already mounted": a second [`mount_basics`] mounts
    /// nothing and stacks nothing. It mounts for real, so it runs in a
    /// private mount namespace: the test re-executes its own binary (one
    /// test, by exact name) under `unshare -m --propagation private`
    /// rather than forking this multi-threaded process. Skipped when
    /// `unshare -m` is not permitted (not root, no user namespaces).
    #[test]
    fn mount_basics_twice_mounts_nothing_the_second_time() {
        const NAME: &str = "agent::init::tests::mount_basics_twice_mounts_nothing_the_second_time";
        if std::env::var_os(MOUNT_NS_CHILD_ENV).is_some() {
            mount_twice_in_this_namespace();
            return;
        }
        let private = ["-m", "--propagation", "private"];
        let permitted = std::process::Command::new("unshare")
            .args(private)
            .arg("true")
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !permitted {
            eprintln!("skipped: unshare -m --propagation private is not permitted here");
            return;
        }
        let out = std::process::Command::new("unshare")
            .args(private)
            .arg(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(MOUNT_NS_CHILD_ENV, "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "the child failed:\n{text}");
        if text.contains("skipped in the mount namespace") {
            eprintln!("{text}");
            return;
        }
        // The exact filter must have matched (else "0 passed" succeeds).
        assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
        assert!(text.contains("second call mounted nothing"), "{text}");
    }

    /// The child's half: in a private mount namespace of its own.
    fn mount_twice_in_this_namespace() {
        // With /dev or /dev/pts unmounted, mount_basics would mount a devpts
        // and could touch the host's /dev (shared even across mount
        // namespaces): only run where they are mounted already.
        for p in ["/proc", "/sys", "/dev", "/dev/pts"] {
            if !is_mount_point(Path::new(p)) {
                println!("skipped in the mount namespace: {p} is not a mount point");
                return;
            }
        }
        // Give the first call something to mount: detach /tmp and /run if
        // they are mount points (in this namespace only).
        for p in ["/tmp", "/run"] {
            if is_mount_point(Path::new(p)) {
                nix::mount::umount2(p, MntFlags::MNT_DETACH).unwrap();
            }
        }
        let first = mount_basics();
        for p in ["/tmp", "/run"] {
            assert!(
                first.contains(&PathBuf::from(p)),
                "{p} not mounted: {first:?}"
            );
        }
        let second = mount_basics();
        assert!(second.is_empty(), "the second call mounted {second:?}");
        // Each of them once, with the options asked for.
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        for p in &first {
            let lines: Vec<&str> = info
                .lines()
                .filter(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
                .collect();
            assert_eq!(
                lines.len(),
                1,
                "{} mounted {} times",
                p.display(),
                lines.len()
            );
        }
        // (tmpfs shows `mode=` in /proc/mounts only when it is not 1777.)
        let mode = fs::metadata("/tmp").unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o1777, "/tmp has mode {mode:o}");
        println!("first call mounted {first:?}; second call mounted nothing");
    }

    #[test]
    fn missing_port_times_out_quickly() {
        let t = Instant::now();
        let err =
            open_port("no-such-port-for-agentd-tests", Duration::from_millis(120)).unwrap_err();
        assert!(matches!(err, InitError::PortTimeout { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn uptime_is_positive() {
        assert!(sys::uptime_ms().unwrap() > 0);
    }

    #[test]
    fn log_writer_splits_kmsg_records() {
        // Write through a LogTarget backed by a plain file in kmsg mode and
        // check the records.
        let path = std::env::temp_dir().join(format!("agentd-kmsg-test-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        let t = LogTarget {
            file: Some(file),
            kmsg: true,
        };
        let long = "x".repeat(KMSG_CHUNK + 10);
        t.write_record(4, format!("one\n\ntwo {long}\n").as_bytes())
            .unwrap();
        let got = fs::read_to_string(&path).unwrap();
        fs::remove_file(&path).unwrap();
        let expected = format!(
            "<4>agentd: one<4>agentd: two {}<4>agentd: {}",
            &long[..KMSG_CHUNK - 4],
            &long[KMSG_CHUNK - 4..]
        );
        assert_eq!(got, expected);
    }
}
