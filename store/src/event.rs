//! Events: the records of the log, their encoding and the tree keys.
//!
//! An event is stored as JSON inside a versioned envelope (`{"v":1,...}`) so
//! that a later schema can change the encoding without misreading old logs.

use serde::{Deserialize, Serialize};
use vmctl_api::{Kind, Note, Object, ObjectRef, Time};

use crate::error::{Result, StoreError};

/// The encoding version of events and objects written by this build.
pub const EVENT_VERSION: u32 = 1;

/// One entry of the log (also a line of the agent's `/v1/watch` and an
/// item of `/v1/history/…`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// The sequence number; also the resourceVersion it gives the object.
    pub seq: u64,
    /// When the event was committed.
    pub time: Time,
    /// The object the event is about.
    pub object: ObjectRef,
    /// What happened.
    pub change: Change,
}

/// What an event did to its object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Change {
    /// The object was created, or its spec, labels, annotations or source
    /// changed. Carries the whole object after the change, without status.
    Applied {
        /// True when this event created the object (a new uid).
        created: bool,
        /// The object after the change; `status` is always `None` here.
        object: Box<Object>,
    },
    /// A controller replaced the status.
    StatusUpdated {
        /// The new status.
        status: serde_json::Value,
    },
    /// A controller replaced the finalizers.
    FinalizersSet {
        /// The new finalizers.
        finalizers: Vec<String>,
    },
    /// Deletion was requested; the object waits for its finalizers.
    DeletionRequested {
        /// The deletion timestamp given to the object.
        at: Time,
    },
    /// The object is gone.
    Deleted,
    /// A controller recorded a note about the object.
    Noted {
        /// The note.
        note: Note,
    },
}

impl Change {
    /// A short name for logs and `vmctl history`.
    pub fn name(&self) -> &'static str {
        match self {
            Change::Applied { created: true, .. } => "Created",
            Change::Applied { created: false, .. } => "Applied",
            Change::StatusUpdated { .. } => "StatusUpdated",
            Change::FinalizersSet { .. } => "FinalizersSet",
            Change::DeletionRequested { .. } => "DeletionRequested",
            Change::Deleted => "Deleted",
            Change::Noted { .. } => "Noted",
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    #[serde(flatten)]
    body: T,
}

#[derive(Serialize)]
struct EnvelopeRef<'a, T> {
    v: u32,
    #[serde(flatten)]
    body: &'a T,
}

/// Encodes a record (event or object) in its versioned envelope.
pub(crate) fn encode<T: Serialize>(body: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(&EnvelopeRef {
        v: EVENT_VERSION,
        body,
    })
    .map_err(StoreError::Codec)
}

/// Decodes a record written by [`encode`], refusing unknown versions.
///
/// [`encode`] writes the version first (`{"v":1,…`), so a record with this
/// version's prefix is parsed once, as its body; anything else takes the
/// slow path (probe the version, then the envelope).
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T> {
    let prefix = version_prefix();
    if let Some(rest) = bytes.strip_prefix(prefix.as_bytes()) {
        let mut body = Vec::with_capacity(rest.len() + 1);
        body.push(b'{');
        body.extend_from_slice(rest);
        if let Ok(t) = serde_json::from_slice(&body) {
            return Ok(t);
        }
    }
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let Version { v } = serde_json::from_slice(bytes).map_err(StoreError::Codec)?;
    if v != EVENT_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: v,
            supported: EVENT_VERSION,
        });
    }
    let env: Envelope<T> = serde_json::from_slice(bytes).map_err(StoreError::Codec)?;
    Ok(env.body)
}

/// `{"v":<EVENT_VERSION>,`: how every record of this version begins.
fn version_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| format!("{{\"v\":{EVENT_VERSION},"))
}

/// Key of a sequence number in the `events` tree: big-endian, so the tree
/// iterates in log order.
pub(crate) fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Inverse of [`seq_key`]; `None` for a key of the wrong length.
pub(crate) fn parse_seq(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// Key of an object in the `objects` tree: `Kind/name`. Names are DNS-1123
/// labels, so `/` and NUL never occur inside them.
pub(crate) fn object_key(r: &ObjectRef) -> Vec<u8> {
    let mut k = Vec::with_capacity(r.kind.as_str().len() + 1 + r.name.len());
    k.extend_from_slice(r.kind.as_str().as_bytes());
    k.push(b'/');
    k.extend_from_slice(r.name.as_bytes());
    k
}

/// Prefix of every `objects` key of one kind.
pub(crate) fn kind_prefix(kind: Kind) -> Vec<u8> {
    let mut k = kind.as_str().as_bytes().to_vec();
    k.push(b'/');
    k
}

/// Prefix of an object's entries in the `index` tree: `Kind/name\0`.
pub(crate) fn index_prefix(r: &ObjectRef) -> Vec<u8> {
    let mut k = object_key(r);
    k.push(0);
    k
}

/// Key of one event in the `index` tree: the object's prefix, then the sequence.
pub(crate) fn index_key(r: &ObjectRef, seq: u64) -> Vec<u8> {
    let mut k = index_prefix(r);
    k.extend_from_slice(&seq_key(seq));
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmctl_api::NoteType;

    #[test]
    fn events_round_trip_through_the_versioned_envelope() {
        let ev = Event {
            seq: 7,
            time: chrono::Utc::now(),
            object: ObjectRef::new(Kind::Image, "debian"),
            change: Change::Noted {
                note: Note {
                    type_: NoteType::Normal,
                    reason: "Pulled".into(),
                    message: "done".into(),
                    object: ObjectRef::new(Kind::Image, "debian"),
                    source: None,
                },
            },
        };
        let bytes = encode(&ev).unwrap();
        assert!(bytes.starts_with(br#"{"v":1,"#));
        assert_eq!(decode::<Event>(&bytes).unwrap(), ev);
        // A record whose version is not first (another writer's key order)
        // takes the slow path and decodes the same.
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let reordered = serde_json::to_vec(&v).unwrap();
        assert!(!reordered.starts_with(br#"{"v""#));
        assert_eq!(decode::<Event>(&reordered).unwrap(), ev);
    }

    #[test]
    fn records_from_a_newer_encoding_are_refused() {
        let err = decode::<Event>(br#"{"v":2,"seq":1}"#).unwrap_err();
        assert!(matches!(
            err,
            StoreError::SchemaTooNew {
                found: 2,
                supported: 1
            }
        ));
    }

    #[test]
    fn index_keys_of_one_object_never_prefix_another() {
        let a = index_prefix(&ObjectRef::new(Kind::VirtualMachine, "a"));
        let ab = index_key(&ObjectRef::new(Kind::VirtualMachine, "ab"), 1);
        assert!(!ab.starts_with(&a));
        assert_eq!(parse_seq(&seq_key(42)), Some(42));
    }
}
