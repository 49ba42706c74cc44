//! `vmctl convert -f FILE -o yaml|json`.

use std::path::Path;
use std::process::ExitCode;

use vmctl_api::manifest::to_yaml;

use crate::cli::Output;
use crate::output::print;

/// Prints the resources the file becomes.
pub fn run(file: &Path, output: Output) -> miette::Result<ExitCode> {
    let loaded = match super::load_or_report(file)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    match output {
        Output::Json => {
            let s = serde_json::to_string_pretty(&loaded.resources).expect("resources serialise");
            print(&format!("{s}\n"))?;
        }
        Output::Yaml | Output::Text => print(&to_yaml(&loaded.resources))?,
    }
    Ok(ExitCode::SUCCESS)
}
