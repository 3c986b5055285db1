//! Logging: where the agent's log lines go, and the one parser of log
//! levels (`--log-level`, `AGENTD_LOG`, `agentd.log=`). The PID-1 path
//! logs to the kernel log instead (see `init::init_logging`); both read
//! levels here.

use std::io;

use tracing::level_filters::LevelFilter;

/// The level a `--log-level`, `AGENTD_LOG` or `agentd.log=` value names:
/// `off`, `error`, `warn` (or `warning`), `info`, `debug` or `trace`, in
/// any case, with surrounding blanks ignored. `None` for anything else.
pub fn parse_level(value: &str) -> Option<LevelFilter> {
    Some(match value.trim().to_ascii_lowercase().as_str() {
        "off" => LevelFilter::OFF,
        "error" => LevelFilter::ERROR,
        "warn" | "warning" => LevelFilter::WARN,
        "info" => LevelFilter::INFO,
        "debug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        _ => return None,
    })
}

/// The level for `value` (from `source`, for the message), or `default`
/// when it is absent; a value that is not a level gives `default` and a
/// warning for the caller to log once logging is set up.
pub(crate) fn level_or(
    source: &str,
    value: Option<&str>,
    default: LevelFilter,
) -> (LevelFilter, Option<String>) {
    match value.map(|v| (v, parse_level(v))) {
        None => (default, None),
        Some((_, Some(level))) => (level, None),
        Some((v, None)) => (
            default,
            Some(format!(
                "{source}={v:?} is not a log level (off, error, warn, info, debug, trace); logging at {}",
                default.to_string().to_lowercase()
            )),
        ),
    }
}

/// Logs to stderr (nonblocking: see [`LogSink`]), never to the transport.
///
/// The level is `level` (from `--log-level`), else `AGENTD_LOG`, else
/// warn; a value that is not a level is reported (at warn, which every
/// level but `error` and `off` shows) and warn is used.
pub(crate) fn init_stderr_logging(level: Option<&str>) {
    let env = std::env::var("AGENTD_LOG").ok();
    let (source, value) = match level {
        Some(l) => ("--log-level", Some(l)),
        None => ("AGENTD_LOG", env.as_deref()),
    };
    let (filter, complaint) = level_or(source, value, LevelFilter::WARN);
    let _ = tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_writer(LogSink::stderr())
        .with_ansi(false)
        .try_init();
    if let Some(c) = complaint {
        tracing::warn!("{c}");
    }
}

/// Where the agent's logs go: its stderr, through an open file of its own
/// that is nonblocking, so a reader that stops reading (or a slow serial
/// console) costs log lines, never the loop.
///
/// `/proc/self/fd/2` is opened anew (for a pipe, a terminal or a file that
/// gives a separate open file description, whose O_NONBLOCK does not touch
/// whoever shares fd 2); if that fails (a socket) fd 2 is duplicated and
/// written as it is.
#[derive(Debug)]
pub(crate) struct LogSink(Option<std::fs::File>);

impl LogSink {
    pub(crate) fn stderr() -> LogSink {
        use std::os::fd::FromRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let reopened = std::fs::OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open("/proc/self/fd/2");
        if let Ok(f) = reopened {
            return LogSink(Some(f));
        }
        // SAFETY: F_DUPFD_CLOEXEC returns a new fd we own, or -1.
        let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
        // SAFETY: a non-negative `fd` was just created and is ours alone.
        LogSink((fd >= 0).then(|| unsafe { std::fs::File::from_raw_fd(fd) }))
    }
}

/// One log line's writer; without a stderr, lines are dropped.
pub(crate) struct LogWriter<'a>(Option<&'a std::fs::File>);

impl io::Write for LogWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            Some(f) => f.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter(self.0.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse() {
        assert_eq!(parse_level("DEBUG"), Some(LevelFilter::DEBUG));
        assert_eq!(parse_level(" warning "), Some(LevelFilter::WARN));
        assert_eq!(parse_level("off"), Some(LevelFilter::OFF));
        assert_eq!(parse_level("bogus"), None);
        assert_eq!(
            level_or("x", None, LevelFilter::INFO),
            (LevelFilter::INFO, None)
        );
        let (level, complaint) = level_or("AGENTD_LOG", Some("loud"), LevelFilter::WARN);
        assert_eq!(level, LevelFilter::WARN);
        assert!(complaint
            .unwrap()
            .contains("AGENTD_LOG=\"loud\" is not a log level"));
    }
}
