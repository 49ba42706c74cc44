//! `vmctl apply -f FILE`.

use std::path::Path;
use std::process::ExitCode;

use vmctl_api::ApplySource;
use vmctl_api::wire::{ApplyOutcome, ApplyRequest, ApplyResponse};

use super::Globals;
use crate::cli::Output;
use crate::output::print;

/// Applies the file's resources through the agent.
pub fn run(
    g: &Globals,
    file: &Path,
    dry_run: bool,
    prune: bool,
    output: Output,
) -> miette::Result<ExitCode> {
    let loaded = match super::load_or_report(file)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let abs = if file == Path::new("-") {
        None
    } else {
        std::path::absolute(file).ok()
    };
    if prune && abs.is_none() {
        return Err(miette::miette!(
            code = "vmctl::apply::prune_needs_file",
            help = "apply from a file or directory to prune",
            "--prune needs a file: objects are pruned by the file they were applied from"
        ));
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let req = ApplyRequest {
        objects: loaded.resources.iter().map(|r| r.to_object()).collect(),
        source: Some(ApplySource {
            file: abs.map(|p| p.display().to_string()),
            applied_by: Some(format!("{user} via vmctl apply")),
        }),
        dry_run,
        prune,
    };
    let client = g.client()?;
    let resp: ApplyResponse = client.call("POST", "/v1/apply", Some(&req))?;
    match output {
        Output::Json => print(&format!(
            "{}\n",
            serde_json::to_string_pretty(&resp).expect("serialises")
        ))?,
        Output::Yaml => print(&serde_yaml::to_string(&resp).expect("serialises"))?,
        Output::Text => {
            let suffix = if dry_run { " (dry run)" } else { "" };
            let mut out = String::new();
            for r in &resp.results {
                let what = match r.outcome {
                    ApplyOutcome::Created => "created",
                    ApplyOutcome::Configured => "configured",
                    ApplyOutcome::Unchanged => "unchanged",
                    ApplyOutcome::Pruned => "pruned",
                };
                out.push_str(&format!("{} {what}{suffix}\n", r.object));
            }
            print(&out)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
