//! The store's error type.

use vmctl_api::ObjectRef;

/// Everything a store operation can fail with.
///
/// Messages are short and never repeat their `#[source]`; print the whole
/// chain once, at the edge.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist (or no longer exists).
    #[error("{0} not found")]
    NotFound(ObjectRef),
    /// The write carried an expected resourceVersion and the object moved on.
    #[error("{object} changed: expected resourceVersion {expected}, found {actual}")]
    Conflict {
        /// The object written.
        object: ObjectRef,
        /// The resourceVersion the caller expected.
        expected: u64,
        /// The object's current resourceVersion (0 if it does not exist).
        actual: u64,
    },
    /// A watch asked for a sequence number that compaction already dropped.
    #[error(
        "sequence {requested} is too old: the log starts after {oldest}; re-list and watch again"
    )]
    TooOld {
        /// The sequence number the watcher asked to resume after.
        requested: u64,
        /// The compaction floor: watches must resume at or after it.
        oldest: u64,
    },
    /// The database was written by a newer vmctl and cannot be read safely.
    #[error(
        "store schema version {found} is newer than this build supports ({supported}); upgrade vmctl"
    )]
    SchemaTooNew {
        /// The schema version recorded in the database.
        found: u32,
        /// The newest schema version this build understands.
        supported: u32,
    },
    /// The database is damaged in a way the store cannot repair by itself.
    #[error("store is corrupt: {detail}; to recover: {hint}")]
    Corrupt {
        /// What is wrong.
        detail: String,
        /// What the operator should do.
        hint: String,
    },
    /// The filesystem holding the store is full (ENOSPC or a quota): the
    /// write was not acknowledged and is not visible. The store reopens its
    /// database by itself and writes work again once space is freed; no
    /// restart is needed. Retry later.
    #[error("no space left on {}", path.display())]
    NoSpace {
        /// The store's database directory.
        path: std::path::PathBuf,
    },
    /// The request itself is invalid (e.g. an object without a name).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The sled database failed.
    #[error("database error")]
    Sled(#[source] sled::Error),
    /// An event or object could not be encoded or decoded.
    #[error("cannot encode or decode a stored record")]
    Codec(#[source] serde_json::Error),
}

/// Short for `Result<T, StoreError>`.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Sled(e)
    }
}

impl StoreError {
    /// A [`StoreError::Corrupt`] with the standard recovery hint for `path`.
    pub(crate) fn corrupt(detail: impl Into<String>, path: &std::path::Path) -> Self {
        StoreError::Corrupt {
            detail: detail.into(),
            hint: format!(
                "stop the agent, move {} aside, and restore it from a backup or start empty \
                 (`vmctl apply` re-creates objects from their files)",
                path.display()
            ),
        }
    }
}
