//! `vmctl history KIND NAME`.

use std::process::ExitCode;

use super::{Globals, kind_arg, name_arg_of, table};
use crate::cli::Output;
use crate::output::print;

/// Prints every recorded change of one object, oldest first.
pub fn run(g: &Globals, kind: &str, name: &str, output: Output) -> miette::Result<ExitCode> {
    let kind = kind_arg(kind)?;
    name_arg_of(kind, name)?;
    let client = g.client()?;
    let events = client.history(kind, name)?;
    if events.is_empty() {
        // Never recorded: no such object (a deleted one keeps its history).
        super::objects::get_object(&client, kind, name)?;
    }
    match output {
        Output::Json => print(&format!(
            "{}\n",
            serde_json::to_string_pretty(&events).expect("serialises")
        ))?,
        Output::Yaml => print(&serde_yaml::to_string(&events).expect("serialises"))?,
        Output::Text => {
            let mut rows = vec![vec![
                "SEQ".into(),
                "TIME".into(),
                "CHANGE".into(),
                "DETAIL".into(),
            ]];
            for e in &events {
                let change = &e["change"];
                let ty = change["type"].as_str().unwrap_or("?");
                let detail = match ty {
                    "applied" => {
                        let o = &change["object"]["metadata"];
                        let src = &o["source"];
                        format!(
                            "{} generation {} from {} by {}",
                            if change["created"].as_bool() == Some(true) {
                                "created,"
                            } else {
                                "spec changed,"
                            },
                            o["generation"].as_u64().unwrap_or(0),
                            src["file"].as_str().unwrap_or("-"),
                            src["appliedBy"].as_str().unwrap_or("-"),
                        )
                    }
                    // A Node has no phase: its Ready condition.
                    "statusUpdated" if kind == vmctl_api::Kind::Node => {
                        let ready = change["status"]["conditions"]
                            .as_array()
                            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"));
                        match ready {
                            Some(c) => format!(
                                "Ready {} ({})",
                                c["status"].as_str().unwrap_or("-"),
                                c["reason"].as_str().unwrap_or("-")
                            ),
                            None => "Ready -".into(),
                        }
                    }
                    "statusUpdated" => format!(
                        "phase {}",
                        change["status"]["phase"].as_str().unwrap_or("-")
                    ),
                    "noted" => format!(
                        "{}: {}",
                        change["note"]["reason"].as_str().unwrap_or(""),
                        change["note"]["message"].as_str().unwrap_or("")
                    ),
                    "finalizersSet" => format!("finalizers {}", change["finalizers"]),
                    _ => String::new(),
                };
                rows.push(vec![
                    e["seq"].to_string(),
                    e["time"].as_str().unwrap_or("").to_owned(),
                    ty.to_owned(),
                    detail,
                ]);
            }
            print(&table(&rows))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
