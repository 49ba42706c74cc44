//! The `vmctl` command line: argument parsing, one module per command,
//! output formatting. Data goes to stdout; messages and diagnostics to
//! stderr.

pub mod cli;
pub mod client;
pub mod commands;
pub mod contexts;
pub mod diag;
pub mod output;

use std::process::ExitCode;

use clap::Parser;

/// Parses the command line, runs the command and maps the result to an exit code.
pub fn run() -> ExitCode {
    let cli = cli::Cli::parse();
    vmctl_api::diag::set_report_hook();
    match commands::dispatch(cli) {
        Ok(code) => code,
        Err(report) => {
            if output::is_broken_pipe(&report) {
                return ExitCode::SUCCESS;
            }
            eprintln!("{report:?}");
            ExitCode::FAILURE
        }
    }
}
