//! `vmctl validate -f FILE`.

use std::path::Path;
use std::process::ExitCode;

use serde::Serialize;
use vmctl_api::diag::{FileDiagnostics, Severity};
use vmctl_api::load::{LoadError, load};

use crate::cli::Output;
use crate::output::print;

/// One problem as `-o json` reports it.
#[derive(Debug, Serialize)]
struct JsonProblem {
    file: String,
    severity: &'static str,
    code: &'static str,
    message: String,
    help: Option<String>,
    line: usize,
    column: usize,
    offset: usize,
    length: usize,
}

/// The result as `-o json` reports it.
#[derive(Debug, Serialize)]
struct JsonResult {
    valid: bool,
    objects: Vec<String>,
    problems: Vec<JsonProblem>,
    /// Problems found but not listed (each file keeps at most
    /// `vmctl_api::limits::MAX_PROBLEMS`).
    #[serde(skip_serializing_if = "is_zero")]
    omitted: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn omitted(diags: &[FileDiagnostics]) -> usize {
    diags.iter().map(FileDiagnostics::omitted).sum()
}

fn problems_json(diags: &[FileDiagnostics]) -> Vec<JsonProblem> {
    let mut out = Vec::new();
    for d in diags {
        for p in &d.problems {
            let (line, column) = d.line_col(p.span.offset());
            out.push(JsonProblem {
                file: d.file.clone(),
                severity: match p.severity {
                    Severity::Error => "error",
                    Severity::Warning => "warning",
                },
                code: p.code,
                message: p.message.clone(),
                help: p.help.clone(),
                line,
                column,
                offset: p.span.offset(),
                length: p.span.len(),
            });
        }
    }
    out
}

/// Validates the file; exit 1 with diagnostics when it has errors.
pub fn run(file: &Path, output: Output) -> miette::Result<ExitCode> {
    let result = load(file);
    if output == Output::Json {
        let res = match &result {
            Ok(l) => JsonResult {
                valid: true,
                objects: l
                    .resources
                    .iter()
                    .map(|r| format!("{}/{}", r.kind().short(), r.name()))
                    .collect(),
                problems: problems_json(&l.warnings),
                omitted: omitted(&l.warnings),
            },
            Err(LoadError::Invalid(d)) => JsonResult {
                valid: false,
                objects: vec![],
                problems: problems_json(d),
                omitted: omitted(d),
            },
            Err(_) => return result.map(|_| ExitCode::FAILURE).map_err(Into::into),
        };
        print(&format!(
            "{}\n",
            serde_json::to_string_pretty(&res).expect("JSON serialises")
        ))?;
        return Ok(if res.valid {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let loaded = match super::report(result)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let count = |k: vmctl_api::Kind| loaded.resources.iter().filter(|r| r.kind() == k).count();
    let plural = |n: usize, w: &str| {
        if n == 1 {
            format!("{n} {w}")
        } else {
            format!("{n} {w}s")
        }
    };
    print(&format!(
        "{} is valid: {}, {}, {}\n",
        file.display(),
        plural(count(vmctl_api::Kind::VirtualMachine), "VirtualMachine"),
        plural(count(vmctl_api::Kind::Image), "Image"),
        plural(count(vmctl_api::Kind::Provision), "Provision"),
    ))?;
    Ok(ExitCode::SUCCESS)
}
