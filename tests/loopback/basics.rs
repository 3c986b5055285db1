//! READY, PING/PONG, the EXEC keys, exit codes and signals.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use agentd::messages::{Message, Rlimit};

use crate::support::agent::*;
use crate::support::checker::*;
use crate::support::host::*;
use crate::support::msgpack::*;
use crate::support::proc::*;
use crate::support::util::*;
use crate::support::*;

both! {
    /// READY comes first with every key of the contract (the checker
    /// validates names and types); `pid` is the agent's own pid: its pid
    /// here, or 1 as PID 1 of a namespace.
    fn ready_describes_the_agent(opts: Opts) {
        let pidns = opts.pidns;
        let agent = Agent::start_with(opts);
        let pid = agent.ready_int("pid");
        if pidns {
            assert_eq!(pid, 1, "READY pid inside the namespace: {:?}", agent.ready);
        } else {
            assert_eq!(pid, i128::from(agent.host_pid), "READY pid: {:?}", agent.ready);
        }
        // `pid1` (an extension key): whether the agent is PID 1.
        let pid1 = agent.ready.get("pid1").and_then(Value::as_bool);
        assert_eq!(pid1, Some(pidns), "READY pid1: {:?}", agent.ready);
        assert!(agent.ready.get("agent").and_then(Value::as_str).is_some_and(|s| !s.is_empty()));
        // The defaults (issue and docs/PROTOCOL.md): a 256 KiB stdin
        // window, 1024 sessions.
        assert_eq!(agent.stdin_window(), 256 * 1024, "READY: {:?}", agent.ready);
        assert_eq!(agent.ready_int("max_sessions"), 1024, "READY: {:?}", agent.ready);
    }

    /// Exit codes come back as `code` with `status` = code and no `signal`.
    fn exit_codes(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        for code in [0, 1, 3, 42, 255] {
            let out = agent.sh(&format!("exit {code}"));
            assert_eq!(out.exit, ExitInfo::code(code), "{:?}", out.exited_map);
            assert!(out.exited_map.get("signal").is_none(), "{:?}", out.exited_map);
            assert_eq!(out.exited_map.get("core_dumped"), Some(&Value::Bool(false)));
        }
        let out = agent.run(cmd("false", &[]));
        assert_eq!(out.exit, ExitInfo::code(1));
    }

    /// A process killed by a signal is reported as `signal` (no `code`),
    /// `status` = 128 + signal, `core_dumped` present as a bool.
    fn signal_death_is_reported_as_signal(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let out = agent.sh("kill -9 $$");
        assert_eq!(out.exit, ExitInfo::signal(9), "{:?}", out.exited_map);
        assert!(out.exited_map.get("code").is_none(), "{:?}", out.exited_map);
        assert_eq!(out.exited_map.get("core_dumped"), Some(&Value::Bool(false)));
        assert_eq!(out.exit.status, 137);

        // SIGNAL frame delivering SIGTERM.
        let id = agent.new_id();
        agent.exec(id, &cmd("sleep", &["100"]));
        agent.send_signal(id, 15, true);
        let out = agent.collect(id);
        assert_eq!(out.exit, ExitInfo::signal(15), "{:?}", out.exited_map);
        assert_eq!(out.exit.status, 143);
        assert!(out.exited_map.get("code").is_none());
        assert!(out.exited_map.get("core_dumped").and_then(Value::as_bool).is_some());
    }
}

#[test]
fn ping_pong_echoes_id_and_payload() {
    let mut agent = Agent::start();
    let big: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let cases: Vec<(u32, Vec<u8>)> = vec![
        (0, Vec::new()),
        (77, b"hello".to_vec()),
        (u32::MAX, vec![0, 1, 2, 0, 255]),
        (5, big),
    ];
    for (id, payload) in &cases {
        agent.send(&Message::Ping(payload), *id);
    }
    // PONGs come back in order, each with its PING's id and payload.
    for (id, payload) in &cases {
        let f = agent.recv_where(|f| f.kind == PONG, "PONG");
        assert_eq!(f.id, *id);
        assert_eq!(&f.payload, payload);
    }
    agent.assert_no_errors();
}

#[test]
fn stdout_and_stderr_are_separate_streams() {
    let mut agent = Agent::start();
    let out = agent.sh("echo out1; echo err1 >&2; echo out2; echo err2 >&2");
    out.assert_success();
    assert_eq!(out.stdout_str(), "out1\nout2\n");
    assert_eq!(out.stderr_str(), "err1\nerr2\n");
}

#[test]
fn args_are_passed_verbatim() {
    let mut agent = Agent::start();
    let args = ["", "two words", "quote'\"", "ünïcödé", "$HOME", "*", "-n"];
    let mut all = vec!["%s|\\n"];
    all.extend(args);
    let out = agent.run(cmd("printf", &all));
    out.assert_success();
    let expect: String = args.iter().map(|a| format!("{a}|\n")).collect();
    assert_eq!(out.stdout_str(), expect);
    // argv[0] is cmd.
    let out = agent.run(cmd("sh", &["-c", "echo $0"]));
    assert_eq!(out.stdout_str(), "sh\n");
}

#[test]
fn env_and_clear_env() {
    let mut agent = Agent::start();
    // The base environment is the agent's.
    let out = agent.sh(&format!("echo ${BASE_ENV_KEY}"));
    assert_eq!(out.stdout_str(), format!("{BASE_ENV_VALUE}\n"));

    // env entries are added, and replace same-named ones.
    let mut e = sh(&format!("echo ${BASE_ENV_KEY} $NEW_ONE \"$WITH_EQ\""));
    e.env = vec![
        format!("{BASE_ENV_KEY}=replaced"),
        "NEW_ONE=added".into(),
        "WITH_EQ=a=b".into(),
    ];
    let out = agent.run(e);
    assert_eq!(out.stdout_str(), "replaced added a=b\n");

    // clear_env: the base is empty, only the request's entries remain.
    let mut e = cmd("/usr/bin/env", &[]);
    e.clear_env = true;
    e.env = vec!["ONLY=this".into(), "AND=that".into()];
    let out = agent.run(e);
    out.assert_success();
    let lines: BTreeSet<String> = out.stdout_str().lines().map(str::to_owned).collect();
    assert_eq!(
        lines,
        BTreeSet::from(["ONLY=this".to_owned(), "AND=that".to_owned()])
    );

    let mut e = cmd("/usr/bin/env", &[]);
    e.clear_env = true;
    let out = agent.run(e);
    assert_eq!(out.stdout_str(), "");
}

#[test]
fn cmd_without_slash_is_looked_up_in_the_childs_path() {
    let dir = TempDir::new("path");
    let prog = dir.join("agentd-test-prog");
    std::fs::write(&prog, "#!/bin/sh\necho found me \"$@\"\n").unwrap();
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut agent = Agent::start();
    let mut e = cmd("agentd-test-prog", &["x"]);
    e.env = vec![format!("PATH={}:/usr/bin:/bin", dir.path().display())];
    let out = agent.run(e);
    out.assert_success();
    assert_eq!(out.stdout_str(), "found me x\n");
    // An absolute cmd is used as it is.
    let out = agent.run(cmd(prog.to_str().unwrap(), &["y"]));
    assert_eq!(out.stdout_str(), "found me y\n");
    // A relative one with a `/` is relative to the child's cwd.
    let mut e = cmd("./agentd-test-prog", &["z"]);
    e.cwd = Some(dir.path().to_str().unwrap().to_owned());
    let out = agent.run(e);
    assert_eq!(out.stdout_str(), "found me z\n");
}

#[test]
fn cwd_sets_the_working_directory() {
    let dir = TempDir::new("cwd");
    let mut agent = Agent::start();
    let mut e = cmd("pwd", &[]);
    e.cwd = Some(dir.path().to_str().unwrap().to_owned());
    let out = agent.run(e);
    out.assert_success();
    assert_eq!(out.stdout_str().trim_end(), dir.path().to_str().unwrap());
    let mut e = cmd("pwd", &[]);
    e.cwd = Some("/".into());
    assert_eq!(agent.run(e).stdout_str(), "/\n");
}

fn ids_of(agent: &mut Agent, user: &str) -> (u32, u32, BTreeSet<u32>) {
    let mut e = sh("id -u; id -g; id -G");
    e.user = Some(user.to_owned());
    let out = agent.run(e);
    out.assert_success();
    let text = out.stdout_str();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text:?}");
    (
        lines[0].parse().unwrap(),
        lines[1].parse().unwrap(),
        lines[2]
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect(),
    )
}

#[test]
fn user_sets_uid_gid_and_exactly_the_users_groups() {
    let mut agent = Agent::start();
    let (uid, gid) = passwd_entry("nobody").expect("no user nobody in /etc/passwd");
    let (u, g, groups) = ids_of(&mut agent, "nobody");
    assert_eq!((u, g), (uid, gid));
    assert_eq!(u, 65534);
    // Exactly the user's groups: nothing inherited from the agent (root's
    // groups).
    assert_eq!(groups, db_groups("nobody", gid));

    // uid:gid, numbers without passwd entries: no supplementary groups.
    let (u, g, groups) = ids_of(&mut agent, "4321:1234");
    assert_eq!((u, g, groups), (4321, 1234, BTreeSet::from([1234])));

    // A bare uid.
    let (u, _, _) = ids_of(&mut agent, "65534");
    assert_eq!(u, 65534);

    // name:group.
    let group_name = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find(|l| l.split(':').nth(2) == Some("100"))
        .map(|l| l.split(':').next().unwrap().to_owned());
    if let Some(group_name) = group_name {
        let (u, g, groups) = ids_of(&mut agent, &format!("nobody:{group_name}"));
        assert_eq!((u, g), (65534, 100));
        assert!(groups.contains(&100), "{groups:?}");
    }

    // A user the group database lists as a member somewhere: supplementary
    // groups come from the database.
    let member = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4).then(|| f[3].split(',').map(str::to_owned).collect::<Vec<_>>())
        })
        .flatten()
        .find(|m| !m.is_empty() && m != "root" && passwd_entry(m).is_some());
    if let Some(name) = member {
        let (uid, gid) = passwd_entry(&name).unwrap();
        let (u, g, groups) = ids_of(&mut agent, &name);
        assert_eq!((u, g), (uid, gid));
        assert_eq!(groups, db_groups(&name, gid), "groups of {name}");
        assert!(groups.len() > 1);
    } else {
        eprintln!("no user with supplementary groups in /etc/group; that part skipped");
    }
}

#[test]
fn rlimits_apply_to_the_child() {
    let mut agent = Agent::start();
    let mut e = sh("ulimit -n; ulimit -Hn; ulimit -c; ulimit -Hc");
    e.rlimits = vec![
        Rlimit {
            resource: "nofile".into(),
            soft: 64,
            hard: 128,
        },
        Rlimit {
            resource: "core".into(),
            soft: 0,
            hard: u64::MAX,
        },
    ];
    let out = agent.run(e);
    out.assert_success();
    assert_eq!(out.stdout_str(), "64\n128\n0\nunlimited\n");
}

#[test]
fn stdin_false_gives_dev_null() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    let mut e = sh("readlink /proc/self/fd/0; cat; echo done");
    e.stdin = false;
    agent.exec(id, &e);
    // cat reads end of file at once: no STDIN_CLOSE needed.
    let out = agent.collect(id);
    out.assert_success();
    assert_eq!(out.stdout_str(), "/dev/null\ndone\n");
}

#[test]
fn stdin_is_delivered_and_fully_acknowledged() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    agent.exec(id, &cmd("cat", &[]));
    let mut expect = Vec::new();
    let mut sent = 0u64;
    for i in 0..200usize {
        let chunk = pseudo_random(1 + (i * 37) % 3000, i as u64);
        agent.send_stdin(id, &chunk);
        sent += chunk.len() as u64;
        expect.extend_from_slice(&chunk);
    }
    // An empty STDIN is no data.
    agent.send_stdin(id, b"");
    agent.send_stdin_close(id);
    let out = agent.collect(id);
    out.assert_success();
    assert_eq!(out.stdout.len(), expect.len());
    assert!(out.stdout == expect, "cat returned different bytes");
    // Every byte cat read was written and acknowledged: the totals match.
    assert_eq!(out.acked, sent, "STDIN_ACK total");
    agent.assert_no_errors();
}

#[test]
fn signal_group_false_signals_the_process_alone() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    let mut e = sh("sleep 100 & echo $!; wait");
    e.linger_ms = 50;
    agent.exec(id, &e);
    let f = agent.recv_where(|f| f.id == id && f.kind == STDOUT, "STDOUT");
    let bg: i32 = String::from_utf8_lossy(&f.payload).trim().parse().unwrap();
    agent.send_signal(id, 15, false);
    let out = agent.collect(id);
    assert_eq!(out.exit, ExitInfo::signal(15), "{:?}", out.exited_map);
    // The background sleep, in the same process group, did not get it.
    assert!(
        alive(bg),
        "group: false also killed the group's other process"
    );
    // SAFETY: kill with a pid and a signal number.
    unsafe { libc::kill(bg, libc::SIGKILL) };
}

#[test]
fn signal_defaults_to_the_process_group() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    agent.exec(id, &sh("sleep 100 & echo $!; wait"));
    let f = agent.recv_where(|f| f.id == id && f.kind == STDOUT, "STDOUT");
    let bg: u32 = String::from_utf8_lossy(&f.payload).trim().parse().unwrap();
    let bg = agent.host_pid_of(bg).expect("the background sleep");
    // `group` absent from the map: it defaults to true.
    let payload = Value::map([("signal", Value::int(15))]).encode();
    agent.send_frame(SIGNAL, id, &payload);
    let out = agent.collect(id);
    assert_eq!(out.exit, ExitInfo::signal(15), "{:?}", out.exited_map);
    assert!(
        wait_until(Duration::from_secs(5), || !alive(bg)),
        "the group's other process survived a group signal"
    );
}

#[test]
fn signal_64_is_a_linux_signal() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    agent.exec(id, &cmd("sleep", &["100"]));
    agent.send_signal(id, 64, true);
    let out = agent.collect(id);
    assert_eq!(out.exit, ExitInfo::signal(64));
    assert_eq!(out.exit.status, 192);
    agent.assert_no_errors();
}

#[test]
fn exited_frees_the_id() {
    let mut agent = Agent::start();
    let id = 7;
    for round in 0..5 {
        agent.exec(id, &sh(&format!("echo round {round}")));
        let out = agent.collect(id);
        assert_eq!(out.stdout_str(), format!("round {round}\n"));
    }
    // A live session with the same id as a finished one behaves normally.
    agent.exec(id, &cmd("cat", &[]));
    agent.send_stdin(id, b"again\n");
    agent.send_stdin_close(id);
    assert_eq!(agent.collect(id).stdout_str(), "again\n");
}

#[test]
fn exec_map_with_any_integer_width_and_unknown_keys() {
    // A host in another language may encode small numbers in wide
    // integers and add keys this version does not know.
    let mut agent = Agent::start();
    let id = 4242;
    let mut p = vec![0x86];
    p.extend(mp::str("cmd"));
    p.extend(mp::str("sh"));
    p.extend(mp::str("args"));
    Value::Array(vec![
        Value::str("-c"),
        Value::str("stty size 2>&1; echo ok"),
    ])
    .encode_into(&mut p);
    p.extend(mp::str("linger_ms"));
    p.extend(mp::u64(100));
    p.extend(mp::str("output_window"));
    p.extend(mp::u32(0));
    p.extend(mp::str("stdin"));
    p.push(0xc2);
    p.extend(mp::str("x-future-key"));
    Value::map([("nested", Value::Array(vec![Value::Nil, Value::Float(1.5)]))]).encode_into(&mut p);
    agent.send_exec_payload(id, &p);
    agent
        .exec_reply(id)
        .expect("EXEC with wide integers failed");
    let out = agent.collect(id);
    out.assert_success();
    assert!(out.stdout_str().ends_with("ok\n"));

    // SIGNAL with an int64 signal number and OUTPUT_ACK with a uint64.
    agent.exec(id, &cmd("sleep", &["100"]));
    let mut p = vec![0x82];
    p.extend(mp::str("signal"));
    p.extend(mp::i64(9));
    p.extend(mp::str("group"));
    p.push(0xc3);
    let mut ack = vec![0x81];
    ack.extend(mp::str("bytes"));
    ack.extend(mp::u64(10));
    agent.send_frame(OUTPUT_ACK, id, &ack);
    agent.send_frame(SIGNAL, id, &p);
    let out = agent.collect(id);
    assert_eq!(out.exit, ExitInfo::signal(9));
    agent.assert_no_errors();
}

#[test]
fn exec_minimal_map_takes_defaults() {
    // {"cmd": "cat"}: stdin defaults to true (a pipe), linger 100 ms...
    let mut agent = Agent::start();
    let id = 9;
    let p = Value::map([("cmd", Value::str("cat"))]).encode();
    agent.send_exec_payload(id, &p);
    agent.exec_reply(id).expect("minimal EXEC failed");
    agent.send_stdin(id, b"defaults\n");
    agent.send_stdin_close(id);
    let out = agent.collect(id);
    out.assert_success();
    assert_eq!(out.stdout_str(), "defaults\n");
    // tty defaults to false: RESIZE is refused.
    let p = Value::map([
        ("cmd", Value::str("sleep")),
        ("args", Value::Array(vec![Value::str("100")])),
    ])
    .encode();
    agent.send_exec_payload(id, &p);
    agent.exec_reply(id).unwrap();
    agent.send_resize(id, 10, 10);
    agent.expect_error_kind(id, "not_a_tty", Some(RESIZE));
    agent.send_signal(id, 9, true);
    agent.collect(id);
}

/// `core_dumped` is true when the kernel wrote a core (here into the
/// session's cwd, with `core` unlimited), with `signal` and status 128 + n.
#[test]
fn core_dumped_is_reported() {
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
    let dir = TempDir::new("core");
    let mut agent = Agent::start();
    let mut e = sh("kill -SEGV $$");
    e.stdin = false;
    e.cwd = Some(dir.path().to_str().unwrap().into());
    e.rlimits = vec![Rlimit {
        resource: "core".into(),
        soft: u64::MAX,
        hard: u64::MAX,
    }];
    let id = agent.new_id();
    agent.exec(id, &e);
    let out = agent.collect(id);
    assert_eq!(out.exit.signal, Some(11), "{:?}", out.exited_map);
    assert_eq!(out.exit.status, 139);
    let pattern = pattern.trim();
    if !pattern.starts_with('|') && !pattern.contains('/') && !pattern.is_empty() {
        assert!(
            out.exit.core_dumped,
            "a core was written but core_dumped is false: {:?}",
            out.exited_map
        );
    } else {
        eprintln!("core_pattern {pattern:?}: core_dumped value not checked");
    }
    // Without a core: false.
    let mut e = sh("kill -SEGV $$");
    e.stdin = false;
    e.rlimits = vec![Rlimit {
        resource: "core".into(),
        soft: 0,
        hard: 0,
    }];
    let id = agent.new_id();
    agent.exec(id, &e);
    let out = agent.collect(id);
    assert_eq!(out.exit, ExitInfo::signal(11), "{:?}", out.exited_map);
}

/// Frames cut at every byte, and many frames in one write, are all
/// handled: the agent's decoder is incremental.
#[test]
fn frames_split_at_every_byte_and_coalesced() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    let mut e = cmd("cat", &[]);
    e.linger_ms = 100;
    let exec = Message::Exec(Box::new(e)).to_bytes(id);
    // EXEC one byte per write.
    for b in &exec {
        agent.send_raw(std::slice::from_ref(b));
        std::thread::sleep(Duration::from_micros(200));
    }
    agent.exec_reply(id).expect("EXEC sent byte by byte failed");
    let mut stdin = Vec::new();
    Message::Stdin(b"split\n")
        .encode(id, &mut stdin)
        .expect("the test's frames fit");
    for b in &stdin {
        agent.send_raw(std::slice::from_ref(b));
    }
    // 1000 PINGs and the STDIN_CLOSE in one write.
    let mut many = Vec::new();
    for i in 0..1000u32 {
        Message::Ping(&i.to_be_bytes())
            .encode(i, &mut many)
            .expect("the test's frames fit");
    }
    Message::StdinClose
        .encode(id, &mut many)
        .expect("the test's frames fit");
    agent.send_raw(&many);
    for i in 0..1000u32 {
        let f = agent.recv_where(|f| f.kind == PONG, "PONG");
        assert_eq!((f.id, f.payload.clone()), (i, i.to_be_bytes().to_vec()));
    }
    let out = agent.collect(id);
    out.assert_success();
    assert_eq!(out.stdout_str(), "split\n");
    agent.assert_no_errors();
}

/// A stopped process is not an exited one: SIGSTOP via SIGNAL stops the
/// session without EXITED; SIGCONT lets it finish normally.
#[test]
fn stopped_is_not_exited() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    let mut e = sh("sleep 0.3; echo done");
    e.stdin = false;
    agent.exec(id, &e);
    agent.send_signal(id, libc::SIGSTOP, true);
    // The shell may be waiting in vfork for a child that is stopped too
    // (state D); some process of the group is stopped (T).
    assert!(
        wait_until(Duration::from_secs(5), || agent.descendants().iter().any(
            |&p| status_field(p, "State").is_some_and(|s| s.starts_with('T'))
        )),
        "nothing of the session stopped"
    );
    let early = agent.recv_where_within(&|f| f.id == id, Duration::from_millis(700));
    assert!(
        early.is_none(),
        "a frame while stopped: {:?}",
        early.map(|f| f.kind)
    );
    agent.send_signal(id, libc::SIGCONT, true);
    let out = agent.collect(id);
    out.assert_success();
    assert_eq!(out.stdout_str(), "done\n");
}

/// Logging goes to stderr at the level `--log-level` gives, else
/// `AGENTD_LOG`, else warn; a value that is not a level is reported, not
/// silently dropped. (An agent whose transport is at end of file at once
/// logs its exit at info.)
#[test]
fn the_log_level_comes_from_the_flag_or_agentd_log() {
    let stderr_of = |env: Option<&str>, args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"));
        cmd.arg("--stdio")
            .args(args)
            .env_remove("AGENTD_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        if let Some(v) = env {
            cmd.env("AGENTD_LOG", v);
        }
        let out = cmd.output().expect("run agentd");
        assert!(out.status.success(), "agentd exited with {}", out.status);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let quiet = stderr_of(None, &[]);
    assert!(quiet.is_empty(), "at the default (warn): {quiet}");
    let info = stderr_of(Some("info"), &[]);
    assert!(
        info.contains("INFO") && info.contains("exiting"),
        "AGENTD_LOG=info: {info}"
    );
    let flag_wins = stderr_of(Some("info"), &["--log-level", "error"]);
    assert!(
        flag_wins.is_empty(),
        "--log-level error over AGENTD_LOG=info: {flag_wins}"
    );
    let flag = stderr_of(None, &["--log-level", "debug"]);
    assert!(flag.contains("INFO"), "--log-level debug: {flag}");
    for (env, args) in [
        (Some("loud"), &[][..]),
        (None, &["--log-level", "loud"][..]),
    ] {
        let bad = stderr_of(env, args);
        assert!(
            bad.contains("\"loud\" is not a log level") && !bad.contains("INFO"),
            "a bad level is reported and warn used: {bad}"
        );
    }
}
