//! `switchyard check`: verifies a stopped router's files and repairs what
//! can be repaired without losing acknowledged data.
//!
//! What it looks at, in order: the journal (its chain and checksums, and
//! whether it continues the database), the database file (redb's own
//! integrity check of every page), then the tables against each other:
//! each partition's log rows against its `(start, end, bytes)` row and
//! every record's checksum, queue floors and queue state against the
//! partitions, fan-out references (inboxes and key indexes) against the
//! log, and rows of topics that no longer exist.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable};

use super::StorageError;
use super::journal::{self, JOURNAL_LSN};
use super::log::{entry_meta, guarded_panic, split_entry};
use super::tables::{INBOX, KEY_INDEX, LOG, META, PARTITIONS, QUEUE, QUEUE_FLOOR, TOPICS};

type PartKey = (u32, u32);
type PartRow = (u64, u64, u64, u64);
type LogKey = (u32, u32, u64);

/// One finding.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    /// The file it is in.
    pub file: PathBuf,
    /// What is wrong.
    pub problem: String,
    /// What to do about it.
    pub action: String,
    /// True once `--repair` fixed it.
    pub repaired: bool,
}

/// What `check` found.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// Problems, repaired or not.
    pub findings: Vec<Finding>,
    /// Topics, partitions and records looked at.
    pub topics: usize,
    /// Partitions looked at.
    pub partitions: usize,
    /// Records whose checksum was verified.
    pub records: u64,
    /// Committed journal entries a start would replay.
    pub journal_pending: usize,
}

impl Report {
    /// True if nothing is left to fix.
    pub fn clean(&self) -> bool {
        self.findings.iter().all(|f| f.repaired)
    }

    fn add(&mut self, file: &Path, problem: String, action: &str, repaired: bool) {
        self.findings.push(Finding {
            file: file.to_path_buf(),
            problem,
            action: action.to_string(),
            repaired,
        });
    }
}

/// What `check` found on a cluster node: each group's tables, and the
/// node's Raft log (one file for all its groups).
#[derive(Debug, Default, serde::Serialize)]
pub struct NodeReport {
    /// Each group's report, by group.
    pub groups: Vec<(u32, Report)>,
    /// Problems of the Raft log file.
    pub raft_log: Vec<Finding>,
}

/// Verifies a stopped cluster node's data directory `data`: the tables of
/// each of its `groups` (group 0's in `data`, group N's in `g<N>/`), as
/// [`check`] does a router's, and the Raft log file's pages. Nothing is
/// repaired: a replica's tables follow its Raft log, and changing them
/// behind it would make this copy differ from the others; a damaged node
/// is replaced from them instead.
pub fn check_node(data: &Path, groups: u32) -> Result<NodeReport, StorageError> {
    let mut report = NodeReport::default();
    for g in 0..groups {
        let dir = match g {
            0 => data.to_path_buf(),
            g => data.join(format!("g{g}")),
        };
        let mut r = check(&dir, false)?;
        // A replica's damage is mended from the other copies, not from a
        // backup of this one.
        for f in r.findings.iter_mut().filter(|f| !f.repaired) {
            f.action = REPLACE_NODE.to_string();
        }
        report.groups.push((g, r));
    }
    let path = data.join("raft.redb");
    let mut log = Report::default();
    match guarded_panic(|| Database::builder().create(&path)) {
        Ok(Ok(mut db)) => {
            integrity(&mut log, &path, &mut db, REPLACE_NODE, REPLACE_NODE);
        }
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
            return Err(StorageError::InUse(path));
        }
        Ok(Err(e)) => log.add(
            &path,
            format!("the Raft log does not open: {e}"),
            REPLACE_NODE,
            false,
        ),
        Err(panic) => log.add(
            &path,
            format!("the Raft log does not open: a page is damaged ({panic})"),
            REPLACE_NODE,
            false,
        ),
    }
    report.raft_log = log.findings;
    Ok(report)
}

/// Runs redb's integrity check of every page of `db` (at `path`) and
/// records what it found: `failed` and `damaged` are what to do when the
/// check fails or meets a damaged page. True unless it did either.
fn integrity(
    report: &mut Report,
    path: &Path,
    db: &mut Database,
    failed: &str,
    damaged: &str,
) -> bool {
    match guarded_panic(|| db.check_integrity()) {
        Ok(Ok(true)) => true,
        Ok(Ok(false)) => {
            report.add(
                path,
                "redb's allocator state needed repair".into(),
                "none: redb repaired it",
                true,
            );
            true
        }
        Ok(Err(e)) => {
            report.add(
                path,
                format!("redb's integrity check failed: {e}"),
                failed,
                false,
            );
            false
        }
        Err(panic) => {
            report.add(
                path,
                format!("redb's integrity check met a damaged page ({panic})"),
                damaged,
                false,
            );
            false
        }
    }
}

/// What to do about a damaged file of a cluster node.
pub const REPLACE_NODE: &str = "replace the node from the others: `switchyard cluster remove-node \
     --id N`, then `cluster add-node` a new one with an empty directory (it receives every \
     group's data from the others)";

/// Checks the data directory `data` of a stopped router; with `repair`,
/// fixes what can be fixed without losing acknowledged data.
pub fn check(data: &Path, mut repair: bool) -> Result<Report, StorageError> {
    let db_path = data.join("switchyard.redb");
    let jpath = db_path.with_extension("journal");
    let mut report = Report::default();
    if !db_path.exists() {
        return Err(StorageError::Corrupt(format!(
            "{} does not exist: is {} a router's data directory?",
            db_path.display(),
            data.display()
        )));
    }
    let opened = guarded_panic(|| Database::builder().create(&db_path));
    let mut db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
            return Err(StorageError::InUse(db_path));
        }
        Ok(Err(e)) => {
            report.add(
                &db_path,
                format!("the database does not open: {e}"),
                "restore the data directory from a backup (a stopped router's copy of both files)",
                false,
            );
            return Ok(report);
        }
        Err(panic) => {
            report.add(
                &db_path,
                format!("the database does not open: a page is damaged ({panic})"),
                "restore the data directory from a backup (a stopped router's copy of both files)",
                false,
            );
            return Ok(report);
        }
    };
    let passed = integrity(
        &mut report,
        &db_path,
        &mut db,
        "restore the data directory from a backup (the findings below say what is \
         affected; --repair changes nothing in a file that fails this check)",
        "restore the data directory from a backup",
    );
    if !passed {
        // redb will not write to a file that failed its check; the table
        // checks below still read what they can.
        repair = false;
    }

    // The journal: does it continue the database, and is it whole?
    let applied = {
        let txn = db.begin_read()?;
        match txn.open_table(META) {
            Ok(t) => t.get(JOURNAL_LSN)?.map_or(0, |v| v.value()),
            Err(_) => 0,
        }
    };
    if let Ok(bytes) = std::fs::read(&jpath) {
        let scan = journal::scan(&bytes, applied, bytes.len());
        let pending: Vec<u64> = scan
            .chain
            .iter()
            .map(|c| c.0)
            .filter(|l| *l > applied)
            .collect();
        report.journal_pending = pending.len();
        if let Some(d) = scan.damage {
            report.add(
                &jpath,
                d,
                "it cannot be repaired without losing the acknowledged commits after the \
                 damaged entry: restore both files from a backup, or, accepting that loss, \
                 move the journal away and start (the router then starts from the database alone)",
                false,
            );
        } else if pending.first().is_some_and(|f| *f != applied + 1) {
            report.add(
                &jpath,
                format!(
                    "the journal continues commit {} but the database ends at commit {applied}",
                    pending[0] - 1
                ),
                "the two files were copied at different moments: restore them together",
                false,
            );
        }
    }

    let txn = db.begin_read()?;
    let topics = match txn.open_table(TOPICS) {
        Ok(t) => t,
        // No table yet: a router that never committed, or a cluster node
        // whose tables were last synced before its first entry was applied
        // (a node's tables are synced now and then; its Raft log holds
        // what came after, replayed at its next start).
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(report),
        Err(e) => return Err(e.into()),
    };
    let mut ids: HashMap<u32, (String, u32)> = HashMap::new();
    for e in topics.iter()? {
        let (k, v) = e?;
        match serde_json::from_slice::<super::TopicMeta>(v.value()) {
            Ok(m) => {
                ids.insert(m.id, (m.name.clone(), m.partitions));
            }
            Err(e) => report.add(
                &db_path,
                format!("topic '{}' has unreadable metadata: {e}", k.value()),
                "restore from a backup",
                false,
            ),
        }
    }
    report.topics = ids.len();
    let parts = txn.open_table(PARTITIONS)?;
    let log = txn.open_table(LOG)?;
    // Per (topic, partition): (start, end) as the partition row says.
    let mut bounds: HashMap<(u32, u32), (u64, u64)> = HashMap::new();
    // Fixes, applied in one write transaction at the end.
    let mut fix_parts: Vec<(PartKey, PartRow)> = Vec::new();
    let mut drop_log: Vec<(LogKey, LogKey)> = Vec::new();
    for (&id, (name, n)) in &ids {
        for p in 0..*n {
            report.partitions += 1;
            let Some(row) = parts.get((id, p))? else {
                continue; // never written to
            };
            let (start, end, bytes, last_ts) = row.value();
            bounds.insert((id, p), (start, end));
            let mut expect = start;
            let mut sum = 0u64;
            let mut gaps = 0u64;
            let mut bad = Vec::new();
            let mut below_start = false;
            for e in log.range((id, p, 0)..=(id, p, u64::MAX))? {
                let (k, v) = e?;
                let key = k.value();
                let o = key.2;
                if o < start {
                    below_start = true;
                    continue;
                }
                if o != expect {
                    gaps += 1;
                }
                expect = o + 1;
                sum += entry_meta(v.value()).1 as u64;
                report.records += 1;
                if split_entry(key, v.value()).is_err() {
                    bad.push(o);
                }
            }
            if below_start {
                drop_log.push(((id, p, 0), (id, p, start)));
            }
            let file = &db_path;
            if !bad.is_empty() {
                report.add(
                    file,
                    format!(
                        "topic '{name}' partition {p}: {} record(s) fail their checksum (offsets {:?}{})",
                        bad.len(),
                        &bad[..bad.len().min(8)],
                        if bad.len() > 8 { ", ..." } else { "" }
                    ),
                    "these records are damaged and are never delivered (subscribers get an error \
                     at them); restore from a backup, or accept their loss",
                    false,
                );
            }
            if gaps > 0 || expect < end {
                report.add(
                    file,
                    format!(
                        "topic '{name}' partition {p}: the log is missing offsets between {start} \
                         and {end} ({gaps} gap(s), last present {})",
                        expect.saturating_sub(1)
                    ),
                    "the missing records cannot be recreated: restore from a backup",
                    false,
                );
            }
            if expect > end {
                report.add(
                    file,
                    format!(
                        "topic '{name}' partition {p}: records up to offset {} lie past the \
                         partition's end {end}",
                        expect - 1
                    ),
                    "restore from a backup (new appends would overwrite them)",
                    false,
                );
            }
            if gaps == 0 && expect <= end && sum != bytes {
                report.add(
                    file,
                    format!(
                        "topic '{name}' partition {p}: the byte count says {bytes}, the records \
                         hold {sum}"
                    ),
                    "--repair recounts it (retention by size uses it)",
                    repair,
                );
                fix_parts.push(((id, p), (start, end, sum, last_ts)));
            }
        }
    }
    if !drop_log.is_empty() {
        report.add(
            &db_path,
            format!(
                "{} partition(s) keep log rows below their start (left by an interrupted \
                 retention pass)",
                drop_log.len()
            ),
            "--repair deletes them (they are past retention and never delivered)",
            repair,
        );
    }

    // Rows of topics that no longer exist.
    let mut orphan_ids: Vec<u32> = Vec::new();
    for e in log.iter()? {
        let (k, _) = e?;
        let id = k.value().0;
        if !ids.contains_key(&id) && !orphan_ids.contains(&id) {
            orphan_ids.push(id);
        }
    }
    if !orphan_ids.is_empty() {
        report.add(
            &db_path,
            format!("log rows of deleted topic id(s) {orphan_ids:?}"),
            "--repair deletes them",
            repair,
        );
    }

    // Queue floors and state against the partitions.
    let floors = txn.open_table(QUEUE_FLOOR)?;
    let mut fix_floors: Vec<(u32, String, u32, u64)> = Vec::new();
    for e in floors.iter()? {
        let (k, v) = e?;
        let (id, group, p) = k.value();
        let floor = v.value();
        if let Some(&(_, end)) = bounds.get(&(id, p))
            && floor > end
        {
            report.add(
                &db_path,
                format!(
                    "queue group '{group}' of topic id {id} partition {p}: its floor {floor} is \
                     past the partition's end {end}"
                ),
                "--repair lowers it to the end (nothing is redelivered: no records lie between)",
                repair,
            );
            fix_floors.push((id, group.to_string(), p, end));
        }
    }
    let queue = txn.open_table(QUEUE)?;
    let mut stale_queue: Vec<(u32, String, u32, u64)> = Vec::new();
    for e in queue.iter()? {
        let (k, _) = e?;
        let (id, group, p, o) = k.value();
        let floor = floors.get((id, group, p))?.map_or(0, |f| f.value());
        if o < floor || !ids.contains_key(&id) {
            stale_queue.push((id, group.to_string(), p, o));
        }
    }
    if !stale_queue.is_empty() {
        report.add(
            &db_path,
            format!(
                "{} queue state row(s) below their group's floor or of deleted topics",
                stale_queue.len()
            ),
            "--repair deletes them (those messages are settled)",
            repair,
        );
    }

    // Fan-out references must point into the log (below the start is a
    // lagging sweep, not damage).
    let mut dangling_inbox = Vec::new();
    for e in txn.open_table(INBOX)?.iter()? {
        let (k, _) = e?;
        let (id, f, p, o) = k.value();
        if bounds.get(&(id, p)).is_none_or(|&(_, end)| o >= end) {
            dangling_inbox.push((id, f, p, o));
        }
    }
    let mut dangling_index = Vec::new();
    for e in txn.open_table(KEY_INDEX)?.iter()? {
        let (k, _) = e?;
        let (id, h, p, o) = k.value();
        if bounds.get(&(id, p)).is_none_or(|&(_, end)| o >= end) {
            dangling_index.push((id, h, p, o));
        }
    }
    if !dangling_inbox.is_empty() || !dangling_index.is_empty() {
        report.add(
            &db_path,
            format!(
                "{} inbox and {} key-index reference(s) point past their partition's end or \
                 into deleted topics",
                dangling_inbox.len(),
                dangling_index.len()
            ),
            "--repair deletes them (feeds skip them anyway)",
            repair,
        );
    }
    drop(log);
    drop(parts);
    drop(topics);
    drop(floors);
    drop(queue);
    drop(txn);

    if repair {
        let w = db.begin_write()?;
        {
            let mut parts = w.open_table(PARTITIONS)?;
            for (k, v) in &fix_parts {
                parts.insert(*k, *v)?;
            }
            let mut log = w.open_table(LOG)?;
            for (from, to) in &drop_log {
                log.retain_in(*from..*to, |_, _| false)?;
            }
            for id in &orphan_ids {
                log.retain_in((*id, 0, 0)..=(*id, u32::MAX, u64::MAX), |_, _| false)?;
            }
            let mut floors = w.open_table(QUEUE_FLOOR)?;
            for (id, g, p, end) in &fix_floors {
                floors.insert((*id, g.as_str(), *p), *end)?;
            }
            let mut queue = w.open_table(QUEUE)?;
            for (id, g, p, o) in &stale_queue {
                queue.remove((*id, g.as_str(), *p, *o))?;
            }
            let mut inbox = w.open_table(INBOX)?;
            for k in &dangling_inbox {
                inbox.remove(*k)?;
            }
            let mut index = w.open_table(KEY_INDEX)?;
            for k in &dangling_index {
                index.remove(*k)?;
            }
        }
        w.commit()?;
    }
    Ok(report)
}
