//! Finalizers that users set, beside those vmctl's controllers own.
//!
//! Finalizers under [`CONTROLLER_PREFIX`] (`vmctl.dev/vm-teardown`,
//! `vmctl.dev/image-cache`) belong to the controllers: an apply never
//! removes them and adds only the one its kind is created with
//! ([`at_create`]: a new VirtualMachine has `vmctl.dev/vm-teardown`), and
//! `PATCH` changes them only with `force`. Every other
//! finalizer is the user's: an apply sets them to what the applied object
//! lists (like labels, the file is the truth; a file without finalizers
//! clears them), and `PATCH` (`vmctl patch`) adds or removes them one by
//! one. Pure functions: the API layer reads, plans here, then writes with
//! the resourceVersion it read.

use vmctl_api::Kind;

/// Prefix of the finalizers vmctl's controllers own.
pub const CONTROLLER_PREFIX: &str = "vmctl.dev/";

/// Longest accepted finalizer name, in bytes (a Kubernetes qualified name).
const MAX_LEN: usize = 253;

pub use vmctl_api::wire::PatchRequest;

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

/// The finalizers of a create of a `kind` object: the controller's own
/// finalizer of the kind, if it has one ([`at_create`]), then the user
/// finalizers the object lists.
///
/// A VirtualMachine is created with `vmctl.dev/vm-teardown` (as
/// Kubernetes' `StorageObjectInUseProtection` admission creates every
/// PersistentVolumeClaim with `kubernetes.io/pvc-protection`): the VM
/// controller would add it before creating anything on the host anyway,
/// and that was a write of its own per VM, before the first start (the
/// controller still adds it to a VM without it).
pub fn on_create(kind: Kind, applied: &[String]) -> Vec<String> {
    let mut out: Vec<String> = at_create(kind).iter().map(|f| (*f).to_owned()).collect();
    out.extend(after_apply(&[], applied));
    out
}

/// The controller finalizers an object of `kind` is created with: the VM
/// controller's for a VirtualMachine. An Image's (`vmctl.dev/image-cache`)
/// is added by its controller once it keeps a cached file, one write per
/// image rather than per VM.
pub fn at_create(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::VirtualMachine => &[vmctl_controllers::vm::FINALIZER],
        _ => &[],
    }
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
        assert_eq!(
            on_create(Kind::Image, &v(&["vmctl.dev/x", "a/b"])),
            v(&["a/b"])
        );
    }

    #[test]
    fn a_virtual_machine_is_created_with_its_teardown_finalizer() {
        assert_eq!(
            on_create(Kind::VirtualMachine, &v(&["vmctl.dev/x", "a/b"])),
            v(&["vmctl.dev/vm-teardown", "a/b"])
        );
        assert_eq!(
            on_create(Kind::VirtualMachine, &v(&["vmctl.dev/vm-teardown"])),
            v(&["vmctl.dev/vm-teardown"])
        );
        assert!(at_create(Kind::Provision).is_empty());
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
