//! The sled implementation of [`Store`]: opening, checking, writing, reading.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

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

/// Every handle of one open sled instance; replaced whole when the store
/// reopens its database after a storage error.
#[derive(Debug)]
pub(crate) struct Db {
    pub(crate) db: sled::Db,
    pub(crate) events: sled::Tree,
    pub(crate) objects: sled::Tree,
    pub(crate) index: sled::Tree,
    pub(crate) meta: sled::Tree,
    /// sled's data file, for the `fdatasync` sled does not do.
    pub(crate) data_file: std::fs::File,
}

impl Db {
    /// Opens the database and its trees (no checks).
    fn open(path: &Path, opts: &Options) -> std::result::Result<Db, sled::Error> {
        let db = open_db(path, opts)?;
        Ok(Db {
            meta: db.open_tree("meta")?,
            events: db.open_tree("events")?,
            objects: db.open_tree("objects")?,
            index: db.open_tree("index")?,
            data_file: std::fs::File::open(path.join("db"))?,
            db,
        })
    }
}

/// Why the database is closed, and when a reopen was last tried.
#[derive(Debug)]
struct Broken {
    at: Instant,
    cause: BrokenCause,
}

#[derive(Debug)]
enum BrokenCause {
    Sled(sled::Error),
    Corrupt(String),
}

/// How long to wait between two attempts to reopen a broken database.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) path: PathBuf,
    opts: Options,
    /// The open database; `None` after a storage error until a reopen
    /// succeeds. Readers hold the read side; a commit holds the write side
    /// from its transaction until its flush succeeded (or a reopen undid
    /// it), so readers never see a write that is not durable.
    db: RwLock<Option<Db>>,
    /// Set while `db` is `None`.
    broken: Mutex<Option<Broken>>,
    /// Serialises writers; holds the last sequence committed.
    pub(crate) writer: Mutex<u64>,
    /// Watches must resume at or above this sequence.
    pub(crate) floor: AtomicU64,
    pub(crate) committer: Committer,
    pub(crate) durability: Durability,
}

/// A read lock on the open database.
pub(crate) struct View<'a>(RwLockReadGuard<'a, Option<Db>>);

impl std::ops::Deref for View<'_> {
    type Target = Db;
    fn deref(&self) -> &Db {
        self.0
            .as_ref()
            .expect("a View is made only of an open database")
    }
}

impl Inner {
    /// The open database for reading, reopening it first if a storage
    /// error closed it (at most once per [`REOPEN_EVERY`]).
    pub(crate) fn view(&self) -> Result<View<'_>> {
        let g = self.db.read().unwrap_or_else(PoisonError::into_inner);
        if g.is_some() {
            return Ok(View(g));
        }
        drop(g);
        self.reopen_if_due(&mut self.write_lock())?;
        let g = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match *g {
            Some(_) => Ok(View(g)),
            None => Err(self.broken_error()),
        }
    }

    /// The write side of the view lock (see [`Inner::view`]).
    pub(crate) fn write_lock(&self) -> RwLockWriteGuard<'_, Option<Db>> {
        self.db.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Maps a sled error to the store's: a full filesystem (or quota) is
    /// [`StoreError::NoSpace`] naming the database directory.
    pub(crate) fn storage_error(&self, e: sled::Error) -> StoreError {
        match &e {
            sled::Error::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                ) =>
            {
                StoreError::NoSpace {
                    path: self.path.clone(),
                }
            }
            _ => StoreError::from(e),
        }
    }

    /// The error that keeps the database closed.
    pub(crate) fn broken_error(&self) -> StoreError {
        let b = self.broken.lock().unwrap_or_else(PoisonError::into_inner);
        match b.as_ref().map(|b| &b.cause) {
            Some(BrokenCause::Sled(e)) => self.storage_error(e.clone()),
            Some(BrokenCause::Corrupt(detail)) => StoreError::corrupt(detail.clone(), &self.path),
            None => StoreError::from(sled::Error::ReportableBug(
                "the database is closed without a recorded cause".into(),
            )),
        }
    }

    /// Reopens a closed database unless the last attempt failed less than
    /// [`REOPEN_EVERY`] ago; `Ok` once it is open.
    pub(crate) fn reopen_if_due(&self, g: &mut Option<Db>) -> Result<()> {
        if g.is_some() {
            return Ok(());
        }
        let due = self
            .broken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_none_or(|b| b.at.elapsed() >= REOPEN_EVERY);
        if !due {
            return Err(self.broken_error());
        }
        self.reopen(g)
    }

    /// Closes the database and opens it again from disk, after a storage
    /// error: whatever sled held in memory but could not write is dropped,
    /// so readers see exactly what is durable. Events that did reach the
    /// disk (a flush that failed after writing) become durable and are
    /// published. On failure the database stays closed (`*g == None`) and
    /// every call reports the cause until a later reopen succeeds.
    pub(crate) fn reopen(&self, g: &mut Option<Db>) -> Result<()> {
        // sled releases its file lock only once every handle is dropped.
        *g = None;
        let fail = |cause: BrokenCause| {
            *self.broken.lock().unwrap_or_else(PoisonError::into_inner) = Some(Broken {
                at: Instant::now(),
                cause,
            });
            self.broken_error()
        };
        let db = match Db::open(&self.path, &self.opts) {
            Ok(db) => db,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "store cannot reopen its database yet");
                return Err(fail(BrokenCause::Sled(e)));
            }
        };
        let recovered = (|| -> std::result::Result<_, sled::Error> {
            if self.durability == Durability::Fsync {
                db.data_file.sync_data()?;
            }
            let last = db
                .meta
                .get(META_LAST_SEQ)?
                .and_then(|v| event::parse_seq(&v));
            let floor = db.meta.get(META_FLOOR)?.and_then(|v| event::parse_seq(&v));
            Ok((last.unwrap_or(0), floor.unwrap_or(0)))
        })();
        let (last, floor) = match recovered {
            Ok(r) => r,
            Err(e) => return Err(fail(BrokenCause::Sled(e))),
        };
        let durable = self.committer.durable();
        if last < durable {
            return Err(fail(BrokenCause::Corrupt(format!(
                "after reopening, the log ends at {last} but {durable} was acknowledged"
            ))));
        }
        let mut found = Vec::new();
        let missed = (last > durable).then(|| event::seq_key(durable + 1)..=event::seq_key(last));
        for v in missed.into_iter().flat_map(|r| db.events.range(r).values()) {
            match v
                .map_err(|e| self.storage_error(e))
                .and_then(|v| event::decode(&v))
            {
                Ok(ev) => found.push(Arc::new(ev)),
                Err(e) => return Err(fail(BrokenCause::Corrupt(e.to_string()))),
            }
        }
        if !found.is_empty() {
            tracing::warn!(
                from = durable + 1,
                to = last,
                "events written before a failed flush reached the disk; publishing them"
            );
        }
        *self.writer.lock().unwrap_or_else(PoisonError::into_inner) = last;
        self.floor.store(floor, Ordering::SeqCst);
        self.committer.publish(found);
        *self.broken.lock().unwrap_or_else(PoisonError::into_inner) = None;
        *g = Some(db);
        tracing::info!(path = %self.path.display(), last_seq = last, "store reopened its database");
        Ok(())
    }
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<Option<u64>> {
    Ok(tree.get(key)?.and_then(|v| event::parse_seq(&v)))
}

/// Opens the sled database, waiting briefly for the file lock: sled's
/// background threads hold the previous handle of this process for a few
/// milliseconds after it is dropped.
fn open_db(path: &Path, opts: &Options) -> std::result::Result<sled::Db, sled::Error> {
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
            other => return other,
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
        let no_space = |e: sled::Error| match &e {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
                StoreError::NoSpace { path: path.clone() }
            }
            _ => StoreError::from(e),
        };
        let db = Db::open(&path, &opts).map_err(no_space)?;
        match db.meta.get(META_SCHEMA)? {
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
            None if db.events.is_empty() && db.objects.is_empty() => {
                db.meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                db.db.flush().map_err(no_space)?;
            }
            None => {
                return Err(StoreError::corrupt(
                    "schema version missing from a non-empty store",
                    &path,
                ));
            }
        }
        let last_seq = read_u64(&db.meta, META_LAST_SEQ)?.unwrap_or(0);
        let floor = read_u64(&db.meta, META_FLOOR)?.unwrap_or(0);
        let inner = Arc::new(Inner {
            path: path.clone(),
            db: RwLock::new(Some(db)),
            broken: Mutex::new(None),
            writer: Mutex::new(last_seq),
            floor: AtomicU64::new(floor),
            committer: Committer::new(last_seq, opts.watch_buffer),
            durability: opts.durability,
            opts,
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
        self.read(|db| Ok(db.db.size_on_disk()?))
    }

    /// Every event in the log, oldest first.
    pub fn events(&self) -> Result<Vec<Event>> {
        self.read(|db| {
            db.events
                .iter()
                .values()
                .map(|v| event::decode(&v?))
                .collect()
        })
    }

    /// The materialised objects tree, decoded.
    pub fn objects(&self) -> Result<BTreeMap<ObjectRef, Object>> {
        self.read(objects_of)
    }

    /// Fails with [`StoreError::Corrupt`] unless the objects tree equals the fold of the log.
    pub fn verify(&self) -> Result<()> {
        self.read(|db| {
            let w = self.writer();
            let folded = fold::fold(&self.checked_log(db, *w)?);
            if objects_of(db).ok().as_ref() != Some(&folded) {
                return Err(StoreError::corrupt(
                    "objects tree differs from the log",
                    &self.inner.path,
                ));
            }
            Ok(())
        })
    }

    /// Runs `f` on the open database under the read lock, naming a full
    /// filesystem as such.
    fn read<T>(&self, f: impl FnOnce(&Db) -> Result<T>) -> Result<T> {
        let view = self.inner.view()?;
        f(&view).map_err(|e| match e {
            StoreError::Sled(e) => self.inner.storage_error(e),
            e => e,
        })
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, u64> {
        self.inner.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decodes the log and checks that it is contiguous above the compaction
    /// floor and ends at `last_seq`. Callers hold the writer lock.
    fn checked_log(&self, db: &Db, last_seq: u64) -> Result<Vec<Event>> {
        let inner = &self.inner;
        let corrupt = |detail: String| StoreError::corrupt(detail, &inner.path);
        let floor = inner.floor.load(Ordering::SeqCst);
        let mut log = Vec::new();
        let mut expect = floor + 1;
        for kv in db.events.iter() {
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
        let g = self.inner.write_lock();
        let db = g.as_ref().expect("the database was just opened");
        let w = self.writer();
        let log = self.checked_log(db, *w)?;
        let folded = fold::fold(&log);
        let index_ok = db.index.len() == log.len();
        let objects_ok = objects_of(db).ok().as_ref() == Some(&folded);
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
            write_view(db, &log, &folded)?;
            report.repaired = true;
        }
        Ok(report)
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
}

/// The materialised objects tree of `db`, decoded.
fn objects_of(db: &Db) -> Result<BTreeMap<ObjectRef, Object>> {
    db.objects
        .iter()
        .values()
        .map(|v| event::decode::<Object>(&v?).map(|o| (o.object_ref(), o)))
        .collect()
}

/// Replaces the objects tree and index with those derived from `log`.
fn write_view(db: &Db, log: &[Event], folded: &BTreeMap<ObjectRef, Object>) -> Result<()> {
    db.objects.clear()?;
    db.index.clear()?;
    let mut objects = sled::Batch::default();
    for (r, o) in folded {
        objects.insert(event::object_key(r), event::encode(o)?);
    }
    db.objects.apply_batch(objects)?;
    let mut index = sled::Batch::default();
    for ev in log {
        index.insert(event::index_key(&ev.object, ev.seq), &[]);
    }
    db.index.apply_batch(index)?;
    db.db.flush()?;
    Ok(())
}

fn event_at(db: &Db, seq: u64) -> Result<Option<Event>> {
    db.events
        .get(event::seq_key(seq))?
        .map(|v| event::decode(&v))
        .transpose()
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
        self.read(|db| db.get_key(&event::object_key(r)))
    }

    fn list(&self, kind: Option<Kind>) -> Result<Listing> {
        self.read(|db| {
            // Under the read lock: the objects are exactly those durable up to here.
            let resource_version = self.inner.committer.durable();
            let iter = match kind {
                Some(k) => db.objects.scan_prefix(event::kind_prefix(k)),
                None => db.objects.iter(),
            };
            let objects = iter
                .values()
                .map(|v| event::decode(&v?))
                .collect::<Result<Vec<Object>>>()?;
            Ok(Listing {
                objects,
                resource_version,
            })
        })
    }

    fn watch(&self, after: u64) -> Result<Watch> {
        Watch::new(self.inner.clone(), after)
    }

    fn history(&self, r: &ObjectRef) -> Result<Vec<Event>> {
        self.read(|db| {
            let mut out = Vec::new();
            for k in db.index.scan_prefix(event::index_prefix(r)).keys() {
                let k = k?;
                let seq = event::parse_seq(&k[k.len() - 8..]).unwrap_or_default();
                // A missing event is one compaction dropped after this scan started.
                if let Some(ev) = event_at(db, seq)? {
                    out.push(ev);
                }
            }
            Ok(out)
        })
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
        // Durable, not merely committed: every acknowledged write is at or
        // below it, and a write that fails never raises it.
        self.inner.committer.durable()
    }

    fn compact(&self, retention: &Retention) -> Result<CompactReport> {
        compact::compact(&self.inner, retention)
    }

    fn rebuild(&self) -> Result<RebuildReport> {
        // The write side: neither readers nor writers while the view is replaced.
        let mut g = self.inner.write_lock();
        self.inner.reopen_if_due(&mut g)?;
        let db = g.as_ref().expect("reopen_if_due succeeded");
        let w = self.writer();
        let log = self.checked_log(db, *w)?;
        let folded = fold::fold(&log);
        let changed = objects_of(db).ok().as_ref() != Some(&folded) || db.index.len() != log.len();
        if changed {
            write_view(db, &log, &folded)?;
        }
        Ok(RebuildReport {
            events: log.len() as u64,
            objects: folded.len() as u64,
            changed,
        })
    }
}
