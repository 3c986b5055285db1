//! `agentctl cp`: copies between the local machine and the guest, in
//! `docker cp`'s shape. A guest path is written `:PATH`; `-` is a tar
//! stream on stdin (to a guest directory) or stdout (of a guest path).
//! With stderr on a terminal a progress bar shows bytes, rate and ETA.

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;

use agentd::client::{local_size, Client, FsErrorKind, TarOptions};

use super::{fail, op_fail};

#[derive(Args, Debug)]
#[command(
    long_about = "Copy files and directories between this machine and the guest, docker cp style.\n\n\
        A guest path is written :PATH (relative: from the user's home). A directory \
        copied to a path that exists as a directory goes inside it; to a path that does \
        not exist, it becomes that path (SRC/. copies the contents). - as SRC reads a tar \
        stream from stdin and extracts it into the guest directory DST; - as DST writes \
        the guest SRC as a tar stream to stdout.\n\n\
        Modes, times, symlinks and empty directories are kept; with -a the owners too.\n\
        Exit status: 0, 1 when the copy failed (the message names the path), 125 when \
        agentctl itself failed.",
    after_help = "Examples:\n  agentctl cp ./src :/srv/app\n  agentctl cp :/srv/app/out ./out\n  \
        tar c dir | agentctl cp - :/srv\n  agentctl cp :/var/log - | tar t"
)]
pub(crate) struct CpArgs {
    /// Archive mode: keep uid and gid (the receiving side needs the rights).
    #[arg(short = 'a', long = "archive")]
    archive: bool,
    /// Do the guest side as USER (name, uid, name:group or uid:gid).
    #[arg(short, long, value_name = "USER")]
    user: Option<String>,
    /// Where from: a local path, :GUEST_PATH, or - for a tar stream on stdin.
    #[arg(value_name = "SRC")]
    src: String,
    /// Where to: a local path, :GUEST_PATH, or - for a tar stream on stdout.
    #[arg(value_name = "DST")]
    dst: String,
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    Local(PathBuf),
    Guest(String),
    Stream,
}

fn parse(s: &str) -> End {
    if s == "-" {
        End::Stream
    } else if let Some(g) = s.strip_prefix(':') {
        End::Guest(if g.is_empty() { ".".into() } else { g.into() })
    } else {
        End::Local(PathBuf::from(s))
    }
}

/// A progress bar on stderr, drawn at most every 100 ms.
pub(crate) struct Progress {
    on: bool,
    total: Option<u64>,
    done: u64,
    start: Instant,
    last: Option<Instant>,
}

fn human(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", units[u])
    } else {
        format!("{v:.1} {}", units[u])
    }
}

impl Progress {
    pub(crate) fn new(total: Option<u64>) -> Progress {
        Progress {
            on: io::stderr().is_terminal(),
            total: total.filter(|&t| t > 0),
            done: 0,
            start: Instant::now(),
            last: None,
        }
    }

    pub(crate) fn add(&mut self, n: u64) {
        self.done += n;
        if !self.on {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(now);
        self.draw(false);
    }

    fn draw(&self, end: bool) {
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        let rate = self.done as f64 / secs;
        let mut line = format!("\r{}", human(self.done as f64));
        if let Some(t) = self.total {
            let shown = self.done.min(t);
            let pct = shown as f64 * 100.0 / t as f64;
            let width = 30usize;
            let fill = (pct / 100.0 * width as f64) as usize;
            line = format!(
                "\r[{}{}] {pct:3.0}% {} / {}",
                "#".repeat(fill),
                " ".repeat(width - fill),
                human(shown as f64),
                human(t as f64)
            );
            if !end && rate > 0.0 {
                let eta = (t.saturating_sub(shown)) as f64 / rate;
                line.push_str(&format!("  ETA {}:{:02}", eta as u64 / 60, eta as u64 % 60));
            }
        }
        line.push_str(&format!("  {}/s\x1b[K", human(rate)));
        if end {
            line.push('\n');
        }
        let _ = io::stderr().write_all(line.as_bytes());
    }

    pub(crate) fn finish(&self) {
        if self.on {
            self.draw(true);
        }
    }
}

pub(crate) fn run(client: &Client, args: &CpArgs) -> i32 {
    let mut fs = client.fs();
    if let Some(u) = &args.user {
        fs = fs.as_user(u);
    }
    let opts = TarOptions {
        parents: false,
        owners: args.archive,
    };
    match (parse(&args.src), parse(&args.dst)) {
        (End::Local(src), End::Guest(dst)) => upload(&fs, &src, &dst, opts),
        (End::Guest(src), End::Local(dst)) => download(&fs, &src, &dst, opts),
        (End::Stream, End::Guest(dst)) => {
            let mut p = Progress::new(None);
            let stdin = io::stdin();
            let reader = CountingStdin {
                inner: stdin.lock(),
                progress: &mut p,
            };
            let r = fs.upload_tar(&dst, reader, opts);
            p.finish();
            r.map(|_| 0).unwrap_or_else(|e| op_fail(&e))
        }
        (End::Guest(src), End::Stream) => {
            let out = io::stdout();
            let r = fs.download_tar(&src, out.lock());
            r.map(|_| 0).unwrap_or_else(|e| op_fail(&e))
        }
        (End::Guest(_), End::Guest(_)) => fail(
            "both SRC and DST are guest paths; use `agentctl fs mv` or copy through this machine",
        ),
        (End::Stream, End::Stream) => fail("SRC and DST cannot both be -"),
        _ => fail(
            "one of SRC and DST must be a guest path, written :PATH (e.g. agentctl cp ./dir :/srv)",
        ),
    }
}

struct CountingStdin<'a, R> {
    inner: R,
    progress: &'a mut Progress,
}

impl<R: io::Read> io::Read for CountingStdin<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.add(n as u64);
        Ok(n)
    }
}

fn base_name(p: &Path) -> Option<&std::ffi::OsStr> {
    p.file_name()
}

/// `SRC/.`: the contents of SRC, not SRC itself.
fn contents_only(s: &str) -> bool {
    s.ends_with("/.") || s == "."
}

fn upload(fs: &agentd::client::Fs, src: &Path, dst: &str, opts: TarOptions) -> i32 {
    let meta = match std::fs::symlink_metadata(src) {
        Ok(m) => m,
        Err(e) => {
            super::complain(format!(
                "cannot read {}: {e}; check the local SRC path",
                src.display()
            ));
            return 1;
        }
    };
    let target = match fs.metadata(dst) {
        Ok(m) if m.is_dir() && !contents_only(&src.to_string_lossy()) => match base_name(src) {
            Some(name) => Path::new(dst).join(name),
            None => PathBuf::from(dst),
        },
        Ok(m) if m.is_dir() => PathBuf::from(dst),
        Ok(_) if meta.is_dir() => {
            super::complain(format!(
                "cannot copy a directory onto the file :{dst}; name a directory or a new path"
            ));
            return 1;
        }
        Ok(_) => PathBuf::from(dst),
        Err(e) if e.fs_error_kind() == Some(FsErrorKind::NotFound) => {
            if dst.ends_with('/') && !meta.is_dir() {
                super::complain(format!(
                    "the guest directory :{dst} does not exist; create it with agentctl fs mkdir -p"
                ));
                return 1;
            }
            PathBuf::from(dst)
        }
        Err(e) => op_fail(&e),
    };
    let mut p = Progress::new(Some(local_size(src)));
    let r = fs.upload_with_progress(src, &target, opts, &mut |n| p.add(n));
    p.finish();
    r.map(|_| 0).unwrap_or_else(|e| op_fail(&e))
}

fn download(fs: &agentd::client::Fs, src: &str, dst: &Path, opts: TarOptions) -> i32 {
    let meta = match fs.symlink_metadata(src) {
        Ok(m) => m,
        Err(e) => op_fail(&e),
    };
    let target = match std::fs::metadata(dst) {
        Ok(m) if m.is_dir() && !contents_only(src) => match base_name(Path::new(src)) {
            Some(name) => dst.join(name),
            None => dst.to_path_buf(),
        },
        Ok(m) if m.is_dir() => dst.to_path_buf(),
        Ok(_) if meta.is_dir() => {
            super::complain(format!(
                "cannot copy a directory onto the file {}; name a directory or a new path",
                dst.display()
            ));
            return 1;
        }
        Ok(_) => dst.to_path_buf(),
        Err(_) => {
            if dst.to_string_lossy().ends_with('/') && !meta.is_dir() {
                super::complain(format!(
                    "the directory {} does not exist; create it first",
                    dst.display()
                ));
                return 1;
            }
            dst.to_path_buf()
        }
    };
    let total = (!meta.is_dir()).then(|| meta.len());
    let mut p = Progress::new(total);
    let r = fs.download_with_progress(src, &target, opts, &mut |n| p.add(n));
    p.finish();
    r.map(|_| 0).unwrap_or_else(|e| op_fail(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends() {
        assert_eq!(parse("-"), End::Stream);
        assert_eq!(parse(":/srv"), End::Guest("/srv".into()));
        assert_eq!(parse(":"), End::Guest(".".into()));
        assert_eq!(parse("./x"), End::Local("./x".into()));
        assert!(contents_only("dir/."));
        assert!(!contents_only("dir"));
        assert_eq!(human(1536.0), "1.5 KiB");
    }
}
