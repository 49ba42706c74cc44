//! The one error type of the three reconcilers (Image, VirtualMachine,
//! Provision): they fail in the same three ways, so they share it.
//!
//! ```text
//!   Decode  the stored object does not match its kind's schema
//!   Store   reading or writing the store failed (a Conflict is retried
//!           at once by the runtime, see [`ReconcileError::is_conflict`])
//!   Driver  a driver operation on the object failed
//! ```

use vmctl_api::{Kind, ObjectRef};

use crate::drivers::DriverError;
use crate::runtime::ReconcileError;
use crate::runtime::controller::ControllerError;

/// Errors of a reconcile. Messages name the object (`vm/web`) and the
/// operation; the cause is the `#[source]`, printed once by the runtime's
/// log line as the whole chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object's spec or status does not match the schema of its kind.
    #[error("invalid {kind} object")]
    Decode {
        /// The kind the object should be.
        kind: Kind,
        /// What does not match.
        #[source]
        source: serde_json::Error,
    },
    /// Reading or writing the store failed.
    #[error("store access failed")]
    Store(#[source] ControllerError),
    /// A driver operation failed.
    #[error("cannot {op} {object}")]
    Driver {
        /// The operation, as a verb phrase (`start`, `fetch`,
        /// `connect over SSH to`).
        op: &'static str,
        /// The object it was for.
        object: ObjectRef,
        /// Why.
        #[source]
        source: DriverError,
    },
}

impl Error {
    /// For `map_err`: an object of `kind` that does not decode.
    pub fn decode(kind: Kind) -> impl FnOnce(serde_json::Error) -> Error {
        move |source| Error::Decode { kind, source }
    }

    /// For `map_err`: the driver operation `op` on `object` failed.
    pub fn driver(op: &'static str, object: &ObjectRef) -> impl FnOnce(DriverError) -> Error {
        let object = object.clone();
        move |source| Error::Driver { op, object, source }
    }
}

impl ReconcileError for Error {
    fn is_conflict(&self) -> bool {
        matches!(self, Error::Store(e) if e.is_conflict())
    }
}

impl From<ControllerError> for Error {
    fn from(e: ControllerError) -> Self {
        Error::Store(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_error_names_the_operation_and_the_object_once() {
        let r = ObjectRef::new(Kind::VirtualMachine, "web");
        let e = Error::driver("start", &r)(DriverError::Backend("qemu exited".into()));
        assert_eq!(e.to_string(), "cannot start vm/web");
        assert_eq!(
            vmctl_api::error_chain(&e),
            "cannot start vm/web: qemu exited"
        );
        assert!(!e.is_conflict());
    }

    #[test]
    fn only_a_store_conflict_is_a_conflict() {
        let conflict = ControllerError::Store(vmctl_store::StoreError::Conflict {
            object: ObjectRef::new(Kind::Image, "i"),
            expected: 1,
            actual: 2,
        });
        assert!(Error::from(conflict).is_conflict());
        let bad = serde_json::from_str::<u8>("x").unwrap_err();
        let e = Error::decode(Kind::Provision)(bad);
        assert_eq!(e.to_string(), "invalid Provision object");
        assert!(!e.is_conflict());
    }
}
