//! The store on a full filesystem (a real, small tmpfs): writes fail with
//! "no space left", nothing that failed is ever shown, and writes work again
//! once space is freed, without reopening the store.
//!
//! Mounting needs root (as in CI); elsewhere the test says so and passes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmctl_api::{Kind, Object, ObjectMeta, ObjectRef};
use vmctl_store::{Durability, Options, SledStore, StoreError};

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (with a message) when not root.
    fn mount(size: &str) -> Option<Tmpfs> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned));
        if euid.as_deref() != Some("0") {
            eprintln!("SKIPPED: mounting a tmpfs needs root (CI runs this test as root)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs failed");
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the filesystem is full; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0xa5u8; 64 << 10];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // Whatever fits in the last partial page.
        while f.write(&[0xa5]).is_ok_and(|n| n == 1) {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: sled may still hold files there for a moment.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn vm(name: &str, pad: usize) -> Object {
    Object::new(
        Kind::VirtualMachine,
        ObjectMeta::named(name),
        serde_json::json!({ "pad": "x".repeat(pad) }),
    )
}

fn vm_ref(name: &str) -> ObjectRef {
    ObjectRef::new(Kind::VirtualMachine, name)
}

#[test]
fn full_disk_fails_writes_with_no_space_shows_no_phantom_and_recovers_without_restart() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let db = fs.path().join("db");
    let opts = Options {
        durability: Durability::Fsync,
        ..Options::default()
    };
    let s = SledStore::open_with(&db, opts.clone()).unwrap();
    let mut acked = Vec::new();
    for i in 0..20 {
        let name = format!("before-{i}");
        s.apply(vm(&name, 200), None, None).unwrap();
        acked.push(name);
    }
    let filler = fs.fill();

    // Writes now fail, each with a clear error naming the store's path.
    let mut failed = Vec::new();
    for i in 0..50 {
        let name = format!("during-{i}");
        match s.apply(vm(&name, 4000), None, None) {
            Ok(_) => acked.push(name),
            Err(e) => {
                assert!(
                    matches!(&e, StoreError::NoSpace { path } if *path == db),
                    "expected no space on {}, got: {}",
                    db.display(),
                    vmctl_api::error_chain(&e)
                );
                assert_eq!(e.to_string(), format!("no space left on {}", db.display()));
                failed.push(name);
            }
        }
    }
    assert!(
        failed.len() >= 40,
        "a full filesystem let {} of 50 writes through",
        50 - failed.len()
    );

    // Nothing that failed is shown, by get or list (an error is fine:
    // sled may not reopen while the disk is full).
    for name in &failed {
        match s.get(&vm_ref(name)) {
            Ok(None) | Err(StoreError::NoSpace { .. }) => {}
            Ok(Some(_)) => panic!("{name}: its write failed but get shows it (a phantom)"),
            Err(e) => panic!("{name}: unexpected error {}", vmctl_api::error_chain(&e)),
        }
    }
    if let Ok(l) = s.list(None) {
        let shown: Vec<_> = l
            .objects
            .iter()
            .map(|o| o.metadata.name.clone())
            .filter(|n| failed.contains(n))
            .collect();
        assert!(shown.is_empty(), "list shows failed writes: {shown:?}");
    }
    let seq_full = s.last_seq();

    // Free the space: the same store (no restart) takes writes again.
    std::fs::remove_file(filler).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100)); // reopen back-off
    let w = s
        .apply(vm("after", 200), None, None)
        .unwrap_or_else(|e| panic!("write after freeing space: {}", vmctl_api::error_chain(&e)));
    assert_eq!(
        w.seq,
        Some(seq_full + 1),
        "sequences continue without a gap"
    );
    acked.push("after".into());
    let names = |s: &SledStore| {
        let mut n: Vec<String> = s
            .list(None)
            .unwrap()
            .objects
            .into_iter()
            .map(|o| o.metadata.name)
            .collect();
        n.sort();
        n
    };
    acked.sort();
    assert_eq!(
        names(&s),
        acked,
        "exactly the acknowledged writes are shown"
    );
    for name in &failed {
        assert_eq!(s.get(&vm_ref(name)).unwrap(), None, "{name}");
    }
    s.verify().unwrap();

    // A restart shows the same: nothing appears or disappears.
    drop(s);
    let s = SledStore::open_with(&db, opts).unwrap();
    assert_eq!(names(&s), acked, "after a restart");
    s.verify().unwrap();
}
