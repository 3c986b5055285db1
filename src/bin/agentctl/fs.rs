//! `agentctl fs`: single file operations on guest paths (ls, stat, rm,
//! mkdir, mv, cat, put, watch), each optionally as `-u USER`.

use std::io::{self, Read, Write};
use std::time::UNIX_EPOCH;

use clap::{Args, Subcommand};

use agentd::client::{Client, FileType, Fs, FsErrorKind, Metadata, WatchKind};

use super::op_fail;

#[derive(Args, Debug)]
#[command(
    long_about = "File operations on guest paths (relative paths start at the user's home).\n\n\
        Exit status: 0, 1 when the operation failed in the guest (the message names the \
        path and the kind), 125 when agentctl itself failed."
)]
pub(crate) struct FsArgs {
    #[command(subcommand)]
    cmd: FsCmd,
}

#[derive(Args, Debug)]
struct UserArg {
    /// Do it as USER (name, uid, name:group or uid:gid).
    #[arg(short, long, value_name = "USER")]
    user: Option<String>,
}

#[derive(Subcommand, Debug)]
enum FsCmd {
    /// List a directory (or show a file).
    Ls {
        /// Long format: type and mode, links, owner, group, size, time, name.
        #[arg(short = 'l')]
        long: bool,
        #[command(flatten)]
        user: UserArg,
        #[arg(value_name = "PATH", default_value = ".")]
        path: String,
    },
    /// Show a path's metadata (symlinks not followed).
    Stat {
        #[command(flatten)]
        user: UserArg,
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<String>,
    },
    /// Remove files (and with -r, directories and their contents).
    Rm {
        /// Remove directories and everything in them.
        #[arg(short = 'r', short_alias = 'R', long = "recursive")]
        recursive: bool,
        /// No error when a path does not exist.
        #[arg(short = 'f', long = "force")]
        force: bool,
        #[command(flatten)]
        user: UserArg,
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<String>,
    },
    /// Create directories.
    Mkdir {
        /// Create missing parents; an existing directory is no error.
        #[arg(short = 'p', long = "parents")]
        parents: bool,
        /// Permission bits, in octal (default 755).
        #[arg(short = 'm', long = "mode", value_name = "MODE", value_parser = parse_mode)]
        mode: Option<u32>,
        #[command(flatten)]
        user: UserArg,
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<String>,
    },
    /// Rename (move) a path.
    Mv {
        /// Fail if DST exists instead of replacing it.
        #[arg(short = 'n', long = "no-clobber")]
        no_clobber: bool,
        #[command(flatten)]
        user: UserArg,
        #[arg(value_name = "SRC")]
        src: String,
        #[arg(value_name = "DST")]
        dst: String,
    },
    /// Write files' contents to stdout.
    Cat {
        #[command(flatten)]
        user: UserArg,
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<String>,
    },
    /// Write stdin to a file (created or truncated).
    Put {
        /// Append instead of truncating.
        #[arg(short = 'a', long = "append", conflicts_with = "atomic")]
        append: bool,
        /// Write a temporary file and rename it into place at the end: readers
        /// never see half a file, a failure leaves the old one.
        #[arg(long = "atomic")]
        atomic: bool,
        /// Permission bits of a new file, in octal (default 644).
        #[arg(short = 'm', long = "mode", value_name = "MODE", value_parser = parse_mode)]
        mode: Option<u32>,
        /// Create missing parent directories.
        #[arg(short = 'p', long = "parents")]
        parents: bool,
        #[command(flatten)]
        user: UserArg,
        #[arg(value_name = "PATH")]
        path: String,
    },
    /// Print changes under a path, one line each, until interrupted.
    Watch {
        /// Subdirectories too (including ones created later).
        #[arg(short = 'r', long = "recursive")]
        recursive: bool,
        #[command(flatten)]
        user: UserArg,
        #[arg(value_name = "PATH")]
        path: String,
    },
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal mode up to 7777")),
    }
}

fn fs_for(client: &Client, user: &UserArg) -> Fs {
    match &user.user {
        Some(u) => client.fs().as_user(u),
        None => client.fs(),
    }
}

pub(crate) fn run(client: &Client, args: &FsArgs) -> i32 {
    match &args.cmd {
        FsCmd::Ls { long, user, path } => ls(&fs_for(client, user), path, *long),
        FsCmd::Stat { user, paths } => {
            let fs = fs_for(client, user);
            for p in paths {
                match fs.symlink_metadata(p) {
                    Ok(m) => print_stat(p, &m),
                    Err(e) => op_fail(&e),
                }
            }
            0
        }
        FsCmd::Rm {
            recursive,
            force,
            user,
            paths,
        } => {
            let fs = fs_for(client, user);
            for p in paths {
                let r = if *recursive {
                    fs.remove_dir_all(p)
                } else {
                    fs.remove_file(p)
                };
                match r {
                    Ok(()) => {}
                    Err(e) if *force && e.fs_error_kind() == Some(FsErrorKind::NotFound) => {}
                    Err(e) if e.fs_error_kind() == Some(FsErrorKind::IsADirectory) => {
                        super::complain(format!(
                            "{p}: is a directory; use fs rm -r to remove it and its contents"
                        ));
                        return 1;
                    }
                    Err(e) => op_fail(&e),
                }
            }
            0
        }
        FsCmd::Mkdir {
            parents,
            mode,
            user,
            paths,
        } => {
            let fs = fs_for(client, user);
            for p in paths {
                let r = fs.create_dir_mode(p, mode.unwrap_or(0o755), *parents);
                if let Err(e) = r {
                    op_fail(&e)
                }
            }
            0
        }
        FsCmd::Mv {
            no_clobber,
            user,
            src,
            dst,
        } => match fs_for(client, user).rename_with(src, dst, !no_clobber) {
            Ok(()) => 0,
            Err(e) => op_fail(&e),
        },
        FsCmd::Cat { user, paths } => {
            let fs = fs_for(client, user);
            let out = io::stdout();
            let mut out = out.lock();
            for p in paths {
                let mut r = match fs.open(p) {
                    Ok(r) => r,
                    Err(e) => op_fail(&e),
                };
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                                return 0; // stdout closed (| head): done
                            }
                        }
                        Err(e) => op_fail(&agentd_error(e)),
                    }
                }
            }
            0
        }
        FsCmd::Put {
            append,
            atomic,
            mode,
            parents,
            user,
            path,
        } => put(
            &fs_for(client, user),
            path,
            *append,
            *atomic,
            *mode,
            *parents,
        ),
        FsCmd::Watch {
            recursive,
            user,
            path,
        } => watch(&fs_for(client, user), path, *recursive),
    }
}

/// The client's error inside an io::Error from a client stream.
fn agentd_error(e: io::Error) -> agentd::client::Error {
    let kind = e.kind();
    match e
        .into_inner()
        .map(|i| i.downcast::<agentd::client::Error>())
    {
        Some(Ok(inner)) => *inner,
        Some(Err(other)) => agentd::client::Error::Io {
            context: "local I/O".into(),
            source: io::Error::new(kind, other),
        },
        None => agentd::client::Error::Io {
            context: "local I/O".into(),
            source: io::Error::from(kind),
        },
    }
}

fn put(fs: &Fs, path: &str, append: bool, atomic: bool, mode: Option<u32>, parents: bool) -> i32 {
    let mut opts = fs.options();
    opts.append(append).atomic(atomic).parents(parents);
    if let Some(m) = mode {
        opts.mode(m);
    }
    let mut w = match opts.open(path) {
        Ok(w) => w,
        Err(e) => op_fail(&e),
    };
    let stdin = io::stdin();
    let mut input = stdin.lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                w.cancel();
                super::fail(format!("reading stdin: {e}"))
            }
        };
        if let Err(e) = w.write_all_checked(&buf[..n]) {
            op_fail(&e)
        }
    }
    match w.finish() {
        Ok(_) => 0,
        Err(e) => op_fail(&e),
    }
}

fn watch(fs: &Fs, path: &str, recursive: bool) -> i32 {
    let w = match fs.watch(path, recursive) {
        Ok(w) => w,
        Err(e) => op_fail(&e),
    };
    let out = io::stdout();
    for ev in w {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => op_fail(&e),
        };
        let kind = match &ev.kind {
            WatchKind::Created => "created",
            WatchKind::Modified => "modified",
            WatchKind::Removed => "removed",
            WatchKind::MovedFrom => "moved_from",
            WatchKind::MovedTo => "moved_to",
            WatchKind::Attrib => "attrib",
            WatchKind::Overflow => "overflow",
            WatchKind::Other(s) => s.as_str(),
        };
        let mut line = format!("{kind} {}", ev.path.display());
        if ev.dir {
            line.push('/');
        }
        let mut out = out.lock();
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            return 0;
        }
    }
    0
}

fn type_char(t: FileType) -> char {
    match t {
        FileType::Dir => 'd',
        FileType::Symlink => 'l',
        FileType::Fifo => 'p',
        FileType::Socket => 's',
        FileType::Char => 'c',
        FileType::Block => 'b',
        _ => '-',
    }
}

fn mode_string(t: FileType, mode: u32) -> String {
    let mut s = String::new();
    s.push(type_char(t));
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ];
    for (i, (bit, c)) in bits.iter().enumerate() {
        let mut ch = if mode & bit != 0 { *c } else { '-' };
        let special = match i {
            2 => Some((0o4000, 's', 'S')),
            5 => Some((0o2000, 's', 'S')),
            8 => Some((0o1000, 't', 'T')),
            _ => None,
        };
        if let Some((sb, on, off)) = special {
            if mode & sb != 0 {
                ch = if ch == 'x' { on } else { off };
            }
        }
        s.push(ch);
    }
    s
}

fn time_string(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    // Civil date from days since the epoch (UTC).
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil.
fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn long_line(name: &str, m: &Metadata) -> String {
    let mut line = format!(
        "{} {:>3} {:>5} {:>5} {:>10} {} {name}",
        mode_string(m.file_type(), m.mode()),
        m.nlink(),
        m.uid(),
        m.gid(),
        m.len(),
        time_string(m.stat().mtime_ns)
    );
    if let Some(t) = m.symlink_target() {
        line.push_str(" -> ");
        line.push_str(t);
    }
    line
}

fn ls(fs: &Fs, path: &str, long: bool) -> i32 {
    let meta = match fs.symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => op_fail(&e),
    };
    let out = io::stdout();
    let mut out = out.lock();
    if !meta.is_dir() {
        let line = if long {
            long_line(path, &meta)
        } else {
            path.to_owned()
        };
        let _ = writeln!(out, "{line}");
        return 0;
    }
    let it = if long {
        fs.read_dir_with_metadata(path)
    } else {
        fs.read_dir(path)
    };
    let it = match it {
        Ok(it) => it,
        Err(e) => op_fail(&e),
    };
    let mut entries = Vec::new();
    for e in it {
        match e {
            Ok(e) => entries.push(e),
            Err(e) => op_fail(&e),
        }
    }
    entries.sort_by(|a, b| a.file_name().cmp(b.file_name()));
    for e in entries {
        let name = e.file_name().to_string_lossy();
        let line = match (long, e.metadata()) {
            (true, Some(m)) => long_line(&name, m),
            _ => name.into_owned(),
        };
        if writeln!(out, "{line}").is_err() {
            return 0;
        }
    }
    let _ = out.flush();
    0
}

fn print_stat(path: &str, m: &Metadata) {
    let st = m.stat();
    let mut s = format!("  File: {path}");
    if let Some(t) = m.symlink_target() {
        s.push_str(&format!(" -> {t}"));
    }
    let ts = |ns: i64| {
        format!(
            "{}.{:09} UTC",
            time_string(ns),
            ns.rem_euclid(1_000_000_000)
        )
    };
    println!(
        "{s}\n  Size: {}\tType: {}\n  Mode: ({:04o}/{})\tUid: {}\tGid: {}\n Inode: {}\tLinks: {}\nAccess: {}\nModify: {}\nChange: {}",
        st.size,
        m.file_type().as_str(),
        st.mode,
        mode_string(m.file_type(), st.mode),
        st.uid,
        st.gid,
        st.ino,
        st.nlink,
        ts(st.atime_ns),
        ts(st.mtime_ns),
        ts(st.ctime_ns),
    );
    let _ = UNIX_EPOCH;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_times() {
        assert_eq!(mode_string(FileType::File, 0o644), "-rw-r--r--");
        assert_eq!(mode_string(FileType::Dir, 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string(FileType::File, 0o4644), "-rwSr--r--");
        assert_eq!(time_string(0), "1970-01-01 00:00:00");
        assert_eq!(
            time_string(1_234_567_890_000_000_000),
            "2009-02-13 23:31:30"
        );
        assert_eq!(parse_mode("755"), Ok(0o755));
        assert!(parse_mode("9").is_err());
        assert!(parse_mode("17777").is_err());
    }
}
