//! Writing to stdout, quietly ending on a closed pipe.

use std::io::Write;

/// Writes `text` to stdout.
pub fn print(text: &str) -> miette::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| miette::miette!(e))
}

/// Whether an error is a broken pipe (e.g. `vmctl convert | head`), which
/// ends the command quietly.
pub fn is_broken_pipe(report: &miette::Report) -> bool {
    report.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    }) || report.to_string().contains("Broken pipe")
}
