//! Queue subscriptions: members of a group compete for individual messages,
//! acknowledge them one by one, and get them again after a visibility
//! timeout, a nack or a lost connection, until the retry policy dead-letters
//! them.
//!
//! A queue group reads the topic's log; it does not copy messages. It keeps
//! per partition a *floor* (every offset below is settled) and looks ahead
//! from it by at most the topic's `queue_window` messages. Those admitted
//! messages live in memory as small entries (no payloads) in ten priority
//! lanes; payloads are read from the log when delivered. What must survive a
//! crash is written to redb (`queue_state`, `queue_floor`) through the group
//! commit: in-flight deliveries with their attempt and deadline, retries with
//! their due time, and the floor itself; a first delivery in offset order
//! writes no row of its own but moves a per-partition mark (`queue_mark`),
//! and acks above the floor are kept as ranges, stored per 4,096-offset
//! chunk (`queue_done`, see [`super::ranges`]). On restart the
//! group re-admits from the floor and reapplies those entries, so an
//! unacknowledged message is delivered again (with its attempt count) and an
//! acknowledged one is not. An ack is durable at the next group commit: a
//! crash before it redelivers the message, never loses it.
//!
//! Selection: strict priority (9 first), FIFO within a priority, except that
//! every `100 / min_share_pct`-th delivery goes to the ready message that has
//! waited longest, whatever its priority. Under a flood of high-priority
//! messages, low-priority ones therefore still get at least `min_share_pct`
//! percent of deliveries.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};

use super::DeliveryError;
use super::ranges::{CHUNK, RangeSet, chunks_of};
use crate::plugins::{CallMessage, Failure, Hook, PluginRegistry, RetryDecision};
use crate::protocol::headers::{DELAY_MS, DELIVER_AT, MESSAGE_ID, Policy};
use crate::protocol::{
    DeliveryTag, ErrorCode, Frame, RawRecord, StartPosition, WireError, put_queue_deliver_header,
    put_queue_delivered,
};
use crate::storage::{
    KvWrite, QueueEntryState, QueueWrite, ReadLimit, Storage, StorageError, TopicHandle,
    TopicPolicy, now_ms,
};

const ST_INFLIGHT: u8 = 1;
const ST_WAITING: u8 = 2;
const ST_DONE: u8 = 3;

/// Most messages in one `QueueDeliver` frame.
const MAX_PER_FRAME: usize = 512;
/// Longest the timer task sleeps without looking.
const MAX_TICK_MS: u64 = 1_000;
/// Most messages admitted per call, so the group's lock is held briefly
/// even when a member joins a deep backlog; later calls admit more.
const ADMIT_PER_CALL: usize = 4_096;

/// Dead-letter headers: where the message came from and why it failed.
pub const DLQ_TOPIC: &str = "x-dlq-topic";
/// Original partition.
pub const DLQ_PARTITION: &str = "x-dlq-partition";
/// Original offset.
pub const DLQ_OFFSET: &str = "x-dlq-offset";
/// Deliveries attempted.
pub const DLQ_ATTEMPTS: &str = "x-dlq-attempts";
/// The last failure.
pub const DLQ_ERROR: &str = "x-dlq-error";
/// When it was dead-lettered, ms since the epoch.
pub const DLQ_TIME: &str = "x-dlq-time-ms";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Ready,
    InFlight {
        member: u64,
        deadline: u64,
    },
    Waiting {
        due: u64,
    },
    /// Failed or expired; the retry policy or a dead-letter append is running.
    Settling,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// True once redb holds a `queue_state` row for it.
    stored: bool,
    attempts: u32,
    priority: u8,
    expires_at: u64,
    phase: Phase,
}

#[derive(Default)]
struct Part {
    /// Next offset to admit.
    scan: u64,
    /// Every offset below is settled.
    floor: u64,
    /// Every offset from the floor up to here was delivered at least once
    /// or has its own stored row: a first delivery at the mark advances it
    /// instead of writing a row (after a restart, offsets below it without a
    /// row count one attempt).
    mark: u64,
    /// Admitted, unsettled offsets.
    open: BTreeSet<u64>,
    /// Settled offsets at or above the floor.
    done: RangeSet,
    /// Stored state of offsets not yet re-admitted after a restart.
    recovered: HashMap<u64, QueueEntryState>,
}

/// A message that failed: the retry policy decides what happens next.
#[derive(Debug, Clone)]
pub struct Failed {
    partition: u32,
    offset: u64,
    attempts: u32,
    failure: Failure,
    /// Skip the retry policy (expired messages of a dead-lettering topic).
    dead_letter_now: bool,
}

struct State {
    parts: Vec<Part>,
    // Looked up several times per message: Fx, not SipHash (keys are ours,
    // not an attacker's).
    entries: FxHashMap<(u32, u64), Entry>,
    lanes: [VecDeque<(u64, u32, u64)>; 10],
    seq: u64,
    timers: BTreeSet<(u64, u32, u64)>,
    deadlines: BTreeSet<(u64, u32, u64)>,
    /// Entries that are ready, in flight or settling (waiting ones do not count).
    window_used: usize,
    picks: u64,
    rr: usize,
    pending: QueueWrite,
    /// `(partition, chunk)` of `done` ranges changed since the last flush.
    done_dirty: FxHashSet<(u32, u64)>,
    inflight: FxHashMap<u64, usize>,
    next_member: u64,
    tick_target: u64,
}

/// Counters of one queue group, as shown by `switchyard queue stats`.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Deliveries sent (first and repeated).
    pub delivered: AtomicU64,
    /// Acknowledged messages.
    pub acked: AtomicU64,
    /// Negative acknowledgements received.
    pub nacked: AtomicU64,
    /// Visibility timeouts.
    pub timed_out: AtomicU64,
    /// Failures the retry policy scheduled for another attempt.
    pub retried: AtomicU64,
    /// Messages moved to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Messages that expired before delivery.
    pub expired: AtomicU64,
}

/// A queue group's shared state for one topic.
pub struct QueueGroup {
    /// Group name.
    pub name: Arc<str>,
    /// The topic.
    pub topic: Arc<TopicHandle>,
    storage: Storage,
    plugins: Arc<PluginRegistry>,
    state: Mutex<State>,
    ready: watch::Sender<u64>,
    wake_timer: Arc<Notify>,
    flush_lock: tokio::sync::Mutex<()>,
    /// On a cluster of several groups, where the topic's group stands: a
    /// dead-letter topic another group holds is written through the
    /// group's outbox.
    placement: Option<crate::server::placement::Placement>,
    /// Counters.
    pub stats: QueueStats,
}

impl State {
    fn push_ready(&mut self, p: u32, o: u64, priority: u8) {
        self.seq += 1;
        self.lanes[priority.min(9) as usize].push_back((self.seq, p, o));
    }

    /// The next ready message: highest priority first, except every
    /// `share_every`-th pick takes the one that has waited longest.
    fn pick(&mut self, share_every: u64) -> Option<(u32, u64)> {
        let lane = if share_every > 0 && (self.picks + 1).is_multiple_of(share_every) {
            (0..10)
                .filter(|&l| !self.lanes[l].is_empty())
                .min_by_key(|&l| self.lanes[l].front().map(|e| e.0))
        } else {
            (0..10).rev().find(|&l| !self.lanes[l].is_empty())
        }?;
        self.picks += 1;
        let (_, p, o) = self.lanes[lane].pop_front()?;
        Some((p, o))
    }

    /// Moves partition `p`'s mark over offsets delivered at least once or
    /// settled. Returns the new mark.
    fn advance_mark(&mut self, p: u32) -> u64 {
        let part = &mut self.parts[p as usize];
        let mut mark = part.mark.max(part.floor);
        while mark < part.scan {
            let covered = !part.open.contains(&mark)
                || self.entries.get(&(p, mark)).is_some_and(|e| e.attempts > 0);
            if !covered {
                break;
            }
            mark += 1;
        }
        part.mark = mark;
        mark
    }

    fn refloor(&mut self, p: u32) {
        let part = &mut self.parts[p as usize];
        let new_floor = part.open.first().copied().unwrap_or(part.scan);
        if new_floor > part.floor {
            part.floor = new_floor;
            part.mark = part.mark.max(new_floor);
            self.pending.floors.push((p, new_floor));
            for (s, e) in part.done.remove_below(new_floor) {
                for c in chunks_of(s, e) {
                    self.done_dirty.insert((p, c));
                }
            }
        }
    }

    /// The state changes to write, with the changed `done` chunks encoded.
    fn take_pending(&mut self, topic_id: u32, group: &Arc<str>) -> QueueWrite {
        let mut w = std::mem::replace(
            &mut self.pending,
            QueueWrite {
                topic_id,
                group: group.clone(),
                ..QueueWrite::default()
            },
        );
        for (p, c) in self.done_dirty.drain() {
            let bytes = self.parts[p as usize].done.encode_chunk(c);
            w.done.push((p, c, bytes));
        }
        w
    }

    /// Removes a message from the queue for good.
    fn settle(&mut self, p: u32, o: u64) -> bool {
        let Some(e) = self.entries.remove(&(p, o)) else {
            return false;
        };
        match e.phase {
            Phase::Waiting { due } => {
                self.timers.remove(&(due, p, o));
            }
            Phase::InFlight { member, deadline } => {
                self.deadlines.remove(&(deadline, p, o));
                if let Some(n) = self.inflight.get_mut(&member) {
                    *n = n.saturating_sub(1);
                }
                self.window_used = self.window_used.saturating_sub(1);
            }
            Phase::Ready | Phase::Settling => {
                self.window_used = self.window_used.saturating_sub(1);
            }
        }
        let part = &mut self.parts[p as usize];
        part.open.remove(&o);
        let floor = part.open.first().copied().unwrap_or(part.scan);
        if o >= floor {
            // Settled out of order: remember it until the floor passes.
            part.done.insert(o);
            self.done_dirty.insert((p, o / CHUNK));
        }
        if e.stored {
            self.pending.entries.push((p, o, None));
        }
        self.refloor(p);
        true
    }

    /// Looks up an in-flight delivery held by `member`.
    fn in_flight(&self, member: u64, t: &DeliveryTag) -> Option<u64> {
        match self.entries.get(&(t.partition, t.offset)) {
            Some(Entry {
                attempts,
                phase:
                    Phase::InFlight {
                        member: m,
                        deadline,
                    },
                ..
            }) if *m == member && *attempts == t.attempt => Some(*deadline),
            _ => None,
        }
    }

    /// Marks an in-flight delivery as failed.
    fn fail(&mut self, p: u32, o: u64) -> Option<u32> {
        let e = self.entries.get_mut(&(p, o))?;
        let Phase::InFlight { member, deadline } = e.phase else {
            return None;
        };
        e.phase = Phase::Settling;
        let attempts = e.attempts;
        self.deadlines.remove(&(deadline, p, o));
        if let Some(n) = self.inflight.get_mut(&member) {
            *n = n.saturating_sub(1);
        }
        Some(attempts)
    }
}

fn unknown_deliveries(bad: &[DeliveryTag], what: &str) -> WireError {
    let list: Vec<String> = bad
        .iter()
        .take(5)
        .map(|t| format!("p{}@{} attempt {}", t.partition, t.offset, t.attempt))
        .collect();
    WireError::new(
        ErrorCode::UnknownDelivery,
        format!(
            "cannot {what} {} deliver{} ({}{}): not in flight to this subscriber; \
             already settled, or its visibility timeout passed and it was redelivered",
            bad.len(),
            if bad.len() == 1 { "y" } else { "ies" },
            list.join(", "),
            if bad.len() > 5 { ", ..." } else { "" }
        ),
    )
}

impl QueueGroup {
    /// Opens (or recovers) the queue group `name` on `topic`. A group with
    /// no stored floor starts at `start`.
    pub fn open(
        name: Arc<str>,
        topic: Arc<TopicHandle>,
        storage: Storage,
        plugins: Arc<PluginRegistry>,
        start: StartPosition,
        placement: Option<crate::server::placement::Placement>,
    ) -> Result<Arc<Self>, StorageError> {
        let snap = storage.queue_snapshot(topic.meta.id, &name)?;
        let infos = topic.partitions();
        let mut pending = QueueWrite {
            topic_id: topic.meta.id,
            group: name.clone(),
            ..QueueWrite::default()
        };
        let mut parts = Vec::with_capacity(infos.len());
        for (p, info) in infos.iter().enumerate() {
            let p = p as u32;
            let floor = match snap.floors.get(&p) {
                Some(f) => *f,
                None => {
                    let f = match start {
                        StartPosition::Earliest => info.start,
                        StartPosition::Latest => info.end,
                        StartPosition::Offset(o) => o.clamp(info.start, info.end),
                        StartPosition::Timestamp(t) => {
                            storage.offset_for_time(topic.meta.id, p, info.start, info.end, t)?
                        }
                    };
                    pending.floors.push((p, f));
                    f
                }
            }
            .max(info.start);
            let mark = snap.marks.get(&p).copied().unwrap_or(floor).max(floor);
            parts.push(Part {
                scan: floor,
                floor,
                mark,
                ..Part::default()
            });
        }
        let mut done_dirty = FxHashSet::default();
        for (p, c, bytes) in snap.done {
            if let Some(part) = parts.get_mut(p as usize) {
                part.done.decode_chunk(c, &bytes);
                // Rewritten at the first flush: chunks below the floor go.
                done_dirty.insert((p, c));
            }
        }
        for (p, o, v) in snap.entries {
            let Some(part) = parts.get_mut(p as usize) else {
                continue;
            };
            if o < part.floor {
                pending.entries.push((p, o, None));
            } else if v.0 == ST_DONE {
                // Stored by versions that kept one row per ack.
                part.done.insert(o);
                done_dirty.insert((p, o / CHUNK));
                pending.entries.push((p, o, None));
            } else {
                part.recovered.insert(o, v);
            }
        }
        for part in &mut parts {
            part.done.remove_below(part.floor);
        }
        let g = Arc::new(QueueGroup {
            name,
            topic,
            storage,
            plugins,
            state: Mutex::new(State {
                parts,
                entries: FxHashMap::default(),
                lanes: Default::default(),
                seq: 0,
                timers: BTreeSet::new(),
                deadlines: BTreeSet::new(),
                window_used: 0,
                picks: 0,
                rr: 0,
                pending,
                done_dirty,
                inflight: FxHashMap::default(),
                next_member: 1,
                tick_target: 0,
            }),
            ready: watch::Sender::new(0),
            wake_timer: Arc::new(Notify::new()),
            flush_lock: tokio::sync::Mutex::new(()),
            placement,
            stats: QueueStats::default(),
        });
        tokio::spawn(timer_task(Arc::downgrade(&g), g.wake_timer.clone()));
        Ok(g)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("queue state lock")
    }

    fn policy(&self) -> Arc<TopicPolicy> {
        self.topic.policy()
    }

    /// Adds a member; returns its id.
    pub fn join(&self) -> u64 {
        let mut st = self.lock();
        let m = st.next_member;
        st.next_member += 1;
        st.inflight.insert(m, 0);
        m
    }

    /// Removes a member: its in-flight messages are ready again at once
    /// (their attempt count kept), as when a RabbitMQ channel closes.
    pub fn leave(&self, member: u64) {
        let mut st = self.lock();
        st.inflight.remove(&member);
        let mine: Vec<((u32, u64), u64, u8)> = st
            .entries
            .iter()
            .filter_map(|(k, e)| match e.phase {
                Phase::InFlight {
                    member: m,
                    deadline,
                } if m == member => Some((*k, deadline, e.priority)),
                _ => None,
            })
            .collect();
        for ((p, o), deadline, priority) in &mine {
            st.deadlines.remove(&(*deadline, *p, *o));
            if let Some(e) = st.entries.get_mut(&(*p, *o)) {
                e.phase = Phase::Ready;
            }
            st.push_ready(*p, *o, *priority);
        }
        drop(st);
        if !mine.is_empty() {
            self.ready.send_modify(|v| *v += 1);
        }
    }

    /// Messages this member holds unacknowledged.
    pub fn in_flight_of(&self, member: u64) -> usize {
        self.lock().inflight.get(&member).copied().unwrap_or(0)
    }

    /// Unsettled messages: from each partition's floor to its end.
    pub fn backlog(&self) -> u64 {
        let infos = self.topic.partitions();
        let st = self.lock();
        st.parts
            .iter()
            .zip(infos.iter())
            .map(|(part, info)| info.end.saturating_sub(part.floor.max(info.start)))
            .sum()
    }

    /// A receiver that changes when messages become ready.
    pub fn ready_watch(&self) -> watch::Receiver<u64> {
        self.ready.subscribe()
    }

    /// Admits messages from the log until the window is full.
    fn admit(&self, st: &mut State, policy: &TopicPolicy, now: u64) -> Result<bool, StorageError> {
        let window = policy.queue_window as usize;
        let infos = self.topic.partitions();
        let n = st.parts.len();
        let mut admitted = false;
        let mut idle = 0;
        let mut budget = ADMIT_PER_CALL;
        while st.window_used < window && idle < n && budget > 0 {
            let p = st.rr % n;
            st.rr = st.rr.wrapping_add(1);
            let info = infos[p];
            let part = &mut st.parts[p];
            part.scan = part.scan.max(info.start);
            if part.scan >= info.end {
                idle += 1;
                continue;
            }
            idle = 0;
            let room = (window - st.window_used).min(256).min(budget);
            let mut batch = Vec::with_capacity(room);
            let from = part.scan;
            let next = self.storage.scan(
                self.topic.meta.id,
                p as u32,
                from,
                ReadLimit {
                    max_records: room,
                    max_bytes: usize::MAX,
                },
                |o, ts, rec| {
                    let pol = Policy::parse_stored(rec);
                    let ttl = pol.ttl_ms.unwrap_or(policy.ttl_ms);
                    batch.push((
                        o,
                        pol.priority.unwrap_or(policy.default_priority),
                        if ttl == 0 {
                            u64::MAX
                        } else {
                            ts.saturating_add(ttl)
                        },
                        pol.visible_at(ts),
                    ));
                },
            )?;
            let p = p as u32;
            budget = budget.saturating_sub(batch.len().max(1));
            st.parts[p as usize].scan = next.max(from);
            for (o, priority, expires_at, visible_at) in batch {
                let part = &mut st.parts[p as usize];
                if part.done.contains(o) {
                    continue;
                }
                let (stored, attempts, phase) = match part.recovered.remove(&o) {
                    Some((ST_WAITING, a, due)) => (true, a, Phase::Waiting { due }),
                    Some((_, a, _)) => (true, a, Phase::Ready),
                    // Delivered in order before a restart, never acked.
                    None if o < part.mark => (false, 1, Phase::Ready),
                    None if visible_at > now => (false, 0, Phase::Waiting { due: visible_at }),
                    None => (false, 0, Phase::Ready),
                };
                part.open.insert(o);
                st.entries.insert(
                    (p, o),
                    Entry {
                        stored,
                        attempts,
                        priority,
                        expires_at,
                        phase,
                    },
                );
                match phase {
                    Phase::Waiting { due } => {
                        st.timers.insert((due, p, o));
                        if due < st.tick_target {
                            self.wake_timer.notify_one();
                        }
                    }
                    _ => {
                        st.window_used += 1;
                        st.push_ready(p, o, priority);
                    }
                }
                admitted = true;
            }
            st.refloor(p);
        }
        Ok(admitted)
    }

    /// Picks up to `max` messages for `member`: in flight until acked, or
    /// settled at once with `auto_ack`. Returns their tags, and expired
    /// messages that must be dead-lettered.
    fn take(
        &self,
        member: u64,
        max: usize,
        visibility_ms: u64,
        auto_ack: bool,
    ) -> Result<(Vec<DeliveryTag>, Vec<Failed>), StorageError> {
        let policy = self.policy();
        let now = now_ms();
        let share_every = match policy.min_share_pct {
            0 => 0,
            pct => (100 / pct as u64).max(1),
        };
        let mut st = self.lock();
        self.admit(&mut st, &policy, now)?;
        let mut tags = Vec::new();
        let mut expired = Vec::new();
        let mut marked: Vec<u32> = Vec::new();
        while tags.len() < max {
            let Some((p, o)) = st.pick(share_every) else {
                break;
            };
            let Some(e) = st.entries.get_mut(&(p, o)) else {
                continue;
            };
            if e.phase != Phase::Ready {
                continue;
            }
            if e.expires_at <= now {
                self.stats.expired.fetch_add(1, Ordering::Relaxed);
                if policy.dead_letter_expired {
                    e.phase = Phase::Settling;
                    expired.push(Failed {
                        partition: p,
                        offset: o,
                        attempts: e.attempts,
                        failure: Failure {
                            code: "expired".into(),
                            message: "time to live passed before delivery".into(),
                            retryable: false,
                        },
                        dead_letter_now: true,
                    });
                } else {
                    st.settle(p, o);
                }
                continue;
            }
            e.attempts += 1;
            let attempt = e.attempts;
            tags.push(DeliveryTag {
                partition: p,
                offset: o,
                attempt,
            });
            if auto_ack {
                st.settle(p, o);
                continue;
            }
            let deadline = now.saturating_add(visibility_ms);
            e.phase = Phase::InFlight { member, deadline };
            st.deadlines.insert((deadline, p, o));
            if deadline < st.tick_target {
                self.wake_timer.notify_one();
            }
            *st.inflight.entry(member).or_default() += 1;
            // A first delivery in offset order only moves the mark; any
            // other delivery records its attempt and deadline.
            let in_order = attempt == 1 && st.advance_mark(p) > o;
            if in_order {
                if !marked.contains(&p) {
                    marked.push(p);
                }
            } else if let Some(e) = st.entries.get_mut(&(p, o)) {
                e.stored = true;
                st.pending
                    .entries
                    .push((p, o, Some((ST_INFLIGHT, attempt, deadline))));
            }
        }
        for p in marked {
            let mark = st.parts[p as usize].mark;
            st.pending.marks.push((p, mark));
        }
        if !tags.is_empty() {
            self.stats
                .delivered
                .fetch_add(tags.len() as u64, Ordering::Relaxed);
        }
        Ok((tags, expired))
    }

    /// Acknowledges deliveries. Valid ones are settled even if others in
    /// the same request are not; the error names the invalid ones.
    pub fn ack(&self, member: u64, items: &[DeliveryTag]) -> Result<(), WireError> {
        let mut st = self.lock();
        let was_full = st.window_used >= self.policy().queue_window as usize;
        let mut bad = Vec::new();
        for t in items {
            if st.in_flight(member, t).is_some() {
                st.settle(t.partition, t.offset);
            } else {
                bad.push(*t);
            }
        }
        drop(st);
        let ok = items.len() - bad.len();
        self.stats.acked.fetch_add(ok as u64, Ordering::Relaxed);
        if was_full && ok > 0 {
            self.ready.send_modify(|v| *v += 1);
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(unknown_deliveries(&bad, "ack"))
        }
    }

    /// Records a nack; returns the failures for the retry policy.
    pub fn nack(
        &self,
        member: u64,
        items: &[DeliveryTag],
        failure: &Failure,
    ) -> (Vec<Failed>, Result<(), WireError>) {
        let mut st = self.lock();
        let mut bad = Vec::new();
        let mut failed = Vec::new();
        for t in items {
            if st.in_flight(member, t).is_none() {
                bad.push(*t);
                continue;
            }
            if let Some(attempts) = st.fail(t.partition, t.offset) {
                failed.push(Failed {
                    partition: t.partition,
                    offset: t.offset,
                    attempts,
                    failure: failure.clone(),
                    dead_letter_now: false,
                });
            }
        }
        drop(st);
        self.stats
            .nacked
            .fetch_add(failed.len() as u64, Ordering::Relaxed);
        let r = if bad.is_empty() {
            Ok(())
        } else {
            Err(unknown_deliveries(&bad, "nack"))
        };
        (failed, r)
    }

    /// Moves the visibility deadline of deliveries to `now + visibility_ms`.
    pub fn extend(
        &self,
        member: u64,
        items: &[DeliveryTag],
        visibility_ms: u64,
    ) -> Result<(), WireError> {
        let now = now_ms();
        let mut st = self.lock();
        let mut bad = Vec::new();
        for t in items {
            let Some(old) = st.in_flight(member, t) else {
                bad.push(*t);
                continue;
            };
            let (p, o) = (t.partition, t.offset);
            let deadline = now.saturating_add(visibility_ms);
            st.deadlines.remove(&(old, p, o));
            st.deadlines.insert((deadline, p, o));
            if let Some(e) = st.entries.get_mut(&(p, o)) {
                e.phase = Phase::InFlight { member, deadline };
            }
            st.pending
                .entries
                .push((p, o, Some((ST_INFLIGHT, t.attempt, deadline))));
            if deadline < st.tick_target {
                self.wake_timer.notify_one();
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(unknown_deliveries(&bad, "extend"))
        }
    }

    /// Fails expired deliveries and readies due retries. Returns the
    /// failures and when to look again.
    fn tick(&self, now: u64) -> (Vec<Failed>, u64) {
        let mut st = self.lock();
        let mut failed = Vec::new();
        while let Some(&(d, p, o)) = st.deadlines.first() {
            if d > now {
                break;
            }
            let current = matches!(
                st.entries.get(&(p, o)),
                Some(Entry { phase: Phase::InFlight { deadline, .. }, .. }) if *deadline == d
            );
            if let Some(attempts) = current.then(|| st.fail(p, o)).flatten() {
                failed.push(Failed {
                    partition: p,
                    offset: o,
                    attempts,
                    failure: Failure {
                        code: "visibility-timeout".into(),
                        message: "not acknowledged within the visibility timeout".into(),
                        retryable: true,
                    },
                    dead_letter_now: false,
                });
            } else {
                st.deadlines.pop_first();
            }
        }
        let mut woke = false;
        while let Some(&(due, p, o)) = st.timers.first() {
            if due > now {
                break;
            }
            st.timers.pop_first();
            let Some(e) = st.entries.get_mut(&(p, o)) else {
                continue;
            };
            if e.phase != (Phase::Waiting { due }) {
                continue;
            }
            e.phase = Phase::Ready;
            let priority = e.priority;
            st.window_used += 1;
            st.push_ready(p, o, priority);
            woke = true;
        }
        let next = [st.deadlines.first(), st.timers.first()]
            .into_iter()
            .flatten()
            .map(|e| e.0)
            .min()
            .unwrap_or(u64::MAX)
            .min(now + MAX_TICK_MS);
        st.tick_target = next;
        drop(st);
        self.stats
            .timed_out
            .fetch_add(failed.len() as u64, Ordering::Relaxed);
        if woke {
            self.ready.send_modify(|v| *v += 1);
        }
        (failed, next)
    }

    /// Applies the retry policy to failed messages: the topic's retry
    /// plugin if one is deployed, else the topic's default backoff.
    pub async fn process_failures(&self, failed: Vec<Failed>) {
        if failed.is_empty() {
            return;
        }
        let policy = self.policy();
        let plugin = self.plugins.hook_for(Hook::Retry, &self.topic.meta.name);
        let records = if plugin.is_some() {
            self.read(failed.iter().map(|f| (f.partition, f.offset)))
        } else {
            HashMap::new()
        };
        let mut dead = Vec::new();
        let mut retry = Vec::new();
        let mut kv: Vec<KvWrite> = Vec::new();
        let mut settle_kv = Vec::new();
        for f in failed {
            let default = || {
                if !f.failure.retryable || f.attempts >= policy.max_attempts {
                    RetryDecision::DeadLetter(if f.failure.retryable {
                        format!(
                            "gave up after {} attempts: {}: {}",
                            f.attempts, f.failure.code, f.failure.message
                        )
                    } else {
                        format!(
                            "non-retryable failure {}: {}",
                            f.failure.code, f.failure.message
                        )
                    })
                } else {
                    RetryDecision::RetryAfterMs(policy.backoff_ms(f.attempts))
                }
            };
            let decision = if f.dead_letter_now {
                RetryDecision::DeadLetter(format!("{}: {}", f.failure.code, f.failure.message))
            } else if let (Some(live), Some((ts, rec))) =
                (&plugin, records.get(&(f.partition, f.offset)))
            {
                let msg = CallMessage {
                    record: rec.clone(),
                    topic: self.topic.meta.name.as_str().into(),
                    timestamp_ms: *ts,
                    attempt: f.attempts,
                };
                let r = live.plugin.retry(msg, &f.failure);
                match r.decisions {
                    Ok(mut d) => {
                        for (key, value) in &r.kv_writes {
                            kv.push(KvWrite {
                                plugin: live
                                    .plugin
                                    .label
                                    .split('@')
                                    .next()
                                    .unwrap_or_default()
                                    .into(),
                                key: key.clone(),
                                value: value.clone(),
                            });
                        }
                        settle_kv.push((live.clone(), r.kv_writes));
                        d.pop().unwrap_or_else(default)
                    }
                    Err(e) => {
                        tracing::warn!(plugin = %live.plugin.label, error = %e,
                            "retry plugin failed; using the topic's default policy");
                        default()
                    }
                }
            } else {
                default()
            };
            match decision {
                RetryDecision::RetryAfterMs(ms) => retry.push((f, ms.min(policy.max_delay_ms))),
                RetryDecision::DeadLetter(reason) => dead.push((f, reason)),
            }
        }
        if !kv.is_empty() {
            match self.storage.append_many(Vec::new(), kv).await {
                Ok(t) => {
                    let _ = t.await;
                }
                Err(e) => tracing::warn!(error = %e, "retry plugin key/value writes not stored"),
            }
        }
        for (live, writes) in settle_kv {
            live.plugin.settle_kv(&writes);
        }
        if !retry.is_empty() {
            let now = now_ms();
            let mut st = self.lock();
            for (f, ms) in &retry {
                let (p, o) = (f.partition, f.offset);
                let Some(e) = st.entries.get_mut(&(p, o)) else {
                    continue;
                };
                let due = now.saturating_add(*ms);
                e.phase = Phase::Waiting { due };
                e.stored = true;
                st.window_used = st.window_used.saturating_sub(1);
                st.timers.insert((due, p, o));
                st.pending
                    .entries
                    .push((p, o, Some((ST_WAITING, f.attempts, due))));
                if due < st.tick_target {
                    self.wake_timer.notify_one();
                }
            }
            drop(st);
            self.stats
                .retried
                .fetch_add(retry.len() as u64, Ordering::Relaxed);
            // The window has room again: members may admit more.
            self.ready.send_modify(|v| *v += 1);
        }
        if !dead.is_empty() {
            self.dead_letter(dead).await;
        }
        self.flush().await;
    }

    fn read(
        &self,
        keys: impl Iterator<Item = (u32, u64)>,
    ) -> HashMap<(u32, u64), (u64, RawRecord)> {
        let keys: Vec<(u32, u64)> = keys.collect();
        let mut out = HashMap::new();
        let r = self
            .storage
            .get_many(self.topic.meta.id, &keys, |i, ts, rec| {
                if let Ok(r) = RawRecord::new(Bytes::copy_from_slice(rec)) {
                    out.insert(keys[i], (ts, r));
                }
            });
        if let Err(e) = r {
            tracing::warn!(error = %e, "reading failed messages");
        }
        out
    }

    /// Appends failed messages to `<topic>.dlq` with their history, then
    /// settles them. If the append fails they are retried in a second.
    async fn dead_letter(&self, dead: Vec<(Failed, String)>) {
        let records = self.read(dead.iter().map(|(f, _)| (f.partition, f.offset)));
        let now = now_ms();
        let dlq = self.dlq_topic().await;
        // Held by another group: through this group's outbox.
        let bound_for = dlq.as_ref().ok().and_then(|(_, name)| name.clone());
        let mut out = Vec::new();
        for (f, reason) in &dead {
            let Some((_, rec)) = records.get(&(f.partition, f.offset)) else {
                continue; // removed by retention meanwhile
            };
            let mut r = rec.to_record();
            r.headers.retain(|(n, _)| !n.starts_with("x-dlq-"));
            r.headers
                .push((DLQ_TOPIC.into(), self.topic.meta.name.clone().into()));
            r.headers
                .push((DLQ_PARTITION.into(), f.partition.to_string().into()));
            r.headers
                .push((DLQ_OFFSET.into(), f.offset.to_string().into()));
            r.headers
                .push((DLQ_ATTEMPTS.into(), f.attempts.to_string().into()));
            r.headers.push((DLQ_ERROR.into(), reason.clone().into()));
            r.headers.push((DLQ_TIME.into(), now.to_string().into()));
            if let Some(name) = &bound_for {
                r.headers
                    .retain(|(n, _)| n != crate::server::outbox::TO_HEADER);
                r.headers
                    .push((crate::server::outbox::TO_HEADER.into(), name.clone().into()));
            }
            out.push((0, r.to_raw()));
        }
        let stored = match dlq.map(|(t, _)| t) {
            Ok(t) if out.is_empty() => {
                drop(t);
                Ok(())
            }
            Ok(t) => match self.storage.append(&t, out).await {
                Ok(ticket) => ticket
                    .await
                    .unwrap_or(Err(StorageError::ShutDown))
                    .map(|_| ()),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let mut st = self.lock();
        match stored {
            Ok(()) => {
                for (f, _) in &dead {
                    st.settle(f.partition, f.offset);
                }
                drop(st);
                self.stats
                    .dead_lettered
                    .fetch_add(dead.len() as u64, Ordering::Relaxed);
                for (f, why) in &dead {
                    tracing::info!(topic = %self.topic.meta.name, group = %self.name,
                        partition = f.partition, offset = f.offset, reason = %why,
                        "moved to the dead-letter topic");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, topic = %self.topic.meta.name,
                    "dead-letter append failed; retrying in 1 s");
                let due = now_ms() + 1_000;
                for (f, _) in &dead {
                    let (p, o) = (f.partition, f.offset);
                    if let Some(e) = st.entries.get_mut(&(p, o)) {
                        e.phase = Phase::Waiting { due };
                        st.window_used = st.window_used.saturating_sub(1);
                        st.timers.insert((due, p, o));
                    }
                }
                self.wake_timer.notify_one();
            }
        }
    }

    /// The topic dead letters are appended to: the dead-letter topic
    /// (made if it does not exist), or, where another group of the
    /// cluster holds it, this group's outbox and the name to forward to.
    async fn dlq_topic(&self) -> Result<(Arc<TopicHandle>, Option<String>), StorageError> {
        let name = self.topic.policy().dlq_of(&self.topic.meta.name);
        if let Some(t) = self.storage.topic(&name) {
            return Ok((t, None));
        }
        if let Some(p) = &self.placement
            && p.zero.group_of(&name).is_some_and(|g| g != p.group)
        {
            let outbox = crate::server::outbox::name(p.group);
            return match self.storage.topic(&outbox) {
                Some(t) => Ok((t, Some(name))),
                None => Err(StorageError::UnknownTopic(outbox)),
            };
        }
        match self.storage.create_topic(&name, 1, 0, 0).await {
            Ok(t) => Ok((t, None)),
            Err(StorageError::TopicExists(_)) => self
                .storage
                .topic(&name)
                .map(|t| (t, None))
                .ok_or(StorageError::UnknownTopic(name)),
            Err(e) => Err(e),
        }
    }

    /// Writes queued state changes to the group commit, in order.
    pub async fn flush(&self) {
        let _order = self.flush_lock.lock().await;
        let w = self.lock().take_pending(self.topic.meta.id, &self.name);
        if let Err(e) = self.storage.queue_write(w).await {
            tracing::debug!(error = %e, "queue state not written");
        }
    }

    /// Messages ready, in flight and waiting (delayed or backing off).
    pub fn depth(&self) -> (usize, usize, usize) {
        let st = self.lock();
        let ready: usize = st.lanes.iter().map(|l| l.len()).sum();
        (ready, st.deadlines.len(), st.timers.len())
    }

    /// The group's counters and sizes, for `queue stats`.
    pub fn describe(&self) -> serde_json::Value {
        let st = self.lock();
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let ready: usize = st.lanes.iter().map(|l| l.len()).sum();
        let in_flight = st.deadlines.len();
        let waiting = st.timers.len();
        let floors: Vec<u64> = st.parts.iter().map(|p| p.floor).collect();
        drop(st);
        serde_json::json!({
            "topic": self.topic.meta.name,
            "group": &*self.name,
            "backlog": self.backlog(),
            "ready": ready,
            "in_flight": in_flight,
            "waiting": waiting,
            "floors": floors,
            "delivered": c(&self.stats.delivered),
            "acked": c(&self.stats.acked),
            "nacked": c(&self.stats.nacked),
            "timed_out": c(&self.stats.timed_out),
            "retried": c(&self.stats.retried),
            "dead_lettered": c(&self.stats.dead_lettered),
            "expired": c(&self.stats.expired),
        })
    }
}

/// Expires visibility deadlines and readies due messages, on time.
async fn timer_task(group: Weak<QueueGroup>, wake: Arc<Notify>) {
    loop {
        let Some(g) = group.upgrade() else { return };
        if g.topic.is_deleted() {
            return;
        }
        let now = now_ms();
        let (failed, next) = g.tick(now);
        g.process_failures(failed).await;
        g.flush().await;
        drop(g);
        let wait = next.saturating_sub(now_ms()).clamp(1, MAX_TICK_MS);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            _ = wake.notified() => {}
        }
    }
}

/// Something a queue subscriber sent.
#[derive(Debug, Clone)]
pub enum QueueEvent {
    /// More credits (auto-ack mode).
    Credit(u32),
    /// Ack.
    Ack {
        /// Request id.
        id: u64,
        /// Deliveries.
        items: Vec<DeliveryTag>,
    },
    /// Nack.
    Nack {
        /// Request id.
        id: u64,
        /// Deliveries.
        items: Vec<DeliveryTag>,
        /// Why.
        failure: Failure,
    },
    /// Extend visibility.
    Extend {
        /// Request id.
        id: u64,
        /// Deliveries.
        items: Vec<DeliveryTag>,
        /// New timeout from now.
        visibility_ms: u64,
    },
}

/// One member of a queue group, delivering to one subscriber stream.
pub struct QueueSubscription {
    group: Arc<QueueGroup>,
    member: u64,
    prefetch: u64,
    credits: u64,
    visibility_ms: u64,
    auto_ack: bool,
}

impl QueueSubscription {
    /// Joins `group`. With `auto_ack`, messages are settled when sent and
    /// `prefetch` is a credit window; otherwise `prefetch` bounds the
    /// messages in flight (unacknowledged) to this member.
    pub fn join(group: Arc<QueueGroup>, prefetch: u32, visibility_ms: u64, auto_ack: bool) -> Self {
        let member = group.join();
        QueueSubscription {
            group,
            member,
            prefetch: prefetch.max(1) as u64,
            credits: prefetch as u64,
            visibility_ms: visibility_ms.max(1),
            auto_ack,
        }
    }

    async fn apply(&mut self, ev: QueueEvent, buf: &mut BytesMut) {
        let answer = |id: u64, r: Result<(), WireError>, buf: &mut BytesMut| match r {
            Ok(()) => Frame::Ok { id }.encode(buf),
            Err(e) => Frame::error(id, &e).encode(buf),
        };
        match ev {
            QueueEvent::Credit(n) => self.credits += n as u64,
            QueueEvent::Ack { id, items } => {
                let r = self.group.ack(self.member, &items);
                answer(id, r, buf);
            }
            QueueEvent::Nack { id, items, failure } => {
                let (failed, r) = self.group.nack(self.member, &items, &failure);
                self.group.process_failures(failed).await;
                answer(id, r, buf);
            }
            QueueEvent::Extend {
                id,
                items,
                visibility_ms,
            } => {
                let r = self.group.extend(self.member, &items, visibility_ms);
                answer(id, r, buf);
            }
        }
    }

    fn room(&self) -> u64 {
        if self.auto_ack {
            self.credits
        } else {
            self.prefetch
                .saturating_sub(self.group.in_flight_of(self.member) as u64)
        }
    }

    /// Delivers until the subscriber closes its side, the topic is
    /// deleted, or a write fails. In-flight messages are released on return.
    pub async fn run<W: AsyncWrite + Unpin>(
        mut self,
        out: &mut W,
        mut events: mpsc::Receiver<QueueEvent>,
    ) -> Result<(), DeliveryError> {
        let mut topic_rx = self.group.topic.watch();
        let mut ready_rx = self.group.ready_watch();
        let mut buf = BytesMut::with_capacity(64 << 10);
        // Answers to acks, nacks and extends: sent once the state changes
        // they made are committed. The loop does not wait for that commit:
        // it queues the answers behind a flush ticket and goes on
        // delivering, and writes them, in order, as their commits finish.
        let mut answers = BytesMut::new();
        let mut committing: VecDeque<(FlushTicket, BytesMut)> = VecDeque::new();
        loop {
            loop {
                match events.try_recv() {
                    Ok(ev) => self.apply(ev, &mut answers).await,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        out.write_all(&buf).await?;
                        return self.finish_answers(out, answers, committing).await;
                    }
                }
            }
            topic_rx.borrow_and_update();
            ready_rx.borrow_and_update();
            if self.group.topic.is_deleted() {
                let f = super::topic_deleted(&self.group.topic.meta.name);
                f.encode(&mut buf);
                out.write_all(&buf).await?;
                return Ok(());
            }
            let room = self.room();
            let mut sent = 0;
            if room > 0 {
                sent = self.fill(&mut buf, room as usize).await?;
            }
            if !buf.is_empty() {
                out.write_all(&buf).await?;
                buf.clear();
            }
            self.group.flush().await;
            if !answers.is_empty() {
                let ticket = self.group.storage.flush_ticket().await?;
                committing.push_back((ticket, std::mem::take(&mut answers)));
            }
            // Answers whose commit already finished.
            while let Some((ticket, _)) = committing.front_mut() {
                match ticket.try_recv() {
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => break,
                    r => {
                        let (_, a) = committing.pop_front().expect("front");
                        answer_committed(out, r.ok(), &a).await?;
                    }
                }
            }
            if sent > 0 {
                continue;
            }
            let room = room > 0;
            let waiting = !committing.is_empty();
            tokio::select! {
                _ = topic_rx.changed(), if room => {}
                _ = ready_rx.changed(), if room => {}
                r = async { (&mut committing.front_mut().expect("waiting").0).await }, if waiting => {
                    let (_, a) = committing.pop_front().expect("front");
                    answer_committed(out, r.ok(), &a).await?;
                }
                ev = events.recv() => match ev {
                    Some(ev) => self.apply(ev, &mut answers).await,
                    None => {
                        out.write_all(&buf).await?;
                        return self.finish_answers(out, answers, committing).await;
                    }
                },
            }
        }
    }

    /// At the end of a subscription: commits what is pending, then writes
    /// every answer whose commit succeeded, in order.
    async fn finish_answers<W: AsyncWrite + Unpin>(
        &self,
        out: &mut W,
        answers: BytesMut,
        mut committing: VecDeque<(FlushTicket, BytesMut)>,
    ) -> Result<(), DeliveryError> {
        if !answers.is_empty() {
            self.group.flush().await;
            committing.push_back((self.group.storage.flush_ticket().await?, answers));
        }
        for (ticket, a) in committing {
            answer_committed(out, ticket.await.ok(), &a).await?;
        }
        Ok(())
    }

    /// Takes up to `room` messages and encodes them. Returns how many.
    async fn fill(&mut self, buf: &mut BytesMut, room: usize) -> Result<usize, DeliveryError> {
        let (tags, expired) = self.group.take(
            self.member,
            room.min(MAX_PER_FRAME),
            self.visibility_ms,
            self.auto_ack,
        )?;
        self.group.process_failures(expired).await;
        if tags.is_empty() {
            return Ok(0);
        }
        let keys: Vec<(u32, u64)> = tags.iter().map(|t| (t.partition, t.offset)).collect();
        let start = buf.len();
        buf.extend_from_slice(&[0u8; 9]);
        let mut count = 0u32;
        let mut found = vec![false; tags.len()];
        self.group
            .storage
            .get_many(self.group.topic.meta.id, &keys, |i, ts, rec| {
                put_queue_delivered(buf, tags[i], ts, rec);
                found[i] = true;
                count += 1;
            })?;
        // Records retention removed meanwhile are settled, not delivered.
        let missing: Vec<DeliveryTag> = tags
            .iter()
            .zip(&found)
            .filter(|(_, f)| !**f)
            .map(|(t, _)| *t)
            .collect();
        if !missing.is_empty() {
            let mut st = self.group.lock();
            for t in &missing {
                st.settle(t.partition, t.offset);
            }
        }
        if count == 0 {
            buf.truncate(start);
            return Ok(tags.len());
        }
        let mut header = [0u8; 9];
        put_queue_deliver_header(&mut &mut header[..], count, buf.len() - start - 9);
        buf[start..start + 9].copy_from_slice(&header);
        self.group
            .topic
            .stats
            .delivered
            .fetch_add(count as u64, Ordering::Relaxed);
        if self.auto_ack {
            self.credits = self.credits.saturating_sub(count as u64);
        }
        Ok(tags.len())
    }
}

impl Drop for QueueSubscription {
    fn drop(&mut self) {
        self.group.leave(self.member);
    }
}

/// Strips dead-letter, delay and id headers from a dead letter so it can be
/// published again as a fresh message (attempts start over).
pub fn redrive_record(rec: &RawRecord) -> (Option<String>, crate::protocol::Record) {
    let mut r = rec.to_record();
    let origin = r
        .headers
        .iter()
        .find(|(n, _)| n == DLQ_TOPIC)
        .and_then(|(_, v)| String::from_utf8(v.to_vec()).ok());
    r.headers.retain(|(n, _)| {
        !n.starts_with("x-dlq-") && n != DELAY_MS && n != DELIVER_AT && n != MESSAGE_ID
    });
    (origin, r)
}

/// A flush of the group commit: resolves with the commit's outcome.
type FlushTicket = tokio::sync::oneshot::Receiver<Result<(), StorageError>>;

/// Writes `answers` if the commit that holds their state changes succeeded
/// (`r`), so an answered ack never comes back after a crash; a failed
/// commit ends the subscription with its error, and the acks get no answer.
async fn answer_committed<W: AsyncWrite + Unpin>(
    out: &mut W,
    r: Option<Result<(), StorageError>>,
    answers: &[u8],
) -> Result<(), DeliveryError> {
    match r {
        Some(Ok(())) => {
            out.write_all(answers).await?;
            Ok(())
        }
        Some(Err(e)) => Err(e.into()),
        None => Err(StorageError::ShutDown.into()),
    }
}
