//! `vmctl schema [KIND]`.

use std::process::ExitCode;

use vmctl_api::Kind;
use vmctl_api::schema::schema_json;

use crate::output::print;

/// Prints one kind's schema, or an object of every kind's schema.
pub fn run(kind: Option<&str>) -> miette::Result<ExitCode> {
    match kind {
        Some(k) => {
            let kind = Kind::parse(k).ok_or_else(|| {
                miette::miette!(
                    code = "vmctl::schema::unknown_kind",
                    help = "kinds are VirtualMachine (vm), Image (image), Provision (provision), Snapshot (snapshot) and Node (node)",
                    "unknown kind `{k}`"
                )
            })?;
            print(&schema_json(kind))?;
        }
        None => {
            let mut all = serde_json::Map::new();
            for k in Kind::ALL {
                let v: serde_json::Value =
                    serde_json::from_str(&schema_json(k)).expect("schemas are JSON");
                all.insert(k.as_str().to_owned(), v);
            }
            print(&format!(
                "{}\n",
                serde_json::to_string_pretty(&all).expect("JSON serialises")
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
