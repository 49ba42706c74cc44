//! Diagnostics carrying the help of the code registry
//! ([`vmctl_api::codes`]) unless a more specific help is given.

/// An error with `code` and the registry's help for it.
pub fn error(code: &'static str, message: impl std::fmt::Display) -> miette::Report {
    let mut d = miette::MietteDiagnostic::new(message.to_string()).with_code(code);
    if let Some(h) = vmctl_api::codes::help(code) {
        d = d.with_help(h);
    }
    miette::Report::new(d)
}

/// An error with `code` and a specific help line.
pub fn error_help(
    code: &'static str,
    help: impl std::fmt::Display,
    message: impl std::fmt::Display,
) -> miette::Report {
    miette::Report::new(
        miette::MietteDiagnostic::new(message.to_string())
            .with_code(code)
            .with_help(help.to_string()),
    )
}

/// The error for a missing object of `kind`: `vmctl::vm::not_found` for
/// VMs, `vmctl::image::not_found` for images, `vmctl::provision::not_found`
/// for provisions.
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
    }
}
