//! Writing to stdout, quietly ending on a closed pipe.

use std::io::Write;

/// Standard output could not be written.
///
/// Only this error ends a command quietly on a broken pipe: a broken pipe
/// of the agent's socket is a failure like any other, never a success.
#[derive(Debug, thiserror::Error)]
#[error("cannot write to standard output")]
pub struct StdoutError(#[source] pub std::io::Error);

impl miette::Diagnostic for StdoutError {}

/// Writes `text` to stdout.
pub fn print(text: &str) -> miette::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| miette::Report::new(StdoutError(e)))
}

/// Whether an error is a broken pipe of standard output (e.g. `vmctl
/// convert | head`), which ends the command quietly.
pub fn is_broken_pipe(report: &miette::Report) -> bool {
    report
        .downcast_ref::<StdoutError>()
        .is_some_and(|e| e.0.kind() == std::io::ErrorKind::BrokenPipe)
}
