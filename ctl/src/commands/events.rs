//! `vmctl events`.

use std::process::ExitCode;

use super::describe::NoteIn;
use super::{Globals, age, table};
use crate::cli::Output;
use crate::output::print;

/// Prints every note, oldest first.
pub fn run(g: &Globals, output: Output, watch: bool) -> miette::Result<ExitCode> {
    let client = g.client()?;
    let raw: Vec<serde_json::Value> = client.call("GET", "/v1/notes", None::<&()>)?;
    let after = raw
        .iter()
        .filter_map(|n| n["seq"].as_u64())
        .max()
        .unwrap_or(0);
    match output {
        Output::Json => print(&format!(
            "{}\n",
            serde_json::to_string_pretty(&raw).expect("serialises")
        ))?,
        Output::Yaml => print(&serde_yaml::to_string(&raw).expect("serialises"))?,
        Output::Text => {
            let notes: Vec<NoteIn> = raw
                .into_iter()
                .filter_map(|v| serde_json::from_value(v).ok())
                .collect();
            if notes.is_empty() && !watch {
                eprintln!("No events.");
                return Ok(ExitCode::SUCCESS);
            }
            let mut rows = vec![vec![
                "AGE".into(),
                "TYPE".into(),
                "REASON".into(),
                "OBJECT".into(),
                "MESSAGE".into(),
            ]];
            for n in &notes {
                let _ = n.seq;
                rows.push(vec![
                    age(Some(n.time)),
                    n.type_.clone(),
                    n.reason.clone(),
                    n.object.to_string(),
                    n.message.clone(),
                ]);
            }
            if rows.len() > 1 {
                print(&table(&rows))?;
            }
        }
    }
    if watch {
        let resp = client.send("GET", &format!("/v1/watch?after={after}"), None)?;
        resp.lines(|line| {
            let Ok(ev) = serde_json::from_slice::<serde_json::Value>(line) else {
                return true;
            };
            if ev["change"]["type"] != "noted" {
                return ev["type"] != "resync";
            }
            let n = &ev["change"]["note"];
            let text = match output {
                Output::Text => format!(
                    "{}   {}   {}   {}/{}   {}\n",
                    ev["time"].as_str().unwrap_or(""),
                    n["type"].as_str().unwrap_or(""),
                    n["reason"].as_str().unwrap_or(""),
                    n["object"]["kind"]
                        .as_str()
                        .and_then(vmctl_api::Kind::parse)
                        .map_or("?", |k| k.short()),
                    n["object"]["name"].as_str().unwrap_or(""),
                    n["message"].as_str().unwrap_or(""),
                ),
                _ => format!("{}\n", serde_json::to_string(&ev).unwrap_or_default()),
            };
            print(&text).is_ok()
        })?;
    }
    Ok(ExitCode::SUCCESS)
}
