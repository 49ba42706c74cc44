//! Opening a store costs what its objects cost, not what its history does:
//! the view is checked against a checkpoint written with every commit, and
//! the whole log is replayed only when that check fails.

use vmctl_api::{Kind, Object, ObjectMeta, ObjectRef};
use vmctl_store::{Durability, Options, SledStore};

fn fast() -> Options {
    Options {
        durability: Durability::None,
        ..Options::default()
    }
}

fn vm_ref(name: &str) -> ObjectRef {
    ObjectRef::new(Kind::VirtualMachine, name)
}

/// A store with `objects` VMs and `updates` status updates each.
fn churned(dir: &tempfile::TempDir, objects: usize, updates: u64) -> SledStore {
    let s = SledStore::open_with(dir.path().join("db"), fast()).unwrap();
    for o in 0..objects {
        let name = format!("vm-{o}");
        s.apply(
            Object::new(
                Kind::VirtualMachine,
                ObjectMeta::named(&name),
                serde_json::json!({ "cpus": 1 }),
            ),
            None,
            None,
        )
        .unwrap();
    }
    for n in 0..updates {
        for o in 0..objects {
            s.update_status(
                &vm_ref(&format!("vm-{o}")),
                serde_json::json!({ "n": n }),
                None,
            )
            .unwrap();
        }
    }
    s
}

fn reopen(dir: &tempfile::TempDir, full_check: bool) -> SledStore {
    SledStore::open_with(
        dir.path().join("db"),
        Options {
            full_check,
            ..fast()
        },
    )
    .unwrap()
}

/// Changes the database behind the store's back, as damage would.
fn tamper(dir: &tempfile::TempDir, f: impl FnOnce(&sled::Db)) {
    let db = sled::open(dir.path().join("db")).unwrap();
    f(&db);
    db.flush().unwrap();
}

#[test]
fn opening_a_long_history_replays_none_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let before = churned(&dir, 3, 1_000).objects().unwrap();
    let s = reopen(&dir, false);
    assert_eq!(s.open_report().replayed, 0, "open replayed the log");
    assert_eq!(s.open_report().objects, 3);
    assert!(!s.open_report().repaired);
    assert_eq!(s.objects().unwrap(), before);
    drop(s);
    // The full check (what every open did before) reads all 3,003 events.
    let s = reopen(&dir, true);
    assert_eq!(s.open_report().replayed, 3_003);
    assert!(!s.open_report().repaired);
}

#[test]
fn a_view_that_disagrees_with_its_checkpoint_is_rebuilt_from_the_log() {
    type Damage = fn(&sled::Db);
    let damages: [(&str, Damage); 4] = [
        ("an object removed", |db| {
            db.open_tree("objects")
                .unwrap()
                .remove("VirtualMachine/vm-1")
                .unwrap();
        }),
        ("a status rolled back", |db| {
            let objects = db.open_tree("objects").unwrap();
            let v = objects.get("VirtualMachine/vm-0").unwrap().unwrap();
            let text = String::from_utf8(v.to_vec()).unwrap();
            let old = text.replace(r#""status":{"n":49}"#, r#""status":{"n":3}"#);
            assert_ne!(text, old);
            objects
                .insert("VirtualMachine/vm-0", old.as_bytes())
                .unwrap();
        }),
        ("an index entry lost", |db| {
            let index = db.open_tree("index").unwrap();
            let last = index.last().unwrap().unwrap().0;
            index.remove(last).unwrap();
        }),
        ("an unreadable object", |db| {
            db.open_tree("objects")
                .unwrap()
                .insert("VirtualMachine/vm-2", "{garbage")
                .unwrap();
        }),
    ];
    for (what, damage) in damages {
        let dir = tempfile::tempdir().unwrap();
        let good = churned(&dir, 3, 50).objects().unwrap();
        tamper(&dir, damage);
        let s = reopen(&dir, false);
        assert!(s.open_report().repaired, "{what}: not repaired");
        assert_eq!(s.open_report().replayed, 153, "{what}");
        assert_eq!(s.objects().unwrap(), good, "{what}");
        s.verify().unwrap();
        drop(s);
        let s = reopen(&dir, false);
        assert_eq!(
            s.open_report().replayed,
            0,
            "{what}: no checkpoint after the repair"
        );
    }
}

#[test]
fn a_store_without_a_checkpoint_is_replayed_once_then_opens_from_it() {
    let dir = tempfile::tempdir().unwrap();
    drop(churned(&dir, 2, 10));
    // As written by a build before checkpoints.
    tamper(&dir, |db| {
        let meta = db.open_tree("meta").unwrap();
        meta.remove("view_seq").unwrap();
        meta.remove("object_count").unwrap();
    });
    let s = reopen(&dir, false);
    assert_eq!(s.open_report().replayed, 22);
    assert!(!s.open_report().repaired);
    drop(s);
    let s = reopen(&dir, false);
    assert_eq!(s.open_report().replayed, 0);
    assert_eq!(s.open_report().objects, 2);
}
