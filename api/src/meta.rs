//! Object metadata, references and the kind-erased object envelope.
//!
//! Every resource has `metadata`, `spec` (written only by users) and `status`
//! (written only by controllers). The store works on [`Object`], which keeps
//! `spec` and `status` as JSON values: the store needs to know *whether* a
//! spec changed, never what it means, and an etcd-backed store later stores
//! the same bytes.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The only API version this build speaks.
pub const API_VERSION: &str = "vmctl/v1alpha1";

/// A point in time, always UTC, serialised as RFC 3339.
pub type Time = DateTime<Utc>;

/// The kinds of resource vmctl manages.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum Kind {
    /// A virtual machine (`vm`).
    VirtualMachine,
    /// A base disk image, local or downloaded (`image`).
    Image,
    /// The provisioning steps run on a VM (`provision`).
    Provision,
    /// A saved point of a VM's disks and memory (`snapshot`).
    Snapshot,
    /// A host running an agent, registered by that agent (`node`).
    Node,
}

impl Kind {
    /// Every kind: those users apply in the order they usually are
    /// ([`Kind::APPLIED`]), then Node.
    pub const ALL: [Kind; 5] = [
        Kind::Image,
        Kind::VirtualMachine,
        Kind::Provision,
        Kind::Snapshot,
        Kind::Node,
    ];

    /// The kinds a manifest or VMFile may hold, in the order they are
    /// usually applied: every kind but Node, which agents register.
    pub const APPLIED: [Kind; 4] = [
        Kind::Image,
        Kind::VirtualMachine,
        Kind::Provision,
        Kind::Snapshot,
    ];

    /// The canonical name, as in `kind:` of a manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::VirtualMachine => "VirtualMachine",
            Kind::Image => "Image",
            Kind::Provision => "Provision",
            Kind::Snapshot => "Snapshot",
            Kind::Node => "Node",
        }
    }

    /// The short name used on the command line (`vmctl get vm`).
    pub fn short(self) -> &'static str {
        match self {
            Kind::VirtualMachine => "vm",
            Kind::Image => "image",
            Kind::Provision => "provision",
            Kind::Snapshot => "snapshot",
            Kind::Node => "node",
        }
    }

    /// Parses a kind as a user types it: canonical, short, plural or lowercase.
    pub fn parse(s: &str) -> Option<Kind> {
        match s.to_ascii_lowercase().as_str() {
            "virtualmachine" | "virtualmachines" | "vm" | "vms" => Some(Kind::VirtualMachine),
            "image" | "images" | "img" => Some(Kind::Image),
            "provision" | "provisions" | "prov" => Some(Kind::Provision),
            "snapshot" | "snapshots" | "snap" => Some(Kind::Snapshot),
            "node" | "nodes" | "no" => Some(Kind::Node),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reference to one object: its kind and name.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub struct ObjectRef {
    /// The object's kind.
    pub kind: Kind,
    /// The object's name.
    pub name: String,
}

impl ObjectRef {
    /// A reference to `kind/name`.
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        ObjectRef {
            kind,
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.short(), self.name)
    }
}

/// Where an applied spec came from: shown by `vmctl history`, used by
/// `apply --prune` to find objects a file no longer has.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplySource {
    /// The file the object was applied from (absolute path), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Who applied it (user name and tool, e.g. `alice via vmctl apply`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_by: Option<String>,
}

/// Metadata common to every object.
///
/// `name`, `labels`, `annotations` and `finalizers` are set by users (or
/// controllers for finalizers); everything else is assigned by the store.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// The object's name: a DNS-1123 label, unique per kind.
    pub name: String,
    /// Unique id assigned when the object is created; a re-created object gets a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Rises by one each time the spec changes. Assigned by the store.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// Sequence number of the last event that changed this object. Assigned by the store.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resource_version: u64,
    /// When the object was created. Assigned by the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<Time>,
    /// When deletion was requested; the object goes once its finalizers are cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<Time>,
    /// Free-form key/value labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form key/value annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Controllers that must clean up before the object may disappear.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
    /// Where the current spec was applied from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ApplySource>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ObjectMeta {
    /// Metadata carrying only a name.
    pub fn named(name: impl Into<String>) -> Self {
        ObjectMeta {
            name: name.into(),
            ..Default::default()
        }
    }
}

/// A kind-erased object, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Object {
    /// Always [`API_VERSION`].
    pub api_version: String,
    /// The object's kind.
    pub kind: Kind,
    /// Metadata.
    pub metadata: ObjectMeta,
    /// What the user wants.
    pub spec: serde_json::Value,
    /// What controllers observed, if they have reported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

impl Object {
    /// A new object with no status.
    pub fn new(kind: Kind, metadata: ObjectMeta, spec: serde_json::Value) -> Self {
        Object {
            api_version: API_VERSION.to_owned(),
            kind,
            metadata,
            spec,
            status: None,
        }
    }

    /// This object's reference.
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(self.kind, self.metadata.name.clone())
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }
}

/// Whether a note reports normal progress or something that needs attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum NoteType {
    /// Normal progress (Pulled, Started, …).
    Normal,
    /// Something went wrong or needs attention (BackOff, Failed, …).
    Warning,
}

/// A Kubernetes-style event that a controller records about an object,
/// shown by `vmctl describe` and `vmctl events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Note {
    /// Normal or Warning.
    #[serde(rename = "type")]
    pub type_: NoteType,
    /// A short CamelCase reason (`Pulled`, `BackOff`).
    pub reason: String,
    /// A human-readable sentence.
    pub message: String,
    /// The object the note is about.
    pub object: ObjectRef,
    /// Which component recorded it (`image-controller`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// The state of a condition, as in Kubernetes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known yet.
    Unknown,
}

/// One observed condition of an object (`Ready`, `ImageReady`, `SshReady`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The condition's type, CamelCase.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// A short CamelCase reason for the last transition.
    #[serde(default)]
    pub reason: String,
    /// A human-readable message.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// The generation of the spec this condition reflects.
    #[serde(default)]
    pub observed_generation: u64,
}

/// Sets `cond` in `conds`, keeping `lastTransitionTime` when the status did
/// not change. Returns whether anything changed.
pub fn set_condition(conds: &mut Vec<Condition>, mut cond: Condition, now: Time) -> bool {
    match conds.iter_mut().find(|c| c.type_ == cond.type_) {
        Some(old) => {
            if old.status == cond.status {
                cond.last_transition_time = old.last_transition_time;
            } else {
                cond.last_transition_time = Some(now);
            }
            let changed = *old != cond;
            *old = cond;
            changed
        }
        None => {
            cond.last_transition_time = Some(now);
            conds.push(cond);
            true
        }
    }
}
