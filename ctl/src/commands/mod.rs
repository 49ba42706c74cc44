//! One module per command.

mod convert;
mod schema;
mod validate;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

/// Runs the command.
pub fn dispatch(cli: Cli) -> miette::Result<ExitCode> {
    match cli.command {
        Command::Validate { file, output } => validate::run(&file, output),
        Command::Convert { file, output } => convert::run(&file, output),
        Command::Schema { kind } => schema::run(kind.as_deref()),
    }
}

/// Prints accepted files' warnings to stderr.
pub(crate) fn print_warnings(warnings: &[vmctl_api::diag::FileDiagnostics]) {
    for w in warnings {
        eprintln!("{:?}", miette::Report::new(w.clone()));
    }
}

/// Loads resources; on invalid files prints every file's diagnostics and
/// returns the exit code to end with.
pub(crate) fn load_or_report(
    file: &std::path::Path,
) -> miette::Result<Result<vmctl_api::load::Loaded, ExitCode>> {
    report(vmctl_api::load::load(file))
}

/// Prints warnings of a load, or every file's diagnostics when it failed.
pub(crate) fn report(
    result: Result<vmctl_api::load::Loaded, vmctl_api::load::LoadError>,
) -> miette::Result<Result<vmctl_api::load::Loaded, ExitCode>> {
    match result {
        Ok(l) => {
            print_warnings(&l.warnings);
            Ok(Ok(l))
        }
        Err(vmctl_api::load::LoadError::Invalid(diags)) => {
            for d in diags {
                eprintln!("{:?}", miette::Report::new(d));
            }
            Ok(Err(ExitCode::FAILURE))
        }
        Err(e) => Err(e.into()),
    }
}
