//! The agent's wire types: JSON bodies of its HTTP API.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::{ApplySource, Object, ObjectRef};

/// Current API path prefix.
pub const API_PREFIX: &str = "/v1";

/// `POST /v1/apply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApplyRequest {
    /// The objects to create or update (status is ignored).
    pub objects: Vec<Object>,
    /// Where they come from (recorded in history, used by `prune`).
    #[serde(default)]
    pub source: Option<ApplySource>,
    /// Compute the outcome without writing anything.
    #[serde(default)]
    pub dry_run: bool,
    /// Delete objects applied earlier from the same source file that are
    /// not in `objects`.
    #[serde(default)]
    pub prune: bool,
    /// Create only: when one of the objects exists, refuse the whole
    /// request (409 `vmctl::api::already_exists`) and write nothing, so
    /// a create never lands on an object someone else made meanwhile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub create_only: bool,
}

/// `PATCH /v1/objects/{kind}/{name}`: changes an object's finalizers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchRequest {
    /// Finalizers to add (one already there is kept once).
    #[serde(default)]
    pub add_finalizers: Vec<String>,
    /// Finalizers to remove; each must be there. Removing the last one of
    /// an object being deleted deletes it.
    #[serde(default)]
    pub remove_finalizers: Vec<String>,
    /// Allow changing finalizers owned by vmctl's controllers (`vmctl.dev/…`).
    #[serde(default)]
    pub force: bool,
    /// Fail with 409 Conflict unless the object is at this resourceVersion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<u64>,
}

/// What applying one object did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ApplyOutcome {
    /// The object did not exist.
    Created,
    /// Its spec, labels, annotations or source changed.
    Configured,
    /// Nothing changed.
    Unchanged,
    /// Deleted by `prune`.
    Pruned,
}

/// The result for one object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResult {
    /// The object.
    pub object: ObjectRef,
    /// What happened.
    pub outcome: ApplyOutcome,
    /// Its generation after the write.
    pub generation: u64,
    /// Its resourceVersion after the write.
    pub resource_version: u64,
}

/// `POST /v1/apply` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResponse {
    /// One result per object, in request order, then pruned objects.
    pub results: Vec<ApplyResult>,
}

/// Every error response's body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// A stable machine-readable code, e.g. `vmctl::api::not_found`.
    pub code: String,
    /// What went wrong.
    pub message: String,
    /// What to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
}

/// `GET /v1/healthz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// Agent version.
    pub version: String,
    /// Agent process id.
    pub pid: u32,
    /// The hypervisor driver in use.
    pub driver: String,
    /// The data directory.
    pub data_dir: String,
    /// The store's current resourceVersion; while the store is
    /// unavailable, the newest one the agent saw (absent if none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// Which store the agent uses: `sled at PATH` or `etcd at URL,…`.
    #[serde(default)]
    pub store: String,
    /// Why the store cannot be used now (e.g. etcd unreachable; the agent
    /// retries by itself); absent when it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    /// Whether this agent runs the controllers: `running`, or `standby`
    /// while another agent holds the etcd prefix's agent lease (or etcd
    /// could not be reached to take it).
    #[serde(default)]
    pub controllers: String,
    /// Who holds the etcd agent lease, when it is another agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_holder: Option<String>,
}

/// `GET /v1/objects` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectList {
    /// The objects.
    pub items: Vec<Object>,
    /// Watch from here to see every later change.
    pub resource_version: u64,
}
