//! The sled implementation of [`Store`](crate::Store): opening, checking, writing, reading.

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
use crate::{Listing, RecordedNote, Written, fold};

/// The newest database layout this build reads and the one it writes.
pub const SCHEMA_VERSION: u32 = 1;

const META_SCHEMA: &[u8] = b"schema_version";
pub(crate) const META_LAST_SEQ: &[u8] = b"last_seq";
pub(crate) const META_FLOOR: &[u8] = b"compaction_floor";
/// The checkpoint: the objects tree and index reflect the log up to this
/// sequence. Written in every commit's transaction; removed while a
/// rebuild rewrites the view and set again when it is done.
pub(crate) const META_VIEW: &[u8] = b"view_seq";
/// The number of objects at the checkpoint (same transaction).
pub(crate) const META_OBJECTS: &[u8] = b"object_count";

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
    /// Replay the whole log on open and compare it with the objects tree,
    /// as [`SledStore::verify`] does: time and memory grow with the
    /// history. Off (the default), open checks the view against its
    /// checkpoint: time and memory grow with the number of objects only;
    /// the full replay then runs only when that check fails or the
    /// checkpoint is missing (a database of an older build).
    pub full_check: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            durability: Durability::Fsync,
            watch_buffer: 1024,
            cache_capacity: 64 << 20,
            full_check: false,
        }
    }
}

/// What opening found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Events read and replayed to check the view: 0 when the checkpoint
    /// check sufficed (every object checked against its last event).
    pub replayed: u64,
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

/// Maps a sled error to the store's: a full filesystem (or quota) is
/// [`StoreError::NoSpace`] naming the database directory `path`.
fn storage_error(path: &Path, e: sled::Error) -> StoreError {
    match &e {
        sled::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) =>
        {
            StoreError::NoSpace {
                path: path.to_path_buf(),
            }
        }
        _ => StoreError::from(e),
    }
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
    /// Objects after the last commit (written with it, as the checkpoint's count).
    pub(crate) object_count: AtomicU64,
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
        storage_error(&self.path, e)
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
            let count = db
                .meta
                .get(META_OBJECTS)?
                .and_then(|v| event::parse_seq(&v));
            Ok((last.unwrap_or(0), floor.unwrap_or(0), count))
        })();
        let (last, floor, count) = match recovered {
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
        let count = match count {
            Some(n) => n,
            None => db.objects.len() as u64,
        };
        self.object_count.store(count, Ordering::SeqCst);
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
        let no_space = |e: sled::Error| storage_error(&path, e);
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
        let full_check = opts.full_check;
        let inner = Arc::new(Inner {
            path: path.clone(),
            db: RwLock::new(Some(db)),
            broken: Mutex::new(None),
            writer: Mutex::new(last_seq),
            object_count: AtomicU64::new(0),
            floor: AtomicU64::new(floor),
            committer: Committer::new(last_seq, opts.watch_buffer),
            durability: opts.durability,
            opts,
        });
        let mut store = SledStore {
            inner,
            report: OpenReport::default(),
        };
        store.report = store.check_and_repair(full_check)?;
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

    /// Fails with [`StoreError::Corrupt`] unless the objects tree equals
    /// the fold of the whole log (reads all of it: time grows with the history).
    pub fn verify(&self) -> Result<()> {
        self.read(|db| {
            let w = self.writer();
            let replayed = self.replay(db, *w)?;
            if objects_of(db).ok().as_ref() != Some(&replayed.objects) {
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
        f(&view).map_err(|e| match e.into_sled() {
            Ok(e) => self.inner.storage_error(e),
            Err(e) => e,
        })
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, u64> {
        self.inner.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the whole log once, checking that it is contiguous above the
    /// compaction floor and ends at `last_seq`, and folds it as it goes
    /// (memory: the objects, not the history). Callers hold the writer lock.
    fn replay(&self, db: &Db, last_seq: u64) -> Result<Replayed> {
        let inner = &self.inner;
        let corrupt = |detail: String| StoreError::corrupt(detail, &inner.path);
        let floor = inner.floor.load(Ordering::SeqCst);
        let mut objects = BTreeMap::new();
        let mut events = 0;
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
            fold::step(&mut objects, &ev);
            events += 1;
        }
        if expect - 1 != last_seq {
            return Err(corrupt(format!(
                "the log ends at {} but the last acknowledged sequence is {last_seq}",
                expect - 1
            )));
        }
        Ok(Replayed { objects, events })
    }

    /// Checks the view against its checkpoint without replaying the log:
    /// the checkpoint is at `last_seq`, the log ends there, and every object
    /// agrees with the event that last changed it (which compaction never
    /// drops) and its index entry, and their number is the checkpoint's.
    /// Time and memory grow with the number of objects, not the history.
    /// `Ok(Err(why))`: the view must be checked in full.
    fn checkpoint_check(&self, db: &Db, last_seq: u64) -> Result<std::result::Result<u64, String>> {
        let floor = self.inner.floor.load(Ordering::SeqCst);
        match read_u64(&db.meta, META_VIEW)? {
            Some(v) if v == last_seq => {}
            Some(v) => {
                return Ok(Err(format!(
                    "the checkpoint is at {v}, the log at {last_seq}"
                )));
            }
            None => return Ok(Err("the store has no checkpoint yet".into())),
        }
        let tail = match db.events.last()? {
            Some((k, v)) => {
                let seq = event::parse_seq(&k).unwrap_or(u64::MAX);
                if event::decode::<Event>(&v).ok().map(|e| e.seq) != Some(seq) {
                    return Ok(Err(format!("the last event ({seq}) is unreadable")));
                }
                seq
            }
            None => 0,
        };
        if tail != last_seq && !(last_seq <= floor && tail < last_seq) {
            return Ok(Err(format!(
                "the log ends at {tail}, the checkpoint at {last_seq}"
            )));
        }
        let mut n = 0;
        for kv in db.objects.iter() {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let Ok(o) = event::decode::<Object>(&v) else {
                return Ok(Err(format!("object {name} is unreadable")));
            };
            let r = o.object_ref();
            let rv = o.metadata.resource_version;
            if k.as_ref() != event::object_key(&r).as_slice() || rv == 0 || rv > last_seq {
                return Ok(Err(format!(
                    "object {name} is misplaced or ahead of the log"
                )));
            }
            let agrees = match event_at(db, rv) {
                Ok(Some(ev)) if ev.object == r => match &ev.change {
                    Change::Applied { object, .. } => {
                        object.spec == o.spec && object.metadata.uid == o.metadata.uid
                    }
                    Change::StatusUpdated { status } => o.status.as_ref() == Some(status),
                    Change::FinalizersSet { finalizers } => o.metadata.finalizers == *finalizers,
                    Change::DeletionRequested { at } => o.metadata.deletion_timestamp == Some(*at),
                    Change::Deleted | Change::Noted { .. } => false,
                },
                _ => false,
            };
            if !agrees || !db.index.contains_key(event::index_key(&r, rv))? {
                return Ok(Err(format!(
                    "object {name} disagrees with its last event ({rv})"
                )));
            }
            n += 1;
        }
        match read_u64(&db.meta, META_OBJECTS)? {
            Some(c) if c == n => Ok(Ok(n)),
            c => Ok(Err(format!(
                "the checkpoint counts {} objects, the view holds {n}",
                c.unwrap_or_default()
            ))),
        }
    }

    /// Checks the view on open: against the checkpoint, or (`full`, or if
    /// that check fails) by replaying the log, rebuilding the view from the
    /// log if it differs.
    fn check_and_repair(&self, full: bool) -> Result<OpenReport> {
        let g = self.inner.write_lock();
        let db = g.as_ref().expect("the database was just opened");
        let w = self.writer();
        if !full {
            match self.checkpoint_check(db, *w)? {
                Ok(objects) => {
                    self.inner.object_count.store(objects, Ordering::SeqCst);
                    return Ok(OpenReport {
                        replayed: 0,
                        objects,
                        repaired: false,
                    });
                }
                // A new store has no checkpoint and nothing to check: no
                // warning at an agent's first start (found as one).
                Err(why) if *w == 0 => tracing::debug!(
                    path = %self.inner.path.display(), %why,
                    "new store: checking its (empty) log"
                ),
                Err(why) => tracing::warn!(
                    path = %self.inner.path.display(), %why,
                    "store view does not match its checkpoint; checking it against the whole log"
                ),
            }
        }
        let replayed = self.replay(db, *w)?;
        let index_ok = db.index.len() as u64 == replayed.events;
        let objects_ok = objects_of(db).ok().as_ref() == Some(&replayed.objects);
        let repaired = !(index_ok && objects_ok);
        if repaired {
            tracing::warn!(
                path = %self.inner.path.display(), index_ok, objects_ok,
                "store view differs from its log; rebuilding it from the log"
            );
            write_view(db, &replayed.objects, *w)?;
        } else {
            set_checkpoint(db, *w, replayed.objects.len() as u64)?;
        }
        let objects = replayed.objects.len() as u64;
        self.inner.object_count.store(objects, Ordering::SeqCst);
        Ok(OpenReport {
            replayed: replayed.events,
            objects,
            repaired,
        })
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

/// The log folded: its objects and the number of events read.
struct Replayed {
    objects: BTreeMap<ObjectRef, Object>,
    events: u64,
}

/// Records (durably) that the view reflects the log up to `last_seq` and
/// holds `objects` objects.
fn set_checkpoint(db: &Db, last_seq: u64, objects: u64) -> Result<()> {
    let mut meta = sled::Batch::default();
    meta.insert(META_VIEW, &event::seq_key(last_seq));
    meta.insert(META_OBJECTS, &event::seq_key(objects));
    db.meta.apply_batch(meta)?;
    db.db.flush()?;
    Ok(())
}

/// Replaces the objects tree with `folded` and the index with one entry per
/// event of the log, then sets the checkpoint. The checkpoint is removed
/// first, so a crash midway leaves a view that the next open replays.
fn write_view(db: &Db, folded: &BTreeMap<ObjectRef, Object>, last_seq: u64) -> Result<()> {
    db.meta.remove(META_VIEW)?;
    db.db.flush()?;
    db.objects.clear()?;
    db.index.clear()?;
    let mut objects = sled::Batch::default();
    for (r, o) in folded {
        objects.insert(event::object_key(r), event::encode(o)?);
    }
    db.objects.apply_batch(objects)?;
    // In chunks, reading the log again: memory stays bounded by the chunk.
    let mut index = sled::Batch::default();
    let mut pending = 0;
    for v in db.events.iter().values() {
        let ev: Event = event::decode(&v?)?;
        index.insert(event::index_key(&ev.object, ev.seq), &[]);
        pending += 1;
        if pending == 10_000 {
            db.index.apply_batch(std::mem::take(&mut index))?;
            pending = 0;
        }
    }
    db.index.apply_batch(index)?;
    set_checkpoint(db, last_seq, folded.len() as u64)
}

fn event_at(db: &Db, seq: u64) -> Result<Option<Event>> {
    db.events
        .get(event::seq_key(seq))?
        .map(|v| event::decode(&v))
        .transpose()
}

/// The sled store's own, blocking API: what [`Store`](crate::Store)'s
/// async methods run on the blocking pool (see the trait for each method's
/// contract), plus the sled maintenance (`compact`, `rebuild`).
impl SledStore {
    /// Blocking [`Store::apply`](crate::Store::apply).
    pub fn apply(
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

    /// Blocking [`Store::update_status`](crate::Store::update_status).
    pub fn update_status(
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

    /// Blocking [`Store::set_finalizers`](crate::Store::set_finalizers).
    pub fn set_finalizers(
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

    /// Blocking [`Store::request_delete`](crate::Store::request_delete).
    pub fn request_delete(&self, r: &ObjectRef, expected_rv: Option<u64>) -> Result<Written> {
        let r2 = r.clone();
        self.write(r, move |prev, now| {
            plan::request_delete(&r2, prev, expected_rv, now)
        })
    }

    /// Blocking [`Store::record_note`](crate::Store::record_note).
    pub fn record_note(&self, note: Note) -> Result<u64> {
        let r = note.object.clone();
        let w = self.write(&r, move |_, _| {
            Ok(Some((Change::Noted { note }, Outcome::Updated)))
        })?;
        Ok(w.seq.unwrap_or_default())
    }

    /// Blocking [`Store::get`](crate::Store::get).
    pub fn get(&self, r: &ObjectRef) -> Result<Option<Object>> {
        self.read(|db| db.get_key(&event::object_key(r)))
    }

    /// Blocking [`Store::list`](crate::Store::list).
    pub fn list(&self, kind: Option<Kind>) -> Result<Listing> {
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

    /// The sled watch from `after`; [`StoreError::TooOld`] below the compaction floor.
    pub fn watch(&self, after: u64) -> Result<Watch> {
        Watch::new(self.inner.clone(), after)
    }

    /// Blocking [`Store::history`](crate::Store::history).
    pub fn history(&self, r: &ObjectRef) -> Result<Vec<Event>> {
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

    /// Blocking [`Store::notes`](crate::Store::notes).
    pub fn notes(&self, object: Option<&ObjectRef>) -> Result<Vec<RecordedNote>> {
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

    /// The last sequence number written.
    pub fn last_seq(&self) -> u64 {
        // Durable, not merely committed: every acknowledged write is at or
        // below it, and a write that fails never raises it.
        self.inner.committer.durable()
    }

    /// Drops events the retention no longer needs (see [`Retention`]).
    pub fn compact(&self, retention: &Retention) -> Result<CompactReport> {
        compact::compact(&self.inner, retention)
    }

    /// Recomputes the objects tree (and index) from the log.
    pub fn rebuild(&self) -> Result<RebuildReport> {
        // The write side: neither readers nor writers while the view is replaced.
        let mut g = self.inner.write_lock();
        self.inner.reopen_if_due(&mut g)?;
        let db = g.as_ref().expect("reopen_if_due succeeded");
        let w = self.writer();
        let replayed = self.replay(db, *w)?;
        let changed = objects_of(db).ok().as_ref() != Some(&replayed.objects)
            || db.index.len() as u64 != replayed.events;
        if changed {
            write_view(db, &replayed.objects, *w)?;
        }
        Ok(RebuildReport {
            events: replayed.events,
            objects: replayed.objects.len() as u64,
            changed,
        })
    }
}
