//! The `fs` extension (kinds 0x40–0x4F): file operations as the session's
//! user, one-shot (stat, mkdir, rename, ...) or streamed (read, write,
//! list, whole trees as tar, watch), flow-controlled both ways. See
//! docs/PROTOCOL.md, "Extension fs".

use serde::{Deserialize, Serialize};

use super::{append_bytes, append_map, check_empty, decode_map, EncodeError, Kind, ProtocolError};

use super::strict;
use super::{cap_message, Ack};

string_enum! {
    /// The operations of FS_REQUEST's `op`.
    FsOp {
        Stat = "stat",
        Lstat = "lstat",
        List = "list",
        Read = "read",
        Write = "write",
        Mkdir = "mkdir",
        Remove = "remove",
        Rename = "rename",
        Chmod = "chmod",
        Chown = "chown",
        Utimes = "utimes",
        Symlink = "symlink",
        Readlink = "readlink",
        Realpath = "realpath",
        TarGet = "tar_get",
        TarPut = "tar_put",
        Watch = "watch",
    }
}

impl FsOp {
    /// Whether the host sends data for it (FS_WRITE, then FS_END).
    pub fn takes_data(self) -> bool {
        matches!(self, FsOp::Write | FsOp::TarPut)
    }

    /// Whether the agent sends data for it (FS_DATA).
    pub fn gives_data(self) -> bool {
        matches!(self, FsOp::Read | FsOp::TarGet)
    }
}

string_enum! {
    /// The `kind` of an FS_ERROR.
    FsErrorKind {
        NotFound = "not_found",
        PermissionDenied = "permission_denied",
        Exists = "exists",
        NotADirectory = "not_a_directory",
        IsADirectory = "is_a_directory",
        NotEmpty = "not_empty",
        NoSpace = "no_space",
        ReadOnly = "read_only",
        InvalidRequest = "invalid_request",
        BadUser = "bad_user",
        DuplicateId = "duplicate_id",
        Resource = "resource",
        Cancelled = "cancelled",
        Other = "other",
    }
}

impl FsErrorKind {
    /// The kind an errno of a file-system call maps to.
    pub fn from_errno(errno: i32) -> FsErrorKind {
        match errno {
            libc::ENOENT => FsErrorKind::NotFound,
            libc::EACCES | libc::EPERM => FsErrorKind::PermissionDenied,
            libc::EEXIST => FsErrorKind::Exists,
            libc::ENOTDIR => FsErrorKind::NotADirectory,
            libc::EISDIR => FsErrorKind::IsADirectory,
            libc::ENOTEMPTY => FsErrorKind::NotEmpty,
            libc::ENOSPC | libc::EDQUOT => FsErrorKind::NoSpace,
            libc::EROFS => FsErrorKind::ReadOnly,
            libc::EINVAL | libc::ENAMETOOLONG => FsErrorKind::InvalidRequest,
            libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN => FsErrorKind::Resource,
            _ => FsErrorKind::Other,
        }
    }
}

/// FS_REQUEST: one operation on the id it opens. Keys an operation does
/// not use are ignored; absent keys take the defaults of docs/PROTOCOL.md.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsRequest {
    /// One of [`FsOp`]'s names (an unknown one is FS_ERROR
    /// `invalid_request`, like an unknown rlimit name in EXEC).
    #[serde(deserialize_with = "strict::string")]
    pub op: String,
    #[serde(deserialize_with = "strict::string")]
    pub path: String,
    /// As EXEC's `user`: the operation runs with that user's credentials.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub user: Option<String>,
    /// Agent → host window (read, tar_get, list, watch); default 1 MiB.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub window: Option<u32>,
    /// read: where to start (default 0).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub offset: Option<u64>,
    /// read: how much at most (default: to the end).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub length: Option<u64>,
    /// write, mkdir, chmod: permission bits (write 0o644, mkdir 0o755).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub mode: Option<u32>,
    /// write: create the file if missing (default true).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub create: Option<bool>,
    /// write: fail with `exists` if it exists (default false).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub exclusive: Option<bool>,
    /// write: append instead of truncating (default false).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub append: Option<bool>,
    /// write: write a temporary file beside it and rename it into place
    /// on success (default false).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub atomic: Option<bool>,
    /// mkdir, write, tar_put: create missing parent directories (default
    /// false).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub parents: Option<bool>,
    /// remove: whole trees; watch: subdirectories too (default false).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub recursive: Option<bool>,
    /// rename: the new path.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub to: Option<String>,
    /// rename: replace an existing `to` (default true; false: `exists`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub replace: Option<bool>,
    /// symlink: what the link points to.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub target: Option<String>,
    /// chown: the new owner and group (absent: unchanged).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub uid: Option<u32>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub gid: Option<u32>,
    /// utimes: nanoseconds since the epoch (absent: unchanged).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub atime_ns: Option<i64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub mtime_ns: Option<i64>,
    /// chown, utimes: follow a symlink at `path` (default true).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub follow: Option<bool>,
    /// list: each entry with its metadata (lstat), not just name and type.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub stat: Option<bool>,
    /// tar_put: keep the archive's uid and gid (default false).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub owners: Option<bool>,
}

impl FsRequest {
    /// A request for `op` on `path`, every other key absent.
    pub fn new(op: FsOp, path: impl Into<String>) -> FsRequest {
        FsRequest {
            op: op.as_str().to_owned(),
            path: path.into(),
            ..FsRequest::default()
        }
    }
}

/// What a path is, with the metadata `lstat` (or `stat`) gives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsStat {
    /// `file`, `dir`, `symlink`, `fifo`, `socket`, `char`, `block`.
    #[serde(rename = "type", deserialize_with = "strict::string")]
    pub kind: String,
    pub size: u64,
    /// Permission bits, setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Nanoseconds since the epoch.
    pub mtime_ns: i64,
    pub atime_ns: i64,
    pub ctime_ns: i64,
    pub nlink: u64,
    pub ino: u64,
    /// A symlink's target.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub target: Option<String>,
}

/// One directory entry of FS_ENTRIES.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEntry {
    /// The name (lossy when it is not valid UTF-8: then `name_bin` has it).
    #[serde(deserialize_with = "strict::string")]
    pub name: String,
    /// The exact bytes of a name that is not valid UTF-8.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "strict::opt_bin"
    )]
    pub name_bin: Option<Vec<u8>>,
    /// As [`FsStat::kind`].
    #[serde(rename = "type", deserialize_with = "strict::string")]
    pub kind: String,
    /// With `stat: true`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub stat: Option<FsStat>,
}

/// FS_ENTRIES: a batch of a directory's entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEntries {
    pub entries: Vec<FsEntry>,
}

/// One change a watch saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEvent {
    /// `created`, `modified`, `removed`, `moved_from`, `moved_to`,
    /// `attrib`.
    #[serde(rename = "type", deserialize_with = "strict::string")]
    pub kind: String,
    /// Relative to the watched path.
    #[serde(deserialize_with = "strict::string")]
    pub path: String,
    /// Whether it is a directory.
    #[serde(default)]
    pub dir: bool,
    /// Pairs a `moved_from` with its `moved_to`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub cookie: Option<u32>,
}

/// FS_EVENTS: a batch of changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEvents {
    pub events: Vec<FsEvent>,
    /// Changes were lost before these (the kernel's queue overflowed while
    /// the host did not read): rescan to know the state.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overflow: bool,
}

/// FS_OPENED: the operation has started (the file is open, the watch is
/// set up). For `read`, the file's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsOpened {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub stat: Option<FsStat>,
}

/// FS_DONE: the operation succeeded; the id is free. Its keys depend on the
/// operation (docs/PROTOCOL.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsDone {
    /// read, write, tar_get, tar_put: payload bytes moved.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub bytes: Option<u64>,
    /// list, tar_get, tar_put: entries.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub entries: Option<u64>,
    /// stat, lstat.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub stat: Option<FsStat>,
    /// readlink: the target; realpath: the resolved path.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub path: Option<String>,
}

/// FS_ERROR: the operation failed (or was cancelled); the id is free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsError {
    /// One of [`FsErrorKind`]'s names.
    #[serde(deserialize_with = "strict::string")]
    pub kind: String,
    #[serde(deserialize_with = "strict::string")]
    pub message: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub errno: Option<i32>,
    /// The path the failing call was about (the request's, or an entry's).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub path: Option<String>,
}

impl FsError {
    /// An FS_ERROR with its message capped.
    pub fn new(
        kind: FsErrorKind,
        message: impl Into<String>,
        errno: Option<i32>,
        path: Option<String>,
    ) -> FsError {
        FsError {
            kind: kind.as_str().to_owned(),
            message: cap_message(message.into()),
            errno,
            path: path.map(|p| super::clip(&p).into_owned()),
        }
    }

    pub fn error_kind(&self) -> Option<FsErrorKind> {
        FsErrorKind::parse(&self.kind)
    }
}

/// A decoded frame of the fs extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsMsg<'a> {
    Request(Box<FsRequest>),
    Opened(FsOpened),
    Data(&'a [u8]),
    DataAck(Ack),
    Write(&'a [u8]),
    WriteAck(Ack),
    End,
    Entries(FsEntries),
    Events(FsEvents),
    Done(Box<FsDone>),
    Error(FsError),
    Cancel,
}

impl<'a> FsMsg<'a> {
    /// The frame kind of this message.
    pub fn kind(&self) -> Kind {
        match self {
            FsMsg::Request(_) => Kind::FsRequest,
            FsMsg::Opened(_) => Kind::FsOpened,
            FsMsg::Data(_) => Kind::FsData,
            FsMsg::DataAck(_) => Kind::FsDataAck,
            FsMsg::Write(_) => Kind::FsWrite,
            FsMsg::WriteAck(_) => Kind::FsWriteAck,
            FsMsg::End => Kind::FsEnd,
            FsMsg::Entries(_) => Kind::FsEntries,
            FsMsg::Events(_) => Kind::FsEvents,
            FsMsg::Done(_) => Kind::FsDone,
            FsMsg::Error(_) => Kind::FsError,
            FsMsg::Cancel => Kind::FsCancel,
        }
    }

    /// Decodes a payload of `kind` (one of this extension's kinds).
    pub(crate) fn decode(kind: Kind, p: &'a [u8]) -> Result<Self, ProtocolError> {
        Ok(match kind {
            Kind::FsRequest => FsMsg::Request(Box::new(decode_map(kind, p)?)),
            Kind::FsOpened => FsMsg::Opened(decode_map(kind, p)?),
            Kind::FsData => FsMsg::Data(p),
            Kind::FsDataAck => FsMsg::DataAck(decode_map(kind, p)?),
            Kind::FsWrite => FsMsg::Write(p),
            Kind::FsWriteAck => FsMsg::WriteAck(decode_map(kind, p)?),
            Kind::FsEnd => {
                check_empty(kind, p)?;
                FsMsg::End
            }
            Kind::FsEntries => FsMsg::Entries(decode_map(kind, p)?),
            Kind::FsEvents => FsMsg::Events(decode_map(kind, p)?),
            Kind::FsDone => FsMsg::Done(Box::new(decode_map(kind, p)?)),
            Kind::FsError => FsMsg::Error(decode_map(kind, p)?),
            Kind::FsCancel => {
                check_empty(kind, p)?;
                FsMsg::Cancel
            }
            _ => return Err(ProtocolError::UnknownKind(kind as u8)),
        })
    }

    /// Appends this message as a frame with id `id`.
    pub(crate) fn encode(&self, id: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let kind = self.kind() as u8;
        match self {
            FsMsg::Request(m) => append_map(out, kind, id, m.as_ref()),
            FsMsg::Opened(m) => append_map(out, kind, id, m),
            FsMsg::Data(p) => append_bytes(out, self.kind(), id, p),
            FsMsg::DataAck(m) => append_map(out, kind, id, m),
            FsMsg::Write(p) => append_bytes(out, self.kind(), id, p),
            FsMsg::WriteAck(m) => append_map(out, kind, id, m),
            FsMsg::End => append_bytes(out, self.kind(), id, &[]),
            FsMsg::Entries(m) => append_map(out, kind, id, m),
            FsMsg::Events(m) => append_map(out, kind, id, m),
            FsMsg::Done(m) => append_map(out, kind, id, m.as_ref()),
            FsMsg::Error(m) => append_map(out, kind, id, m),
            FsMsg::Cancel => append_bytes(out, self.kind(), id, &[]),
        }
    }
}
