//! Crash-test helper: writes to a store from several threads and prints one
//! line per acknowledged write until it is killed.
//!
//! Usage: `store-crash-writer DIR THREADS`. Each line is
//! `ack SEQ KIND NAME CHANGE N`, written only after the store acknowledged
//! the write; the parent SIGKILLs this process and checks every line
//! against the reopened store.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vmctl_api::{Kind, Note, NoteType, Object, ObjectMeta, ObjectRef};
use vmctl_store::{Retention, SledStore};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: store-crash-writer DIR THREADS");
    let threads: usize = args.next().and_then(|t| t.parse().ok()).unwrap_or(4);
    let store = match SledStore::open(&dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("open failed: {e}");
            std::process::exit(2);
        }
    };
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = store.clone();
            let out = out.clone();
            std::thread::spawn(move || writer(&store, t, &out))
        })
        .collect();
    for h in handles {
        h.join().expect("writer thread panicked");
    }
}

fn writer(store: &SledStore, t: usize, out: &Mutex<std::io::Stdout>) {
    for n in 1u64.. {
        let name = format!("w{t}-{}", n % 8);
        let r = ObjectRef::new(Kind::VirtualMachine, name.clone());
        let (seq, change) = match n % 4 {
            0 | 1 => {
                let obj = Object::new(
                    Kind::VirtualMachine,
                    ObjectMeta::named(name.clone()),
                    serde_json::json!({ "n": n }),
                );
                (store.apply(obj, None, None).expect("apply").seq, "Applied")
            }
            2 => match store.update_status(&r, serde_json::json!({ "beat": n }), None) {
                Ok(w) => (w.seq, "StatusUpdated"),
                Err(vmctl_store::StoreError::NotFound(_)) => continue,
                Err(e) => panic!("status: {e}"),
            },
            _ => {
                let note = Note {
                    type_: NoteType::Normal,
                    reason: "Beat".into(),
                    message: format!("{n}"),
                    object: r.clone(),
                    source: None,
                };
                (Some(store.record_note(note).expect("note")), "Noted")
            }
        };
        if let Some(seq) = seq {
            let mut o = out.lock().unwrap();
            writeln!(
                o,
                "ack {seq} {} {name} {change} {n}",
                Kind::VirtualMachine.as_str()
            )
            .unwrap();
            o.flush().unwrap();
        }
        if t == 0 && n % 500 == 0 {
            let r = Retention {
                window: 100,
                status_per_object: 1,
                notes_per_object: 2,
                forget_deleted: false,
            };
            store.compact(&r).expect("compact");
        }
    }
}
