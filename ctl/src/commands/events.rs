//! `vmctl events`, and the aggregation of repeated notes that `describe`
//! shares.
//!
//! Listings show each distinct note once, as `kubectl` shows events: notes
//! about the same object with the same type, reason and message are one
//! row with a `count` and the first and last time they were recorded. The
//! store keeps every note; aggregation happens here, when they are read.

use std::collections::HashMap;
use std::process::ExitCode;

use super::{Globals, age, table};
use crate::cli::Output;
use crate::client::WatchItem;
use crate::output::print;

pub(crate) use crate::client::NoteIn;

/// Identical notes (same object, type, reason and message) folded into one,
/// as a Kubernetes Event with `count`; this is what `events -o json|yaml`
/// prints.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AggregatedNote {
    /// The sequence number of the last occurrence (watch from here).
    pub seq: u64,
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: String,
    /// CamelCase reason.
    pub reason: String,
    /// The sentence.
    pub message: String,
    /// The object it is about.
    pub object: vmctl_api::ObjectRef,
    /// The component that recorded the last occurrence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// How many times it was recorded (at least 1).
    pub count: u64,
    /// When it was first recorded.
    pub first_timestamp: vmctl_api::Time,
    /// When it was last recorded.
    pub last_timestamp: vmctl_api::Time,
}

impl AggregatedNote {
    /// kubectl's age cell: `5m`, or `2m (x5 over 10m)` for a repeated note.
    pub(crate) fn seen(&self) -> String {
        if self.count > 1 {
            format!(
                "{} (x{} over {})",
                age(Some(self.last_timestamp)),
                self.count,
                age(Some(self.first_timestamp))
            )
        } else {
            age(Some(self.last_timestamp))
        }
    }
}

/// Folds identical notes (same object, type, reason and message, wherever
/// they fall in the stream) into one each, ordered by when they were last
/// recorded, oldest first. `notes` may come in any order.
pub(crate) fn aggregate(mut notes: Vec<NoteIn>) -> Vec<AggregatedNote> {
    notes.sort_by_key(|n| n.seq);
    let mut out: Vec<AggregatedNote> = Vec::new();
    let mut index: HashMap<(vmctl_api::ObjectRef, String, String, String), usize> = HashMap::new();
    for n in notes {
        let key = (
            n.object.clone(),
            n.type_.clone(),
            n.reason.clone(),
            n.message.clone(),
        );
        match index.get(&key) {
            Some(&i) => {
                let a = &mut out[i];
                a.count += 1;
                a.seq = n.seq;
                a.last_timestamp = n.time;
                if n.source.is_some() {
                    a.source = n.source;
                }
            }
            None => {
                index.insert(key, out.len());
                out.push(AggregatedNote {
                    seq: n.seq,
                    type_: n.type_,
                    reason: n.reason,
                    message: n.message,
                    object: n.object,
                    source: n.source,
                    count: 1,
                    first_timestamp: n.time,
                    last_timestamp: n.time,
                });
            }
        }
    }
    out.sort_by_key(|a| a.seq);
    out
}

/// Prints every distinct note, least recently seen first; with `watch`,
/// then each new note once as it is recorded.
pub fn run(g: &Globals, output: Output, watch: bool) -> miette::Result<ExitCode> {
    let client = g.client()?;
    let notes = client.notes(None)?;
    let after = notes.iter().map(|n| n.seq).max().unwrap_or(0);
    let notes = aggregate(notes);
    match output {
        Output::Json => print(&format!(
            "{}\n",
            serde_json::to_string_pretty(&notes).expect("serialises")
        ))?,
        Output::Yaml => print(&serde_yaml::to_string(&notes).expect("serialises"))?,
        Output::Text => {
            if notes.is_empty() && !watch {
                eprintln!("No events.");
                return Ok(ExitCode::SUCCESS);
            }
            let mut rows = vec![vec![
                "LAST SEEN".into(),
                "TYPE".into(),
                "REASON".into(),
                "OBJECT".into(),
                "MESSAGE".into(),
            ]];
            for n in &notes {
                rows.push(vec![
                    n.seen(),
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
        // Each new note once, as recorded: aggregation is for listings.
        let mut w = client.watch(after)?;
        while let Some(item) = w.next_item()? {
            let WatchItem::Event(ev) = item else {
                break;
            };
            if ev.change_type() != "noted" {
                continue;
            }
            let n = &ev.change["note"];
            let text = match output {
                Output::Text => format!(
                    "{}   {}   {}   {}/{}   {}\n",
                    ev.time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
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
            print(&text)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmctl_api::{Kind, ObjectRef};

    fn note(seq: u64, secs: i64, obj: &str, reason: &str, message: &str) -> NoteIn {
        NoteIn {
            seq,
            time: chrono::DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap(),
            type_: "Normal".into(),
            reason: reason.into(),
            message: message.into(),
            object: ObjectRef::new(Kind::VirtualMachine, obj.to_owned()),
            source: Some("vm-controller".into()),
        }
    }

    #[test]
    fn repeated_identical_notes_are_one_row_with_count_and_first_and_last_time() {
        let notes = vec![
            note(1, 0, "web", "Suspended", "Suspended VM web"),
            note(2, 10, "web", "Resumed", "Resumed VM web"),
            note(3, 20, "web", "Suspended", "Suspended VM web"),
            note(4, 30, "db", "Suspended", "Suspended VM web"),
            note(5, 40, "web", "Resumed", "Resumed VM web"),
            note(6, 50, "web", "Suspended", "Suspended VM web"),
            note(7, 60, "web", "Suspended", "Suspended VM web, again"),
        ];
        let a = aggregate(notes);
        let rows: Vec<(&str, &str, u64, u64)> = a
            .iter()
            .map(|n| (n.object.name.as_str(), n.message.as_str(), n.count, n.seq))
            .collect();
        // Ordered by last occurrence; a different object or message is a different row.
        assert_eq!(
            rows,
            [
                ("db", "Suspended VM web", 1, 4),
                ("web", "Resumed VM web", 2, 5),
                ("web", "Suspended VM web", 3, 6),
                ("web", "Suspended VM web, again", 1, 7),
            ]
        );
        let s = &a[2];
        assert_eq!(s.first_timestamp.timestamp(), 1_700_000_000);
        assert_eq!(s.last_timestamp.timestamp(), 1_700_000_050);
        assert!(s.seen().contains("(x3 over "), "{}", s.seen());
        assert!(!a[0].seen().contains('x'), "{}", a[0].seen());
    }

    #[test]
    fn notes_differing_only_in_type_are_not_merged() {
        let mut w = note(2, 1, "web", "Started", "Started VM web");
        w.type_ = "Warning".into();
        let a = aggregate(vec![w, note(1, 0, "web", "Started", "Started VM web")]);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].type_, "Normal", "sorted by seq, not input order");
    }
}
