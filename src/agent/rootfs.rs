//! A real root for the init path: `agentd.root=`, `agentd.overlay=` and
//! `agentd.mount=` (docs/VM.md, "Booting a distribution").
//!
//! agentd as `/init` of a small initramfs mounts the root the kernel
//! command line names (a block device, or a virtiofs tag), optionally under
//! a tmpfs overlay so the image stays pristine, moves `/dev`, `/proc`,
//! `/sys`, `/run` and `/tmp` into it, frees the initramfs (its files are
//! deleted, as `switch_root(8)` does: a ramfs keeps its pages until then)
//! and makes the new root `/` with `MS_MOVE` and `chroot`. It carries on as
//! PID 1 there, so sessions see the distribution's `/etc/passwd`, `PATH`
//! and `HOME`. Then the shared folders are mounted, before READY.
//!
//! Nothing here may hang or panic the machine: the device is waited for
//! for a bounded time (`agentd.rootwait=SECONDS`, default 30), and every
//! failure (of the root, the overlay, a shared folder, or a malformed
//! option) is logged on the console and kept as a [`MountStatus`] with its
//! error for READY's `mounts`. A root that cannot be mounted leaves the
//! agent serving from the initramfs, where the host can read why.
//!
//! Only the init of a machine (PID 1 of the first pid namespace, on an
//! initramfs) switches roots or mounts: anything else reports each request
//! as not carried out, which is how the loopback tests see this module.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
use tracing::{error, info, warn};

use crate::messages::MountStatus;

/// `statfs`'s type of a ramfs (the kernel's RAMFS_MAGIC; nix names only
/// tmpfs's).
const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
/// Where the new root is assembled before the switch.
const NEW_ROOT: &str = "/newroot";
/// Under the old `/run` (which moves into the new root with it): the
/// read-only lower layer and the tmpfs of an overlaid root.
const OVERLAY_LOWER: &str = "/run/agentd/root.ro";
const OVERLAY_TMPFS: &str = "/run/agentd/root.rw";
/// The basic mounts moved into the new root, in this order.
const MOVED: [&str; 5] = ["/dev", "/proc", "/sys", "/run", "/tmp"];
/// `agentd.rootwait=` when absent.
pub const DEFAULT_ROOT_WAIT: Duration = Duration::from_secs(30);

/// The boot options of this module, as the command line gave them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootOptions {
    /// `agentd.root=/dev/vda` or `agentd.root=virtiofs:TAG`.
    pub root: Option<String>,
    /// `agentd.rootfstype=` (default `ext4` for a device).
    pub fstype: Option<String>,
    /// `agentd.rootflags=`: mount options, as `mount -o` takes them.
    pub flags: Option<String>,
    /// `agentd.rootwait=SECONDS`: how long to wait for the device.
    pub wait: Option<String>,
    /// `agentd.overlay=tmpfs`.
    pub overlay: Option<String>,
    /// Each `agentd.mount=TAG:/path[:virtiofs|9p][:ro]`, in order.
    pub mounts: Vec<String>,
}

impl RootOptions {
    /// Whether any option of this module was given.
    pub fn is_empty(&self) -> bool {
        self.root.is_none() && self.overlay.is_none() && self.mounts.is_empty()
    }
}

/// Where the root comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RootSource {
    Device(PathBuf),
    Virtiofs(String),
}

/// A shared folder's file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SharedFs {
    Virtiofs,
    NineP,
}

impl SharedFs {
    fn name(self) -> &'static str {
        match self {
            SharedFs::Virtiofs => "virtiofs",
            SharedFs::NineP => "9p",
        }
    }
}

/// One `agentd.mount=` request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SharedMount {
    tag: String,
    path: PathBuf,
    fs: SharedFs,
    read_only: bool,
}

/// Parses `TAG:/path[:virtiofs|9p][:ro]` (the last two in either order).
fn parse_shared(spec: &str) -> Result<SharedMount, String> {
    let mut parts = spec.split(':');
    let tag = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    if tag.is_empty() || !path.starts_with('/') {
        return Err(format!(
            "agentd.mount={spec}: expected TAG:/path[:virtiofs|9p][:ro]"
        ));
    }
    let mut m = SharedMount {
        tag: tag.to_owned(),
        path: PathBuf::from(path),
        fs: SharedFs::Virtiofs,
        read_only: false,
    };
    for word in parts {
        match word {
            "virtiofs" => m.fs = SharedFs::Virtiofs,
            "9p" => m.fs = SharedFs::NineP,
            "ro" => m.read_only = true,
            "rw" => m.read_only = false,
            other => {
                return Err(format!(
                    "agentd.mount={spec}: unknown option {other:?} (virtiofs, 9p, ro or rw)"
                ))
            }
        }
    }
    Ok(m)
}

/// Mount flags and the data string of a `mount -o` style option list.
fn parse_flags(options: &str) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for opt in options.split(',').filter(|o| !o.is_empty()) {
        match opt {
            "ro" => flags.insert(MsFlags::MS_RDONLY),
            "rw" => flags.remove(MsFlags::MS_RDONLY),
            "nosuid" => flags.insert(MsFlags::MS_NOSUID),
            "nodev" => flags.insert(MsFlags::MS_NODEV),
            "noexec" => flags.insert(MsFlags::MS_NOEXEC),
            "noatime" => flags.insert(MsFlags::MS_NOATIME),
            "nodiratime" => flags.insert(MsFlags::MS_NODIRATIME),
            "relatime" => flags.insert(MsFlags::MS_RELATIME),
            "sync" => flags.insert(MsFlags::MS_SYNCHRONOUS),
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// A failure, as READY reports it.
struct Failure {
    message: String,
    errno: Option<Errno>,
}

impl Failure {
    fn new(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            errno: None,
        }
    }

    fn sys(what: impl std::fmt::Display, e: Errno) -> Failure {
        Failure {
            message: format!("{what}: {}", e.desc()),
            errno: Some(e),
        }
    }
}

fn status(
    source: &str,
    path: &Path,
    fstype: &str,
    ro: bool,
    r: Result<(), Failure>,
) -> MountStatus {
    let (error, errno) = match r {
        Ok(()) => (None, None),
        Err(f) => (Some(f.message), f.errno.map(|e| e as i32)),
    };
    MountStatus {
        source: source.to_owned(),
        path: path.display().to_string(),
        fstype: fstype.to_owned(),
        ro,
        error,
        errno,
    }
}

fn do_mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: &str,
) -> Result<(), Failure> {
    if let Err(e) = fs::create_dir_all(target) {
        let errno = e.raw_os_error().map(Errno::from_raw);
        return Err(Failure {
            message: format!("cannot create {}: {e}", target.display()),
            errno,
        });
    }
    let data = (!data.is_empty()).then_some(data);
    mount(Some(source), target, Some(fstype), flags, data).map_err(|e| {
        Failure::sys(
            format_args!("mount -t {fstype} {source} {}", target.display()),
            e,
        )
    })
}

/// Waits up to `wait` for `dev` to appear (devtmpfs adds it once its
/// driver has probed the disk).
fn wait_for_device(dev: &Path, wait: Duration) -> Result<(), Failure> {
    let start = Instant::now();
    while !dev.exists() {
        if start.elapsed() >= wait {
            return Err(Failure::new(format!(
                "agentd.root={}: no such device after {} s (is its driver loaded? see agentd.modules=; agentd.rootwait= waits longer)",
                dev.display(),
                wait.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// What [`prepare`] did: the READY entries, and whether `/` is now the
/// new root.
#[derive(Debug, Default)]
pub struct RootOutcome {
    pub mounts: Vec<MountStatus>,
    pub switched: bool,
}

/// Mounts the root the options name, switches to it, then mounts the
/// shared folders. `machine_init` says whether this process may (the init
/// of a VM): otherwise each request is reported as not carried out.
pub fn prepare(opts: &RootOptions, machine_init: bool) -> RootOutcome {
    let mut out = RootOutcome::default();
    if opts.is_empty() {
        return out;
    }
    if !machine_init {
        warn!("agentd.root=/agentd.mount= given, but this agent is not the init of a VM: nothing mounted");
        report_not_init(opts, &mut out);
        return out;
    }
    if opts.root.is_some() || opts.overlay.is_some() {
        out.switched = mount_and_switch(opts, &mut out.mounts);
    }
    for spec in &opts.mounts {
        out.mounts.push(mount_shared(spec));
    }
    for m in &out.mounts {
        match &m.error {
            None => info!("mounted {} on {} ({})", m.source, m.path, m.fstype),
            Some(e) => error!("not mounted: {} on {}: {e}", m.source, m.path),
        }
    }
    out
}

fn report_not_init(opts: &RootOptions, out: &mut RootOutcome) {
    let why = || Err(Failure::new("not the init of a VM: nothing is mounted"));
    if let Some(root) = &opts.root {
        out.mounts.push(status(
            root,
            Path::new("/"),
            opts.fstype.as_deref().unwrap_or(""),
            false,
            why(),
        ));
    }
    for spec in &opts.mounts {
        out.mounts.push(match parse_shared(spec) {
            Ok(m) => status(&m.tag, &m.path, m.fs.name(), m.read_only, why()),
            Err(e) => status(spec, Path::new(""), "", false, Err(Failure::new(e))),
        });
    }
}

fn mount_shared(spec: &str) -> MountStatus {
    let m = match parse_shared(spec) {
        Ok(m) => m,
        Err(e) => return status(spec, Path::new(""), "", false, Err(Failure::new(e))),
    };
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if m.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let data = match m.fs {
        SharedFs::Virtiofs => "",
        SharedFs::NineP => "trans=virtio,version=9p2000.L,msize=262144",
    };
    let r = do_mount(&m.tag, &m.path, m.fs.name(), flags, data);
    status(&m.tag, &m.path, m.fs.name(), m.read_only, r)
}

/// Mounts the new root at [`NEW_ROOT`] (through an overlay when asked) and
/// switches to it. Returns whether `/` is now the new root.
fn mount_and_switch(opts: &RootOptions, report: &mut Vec<MountStatus>) -> bool {
    let Some(root) = opts.root.as_deref() else {
        report.push(status(
            "overlay",
            Path::new("/"),
            "overlay",
            false,
            Err(Failure::new(
                "agentd.overlay= needs agentd.root= (the image to lay the overlay on)",
            )),
        ));
        return false;
    };
    let source = match root.strip_prefix("virtiofs:") {
        Some(tag) => RootSource::Virtiofs(tag.to_owned()),
        None => RootSource::Device(PathBuf::from(root)),
    };
    let fstype = match (&source, opts.fstype.as_deref()) {
        (_, Some(t)) => t.to_owned(),
        (RootSource::Device(_), None) => "ext4".to_owned(),
        (RootSource::Virtiofs(_), None) => "virtiofs".to_owned(),
    };
    let overlay = match opts.overlay.as_deref() {
        None => false,
        Some("tmpfs") => true,
        Some(other) => {
            report.push(status(
                root,
                Path::new("/"),
                &fstype,
                false,
                Err(Failure::new(format!(
                    "agentd.overlay={other}: only tmpfs is known"
                ))),
            ));
            return false;
        }
    };
    let (mut flags, data) = parse_flags(opts.flags.as_deref().unwrap_or(""));
    if overlay {
        flags |= MsFlags::MS_RDONLY;
    }
    let ro = flags.contains(MsFlags::MS_RDONLY);
    let r = mount_root(&source, &fstype, flags, &data, overlay, opts);
    let ok = r.is_ok();
    let (src, label) = match &source {
        RootSource::Device(d) => (d.display().to_string(), fstype.clone()),
        RootSource::Virtiofs(t) => (t.clone(), fstype.clone()),
    };
    report.push(status(&src, Path::new("/"), &label, ro, r));
    if !ok {
        return false;
    }
    if overlay {
        report.push(status("overlay", Path::new("/"), "overlay", false, Ok(())));
    }
    match switch_root() {
        Ok(()) => {
            SWITCHED.store(true, Ordering::Relaxed);
            true
        }
        Err(f) => {
            // The root is mounted but could not become `/`: say so.
            if let Some(last) = report.iter_mut().rev().find(|m| m.path == "/") {
                last.error = Some(f.message);
                last.errno = f.errno.map(|e| e as i32);
            }
            false
        }
    }
}

fn mount_root(
    source: &RootSource,
    fstype: &str,
    flags: MsFlags,
    data: &str,
    overlay: bool,
    opts: &RootOptions,
) -> Result<(), Failure> {
    let src = match source {
        RootSource::Device(dev) => {
            let wait = match opts.wait.as_deref().map(str::parse::<u64>) {
                None => DEFAULT_ROOT_WAIT,
                Some(Ok(s)) => Duration::from_secs(s),
                Some(Err(_)) => {
                    return Err(Failure::new(format!(
                        "agentd.rootwait={}: not a number of seconds",
                        opts.wait.as_deref().unwrap_or_default()
                    )))
                }
            };
            wait_for_device(dev, wait)?;
            dev.display().to_string()
        }
        RootSource::Virtiofs(tag) => tag.clone(),
    };
    if !overlay {
        return do_mount(&src, Path::new(NEW_ROOT), fstype, flags, data);
    }
    do_mount(&src, Path::new(OVERLAY_LOWER), fstype, flags, data)?;
    do_mount(
        "tmpfs",
        Path::new(OVERLAY_TMPFS),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=0755",
    )?;
    for dir in ["upper", "work"] {
        let p = Path::new(OVERLAY_TMPFS).join(dir);
        fs::create_dir_all(&p).map_err(|e| Failure {
            message: format!("cannot create {}: {e}", p.display()),
            errno: e.raw_os_error().map(Errno::from_raw),
        })?;
    }
    let data = format!(
        "lowerdir={OVERLAY_LOWER},upperdir={OVERLAY_TMPFS}/upper,workdir={OVERLAY_TMPFS}/work"
    );
    do_mount(
        "overlay",
        Path::new(NEW_ROOT),
        "overlay",
        MsFlags::empty(),
        &data,
    )
}

/// Moves the basic mounts into [`NEW_ROOT`], frees the initramfs, and makes
/// [`NEW_ROOT`] `/`.
fn switch_root() -> Result<(), Failure> {
    let new_root = Path::new(NEW_ROOT);
    if !new_root.join("sbin").exists()
        && !new_root.join("usr").exists()
        && !new_root.join("bin").exists()
    {
        warn!("the new root has no /sbin, /bin or /usr: is it the right file system?");
    }
    for dir in MOVED {
        let target = new_root.join(dir.trim_start_matches('/'));
        if fs::create_dir_all(&target).is_err() && !target.is_dir() {
            warn!(
                "{} is missing in the new root and cannot be made: {dir} stays behind",
                target.display()
            );
            continue;
        }
        if let Err(e) = mount(
            Some(dir),
            &target,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        ) {
            warn!("cannot move {dir} into the new root: {e}");
        }
    }
    std::env::set_current_dir(new_root)
        .map_err(|e| Failure::new(format!("chdir {NEW_ROOT}: {e}")))?;
    free_initramfs();
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| Failure::sys("mount --move . /", e))?;
    nix::unistd::chroot(".").map_err(|e| Failure::sys("chroot .", e))?;
    std::env::set_current_dir("/").map_err(|e| Failure::new(format!("chdir /: {e}")))?;
    info!("switched root");
    Ok(())
}

/// Deletes the initramfs's files (not crossing into other mounts), as
/// `switch_root(8)` does, so the ramfs's memory comes back. Only when `/`
/// really is a ramfs or tmpfs.
fn free_initramfs() {
    let is_ram = statfs("/").is_ok_and(|s| {
        let t = s.filesystem_type();
        t == RAMFS_MAGIC || t == TMPFS_MAGIC
    });
    let Ok(meta) = fs::symlink_metadata("/") else {
        return;
    };
    if !is_ram {
        warn!("/ is not an initramfs: its files are left alone");
        return;
    }
    remove_tree_on(Path::new("/"), meta.dev());
}

fn remove_tree_on(dir: &Path, dev: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue; // another mount (the new root, or one left behind)
        }
        let removed = if meta.is_dir() {
            remove_tree_on(&path, dev);
            fs::remove_dir(&path)
        } else {
            fs::remove_file(&path)
        };
        if let Err(e) = removed {
            if e.kind() != io::ErrorKind::NotFound {
                warn!("freeing the initramfs: {}: {e}", path.display());
            }
        }
    }
}

/// Set once `/` is the new root.
static SWITCHED: AtomicBool = AtomicBool::new(false);

/// At power-off, after the other unmounts: a switched-to root is made
/// read-only, so a block device's file system is clean (it cannot be
/// unmounted while it is `/`). Nothing when the root was not switched.
pub fn remount_root_read_only() {
    if !SWITCHED.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        warn!("cannot remount / read-only: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_mount_specs() {
        let m = parse_shared("work:/srv/work").unwrap();
        assert_eq!(
            (m.tag.as_str(), m.path.as_path(), m.fs, m.read_only),
            ("work", Path::new("/srv/work"), SharedFs::Virtiofs, false)
        );
        let m = parse_shared("data:/data:9p:ro").unwrap();
        assert_eq!((m.fs, m.read_only), (SharedFs::NineP, true));
        let m = parse_shared("data:/data:ro:virtiofs").unwrap();
        assert_eq!((m.fs, m.read_only), (SharedFs::Virtiofs, true));
        for bad in [
            "",
            "tag",
            "tag:relative",
            ":/x",
            "t:/x:nfs",
            "t:/x:ro:bogus",
        ] {
            assert!(parse_shared(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn root_flags_split_into_flags_and_data() {
        let (f, d) = parse_flags("ro,noatime,data=ordered,errors=remount-ro");
        assert!(f.contains(MsFlags::MS_RDONLY | MsFlags::MS_NOATIME));
        assert_eq!(d, "data=ordered,errors=remount-ro");
        let (f, d) = parse_flags("ro,rw");
        assert!(!f.contains(MsFlags::MS_RDONLY));
        assert_eq!(d, "");
    }

    #[test]
    fn not_init_reports_every_request() {
        let opts = RootOptions {
            root: Some("/dev/vda".into()),
            mounts: vec!["a:/a".into(), "bad".into()],
            ..Default::default()
        };
        let out = prepare(&opts, false);
        assert!(!out.switched);
        assert_eq!(out.mounts.len(), 3);
        assert!(out.mounts.iter().all(|m| m.error.is_some()));
        assert_eq!(out.mounts[1].source, "a");
        assert!(out.mounts[2]
            .error
            .as_deref()
            .unwrap()
            .contains("expected TAG:/path"));
    }
}
