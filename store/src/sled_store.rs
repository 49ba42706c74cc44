//! The sled implementation of [`Store`]: opening, checking, writing, reading.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmctl_api::{ApplySource, Kind, Note, Object, ObjectRef, Time};

use crate::commit::Committer;
use crate::compact::{self, CompactReport, Retention};
use crate::error::{Result, StoreError};
use crate::event::{self, Change, Event};
use crate::plan::{self, Outcome, Plan};
use crate::watch::Watch;
use crate::{Listing, RecordedNote, Store, Written, fold};

/// The newest database layout this build reads and the one it writes.
pub const SCHEMA_VERSION: u32 = 1;

const META_SCHEMA: &[u8] = b"schema_version";
pub(crate) const META_LAST_SEQ: &[u8] = b"last_seq";
pub(crate) const META_FLOOR: &[u8] = b"compaction_floor";

/// What "on disk" means before a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// sled's flush, then `fdatasync` of the database file. sled 0.34 on
    /// Linux flushes with `sync_file_range`, which neither flushes the
    /// drive's write cache nor the file's size: survives a killed process,
    /// not a power cut. This adds the real sync. The default.
    Fsync,
    /// sled's flush only: survives a killed process, maybe not a power cut.
    SledFlush,
    /// No flush at all: for tests.
    None,
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct Options {
    /// What to wait for before acknowledging a write.
    pub durability: Durability,
    /// Events buffered per live watcher before it falls back to reading the log.
    pub watch_buffer: usize,
    /// sled's page cache, in bytes.
    pub cache_capacity: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            durability: Durability::Fsync,
            watch_buffer: 1024,
            cache_capacity: 64 << 20,
        }
    }
}

/// What opening found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Events in the log.
    pub events: u64,
    /// Objects after the check.
    pub objects: u64,
    /// The objects tree or index differed from the log and was rebuilt.
    pub repaired: bool,
}

/// What a rebuild did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildReport {
    /// Events replayed.
    pub events: u64,
    /// Objects in the rebuilt tree.
    pub objects: u64,
    /// Whether the rebuilt tree or index differed from the old one.
    pub changed: bool,
}

/// The sled-backed store. Cheap to clone; clones share one database.
#[derive(Debug, Clone)]
pub struct SledStore {
    pub(crate) inner: Arc<Inner>,
    report: OpenReport,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) path: PathBuf,
    pub(crate) db: sled::Db,
    pub(crate) events: sled::Tree,
    pub(crate) objects: sled::Tree,
    pub(crate) index: sled::Tree,
    pub(crate) meta: sled::Tree,
    /// Serialises writers; holds the last sequence written.
    pub(crate) writer: Mutex<u64>,
    /// Watches must resume at or above this sequence.
    pub(crate) floor: AtomicU64,
    pub(crate) committer: Committer,
    pub(crate) durability: Durability,
    /// sled's data file, for the `fdatasync` sled does not do.
    pub(crate) data_file: std::fs::File,
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<Option<u64>> {
    Ok(tree.get(key)?.and_then(|v| event::parse_seq(&v)))
}

/// Opens the sled database, waiting briefly for the file lock: sled's
/// background threads hold the previous handle of this process for a few
/// milliseconds after it is dropped.
fn open_db(path: &Path, opts: &Options) -> Result<sled::Db> {
    let config = sled::Config::new()
        .path(path)
        .cache_capacity(opts.cache_capacity);
    let mut attempts = 0;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if attempts < 200 && e.to_string().contains("could not acquire lock") =>
            {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return Ok(other?),
        }
    }
}

impl SledStore {
    /// Opens (or creates) the store at `path` with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, Options::default())
    }

    /// Opens (or creates) the store at `path`, checks the log and repairs
    /// the objects tree from it if needed.
    pub fn open_with(path: impl AsRef<Path>, opts: Options) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let db = open_db(&path, &opts)?;
        let meta = db.open_tree("meta")?;
        let events = db.open_tree("events")?;
        let objects = db.open_tree("objects")?;
        let index = db.open_tree("index")?;
        match meta.get(META_SCHEMA)? {
            Some(v) => {
                let found = v
                    .as_ref()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::corrupt("unreadable schema version", &path))?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::SchemaTooNew {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
            }
            None if events.is_empty() && objects.is_empty() => {
                meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            None => {
                return Err(StoreError::corrupt(
                    "schema version missing from a non-empty store",
                    &path,
                ));
            }
        }
        let last_seq = read_u64(&meta, META_LAST_SEQ)?.unwrap_or(0);
        let floor = read_u64(&meta, META_FLOOR)?.unwrap_or(0);
        let inner = Arc::new(Inner {
            path: path.clone(),
            db,
            events,
            objects,
            index,
            meta,
            writer: Mutex::new(last_seq),
            floor: AtomicU64::new(floor),
            committer: Committer::new(last_seq, opts.watch_buffer),
            durability: opts.durability,
            data_file: std::fs::File::open(path.join("db"))
                .map_err(|e| StoreError::Sled(e.into()))?,
        });
        let mut store = SledStore {
            inner,
            report: OpenReport::default(),
        };
        store.report = store.check_and_repair()?;
        Ok(store)
    }

    /// What opening found (and whether it repaired the objects tree).
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Watches must resume at or above this sequence; compaction may have
    /// dropped redundant events at or below it.
    pub fn compaction_floor(&self) -> u64 {
        self.inner.floor.load(Ordering::SeqCst)
    }

    /// Flushes done since open and the time spent in them (for benchmarks).
    pub fn flush_stats(&self) -> (u64, std::time::Duration) {
        let c = &self.inner.committer;
        let nanos = c.flush_nanos.load(Ordering::Relaxed);
        (
            c.flushes.load(Ordering::Relaxed),
            std::time::Duration::from_nanos(nanos),
        )
    }

    /// Bytes the database takes on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.inner.db.size_on_disk()?)
    }

    /// Every event in the log, oldest first.
    pub fn events(&self) -> Result<Vec<Event>> {
        self.inner
            .events
            .iter()
            .values()
            .map(|v| event::decode(&v?))
            .collect()
    }

    /// The materialised objects tree, decoded.
    pub fn objects(&self) -> Result<BTreeMap<ObjectRef, Object>> {
        self.inner
            .objects
            .iter()
            .values()
            .map(|v| event::decode::<Object>(&v?).map(|o| (o.object_ref(), o)))
            .collect()
    }

    /// Fails with [`StoreError::Corrupt`] unless the objects tree equals the fold of the log.
    pub fn verify(&self) -> Result<()> {
        let w = self.writer();
        let folded = fold::fold(&self.checked_log(*w)?);
        if self.objects().ok().as_ref() != Some(&folded) {
            return Err(StoreError::corrupt(
                "objects tree differs from the log",
                &self.inner.path,
            ));
        }
        Ok(())
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, u64> {
        self.inner.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decodes the log and checks that it is contiguous above the compaction
    /// floor and ends at `last_seq`. Callers hold the writer lock.
    fn checked_log(&self, last_seq: u64) -> Result<Vec<Event>> {
        let inner = &self.inner;
        let corrupt = |detail: String| StoreError::corrupt(detail, &inner.path);
        let floor = inner.floor.load(Ordering::SeqCst);
        let mut log = Vec::with_capacity(inner.events.len());
        let mut expect = floor + 1;
        for kv in inner.events.iter() {
            let (k, v) = kv?;
            let seq = event::parse_seq(&k).ok_or_else(|| corrupt("malformed event key".into()))?;
            let ev: Event = event::decode(&v).map_err(|e| match e {
                StoreError::SchemaTooNew { .. } => e,
                _ => corrupt(format!("event {seq} is unreadable ({e})")),
            })?;
            if ev.seq != seq {
                return Err(corrupt(format!("event {seq} claims sequence {}", ev.seq)));
            }
            if seq > floor {
                if seq != expect {
                    return Err(corrupt(format!("events {expect}..{seq} are missing")));
                }
                expect = seq + 1;
            }
            log.push(ev);
        }
        if expect - 1 != last_seq {
            return Err(corrupt(format!(
                "the log ends at {} but the last acknowledged sequence is {last_seq}",
                expect - 1
            )));
        }
        Ok(log)
    }

    fn check_and_repair(&self) -> Result<OpenReport> {
        let w = self.writer();
        let log = self.checked_log(*w)?;
        let folded = fold::fold(&log);
        let index_ok = self.inner.index.len() == log.len();
        let objects_ok = self.objects().ok().as_ref() == Some(&folded);
        let mut report = OpenReport {
            events: log.len() as u64,
            objects: folded.len() as u64,
            repaired: false,
        };
        if !(index_ok && objects_ok) {
            tracing::warn!(
                path = %self.inner.path.display(), index_ok, objects_ok,
                "store view differs from its log; rebuilding it from the log"
            );
            self.write_view(&log, &folded)?;
            report.repaired = true;
        }
        Ok(report)
    }

    /// Replaces the objects tree and index with those derived from `log`.
    fn write_view(&self, log: &[Event], folded: &BTreeMap<ObjectRef, Object>) -> Result<()> {
        let inner = &self.inner;
        inner.objects.clear()?;
        inner.index.clear()?;
        let mut objects = sled::Batch::default();
        for (r, o) in folded {
            objects.insert(event::object_key(r), event::encode(o)?);
        }
        inner.objects.apply_batch(objects)?;
        let mut index = sled::Batch::default();
        for ev in log {
            index.insert(event::index_key(&ev.object, ev.seq), &[]);
        }
        inner.index.apply_batch(index)?;
        inner.db.flush()?;
        Ok(())
    }

    fn get_key(&self, key: &[u8]) -> Result<Option<Object>> {
        self.inner.get_key(key)
    }

    fn write(
        &self,
        r: &ObjectRef,
        plan: impl FnOnce(Option<&Object>, Time) -> Result<Plan> + Send + 'static,
    ) -> Result<Written> {
        self.inner
            .committer
            .submit(&*self.inner, r.clone(), Box::new(plan))
    }

    fn event_at(&self, seq: u64) -> Result<Option<Event>> {
        self.inner
            .events
            .get(event::seq_key(seq))?
            .map(|v| event::decode(&v))
            .transpose()
    }
}

impl Store for SledStore {
    fn apply(
        &self,
        obj: Object,
        source: Option<ApplySource>,
        expected_rv: Option<u64>,
    ) -> Result<Written> {
        let r = obj.object_ref();
        self.write(&r, move |prev, now| {
            plan::apply(prev, obj, source, expected_rv, now)
        })
    }

    fn update_status(
        &self,
        r: &ObjectRef,
        status: serde_json::Value,
        expected_rv: Option<u64>,
    ) -> Result<Written> {
        let r2 = r.clone();
        self.write(r, move |prev, _| {
            plan::update_status(&r2, prev, status, expected_rv)
        })
    }

    fn set_finalizers(
        &self,
        r: &ObjectRef,
        finalizers: Vec<String>,
        expected_rv: Option<u64>,
    ) -> Result<Written> {
        let r2 = r.clone();
        self.write(r, move |prev, _| {
            plan::set_finalizers(&r2, prev, finalizers, expected_rv)
        })
    }

    fn request_delete(&self, r: &ObjectRef, expected_rv: Option<u64>) -> Result<Written> {
        let r2 = r.clone();
        self.write(r, move |prev, now| {
            plan::request_delete(&r2, prev, expected_rv, now)
        })
    }

    fn record_note(&self, note: Note) -> Result<u64> {
        let r = note.object.clone();
        let w = self.write(&r, move |_, _| {
            Ok(Some((Change::Noted { note }, Outcome::Updated)))
        })?;
        Ok(w.seq.unwrap_or_default())
    }

    fn get(&self, r: &ObjectRef) -> Result<Option<Object>> {
        self.get_key(&event::object_key(r))
    }

    fn list(&self, kind: Option<Kind>) -> Result<Listing> {
        let resource_version = self.inner.committer.durable();
        let iter = match kind {
            Some(k) => self.inner.objects.scan_prefix(event::kind_prefix(k)),
            None => self.inner.objects.iter(),
        };
        let objects = iter
            .values()
            .map(|v| event::decode(&v?))
            .collect::<Result<Vec<Object>>>()?;
        Ok(Listing {
            objects,
            resource_version,
        })
    }

    fn watch(&self, after: u64) -> Result<Watch> {
        Watch::new(self.inner.clone(), after)
    }

    fn history(&self, r: &ObjectRef) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        for k in self.inner.index.scan_prefix(event::index_prefix(r)).keys() {
            let k = k?;
            let seq = event::parse_seq(&k[k.len() - 8..]).unwrap_or_default();
            // A missing event is one compaction dropped after this scan started.
            if let Some(ev) = self.event_at(seq)? {
                out.push(ev);
            }
        }
        Ok(out)
    }

    fn notes(&self, object: Option<&ObjectRef>) -> Result<Vec<RecordedNote>> {
        let events = match object {
            Some(r) => self.history(r)?,
            None => self.events()?,
        };
        Ok(events
            .into_iter()
            .filter_map(|ev| match ev.change {
                Change::Noted { note } => Some(RecordedNote {
                    seq: ev.seq,
                    time: ev.time,
                    note,
                }),
                _ => None,
            })
            .collect())
    }

    fn last_seq(&self) -> u64 {
        *self.writer()
    }

    fn compact(&self, retention: &Retention) -> Result<CompactReport> {
        compact::compact(&self.inner, retention)
    }

    fn rebuild(&self) -> Result<RebuildReport> {
        let w = self.writer();
        let log = self.checked_log(*w)?;
        let folded = fold::fold(&log);
        let changed =
            self.objects().ok().as_ref() != Some(&folded) || self.inner.index.len() != log.len();
        if changed {
            self.write_view(&log, &folded)?;
        }
        Ok(RebuildReport {
            events: log.len() as u64,
            objects: folded.len() as u64,
            changed,
        })
    }
}
