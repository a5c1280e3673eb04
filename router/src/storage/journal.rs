//! A write-ahead journal in front of redb, for small commits.
//!
//! A durable redb commit writes its changed pages where they live in the
//! file, about seven scattered pages for a one-message commit, and one
//! `fdatasync` of scattered pages costs ~2x one of contiguous pages on the
//! disks we measured (`docs/storage.md`). Small group commits therefore go
//! here first: the writer records every table change of the commit (a
//! physical redo entry), appends it to this preallocated, pre-written file
//! with one `fdatasync`, and only then commits the redb transaction without
//! an fsync (`Durability::None`). A durable redb commit (a checkpoint) every
//! `journal_checkpoint_ms`, and any large commit, which is durable in redb
//! anyway, make everything before them durable in redb, and the journal
//! starts again at its beginning.
//!
//! Each commit also stores its journal sequence number (`lsn`) in redb's
//! `meta` table. After a crash redb is back at its last durable commit; the
//! entries with a higher `lsn` are exactly the acknowledged commits it lost,
//! and replaying their changes, in order, restores them. The changes are
//! plain puts and deletes of table rows, so replay does not depend on any
//! in-memory state of the router.
//!
//! Entry layout (little endian): magic `u32`, CRC-32 `u32` of everything
//! after it, `lsn u64`, payload length `u32`, reserved `u32`, payload. The
//! entries of one cycle are written back to back from offset 0 with
//! consecutive `lsn`s; recovery follows that chain from offset 0 and stops
//! at the first entry that is torn, zeroed or from an older cycle (a lower
//! `lsn`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redb::{Key, TableDefinition, TableHandle, Value, WriteTransaction};

use super::StorageError;
use super::disk::{Disk, DiskFile, write_zeros};
use super::tables::{
    DEDUP, DEDUP_EXPIRY, FEEDS, INBOX, KEY_INDEX, LOG, META, OFFSETS, PARTITIONS, PLUGIN_CUTOVER,
    PLUGIN_KV, PLUGIN_WASM, PLUGINS, PRINCIPALS, QUEUE, QUEUE_DONE, QUEUE_FLOOR, QUEUE_MARK,
    TOPIC_GROUPS, TOPICS,
};

const MAGIC: u32 = u32::from_le_bytes(*b"SYJ1");
/// Bytes before each entry's payload.
pub(crate) const HEADER: usize = 24;

const PUT: u8 = 1;
const DEL: u8 = 2;
const DEL_RANGE: u8 = 3;

/// Key in `meta`: the `lsn` of the last journaled commit applied to redb.
pub(crate) const JOURNAL_LSN: &str = "journal_lsn";

/// The table changes of one commit, recorded as it applies them. When
/// `on` is false nothing is recorded (the commit goes to redb durably).
pub(crate) struct Redo {
    buf: Vec<u8>,
    on: bool,
}

impl Redo {
    pub(crate) fn new() -> Redo {
        Redo {
            buf: vec![0; HEADER],
            on: false,
        }
    }

    /// Starts a new commit; `on` says whether to record it.
    pub(crate) fn start(&mut self, on: bool) {
        self.buf.truncate(HEADER);
        // Do not keep a rare huge commit's buffer for good.
        if self.buf.capacity() > 4 << 20 {
            self.buf.shrink_to(1 << 20);
        }
        self.on = on;
    }

    pub(crate) fn is_on(&self) -> bool {
        self.on
    }

    /// The recorded payload.
    pub(crate) fn payload(&self) -> &[u8] {
        &self.buf[HEADER..]
    }

    /// The recorded payload, without a copy.
    pub(crate) fn into_payload(self) -> bytes::Bytes {
        bytes::Bytes::from(self.buf).slice(HEADER..)
    }

    /// Payload bytes recorded so far.
    pub(crate) fn len(&self) -> usize {
        self.buf.len() - HEADER
    }

    fn table(&mut self, op: u8, name: &str) {
        self.buf.push(op);
        self.buf.push(name.len() as u8);
        self.buf.extend_from_slice(name.as_bytes());
    }

    fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(b);
    }

    /// Records `table[key] = value`.
    pub(crate) fn put<K: Key + 'static, V: Value + 'static>(
        &mut self,
        def: TableDefinition<K, V>,
        key: &K::SelfType<'_>,
        value: &V::SelfType<'_>,
    ) {
        if self.on {
            self.put_raw(def, key, V::as_bytes(value).as_ref());
        }
    }

    /// Records `table[key] = value` for a value already in its stored form.
    pub(crate) fn put_raw<K: Key + 'static, V: Value + 'static>(
        &mut self,
        def: TableDefinition<K, V>,
        key: &K::SelfType<'_>,
        value: &[u8],
    ) {
        if self.on {
            self.table(PUT, def.name());
            self.bytes(K::as_bytes(key).as_ref());
            self.bytes(value);
        }
    }

    /// Records the removal of `key`.
    pub(crate) fn del<K: Key + 'static, V: Value + 'static>(
        &mut self,
        def: TableDefinition<K, V>,
        key: &K::SelfType<'_>,
    ) {
        if self.on {
            self.table(DEL, def.name());
            self.bytes(K::as_bytes(key).as_ref());
        }
    }

    /// Records the removal of every key in `from..to`.
    pub(crate) fn del_range<K: Key + 'static, V: Value + 'static>(
        &mut self,
        def: TableDefinition<K, V>,
        from: &K::SelfType<'_>,
        to: &K::SelfType<'_>,
    ) {
        if self.on {
            self.table(DEL_RANGE, def.name());
            self.bytes(K::as_bytes(from).as_ref());
            self.bytes(K::as_bytes(to).as_ref());
        }
    }
}

/// The journal file and where the next entry goes.
pub(crate) struct Journal {
    file: Arc<dyn DiskFile>,
    path: PathBuf,
    capacity: u64,
    pos: u64,
    next_lsn: u64,
    /// Offset of the last entry written, for [`Journal::cancel`].
    last: u64,
    /// When the first entry of this cycle was written.
    first_at: Option<Instant>,
    /// Whether this cycle has entries, for callers on other threads (a
    /// checkpoint with nothing to do need not wake the writer).
    pending: Arc<AtomicBool>,
}

/// Committed entries found in a journal, oldest first.
pub(crate) type Pending = Vec<(u64, Vec<u8>)>;

impl Journal {
    /// Opens the journal at `path`, creating it (`capacity` bytes of
    /// zeros, synced) if it does not exist. Returns the entries with an
    /// `lsn` above `applied`, in order: commits that were acknowledged but
    /// never made durable in redb. `expected_len` is the size the file
    /// was written with (a shorter file was truncated).
    pub(crate) fn open(
        disk: &dyn Disk,
        path: &Path,
        capacity: u64,
        applied: u64,
        expected_len: u64,
    ) -> Result<(Journal, Pending), StorageError> {
        let io = |what: &str, e: std::io::Error| {
            StorageError::Corrupt(format!("journal {}: {what}: {e}", path.display()))
        };
        let mut pending = Vec::new();
        let mut last_lsn = applied;
        let file = if let Some(file) = disk.open(path).map_err(|e| io("open", e))? {
            let len = file.len().map_err(|e| io("read", e))?;
            let mut data = vec![0; len as usize];
            file.read_at(0, &mut data).map_err(|e| io("read", e))?;
            let scan = scan(&data, applied, expected_len as usize);
            if let Some(d) = &scan.damage {
                return Err(StorageError::Damaged(format!(
                    "journal {}: {d}. The entries after it hold acknowledged commits that \
                     replay cannot reach, so the router will not start (it would lose them \
                     and hand their offsets out again). Run `switchyard check --data {}` \
                     for what can be done",
                    path.display(),
                    path.parent()
                        .map_or_else(|| ".".into(), |p| p.display().to_string()),
                )));
            }
            for (lsn, range) in scan.chain {
                if lsn > applied {
                    pending.push((lsn, data[range].to_vec()));
                }
                last_lsn = last_lsn.max(lsn);
            }
            if let Some(&(first, _)) = pending.first()
                && first != applied + 1
            {
                // Entries applied..first are in neither file: this journal
                // does not continue this database (copied apart, say).
                return Err(StorageError::Corrupt(format!(
                    "journal {} continues commit {} but the database ends at commit {applied}; \
                     refusing to replay it over a gap. Restore the two files together, or \
                     move the journal away to start without the commits it holds",
                    path.display(),
                    first - 1
                )));
            }
            file
        } else {
            disk.create_zeroed(path, capacity)
                .map_err(|e| io("create", e))?
        };
        Ok((
            Journal {
                file,
                path: path.to_path_buf(),
                capacity,
                pos: 0,
                next_lsn: last_lsn + 1,
                last: 0,
                first_at: None,
                pending: Arc::default(),
            },
            pending,
        ))
    }

    /// Gives the file `capacity` bytes of zeros if it has another size
    /// (the configured size changed). Only once its entries are replayed.
    pub(crate) fn resize(&mut self, capacity: u64) -> Result<(), StorageError> {
        let len = self.file.len();
        if len.as_ref().is_ok_and(|&l| l == capacity) {
            return Ok(());
        }
        let r = len
            .and_then(|_| self.file.set_len(0))
            .and_then(|_| write_zeros(&*self.file, capacity))
            .and_then(|_| self.file.sync());
        r.map_err(|e| {
            StorageError::Corrupt(format!("journal {}: resize: {e}", self.path.display()))
        })?;
        self.capacity = capacity;
        self.restart();
        Ok(())
    }

    /// The `lsn` the next entry will carry.
    pub(crate) fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// True if an entry with `payload` bytes fits before the end.
    pub(crate) fn fits(&self, payload: usize) -> bool {
        self.pos + (HEADER + payload) as u64 <= self.capacity
    }

    fn set_first(&mut self, at: Option<Instant>) {
        self.first_at = at;
        self.pending.store(at.is_some(), Ordering::Release);
    }

    /// A flag that is true while entries wait for a checkpoint.
    pub(crate) fn pending_flag(&self) -> Arc<AtomicBool> {
        self.pending.clone()
    }

    /// How long ago the oldest entry not yet checkpointed was written.
    pub(crate) fn age(&self) -> Option<Duration> {
        self.first_at.map(|t| t.elapsed())
    }

    /// Appends the commit recorded in `redo` as entry `next_lsn()` and
    /// syncs it. Once this returns the commit survives a crash.
    pub(crate) fn append(&mut self, redo: &mut Redo) -> Result<(), StorageError> {
        let lsn = self.next_lsn;
        let len = redo.len() as u32;
        let buf = &mut redo.buf;
        buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        buf[8..16].copy_from_slice(&lsn.to_le_bytes());
        buf[16..20].copy_from_slice(&len.to_le_bytes());
        buf[20..24].copy_from_slice(&0u32.to_le_bytes());
        let crc = crc32fast::hash(&buf[8..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        self.write_at(self.pos, buf)?;
        if self.pos == 0 {
            self.set_first(Some(Instant::now()));
        }
        self.last = self.pos;
        self.pos += buf.len() as u64;
        self.next_lsn += 1;
        Ok(())
    }

    /// Voids the entry just appended (its redb commit failed, so the
    /// request was refused and must not come back on replay).
    pub(crate) fn cancel(&mut self) -> Result<(), StorageError> {
        self.write_at(self.last, &[0; HEADER])?;
        self.pos = self.last;
        // The next entry takes this one's place and number, so the chain
        // recovery follows stays unbroken.
        self.next_lsn -= 1;
        if self.pos == 0 {
            self.set_first(None);
        }
        Ok(())
    }

    /// Starts a new cycle at the beginning of the file: call only after a
    /// durable redb commit, which holds every entry written so far.
    pub(crate) fn restart(&mut self) {
        self.pos = 0;
        self.set_first(None);
    }

    fn write_at(&mut self, pos: u64, buf: &[u8]) -> Result<(), StorageError> {
        let r = self.file.write_at(pos, buf).and_then(|_| self.file.sync());
        r.map_err(|e| StorageError::WriteFailed(format!("journal {}: {e}", self.path.display())))
    }
}

/// What recovery finds in a journal's bytes.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// The chain from offset 0: each entry's `lsn` and payload range.
    pub(crate) chain: Vec<(u64, std::ops::Range<usize>)>,
    /// Where the chain ends (the first byte not part of it).
    pub(crate) end: usize,
    /// Why the journal cannot be trusted, if it cannot: an entry the chain
    /// cannot read with a newer, whole entry after it, or a file cut short.
    pub(crate) damage: Option<String>,
}

/// Follows the chain of entries from offset 0 and decides whether where
/// it ends is a clean end or damage.
///
/// Entries are appended one at a time, each synced before the next is
/// written, so a crash can tear only the last one: after a torn tail the
/// file holds zeros or entries of older cycles, whose `lsn`s are at most
/// the database's `applied` (a cycle starts over only after a durable
/// commit). A whole entry with a higher `lsn` beyond the end of the chain
/// therefore means an entry in the middle was damaged, and a file that
/// ends inside an entry was truncated (the file is preallocated). Both
/// are damage; a torn or voided last entry is not.
pub(crate) fn scan(data: &[u8], applied: u64, expected_len: usize) -> Scan {
    let mut out = Scan::default();
    let mut pos = 0usize;
    let mut expect: Option<u64> = None;
    while let Some((lsn, payload, next)) = entry_at(data, pos) {
        if expect.is_some_and(|e| e != lsn) {
            break;
        }
        out.chain
            .push((lsn, pos + HEADER..pos + HEADER + payload.len()));
        expect = Some(lsn + 1);
        pos = next;
    }
    out.end = pos;
    let floor = expect.unwrap_or(0).max(applied + 1);
    let lost = |at: usize| {
        let what = match expect {
            Some(e) => format!("entry {e} at byte {pos}"),
            None => format!("its first entry (byte {pos})"),
        };
        format!("{what} is damaged, and a whole newer entry follows at byte {at}")
    };
    // The file is preallocated to its configured size, and the chain
    // reaches the end of a shorter file: it was cut short.
    if data.len() < expected_len && pos > 0 {
        let runs_past_end = match data.get(pos..pos + HEADER) {
            None => true,
            Some(h) => {
                let len = u32::from_le_bytes(h[16..20].try_into().unwrap()) as usize;
                h[0..4] == MAGIC.to_le_bytes() && pos + HEADER + len > data.len()
            }
        };
        if runs_past_end {
            out.damage = Some(format!(
                "the file is {} bytes, shorter than the {expected_len} it was written \
                 with, and its last entry (byte {pos}) runs past the end: it was truncated",
                data.len()
            ));
            return out;
        }
    }
    let mut at = pos + 1;
    let magic = MAGIC.to_le_bytes();
    while let Some(i) = data
        .get(at..)
        .and_then(|rest| rest.windows(4).position(|w| w == magic))
    {
        let cand = at + i;
        if let Some((lsn, _, _)) = entry_at(data, cand)
            && lsn >= floor
        {
            out.damage = Some(lost(cand));
            return out;
        }
        at = cand + 1;
    }
    out
}

/// The entry at `pos` if it is whole: `(lsn, payload, next position)`.
fn entry_at(data: &[u8], pos: usize) -> Option<(u64, &[u8], usize)> {
    let header = data.get(pos..pos.checked_add(HEADER)?)?;
    if header[0..4] != MAGIC.to_le_bytes() {
        return None;
    }
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let lsn = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(header[16..20].try_into().ok()?) as usize;
    let end = pos.checked_add(HEADER)?.checked_add(len)?;
    let body = data.get(pos + 8..end)?;
    (crc32fast::hash(body) == crc).then(|| (lsn, &data[pos + HEADER..end], end))
}

/// One change of a journal entry: the operation, the table's name, the
/// key (or range start) and the value (or range end; empty for a delete).
type Op<'a> = (u8, &'a str, &'a [u8], &'a [u8]);

/// The changes of one journal entry, in order.
fn ops(payload: &[u8]) -> impl Iterator<Item = Result<Op<'_>, StorageError>> {
    let bad = || StorageError::Corrupt("journal entry does not parse".into());
    let mut rest = payload;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut next = || {
            let (op, name, a, b);
            (op, rest) = split(rest, 1).ok_or_else(bad)?;
            let (n, r) = split(rest, 1).ok_or_else(bad)?;
            (name, rest) = split(r, n[0] as usize).ok_or_else(bad)?;
            (a, rest) = field(rest).ok_or_else(bad)?;
            b = if op[0] == DEL {
                &[][..]
            } else {
                let (b, r) = field(rest).ok_or_else(bad)?;
                rest = r;
                b
            };
            let name = std::str::from_utf8(name).map_err(|_| bad())?;
            Ok((op[0], name, a, b))
        };
        let op = next();
        if op.is_err() {
            rest = &[];
        }
        Some(op)
    })
}

/// Whether a journal entry changes a table `table` picks (false if it
/// does not parse: replaying it fails instead).
pub(crate) fn touches(payload: &[u8], table: impl Fn(&str) -> bool) -> bool {
    ops(payload).any(|op| op.is_ok_and(|(_, name, _, _)| table(name)))
}

/// Applies one journal entry's changes inside `txn`.
pub(crate) fn replay(txn: &WriteTransaction, payload: &[u8]) -> Result<(), StorageError> {
    replay_seeing(txn, payload, |_| {})
}

/// As [`replay`], telling `seen` the table of each change as it applies it
/// (so a caller learns what an entry changed without parsing it twice).
pub(crate) fn replay_seeing(
    txn: &WriteTransaction,
    payload: &[u8],
    mut seen: impl FnMut(&str),
) -> Result<(), StorageError> {
    for op in ops(payload) {
        let (op, name, a, b) = op?;
        seen(name);
        match name {
            n if n == LOG.name() => apply(txn, LOG, op, a, b)?,
            n if n == PARTITIONS.name() => apply(txn, PARTITIONS, op, a, b)?,
            n if n == OFFSETS.name() => apply(txn, OFFSETS, op, a, b)?,
            n if n == META.name() => apply(txn, META, op, a, b)?,
            n if n == PLUGIN_KV.name() => apply(txn, PLUGIN_KV, op, a, b)?,
            n if n == PLUGIN_CUTOVER.name() => apply(txn, PLUGIN_CUTOVER, op, a, b)?,
            n if n == DEDUP.name() => apply(txn, DEDUP, op, a, b)?,
            n if n == DEDUP_EXPIRY.name() => apply(txn, DEDUP_EXPIRY, op, a, b)?,
            n if n == QUEUE.name() => apply(txn, QUEUE, op, a, b)?,
            n if n == QUEUE_FLOOR.name() => apply(txn, QUEUE_FLOOR, op, a, b)?,
            n if n == QUEUE_MARK.name() => apply(txn, QUEUE_MARK, op, a, b)?,
            n if n == QUEUE_DONE.name() => apply(txn, QUEUE_DONE, op, a, b)?,
            n if n == INBOX.name() => apply(txn, INBOX, op, a, b)?,
            n if n == KEY_INDEX.name() => apply(txn, KEY_INDEX, op, a, b)?,
            n if n == TOPICS.name() => apply(txn, TOPICS, op, a, b)?,
            n if n == PLUGINS.name() => apply(txn, PLUGINS, op, a, b)?,
            n if n == PLUGIN_WASM.name() => apply(txn, PLUGIN_WASM, op, a, b)?,
            n if n == PRINCIPALS.name() => apply(txn, PRINCIPALS, op, a, b)?,
            n if n == TOPIC_GROUPS.name() => apply(txn, TOPIC_GROUPS, op, a, b)?,
            n if n == FEEDS.name() => apply(txn, FEEDS, op, a, b)?,
            other => {
                return Err(StorageError::Corrupt(format!(
                    "journal entry names unknown table '{other}'"
                )));
            }
        }
    }
    Ok(())
}

/// Something done to every table a redo can change (every table but
/// `plugin_artifact`, which holds code compiled for one build and is made
/// again from `plugin_wasm` where it is missing).
pub(crate) trait EachTable {
    fn table<K: Key + 'static, V: Value + 'static>(
        &mut self,
        def: TableDefinition<K, V>,
    ) -> Result<(), StorageError>;
}

/// Calls `f` for every table a redo can change.
pub(crate) fn each_table(f: &mut impl EachTable) -> Result<(), StorageError> {
    f.table(TOPICS)?;
    f.table(PARTITIONS)?;
    f.table(LOG)?;
    f.table(OFFSETS)?;
    f.table(META)?;
    f.table(PLUGINS)?;
    f.table(PRINCIPALS)?;
    f.table(TOPIC_GROUPS)?;
    f.table(PLUGIN_WASM)?;
    f.table(PLUGIN_KV)?;
    f.table(PLUGIN_CUTOVER)?;
    f.table(QUEUE_FLOOR)?;
    f.table(QUEUE)?;
    f.table(DEDUP)?;
    f.table(DEDUP_EXPIRY)?;
    f.table(INBOX)?;
    f.table(KEY_INDEX)?;
    f.table(FEEDS)?;
    f.table(QUEUE_MARK)?;
    f.table(QUEUE_DONE)
}

/// Records every row of every table `txn` sees as puts: a redo that,
/// replayed into empty tables, rebuilds them (a replica's snapshot).
pub(crate) fn dump(txn: &redb::ReadTransaction, redo: &mut Redo) -> Result<(), StorageError> {
    dump_chunked(txn, redo, usize::MAX, &mut |_| Ok(()))
}

/// Every replicated row of `db`, as a redo's payload: equal for two
/// databases with equal tables.
#[cfg(test)]
pub(crate) fn dump_db(db: &redb::Database) -> Vec<u8> {
    use redb::ReadableDatabase;
    let mut redo = Redo::new();
    redo.start(true);
    dump(&db.begin_read().unwrap(), &mut redo).unwrap();
    redo.payload().to_vec()
}

/// Like [`dump`], handing `sink` the redo whenever it holds `chunk` bytes
/// or more (whole rows: each piece replays on its own) and starting it
/// afresh; what is left at the end stays in `redo`. A dump of any size
/// then takes about `chunk` bytes of memory.
pub(crate) fn dump_chunked(
    txn: &redb::ReadTransaction,
    redo: &mut Redo,
    chunk: usize,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    struct Dump<'a> {
        txn: &'a redb::ReadTransaction,
        redo: &'a mut Redo,
        chunk: usize,
        sink: &'a mut dyn FnMut(&[u8]) -> Result<(), StorageError>,
    }
    impl EachTable for Dump<'_> {
        fn table<K: Key + 'static, V: Value + 'static>(
            &mut self,
            def: TableDefinition<K, V>,
        ) -> Result<(), StorageError> {
            use redb::ReadableTable;
            let table = match self.txn.open_table(def) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            for row in table.iter()? {
                let (k, v) = row?;
                self.redo.table(PUT, def.name());
                self.redo.bytes(K::as_bytes(&k.value()).as_ref());
                self.redo.bytes(V::as_bytes(&v.value()).as_ref());
                if self.redo.len() >= self.chunk {
                    (self.sink)(self.redo.payload())?;
                    self.redo.start(true);
                }
            }
            Ok(())
        }
    }
    let on = redo.on;
    redo.on = true;
    let r = each_table(&mut Dump {
        txn,
        redo,
        chunk,
        sink,
    });
    redo.on = on;
    r
}

/// Removes every row of every table a redo can change.
pub(crate) fn clear(txn: &WriteTransaction) -> Result<(), StorageError> {
    struct Clear<'a>(&'a WriteTransaction);
    impl EachTable for Clear<'_> {
        fn table<K: Key + 'static, V: Value + 'static>(
            &mut self,
            def: TableDefinition<K, V>,
        ) -> Result<(), StorageError> {
            self.0.open_table(def)?.retain(|_, _| false)?;
            Ok(())
        }
    }
    each_table(&mut Clear(txn))
}

fn split(b: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    (b.len() >= n).then(|| b.split_at(n))
}

/// A `u32` length followed by that many bytes.
fn field(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (n, rest) = split(b, 4)?;
    split(rest, u32::from_le_bytes(n.try_into().ok()?) as usize)
}

fn apply<K: Key + 'static, V: Value + 'static>(
    txn: &WriteTransaction,
    def: TableDefinition<K, V>,
    op: u8,
    a: &[u8],
    b: &[u8],
) -> Result<(), StorageError> {
    let mut table = txn.open_table(def)?;
    match op {
        PUT => {
            table.insert(K::from_bytes(a), V::from_bytes(b))?;
        }
        DEL => {
            table.remove(K::from_bytes(a))?;
        }
        DEL_RANGE => {
            table.retain_in(K::from_bytes(a)..K::from_bytes(b), |_, _| false)?;
        }
        _ => {
            return Err(StorageError::Corrupt(format!(
                "journal entry has unknown operation {op}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(redo: &mut Redo, n: u64) {
        redo.start(true);
        redo.put(META, &"n", &n);
    }

    fn lsns(p: &Pending) -> Vec<u64> {
        p.iter().map(|(l, _)| *l).collect()
    }

    #[test]
    fn recovery_follows_the_newest_cycle_and_stops_at_a_torn_or_voided_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.journal");
        let mut redo = Redo::new();
        let (mut j, pending) =
            Journal::open(&crate::storage::disk::OsDisk, &path, 1 << 16, 0, 1 << 16).unwrap();
        assert!(pending.is_empty());
        for n in 0..5 {
            entry(&mut redo, n);
            j.append(&mut redo).unwrap();
        }
        // Entries 1-5 are in the first cycle; redb holds up to 2.
        let (_, pending) =
            Journal::open(&crate::storage::disk::OsDisk, &path, 1 << 16, 2, 1 << 16).unwrap();
        assert_eq!(lsns(&pending), [3, 4, 5]);

        // A checkpoint, then a new cycle of two entries over the old ones:
        // the older entries behind them are not replayed.
        j.restart();
        for n in 0..2 {
            entry(&mut redo, n);
            j.append(&mut redo).unwrap();
        }
        let (_, pending) =
            Journal::open(&crate::storage::disk::OsDisk, &path, 1 << 16, 5, 1 << 16).unwrap();
        assert_eq!(lsns(&pending), [6, 7]);
        // A database that ends before the journal's first entry (the two
        // files copied at different times) is refused, not replayed over
        // the gap.
        let e = Journal::open(&crate::storage::disk::OsDisk, &path, 1 << 16, 4, 1 << 16)
            .err()
            .unwrap();
        assert!(e.to_string().contains("refusing to replay"), "{e}");

        // A voided entry (its database commit failed) ends the chain...
        entry(&mut redo, 9);
        j.append(&mut redo).unwrap();
        j.cancel().unwrap();
        let (_, pending) =
            Journal::open(&crate::storage::disk::OsDisk, &path, 1 << 16, 5, 1 << 16).unwrap();
        assert_eq!(lsns(&pending), [6, 7]);
        // ...and the next entry takes its place and its number.
        entry(&mut redo, 10);
        j.append(&mut redo).unwrap();
        let (_, pending) =
            Journal::open(&crate::storage::disk::OsDisk, &path, 1 << 16, 5, 1 << 16).unwrap();
        assert_eq!(lsns(&pending), [6, 7, 8]);

        // A torn last entry ends it too (a crash while it was written).
        let clean = std::fs::read(&path).unwrap();
        let size = HEADER + redo.len();
        let mut bytes = clean.clone();
        bytes[2 * size + HEADER + 3] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (j2, pending) =
            Journal::open(&crate::storage::disk::OsDisk, &path, 1 << 16, 5, 1 << 16).unwrap();
        assert_eq!(lsns(&pending), [6, 7]);
        // Numbering continues above everything seen and applied.
        assert_eq!(j2.next_lsn(), 8);
        drop(j2);

        // A damaged entry with a whole newer one after it is damage: the
        // start is refused, naming the file and the entry, rather than
        // losing entry 8 and handing its offsets out again.
        for flip in [size + 2, size + HEADER + 1, size + 17] {
            let mut bytes = clean.clone();
            bytes[flip] ^= 0x40;
            std::fs::write(&path, &bytes).unwrap();
            let e = Journal::open(&crate::storage::disk::OsDisk, &path, 1 << 16, 5, 1 << 16)
                .err()
                .unwrap();
            let msg = e.to_string();
            assert!(matches!(e, StorageError::Damaged(_)), "{msg}");
            assert!(
                msg.contains("j.journal") && msg.contains("entry 7"),
                "{msg}"
            );
            assert!(msg.contains("switchyard check"), "{msg}");
        }
        // So is a file cut short inside an entry.
        std::fs::write(&path, &clean[..size + size / 2]).unwrap();
        let e = Journal::open(&crate::storage::disk::OsDisk, &path, 1 << 16, 5, 1 << 16)
            .err()
            .unwrap();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    /// A small commit is durable in the journal before it is in the
    /// database file; a checkpoint puts it there. A copy of the file taken
    /// before the checkpoint lacks the record, one taken after holds it.
    #[test]
    fn a_checkpoint_moves_journaled_commits_into_the_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let db = dir.path().join("db.redb");
        let storage = crate::storage::Storage::open(&db, Default::default()).unwrap();
        let in_copy = |name: &str| {
            let copy = dir.path().join(name);
            std::fs::copy(&db, &copy).unwrap();
            let db = redb::Database::create(&copy).unwrap();
            let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
            redb::ReadableTableMetadata::len(&txn.open_table(LOG).unwrap()).unwrap()
        };
        rt.block_on(async {
            let topic = storage.create_topic("t", 1, 0, 0).await.unwrap();
            let rec = crate::protocol::Record::new("x").to_raw();
            let ticket = storage.append(&topic, vec![(0, rec)]).await.unwrap();
            assert_eq!(ticket.await.unwrap().unwrap(), [(0, 0)]);
            assert_eq!(in_copy("before.redb"), 0, "acknowledged from the journal");
            storage.checkpoint().await.unwrap();
            assert_eq!(
                in_copy("after.redb"),
                1,
                "in the database after the checkpoint"
            );
            storage.shutdown().await;
        });
    }

    /// Every row of `def`, as bytes.
    fn dump<K: Key + 'static, V: Value + 'static>(
        db: &redb::Database,
        def: TableDefinition<K, V>,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = db.begin_read().unwrap();
        let Ok(table) = txn.open_table(def) else {
            return Vec::new();
        };
        table
            .iter()
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                let k = K::as_bytes(&k.value()).as_ref().to_vec();
                let v = V::as_bytes(&v.value()).as_ref().to_vec();
                (k, v)
            })
            .collect()
    }

    fn dump_all(db: &redb::Database) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        vec![
            dump(db, LOG),
            dump(db, PARTITIONS),
            dump(db, OFFSETS),
            dump(db, META),
            dump(db, PLUGIN_KV),
            dump(db, DEDUP),
            dump(db, DEDUP_EXPIRY),
            dump(db, QUEUE),
            dump(db, QUEUE_FLOOR),
            dump(db, QUEUE_MARK),
            dump(db, QUEUE_DONE),
            dump(db, INBOX),
            dump(db, KEY_INDEX),
        ]
    }

    /// The crash image of a router that has only journaled every change
    /// since its last checkpoint (a copy of both files, as `kill -9`
    /// leaves them), opened again, holds exactly the rows of the live
    /// database in every table small commits write: log, counters, dedup,
    /// plugin state, fan-out references, queue state and offsets. A table
    /// write that is not recorded for the journal fails this.
    #[test]
    fn replaying_the_journal_reproduces_every_table() {
        use crate::protocol::Record;
        use crate::storage::{AppendRecord, Fanout, KvWrite, QueueWrite, Storage, StorageConfig};
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let config = StorageConfig {
            checkpoint: std::time::Duration::from_secs(3600),
            ..StorageConfig::default()
        };
        let live_path = dir.path().join("live.redb");
        let storage = Storage::open(&live_path, config.clone()).unwrap();
        rt.block_on(async {
            let topic = storage.create_topic("t", 2, 0, 0).await.unwrap();
            let id = topic.meta.id;
            // Dedup ids expire while the test runs: removals are replayed too.
            let policy = crate::storage::TopicPolicy {
                dedup_window_ms: 20,
                ..Default::default()
            };
            storage.set_policy("t", policy).await.unwrap();
            let hot = b"hot".to_vec();
            let feed = storage
                .follow(&topic, "f", vec![hot.clone()])
                .await
                .unwrap();
            for i in 0..40u32 {
                let fanout = match i % 3 {
                    0 => Some((crate::storage::key_hash(&hot), Fanout::OnWrite)),
                    1 => Some((crate::storage::key_hash(&hot), Fanout::OnRead)),
                    _ => None,
                };
                let rec = AppendRecord {
                    topic_id: id,
                    partition: i % 2,
                    record: Record::new(format!("r{i}")).with_key(hot.clone()).to_raw(),
                    dedup: Some(format!("id-{i}").into()),
                    fanout,
                };
                let kv = vec![KvWrite {
                    plugin: "p".into(),
                    key: format!("k{}", i % 4),
                    value: i.to_be_bytes().to_vec(),
                }];
                let t = storage.append_many(vec![rec], kv).await.unwrap();
                t.await.unwrap().unwrap();
                if i == 20 {
                    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                }
            }
            storage.commit_offset("g".into(), id, 1, 9).await.unwrap();
            storage.feed_commit(id, &feed, 0, 6).await.unwrap();
            storage
                .queue_write(QueueWrite {
                    topic_id: id,
                    group: "q".into(),
                    entries: vec![(0, 3, Some((1, 2, 99))), (0, 4, Some((1, 1, 5)))],
                    floors: vec![(0, 2), (1, 1)],
                    marks: vec![(0, 6)],
                    done: vec![(0, 0, vec![5, 0, 6, 0])],
                })
                .await
                .unwrap();
            storage
                .queue_write(QueueWrite {
                    topic_id: id,
                    group: "q".into(),
                    entries: vec![(0, 4, None)],
                    floors: vec![],
                    marks: vec![],
                    done: vec![(0, 0, vec![]), (1, 0, vec![1, 0, 2, 0])],
                })
                .await
                .unwrap();
            storage.flush().await.unwrap();
        });
        // The crash image: both files as they are now.
        let image = dir.path().join("image");
        std::fs::create_dir(&image).unwrap();
        let image_db = image.join("live.redb");
        std::fs::copy(&live_path, &image_db).unwrap();
        std::fs::copy(
            live_path.with_extension("journal"),
            image_db.with_extension("journal"),
        )
        .unwrap();
        let live = dump_all(storage.db());
        let without_journal = image.join("plain.redb");
        std::fs::copy(&image_db, &without_journal).unwrap();
        let plain = dump_all(&redb::Database::create(&without_journal).unwrap());
        assert!(plain[0].is_empty(), "the records were only in the journal");

        // The journal alone, without its database, is discarded.
        let orphan = dir.path().join("orphan");
        std::fs::create_dir(&orphan).unwrap();
        let orphan_db = orphan.join("live.redb");
        std::fs::copy(
            image_db.with_extension("journal"),
            orphan_db.with_extension("journal"),
        )
        .unwrap();
        let fresh = Storage::open(&orphan_db, config.clone()).unwrap();
        assert!(dump_all(fresh.db())[0].is_empty(), "nothing replayed");
        rt.block_on(fresh.shutdown());

        let reopened = Storage::open(&image_db, config).unwrap();
        let replayed = dump_all(reopened.db());
        for (i, (a, b)) in live.iter().zip(&replayed).enumerate() {
            assert!(!a.is_empty(), "table {i} was exercised");
            assert_eq!(a, b, "table {i} differs after replay");
        }
        rt.block_on(reopened.shutdown());
        rt.block_on(storage.shutdown());
    }

    #[test]
    fn replay_applies_puts_deletes_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("db.redb")).unwrap();
        let mut redo = Redo::new();
        redo.start(true);
        for o in 0..10u64 {
            redo.put_raw(LOG, &(1, 0, o), &o.to_be_bytes());
        }
        redo.del(LOG, &(1, 0, 9));
        redo.del_range(LOG, &(1, 0, 2), &(1, 0, 5));
        redo.put(OFFSETS, &("g", 1, 0), &7);
        let payload = redo.buf[HEADER..].to_vec();
        let txn = db.begin_write().unwrap();
        replay(&txn, &payload).unwrap();
        txn.commit().unwrap();
        let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
        let log = txn.open_table(LOG).unwrap();
        let keys: Vec<u64> = redb::ReadableTable::iter(&log)
            .unwrap()
            .map(|e| e.unwrap().0.value().2)
            .collect();
        assert_eq!(keys, [0, 1, 5, 6, 7, 8]);
        let v = log.get((1, 0, 6)).unwrap().unwrap();
        assert_eq!(v.value(), 6u64.to_be_bytes());
        let offsets = txn.open_table(OFFSETS).unwrap();
        assert_eq!(offsets.get(("g", 1, 0)).unwrap().unwrap().value(), 7);
        // An entry that does not parse is an error, not a partial replay.
        let txn = db.begin_write().unwrap();
        assert!(replay(&txn, &payload[..payload.len() - 1]).is_err());
    }
}
