//! Every EXEC_FAILED kind. After each, the id is free again and the
//! program never ran. (`other`, which the agent uses for an EXEC during a
//! shutdown's grace, is checked in `guarantees::during_shutdown`.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use agentd::messages::{Exec, Rlimit};

use crate::support::agent::*;
use crate::support::host::*;
use crate::support::util::*;

/// A script at `path` that creates `marker` if it ever runs.
fn marker_script(path: &Path, marker: &Path, mode: u32) {
    std::fs::write(path, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `errno` is optional; when present it must be the one that failed.
#[track_caller]
fn assert_errno(f: &FailInfo, allowed: &[i32]) {
    if let Some(e) = f.errno {
        assert!(
            allowed.contains(&e),
            "errno {e}, expected one of {allowed:?}: {f:?}"
        );
    }
}

/// `stage` is optional; when present it must name the failing step.
#[track_caller]
fn assert_stage(f: &FailInfo, allowed: &[&str]) {
    if let Some(s) = &f.stage {
        assert!(
            allowed.contains(&s.as_str()),
            "stage {s:?}, expected one of {allowed:?}: {f:?}"
        );
    }
}

/// Checks that the id is free after an EXEC_FAILED: a good EXEC with the
/// same id starts.
#[track_caller]
fn id_is_free(agent: &mut Agent, id: u32) {
    agent.exec(id, &cmd("true", &[]));
    agent.collect(id).assert_success();
}

#[test]
fn not_found() {
    let mut agent = Agent::start();
    let id = 10;
    let f = agent.exec_fail(id, &Exec::new("agentd-no-such-program-xyz"), "not_found");
    eprintln!("not_found by lookup: {f:?}");
    assert_errno(&f, &[libc::ENOENT]);
    id_is_free(&mut agent, id);
    let f = agent.exec_fail(id, &Exec::new("/nonexistent/dir/prog"), "not_found");
    eprintln!("not_found by path: {f:?}");
    assert_errno(&f, &[libc::ENOENT]);
    assert_stage(&f, &["execve", "lookup"]);
    id_is_free(&mut agent, id);
    // Relative to cwd.
    let dir = TempDir::new("nf");
    let mut e = Exec::new("./missing");
    e.cwd = Some(dir.path().to_str().unwrap().into());
    agent.exec_fail(id, &e, "not_found");
    // The child's PATH decides: `sh` is in none of its directories.
    let mut e = Exec::new("sh");
    e.env = vec![format!("PATH={}", dir.path().display())];
    agent.exec_fail(id, &e, "not_found");
    id_is_free(&mut agent, id);
}

#[test]
fn permission_denied() {
    let mut agent = Agent::start();
    let dir = TempDir::new("perm");
    let marker = dir.join("ran");
    let script = dir.join("not-executable");
    marker_script(&script, &marker, 0o644);
    let id = 11;
    let f = agent.exec_fail(
        id,
        &Exec::new(script.to_str().unwrap()),
        "permission_denied",
    );
    eprintln!("permission_denied: {f:?}");
    assert_errno(&f, &[libc::EACCES]);
    id_is_free(&mut agent, id);
    // Found on PATH but not executable.
    let mut e = Exec::new("not-executable");
    e.env = vec![format!("PATH={}", dir.path().display())];
    agent.exec_fail(id, &e, "permission_denied");
    // A directory.
    agent.exec_fail(
        id,
        &Exec::new(dir.path().to_str().unwrap()),
        "permission_denied",
    );
    assert!(!marker.exists(), "the program ran");
    id_is_free(&mut agent, id);
}

#[test]
fn bad_cwd() {
    let mut agent = Agent::start();
    let dir = TempDir::new("cwd");
    let marker = dir.join("ran");
    let id = 12;
    let touch = |cwd: &str| {
        let mut e = cmd("touch", &[marker.to_str().unwrap()]);
        e.cwd = Some(cwd.to_owned());
        e
    };
    let f = agent.exec_fail(id, &touch("/nonexistent-agentd-dir"), "bad_cwd");
    eprintln!("bad_cwd: {f:?}");
    assert_errno(&f, &[libc::ENOENT]);
    assert_stage(&f, &["chdir"]);
    id_is_free(&mut agent, id);
    // A file is not a directory.
    let file = dir.join("file");
    std::fs::write(&file, "").unwrap();
    agent.exec_fail(id, &touch(file.to_str().unwrap()), "bad_cwd");
    // Children that failed before exec were reaped at once.
    agent.wait_no_children(std::time::Duration::from_secs(5));
    assert!(!marker.exists(), "the program ran");
    id_is_free(&mut agent, id);
}

#[test]
fn bad_user() {
    let mut agent = Agent::start();
    let dir = TempDir::new("user");
    let marker = dir.join("ran");
    let id = 13;
    for user in ["agentd-no-such-user", "nobody:agentd-no-such-group"] {
        let mut e = cmd("touch", &[marker.to_str().unwrap()]);
        e.user = Some(user.into());
        let f = agent.exec_fail(id, &e, "bad_user");
        eprintln!("bad_user {user}: {f:?}");
        id_is_free(&mut agent, id);
    }
    assert!(!marker.exists(), "the program ran");
}

#[test]
fn invalid_request() {
    let mut agent = Agent::start();
    let dir = TempDir::new("inv");
    let marker = dir.join("ran");
    let m = marker.to_str().unwrap().to_owned();
    let touch = || cmd("touch", &[&m]);
    let mut cases: Vec<(&str, Exec)> = vec![("empty cmd", Exec::new(""))];
    cases.push(("NUL in cmd", Exec::new("tou\0ch")));
    let mut e = touch();
    e.args.push("a\0b".into());
    cases.push(("NUL in an argument", e));
    let mut e = touch();
    e.env = vec!["A=b\0c".into()];
    cases.push(("NUL in env", e));
    let mut e = touch();
    e.cwd = Some("/tmp\0/x".into());
    cases.push(("NUL in cwd", e));
    let mut e = touch();
    e.user = Some("nob\0ody".into());
    cases.push(("NUL in user", e));
    let mut e = touch();
    e.rlimits = vec![Rlimit {
        resource: "bogus".into(),
        soft: 1,
        hard: 1,
    }];
    cases.push(("unknown rlimit", e));
    let mut e = touch();
    e.rlimits = vec![Rlimit {
        resource: "NOFILE".into(),
        soft: 1,
        hard: 1,
    }];
    cases.push(("rlimit names are lower case", e));
    let id = 14;
    for (what, e) in &cases {
        let f = agent.exec_result(id, e).expect_err(what);
        assert_eq!(f.kind, "invalid_request", "{what}: {f:?}");
        id_is_free(&mut agent, id);
    }
    // Id 0 is the connection's: EXEC_FAILED invalid_request, with id 0.
    let f = agent.exec_fail(0, &touch(), "invalid_request");
    eprintln!("id 0: {f:?}");
    assert!(!marker.exists(), "the program ran");
    agent.assert_no_errors();
}

#[test]
fn duplicate_id_leaves_the_live_session_alone() {
    let mut agent = Agent::start();
    let id = 15;
    let pid = agent.exec(id, &cmd("cat", &[]));
    agent.send_stdin(id, b"one\n");
    let f = agent.exec_fail(id, &cmd("echo", &["intruder"]), "duplicate_id");
    eprintln!("duplicate_id: {f:?}");
    // Twice, and with a tty request: still the same session.
    let mut e = cmd("echo", &["intruder"]);
    e.tty = true;
    agent.exec_fail(id, &e, "duplicate_id");
    agent.send_stdin(id, b"two\n");
    agent.send_stdin_close(id);
    let out = agent.collect(id);
    out.assert_success();
    assert_eq!(out.stdout_str(), "one\ntwo\n");
    assert_eq!(out.acked, 8);
    let _ = pid;
    id_is_free(&mut agent, id);
}

#[test]
fn resource_when_max_sessions_is_reached() {
    let mut agent = Agent::start_args(&["--max-sessions", "2"]);
    assert_eq!(agent.ready_int("max_sessions"), 2, "{:?}", agent.ready);
    agent.exec(1, &cmd("sleep", &["100"]));
    agent.exec(2, &cmd("cat", &[]));
    let f = agent.exec_fail(3, &cmd("true", &[]), "resource");
    eprintln!("resource: {f:?}");
    agent.exec_fail(3, &cmd("true", &[]), "resource");
    // The two sessions are unaffected.
    agent.send_stdin(2, b"still here\n");
    agent.send_stdin_close(2);
    assert_eq!(agent.collect(2).stdout_str(), "still here\n");
    // A slot is free again.
    agent.exec(3, &cmd("echo", &["three"]));
    assert_eq!(agent.collect(3).stdout_str(), "three\n");
    agent.send_signal(1, 9, true);
    agent.collect(1);
}
