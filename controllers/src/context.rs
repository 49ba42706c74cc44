//! What every reconciler shares: the store, the drivers, the tuning, and
//! helpers that write through the store.

use std::sync::Arc;

use serde::Serialize;
use vmctl_api::{Note, NoteType, Object, ObjectRef};
use vmctl_store::Store;

use crate::runtime::controller::ControllerError;
use crate::{Drivers, RuntimeConfig};

/// Shared by the reconcilers of one agent.
#[derive(Debug, Clone)]
pub struct Context {
    /// The object store.
    pub store: Arc<dyn Store>,
    /// The drivers.
    pub drivers: Drivers,
    /// Tuning.
    pub config: RuntimeConfig,
}

/// The node a VM is bound to: its `status.nodeName` (`None`: unbound).
pub fn vm_node(vm: &Object) -> Option<&str> {
    vm.status.as_ref()?.get("nodeName")?.as_str()
}

impl Context {
    /// Whether a VM `status` is the scheduler's binding to this agent's
    /// node that no VM controller has written after (`nodeName` is this
    /// node, `observedGeneration` still 0): what wakes this node's work on
    /// the VM and its Image (cluster only).
    pub fn is_fresh_binding_here(&self, status: &serde_json::Value) -> bool {
        self.config.cluster
            && status.get("nodeName").and_then(|n| n.as_str())
                == Some(self.config.node.name.as_str())
            && status
                .get("observedGeneration")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
                == 0
    }

    /// Whether this agent acts on a VM bound to `node` (its
    /// `status.nodeName`): always on one host; in a cluster
    /// ([`RuntimeConfig::cluster`]) only when it is this agent's node.
    pub fn acts_on(&self, node: Option<&str>) -> bool {
        !self.config.cluster || node == Some(self.config.node.name.as_str())
    }

    /// The object, read fresh from the store.
    pub async fn get(&self, r: &ObjectRef) -> Result<Option<Object>, ControllerError> {
        Ok(self.store.get(r).await?)
    }

    /// Every object of `kind`, read fresh from the store.
    pub async fn list(&self, kind: vmctl_api::Kind) -> Result<Vec<Object>, ControllerError> {
        Ok(self.store.list(Some(kind)).await?.objects)
    }

    /// Writes `status` if it differs from `obj`'s, expecting `obj`'s
    /// resourceVersion. Returns the object as it now is.
    pub async fn write_status<S: Serialize>(
        &self,
        obj: &Object,
        status: &S,
    ) -> Result<Object, ControllerError> {
        let value = serde_json::to_value(status).expect("statuses always serialise");
        if obj.status.as_ref() == Some(&value) {
            return Ok(obj.clone());
        }
        let (r, rv) = (obj.object_ref(), obj.metadata.resource_version);
        let written = self.store.update_status(&r, value, Some(rv)).await?;
        Ok(written.object.unwrap_or_else(|| obj.clone()))
    }

    /// Replaces `obj`'s finalizers, expecting its resourceVersion. Returns
    /// the object as it now is, `None` once deleted.
    pub async fn set_finalizers(
        &self,
        obj: &Object,
        finalizers: Vec<String>,
    ) -> Result<Option<Object>, ControllerError> {
        let (r, rv) = (obj.object_ref(), obj.metadata.resource_version);
        let written = self.store.set_finalizers(&r, finalizers, Some(rv)).await?;
        Ok(written.object)
    }

    /// Adds `finalizer` to `obj` unless it has it. Returns the object as it
    /// now is, `None` once deleted.
    pub async fn add_finalizer(
        &self,
        obj: &Object,
        finalizer: &str,
    ) -> Result<Option<Object>, ControllerError> {
        if obj.metadata.finalizers.iter().any(|f| f == finalizer) {
            return Ok(Some(obj.clone()));
        }
        let mut fins = obj.metadata.finalizers.clone();
        fins.push(finalizer.to_owned());
        self.set_finalizers(obj, fins).await
    }

    /// Removes `finalizer` from `obj` (which lets a deleted object go).
    pub async fn remove_finalizer(
        &self,
        obj: &Object,
        finalizer: &str,
    ) -> Result<Option<Object>, ControllerError> {
        let rest = obj
            .metadata
            .finalizers
            .iter()
            .filter(|f| *f != finalizer)
            .cloned()
            .collect();
        self.set_finalizers(obj, rest).await
    }

    /// Records a note; a failure is logged, never returned, because a lost
    /// note must not undo or repeat the step it reports.
    pub async fn note(
        &self,
        object: &ObjectRef,
        type_: NoteType,
        source: &str,
        reason: &str,
        message: impl Into<String>,
    ) {
        let note = Note {
            type_,
            reason: reason.to_owned(),
            message: message.into(),
            object: object.clone(),
            source: Some(source.to_owned()),
        };
        if let Err(e) = self.store.record_note(note).await {
            tracing::warn!(error = %e, reason, "cannot record note");
        }
    }
}
