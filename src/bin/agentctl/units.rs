//! What people type and read: durations (`30s`), sizes (`256M`), CPU
//! shares (`0.5`), signal names (`KILL`), times (RFC 3339 in UTC), and the
//! short forms `ps` prints. Parsers return a message clap shows as is.

use std::time::{Duration, SystemTime};

/// `500ms`, `30s`, `5m`, `2h`, `1d`, or a bare number of seconds (`1.5`).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 5m, 2h)"))?;
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h or d)")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| format!("{s:?} is out of range"))
}

/// Bytes, with an optional binary suffix as docker takes them: `512`,
/// `64k`, `256M`, `1G` (also `KiB`, `MB`, `b`: all powers of 1024).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512, 64k, 256M, 1G)"))?;
    let shift = match unit
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (k, M, G or T)")),
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A size that must fit in u32.
pub(crate) fn parse_size_u32(s: &str) -> Result<u32, String> {
    let v = parse_size(s)?;
    u32::try_from(v).map_err(|_| format!("{s:?} is too large (at most 4G - 1)"))
}

/// A positive number of CPUs (`0.5`, `2`).
pub(crate) fn parse_cpus(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.01 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of CPUs of at least 0.01 (e.g. 0.5)"
        )),
    }
}

/// `KILL`, `SIGKILL`, `kill`, `9`.
pub(crate) fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n)
            .map(|sig| sig as i32)
            .map_err(|_| format!("{n} is not a signal number"));
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| format!("{s:?} is not a signal (e.g. KILL, TERM, HUP, 9)"))
}

/// `SIGKILL` for 9, or the number.
pub(crate) fn signal_name(n: i32) -> String {
    nix::sys::signal::Signal::try_from(n).map_or_else(|_| n.to_string(), |s| s.as_str().to_owned())
}

/// `0B`, `512B`, `1.5kB`, `3.2MB` (powers of 1000, as docker prints sizes).
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < UNITS.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

/// `5 seconds ago`, `3 minutes ago`, `2 hours ago`, `4 days ago`.
pub(crate) fn ago(then: SystemTime, now: SystemTime) -> String {
    let Ok(d) = now.duration_since(then) else {
        return "just now".into();
    };
    let s = d.as_secs();
    let (n, unit) = match s {
        0 => return "just now".into(),
        1..=59 => (s, "second"),
        60..=3599 => (s / 60, "minute"),
        3600..=86399 => (s / 3600, "hour"),
        _ => (s / 86400, "day"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Nanoseconds since the epoch as RFC 3339 in UTC, to the millisecond:
/// `2026-12-02T15:04:05.123Z`.
pub(crate) fn rfc3339(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let ms = ns.rem_euclid(1_000_000_000) / 1_000_000;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86400));
    let rem = secs.rem_euclid(86400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A time to set a clock to: RFC 3339 in UTC (`2026-12-02T15:04:05Z`,
/// fraction optional, `Z` or `+00:00`; a space for the `T` too), or
/// `@SECONDS[.FRACTION]` since the epoch. Nanoseconds since the epoch.
pub(crate) fn parse_time(s: &str) -> Result<i64, String> {
    let bad = || {
        format!(
            "{s:?} is not a time: give RFC 3339 in UTC (2026-12-02T15:04:05Z) or @EPOCH_SECONDS"
        )
    };
    if let Some(epoch) = s.strip_prefix('@') {
        let v: f64 = epoch.parse().map_err(|_| bad())?;
        if !v.is_finite() || v.abs() > 9.0e9 {
            return Err(bad());
        }
        return Ok((v * 1e9).round() as i64);
    }
    let t = s
        .strip_suffix('Z')
        .or_else(|| s.strip_suffix('z'))
        .or_else(|| s.strip_suffix("+00:00"))
        .ok_or_else(bad)?;
    let (date, time) = t.split_once(['T', 't', ' ']).ok_or_else(bad)?;
    let num = |x: &str| x.parse::<i64>().map_err(|_| bad());
    let mut dp = date.splitn(3, '-');
    let (y, mo, d) = match (dp.next(), dp.next(), dp.next()) {
        (Some(y), Some(m), Some(d)) if y.len() == 4 => (num(y)?, num(m)?, num(d)?),
        _ => return Err(bad()),
    };
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut tp = hms.splitn(3, ':');
    let (h, mi, sec) = match (tp.next(), tp.next(), tp.next()) {
        (Some(h), Some(m), Some(s)) => (num(h)?, num(m)?, num(s)?),
        _ => return Err(bad()),
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return Err(bad());
    }
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let frac_ns = if frac.is_empty() {
        0
    } else {
        num(frac)? * 10i64.pow(9 - frac.len() as u32)
    };
    let secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec;
    Ok(secs * 1_000_000_000 + frac_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size_u32("8G").is_err());
        assert!(parse_cpus("0").is_err());
        assert_eq!(parse_cpus("0.5"), Ok(0.5));
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("KILL"), Ok(9));
        assert_eq!(parse_signal("sigterm"), Ok(15));
        assert_eq!(parse_signal("1"), Ok(1));
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("999").is_err());
        assert_eq!(signal_name(9), "SIGKILL");
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        let t = parse_time("2026-12-02T15:04:05.25Z").unwrap();
        assert_eq!(rfc3339(t), "2026-12-02T15:04:05.250Z");
        assert_eq!(parse_time("@1.5"), Ok(1_500_000_000));
        assert_eq!(
            parse_time("1970-01-02 00:00:00+00:00"),
            Ok(86400 * 1_000_000_000)
        );
        assert!(parse_time("2026-13-01T00:00:00Z").is_err());
        assert!(parse_time("2026-12-02T15:04:05").is_err());
        assert!(parse_time("yesterday").is_err());
        assert_eq!(human_bytes(999), "999B");
        assert_eq!(human_bytes(1500), "1.5kB");
        let now = SystemTime::now();
        assert_eq!(ago(now - Duration::from_secs(120), now), "2 minutes ago");
        assert_eq!(ago(now - Duration::from_secs(1), now), "1 second ago");
    }
}
