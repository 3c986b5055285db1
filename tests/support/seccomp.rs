//! Seccomp filters for the agent, installed between fork and exec (see
//! `Opts::epoll_add_only` and `Opts::epoll_wait_fails` in [`super::host`]):
//! classic BPF on x86_64, where the system call numbers are known.

#[cfg(target_arch = "x86_64")]
/// The classic BPF program behind `Opts::epoll_add_only` and
/// `Opts::epoll_wait_fails`: on x86_64, `epoll_ctl(_, EPOLL_CTL_ADD, fd,
/// _)` for an fd not in `add_only` (when given) returns ENOSPC, and with
/// `wait_fails` every epoll_wait, epoll_pwait and epoll_pwait2 returns
/// EINVAL; every other system call is allowed.
pub fn epoll_filter(add_only: Option<&[u32]>, wait_fails: bool) -> Vec<libc::sock_filter> {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const LD_ABS_W: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    /// Where a jump goes: on to the next instruction, or to one of the
    /// three returns at the end.
    #[derive(Clone, Copy)]
    enum To {
        Next,
        Allow,
        NoSpace,
        Invalid,
    }
    // struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (the
    // low 32 bits first, little endian).
    let mut prog: Vec<(u16, To, To, u32)> = vec![
        (LD_ABS_W, To::Next, To::Next, 4),
        (JEQ, To::Next, To::Allow, AUDIT_ARCH_X86_64),
        (LD_ABS_W, To::Next, To::Next, 0),
    ];
    if wait_fails {
        for nr in [
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_pwait2,
        ] {
            prog.push((JEQ, To::Invalid, To::Next, nr as u32));
        }
    }
    if let Some(allowed) = add_only {
        prog.push((JEQ, To::Next, To::Allow, libc::SYS_epoll_ctl as u32));
        prog.push((LD_ABS_W, To::Next, To::Next, 24));
        prog.push((JEQ, To::Next, To::Allow, libc::EPOLL_CTL_ADD as u32));
        prog.push((LD_ABS_W, To::Next, To::Next, 32));
        for &fd in allowed {
            prog.push((JEQ, To::Allow, To::Next, fd));
        }
        prog.push((JEQ, To::NoSpace, To::NoSpace, 0));
    }
    let (allow, no_space, invalid) = (prog.len(), prog.len() + 1, prog.len() + 2);
    let offset = |i: usize, to: To| -> u8 {
        let target = match to {
            To::Next => return 0,
            To::Allow => allow,
            To::NoSpace => no_space,
            To::Invalid => invalid,
        };
        u8::try_from(target - i - 1).expect("a jump too far for classic BPF")
    };
    let mut out: Vec<libc::sock_filter> = prog
        .iter()
        .enumerate()
        .map(|(i, &(code, jt, jf, k))| libc::sock_filter {
            code,
            jt: offset(i, jt),
            jf: offset(i, jf),
            k,
        })
        .collect();
    for ret in [
        libc::SECCOMP_RET_ALLOW,
        libc::SECCOMP_RET_ERRNO | libc::ENOSPC as u32,
        libc::SECCOMP_RET_ERRNO | libc::EINVAL as u32,
    ] {
        out.push(libc::sock_filter {
            code: RET,
            jt: 0,
            jf: 0,
            k: ret,
        });
    }
    out
}

#[cfg(target_arch = "x86_64")]
/// Installs a seccomp filter on the calling process (between fork and
/// exec: two prctl calls, no allocation).
pub fn install_seccomp_filter(filter: &[libc::sock_filter]) -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with integer arguments, then with a pointer to a
    // program that outlives the call (the kernel copies it).
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
