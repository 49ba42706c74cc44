//! Diagnostics carrying the help of the code registry
//! ([`vmctl_api::codes`]) unless a more specific help is given.

pub use vmctl_api::diag::{error, error_help};

/// The error for a missing object of `kind`: `vmctl::vm::not_found` for
/// VMs, `vmctl::image::not_found` for images, `vmctl::provision::not_found`
/// for provisions, `vmctl::snapshot::not_found` for snapshots,
/// `vmctl::node::not_found` for nodes.
pub fn not_found(kind: vmctl_api::Kind, name: &str) -> miette::Report {
    match kind {
        vmctl_api::Kind::VirtualMachine => {
            error("vmctl::vm::not_found", format!("VM {name} not found"))
        }
        vmctl_api::Kind::Image => {
            error("vmctl::image::not_found", format!("image {name} not found"))
        }
        vmctl_api::Kind::Provision => error(
            "vmctl::provision::not_found",
            format!("VM {name} has no provisioners (no provision/{name})"),
        ),
        vmctl_api::Kind::Snapshot => error(
            "vmctl::snapshot::not_found",
            format!("snapshot {name} not found"),
        ),
        vmctl_api::Kind::Node => error("vmctl::node::not_found", format!("node {name} not found")),
    }
}
