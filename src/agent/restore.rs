//! Noticing a restore from a snapshot by itself: the VM generation ID.
//!
//! A monitor that restores a snapshot (or clones a VM) changes the VM
//! generation ID (QEMU's `-device vmgenid`, Firecracker's VMGenID,
//! Hyper-V's); the kernel's vmgenid driver reseeds the random pool and
//! sends a uevent with `NEW_VMGENID=1` (Linux 6.2 and later). The agent
//! listens for kernel uevents on a netlink socket, polled by the loop like
//! any other fd, and on that one increments its restore counter and sends
//! READY again on every connection (docs/PROTOCOL.md, "Extension
//! `clock`"), so a host knows to set the clock before it runs anything.
//!
//! Only the init of a VM listens (a loopback agent would wake on every
//! uevent of the developer's machine, and no restore happens there).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The netlink multicast group of the kernel's own uevents (udev's
/// rebroadcasts are group 2).
const KERNEL_GROUP: u32 = 1;

/// The kernel's uevents, on a nonblocking netlink socket.
#[derive(Debug)]
pub(crate) struct Uevents {
    fd: OwnedFd,
}

impl Uevents {
    pub(crate) fn open() -> io::Result<Uevents> {
        // SAFETY: plain socket creation with constant arguments; the fd is
        // checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_KOBJECT_UEVENT,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl is valid; the fields are set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = KERNEL_GROUP;
        // SAFETY: `addr` is a valid sockaddr_nl of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Uevents { fd })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads every uevent queued; true if one said the VM generation
    /// changed.
    pub(crate) fn drain_restored(&self) -> bool {
        let mut restored = false;
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Drained.
                    Some(libc::EAGAIN) => return restored,
                    // The kernel dropped uevents (the socket's buffer was
                    // full): one may have been a restore; count it rather
                    // than miss it.
                    Some(libc::ENOBUFS) => {
                        restored = true;
                        continue;
                    }
                    _ => return restored,
                }
            }
            restored |= says_new_generation(&buf[..n as usize]);
        }
    }
}

/// Whether a uevent (`ACTION@DEVPATH\0KEY=VALUE\0...`) carries
/// `NEW_VMGENID=1`.
pub(crate) fn says_new_generation(event: &[u8]) -> bool {
    event.split(|&b| b == 0).any(|f| f == b"NEW_VMGENID=1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmgenid_uevent_is_recognised() {
        let e = b"change@/devices/platform/QEMUVGID:00\0ACTION=change\0DEVPATH=/devices/platform/QEMUVGID:00\0SUBSYSTEM=platform\0NEW_VMGENID=1\0SEQNUM=1234\0";
        assert!(says_new_generation(e));
        let other = b"add@/devices/virtual/net/lo\0ACTION=add\0NEW_VMGENID=10\0XNEW_VMGENID=1\0";
        assert!(!says_new_generation(other));
        assert!(!says_new_generation(b""));
    }

    #[test]
    fn the_socket_opens_and_drains_empty() {
        // Unprivileged processes may bind to the kernel's uevent group.
        let u = Uevents::open().expect("a uevent socket");
        let _ = u.drain_restored();
    }
}
