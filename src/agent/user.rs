//! Resolving EXEC's `user` key against the guest's own `/etc/passwd` and
//! `/etc/group`.
//!
//! The agent is a static binary in an initramfs that may have no NSS
//! configuration at all, so it reads the two files itself (the format is
//! `name:password:uid:gid:...` and `name:password:gid:member,member`), once
//! per EXEC that names a user, before fork.

use std::fs;

use crate::messages::quote;

/// Who a child runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, the primary gid first.
    pub groups: Vec<u32>,
    /// The passwd entry's name and home, when the user has one.
    pub name: Option<String>,
    pub home: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UserError {
    #[error("no user named {} in /etc/passwd", quote(.0))]
    UnknownUser(String),
    #[error("no group named {} in /etc/group", quote(.0))]
    UnknownGroup(String),
    #[error("empty user or group in {}", quote(.0))]
    Empty(String),
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn read_db(path: &str) -> String {
    // A missing or unreadable database is an empty one: numeric ids still work.
    fs::read_to_string(path).unwrap_or_default()
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry> + '_ {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: f[0].to_owned(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f.get(5).copied().unwrap_or("/").to_owned(),
        })
    })
}

/// (name, gid, members) of each group line.
fn group_entries(text: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> + '_ {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 3 || line.starts_with('#') {
            return None;
        }
        let members = f
            .get(3)
            .map(|m| m.split(',').filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolves `name`, `uid`, `name:group` or `uid:gid` with the databases at
/// the usual paths.
pub(crate) fn resolve(spec: &str) -> Result<Identity, UserError> {
    resolve_with(spec, &read_db("/etc/passwd"), &read_db("/etc/group"))
}

/// Resolves a user spec against the given passwd and group texts.
///
/// - A name must exist in passwd; a number need not (then its gid is the
///   same number and it has no supplementary groups).
/// - The group part, when present, replaces the primary gid; a group name
///   must exist in the group database.
/// - Supplementary groups: the primary gid plus every group that lists the
///   user's name as a member. Nothing is inherited from the agent.
pub(crate) fn resolve_with(spec: &str, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() || group_part == Some("") {
        return Err(UserError::Empty(spec.to_owned()));
    }
    let (entry, uid, mut gid) = match user_part.parse::<u32>() {
        Ok(uid) => {
            let entry = passwd_entries(passwd).find(|e| e.uid == uid);
            let gid = entry.as_ref().map_or(uid, |e| e.gid);
            (entry, uid, gid)
        }
        Err(_) => {
            let entry = passwd_entries(passwd)
                .find(|e| e.name == user_part)
                .ok_or_else(|| UserError::UnknownUser(user_part.to_owned()))?;
            let (uid, gid) = (entry.uid, entry.gid);
            (Some(entry), uid, gid)
        }
    };
    if let Some(g) = group_part {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group_entries(group)
                .find(|(name, _, _)| *name == g)
                .map(|(_, gid, _)| gid)
                .ok_or_else(|| UserError::UnknownGroup(g.to_owned()))?,
        };
    }
    let mut groups = vec![gid];
    if let Some(e) = &entry {
        for (_, g, members) in group_entries(group) {
            if members.contains(&e.name.as_str()) && !groups.contains(&g) {
                groups.push(g);
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups,
        name: entry.as_ref().map(|e| e.name.clone()),
        home: entry.map(|e| e.home),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nalice:x:1000:\nwheel:x:10:alice,bob\nstaff:x:50:bob\n";

    #[test]
    fn by_name() {
        let id = resolve_with("alice", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid), (1000, 1000));
        assert_eq!(id.groups, vec![1000, 10]);
        assert_eq!(id.home.as_deref(), Some("/home/alice"));
    }

    #[test]
    fn numeric_without_entry() {
        let id = resolve_with("4242", PASSWD, GROUP).unwrap();
        assert_eq!(
            (id.uid, id.gid, id.groups.clone()),
            (4242, 4242, vec![4242])
        );
        assert_eq!(id.name, None);
    }

    #[test]
    fn with_group() {
        let id = resolve_with("alice:staff", PASSWD, GROUP).unwrap();
        assert_eq!(id.gid, 50);
        assert_eq!(id.groups, vec![50, 10]);
        let id = resolve_with("1000:7", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid), (1000, 7));
    }

    #[test]
    fn unknown() {
        assert!(matches!(
            resolve_with("mallory", PASSWD, GROUP),
            Err(UserError::UnknownUser(_))
        ));
        assert!(matches!(
            resolve_with("alice:nogroup", PASSWD, GROUP),
            Err(UserError::UnknownGroup(_))
        ));
        assert!(resolve_with(":", PASSWD, GROUP).is_err());
        assert!(resolve_with("alice:", PASSWD, GROUP).is_err());
    }
}
