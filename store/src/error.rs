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
    /// The store cannot be reached now (etcd down, no quorum, a timeout):
    /// nothing was written by this call; retry later. `store` names it,
    /// e.g. `etcd at http://127.0.0.1:2379`.
    #[error("the store ({store}) is unavailable; retrying may succeed once it is back")]
    Unavailable {
        /// Which store, with its endpoints.
        store: String,
        /// The backend's error.
        #[source]
        source: BoxError,
    },
    /// The backend failed in another way (its error is kept as the source).
    #[error("the store's database failed")]
    Backend(#[source] BoxError),
    /// An event or object could not be encoded or decoded.
    #[error("cannot encode or decode a stored record")]
    Codec(#[source] serde_json::Error),
}

/// A backend's error, opaque to callers; print it with its chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Short for `Result<T, StoreError>`.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

impl StoreError {
    /// A [`StoreError::Backend`] wrapping `e`.
    pub fn backend(e: impl Into<BoxError>) -> Self {
        StoreError::Backend(e.into())
    }

    /// The sled error inside a [`StoreError::Backend`], or the error itself.
    pub(crate) fn into_sled(self) -> std::result::Result<sled::Error, StoreError> {
        match self {
            StoreError::Backend(b) => b
                .downcast::<sled::Error>()
                .map(|e| *e)
                .map_err(StoreError::Backend),
            other => Err(other),
        }
    }

    /// True for [`StoreError::Unavailable`]: retry later, nothing was written.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// True for [`StoreError::TooOld`]: re-list, then watch from the listing.
    pub fn is_too_old(&self) -> bool {
        matches!(self, StoreError::TooOld { .. })
    }

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
