//! `vmctl events`.

use std::process::ExitCode;

use super::describe::NoteIn;
use super::{Globals, age, table};
use crate::cli::Output;
use crate::output::print;

/// Prints every note, oldest first.
pub fn run(g: &Globals, output: Output) -> miette::Result<ExitCode> {
    let client = g.client()?;
    let raw: Vec<serde_json::Value> = client.call("GET", "/v1/notes", None::<&()>)?;
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
            if notes.is_empty() {
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
            print(&table(&rows))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
