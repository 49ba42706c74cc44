//! Finalizers that users set, beside those vmctl's controllers own.
//!
//! Finalizers under [`CONTROLLER_PREFIX`] (`vmctl.dev/vm-teardown`,
//! `vmctl.dev/image-cache`) belong to the controllers: an apply never adds
//! or removes them, and `PATCH` changes them only with `force`. Every other
//! finalizer is the user's: an apply sets them to what the applied object
//! lists (like labels, the file is the truth; a file without finalizers
//! clears them), and `PATCH` (`vmctl patch`) adds or removes them one by
//! one. Pure functions: the API layer reads, plans here, then writes with
//! the resourceVersion it read.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Prefix of the finalizers vmctl's controllers own.
pub const CONTROLLER_PREFIX: &str = "vmctl.dev/";

/// Longest accepted finalizer name, in bytes (a Kubernetes qualified name).
const MAX_LEN: usize = 253;

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

/// Why a finalizer change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FinalizerError {
    /// The name is empty, too long or has spaces or control characters.
    #[error("finalizer `{0}` is not a valid name: {1}")]
    InvalidName(String, &'static str),
    /// A controller-owned finalizer was to be changed without `force`.
    #[error("finalizer `{0}` belongs to vmctl's controllers")]
    Protected(String),
    /// A finalizer to remove is not on the object.
    #[error("the object has no finalizer `{name}` (it has: {have})")]
    Absent {
        /// The finalizer asked for.
        name: String,
        /// The object's finalizers, comma-separated, or `none`.
        have: String,
    },
}

/// Whether `f` is owned by vmctl's controllers.
pub fn is_controller_owned(f: &str) -> bool {
    f.starts_with(CONTROLLER_PREFIX)
}

/// Checks a finalizer name: 1–253 printable ASCII characters without spaces.
pub fn check_name(f: &str) -> Result<(), FinalizerError> {
    let bad = |why| Err(FinalizerError::InvalidName(f.to_owned(), why));
    if f.is_empty() {
        return bad("it is empty");
    }
    if f.len() > MAX_LEN {
        return bad("it is longer than 253 bytes");
    }
    if !f.bytes().all(|b| b.is_ascii_graphic()) {
        return bad("only printable ASCII without spaces is allowed, e.g. `example.com/backup`");
    }
    Ok(())
}

/// The finalizers an apply leaves: the stored ones the controllers own,
/// plus the user finalizers the applied object lists; stored order kept,
/// new ones appended.
pub fn after_apply(current: &[String], applied: &[String]) -> Vec<String> {
    let wanted: Vec<&String> = applied.iter().filter(|f| !is_controller_owned(f)).collect();
    let mut out: Vec<String> = current
        .iter()
        .filter(|f| is_controller_owned(f) || wanted.contains(f))
        .cloned()
        .collect();
    for f in wanted {
        if !out.contains(f) {
            out.push(f.clone());
        }
    }
    out
}

/// The finalizers of a create: the user finalizers the object lists (the
/// controllers add their own).
pub fn on_create(applied: &[String]) -> Vec<String> {
    after_apply(&[], applied)
}

/// The finalizers after `patch`, or why it is refused.
pub fn after_patch(
    current: &[String],
    patch: &PatchRequest,
) -> Result<Vec<String>, FinalizerError> {
    for f in patch.add_finalizers.iter().chain(&patch.remove_finalizers) {
        check_name(f)?;
        if is_controller_owned(f) && !patch.force {
            return Err(FinalizerError::Protected(f.clone()));
        }
    }
    let mut out = current.to_vec();
    for f in &patch.remove_finalizers {
        let Some(i) = out.iter().position(|x| x == f) else {
            return Err(FinalizerError::Absent {
                name: f.clone(),
                have: if current.is_empty() {
                    "none".into()
                } else {
                    current.join(", ")
                },
            });
        };
        out.remove(i);
    }
    for f in &patch.add_finalizers {
        if !out.contains(f) {
            out.push(f.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn apply_sets_user_finalizers_and_keeps_the_controllers() {
        let cur = v(&["vmctl.dev/vm-teardown", "example.com/hold"]);
        assert_eq!(after_apply(&cur, &[]), v(&["vmctl.dev/vm-teardown"]));
        assert_eq!(
            after_apply(&cur, &v(&["example.com/hold", "b/c"])),
            v(&["vmctl.dev/vm-teardown", "example.com/hold", "b/c"])
        );
        // A file cannot add or drop a controller's finalizer.
        assert_eq!(after_apply(&[], &v(&["vmctl.dev/vm-teardown"])), v(&[]));
        assert_eq!(on_create(&v(&["vmctl.dev/x", "a/b"])), v(&["a/b"]));
    }

    #[test]
    fn patch_refuses_controller_finalizers_without_force_and_absent_ones() {
        let cur = v(&["vmctl.dev/vm-teardown", "example.com/hold"]);
        let rm = |f: &str, force| PatchRequest {
            remove_finalizers: v(&[f]),
            force,
            ..Default::default()
        };
        assert_eq!(
            after_patch(&cur, &rm("example.com/hold", false)).unwrap(),
            v(&["vmctl.dev/vm-teardown"])
        );
        assert!(matches!(
            after_patch(&cur, &rm("vmctl.dev/vm-teardown", false)),
            Err(FinalizerError::Protected(_))
        ));
        assert_eq!(
            after_patch(&cur, &rm("vmctl.dev/vm-teardown", true)).unwrap(),
            v(&["example.com/hold"])
        );
        assert!(matches!(
            after_patch(&cur, &rm("nope/x", false)),
            Err(FinalizerError::Absent { .. })
        ));
        assert!(matches!(
            after_patch(&cur, &rm("has space", false)),
            Err(FinalizerError::InvalidName(..))
        ));
    }
}
