//! How a leader's storage writer and the state machine share the tables.
//!
//! While a node serves as leader, its storage writer decides each commit
//! in an open redb transaction, proposes the commit's redo to Raft and
//! waits. When the entry is committed, the state machine reaches it in log
//! order and, instead of replaying it (the rows are already in the
//! writer's transaction), hands the writer its log position; the writer
//! writes that position into the transaction, commits it and tells the
//! state machine, which goes on with the next entry. So the tables are
//! written in log order by exactly one party at a time, and the leader
//! does each commit's work once.
//!
//! If the entry is not committed by this leader (it lost leadership), the
//! proposal fails, the writer aborts the transaction and refuses the
//! commit (`not the leader`): nothing of it was acknowledged, and a new
//! leader that did commit it (it reached a majority first) delivers it
//! again to this node, now a follower, which replays it like any other.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use super::node::{InFlight, WriteGate};
use super::state::set_applied;
use super::{Command, LogId, NodeId, Origin, Raft};
use crate::storage::{Replicator, StorageError};

type Membership = openraft::StoredMembership<NodeId, openraft::BasicNode>;

/// What the state machine tells a waiting writer.
pub(crate) enum Event {
    /// The entry is committed and it is its turn: commit at this position.
    Apply(LogId, Membership),
    /// The proposal failed.
    Failed(String),
    /// The node stopped serving while the commit waited
    /// ([`Handoff::abandon`]): it is refused, and if it is committed after
    /// all, the state machine replays it.
    Abandoned(String),
}

/// The commit a writer waits for.
pub(crate) struct Expected {
    pub(crate) origin: Origin,
    pub(crate) events: mpsc::Sender<Event>,
    pub(crate) done: mpsc::Receiver<bool>,
}

/// Shared by a node's state machine and its leader's writer.
#[derive(Default)]
pub struct Handoff {
    /// True while the storage writer owns the tables (this node serves as
    /// leader): the state machine then writes nothing itself.
    serving: AtomicBool,
    waiting: Mutex<Option<Expected>>,
    /// Set by [`Handoff::abandon`] until serving starts again: why every
    /// commit is refused.
    abandoned: Mutex<Option<String>>,
    /// The membership applied while serving (written with the next commit).
    pub(crate) membership: Mutex<Option<Membership>>,
    changed: tokio::sync::Notify,
}

impl Handoff {
    /// Whether the writer owns the tables.
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// Gives the tables to the writer (`true`) or back to the state
    /// machine.
    pub fn set_serving(&self, on: bool) {
        self.serving.store(on, Ordering::Release);
        if on {
            *self.abandoned.lock().expect("handoff lock") = None;
        } else {
            *self.waiting.lock().expect("handoff lock") = None;
        }
        self.changed.notify_waiters();
    }

    /// Waits until the writer no longer owns the tables.
    pub(crate) async fn until_not_serving(&self) {
        loop {
            let changed = self.changed.notified();
            if !self.serving() {
                return;
            }
            changed.await;
        }
    }

    /// Takes the waiting commit if `origin` is it.
    pub(crate) fn take(&self, origin: Option<Origin>) -> Option<Expected> {
        let origin = origin?;
        let mut w = self.waiting.lock().expect("handoff lock");
        if w.as_ref().is_some_and(|e| e.origin == origin) {
            w.take()
        } else {
            None
        }
    }

    /// Registers the commit the writer is about to propose; refused (with
    /// why) once the commits of this serving have been abandoned.
    fn expect(&self, e: Expected) -> Result<(), String> {
        let mut w = self.waiting.lock().expect("handoff lock");
        if let Some(why) = self.abandoned.lock().expect("handoff lock").clone() {
            return Err(why);
        }
        *w = Some(e);
        Ok(())
    }

    /// Refuses the commit the writer waits for and every later one until
    /// serving starts again, so that a router whose commits cannot reach a
    /// majority (this node is cut off) can stop without waiting for one.
    /// Nothing refused was acknowledged; an entry of it that is committed
    /// after all is replayed by the state machine once serving stops.
    pub fn abandon(&self, why: &str) {
        let mut w = self.waiting.lock().expect("handoff lock");
        *self.abandoned.lock().expect("handoff lock") = Some(why.to_string());
        if let Some(e) = w.take() {
            let _ = e.events.send(Event::Abandoned(why.to_string()));
        }
    }

    /// Withdraws the waiting commit; false if the state machine took it.
    fn cancel(&self, origin: Origin) -> bool {
        let mut w = self.waiting.lock().expect("handoff lock");
        if w.as_ref().is_some_and(|e| e.origin == origin) {
            *w = None;
            true
        } else {
            false
        }
    }
}

/// The [`Replicator`] of a node serving as leader.
pub struct LeaderReplicator {
    raft: Raft,
    runtime: tokio::runtime::Handle,
    handoff: Arc<Handoff>,
    node: NodeId,
    incarnation: u64,
    seq: AtomicU64,
    done: Mutex<Option<mpsc::Sender<bool>>>,
    /// The group's writes on this node, which a handover holds back
    /// ([`super::node::Handover::gate`]).
    gate: WriteGate,
}

impl LeaderReplicator {
    /// Replicates through `raft` for one incarnation of serving; a new
    /// commit passes `gate` (waits while a handover runs).
    pub fn new(
        raft: Raft,
        runtime: tokio::runtime::Handle,
        handoff: Arc<Handoff>,
        node: NodeId,
        incarnation: u64,
        gate: WriteGate,
    ) -> LeaderReplicator {
        LeaderReplicator {
            raft,
            runtime,
            handoff,
            node,
            incarnation,
            seq: AtomicU64::new(0),
            done: Mutex::new(None),
            gate,
        }
    }

    /// Enters the gate for one commit, waiting out a handover in progress
    /// (the storage writer's thread blocks, so every commit queued behind
    /// this one waits too). If leadership moved meanwhile, the commit is
    /// refused without having been proposed: its clients send it again to
    /// the new leader.
    fn enter(&self) -> Result<InFlight, StorageError> {
        let (in_flight, waited) = self.gate.enter_blocking(&self.runtime);
        if waited && self.raft.metrics().borrow().state != openraft::ServerState::Leader {
            return Err(StorageError::NotLeader(
                "leadership was handed to another node".into(),
            ));
        }
        Ok(in_flight)
    }

    fn commit_at(
        &self,
        txn: &redb::WriteTransaction,
        log_id: LogId,
        membership: Membership,
        done: mpsc::Sender<bool>,
    ) -> Result<(), StorageError> {
        set_applied(txn, Some(log_id), &membership)
            .map_err(|e| StorageError::Corrupt(format!("recording the Raft position: {e}")))?;
        *self.done.lock().expect("replicator lock") = Some(done);
        Ok(())
    }
}

impl Replicator for LeaderReplicator {
    fn replicate(&self, redo: &[u8], txn: &redb::WriteTransaction) -> Result<(), StorageError> {
        let _in_flight = self.enter()?;
        let origin = Origin {
            node: self.node,
            incarnation: self.incarnation,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
        };
        let (events, rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        self.handoff
            .expect(Expected {
                origin,
                events: events.clone(),
                done: done_rx,
            })
            .map_err(StorageError::NotLeader)?;
        let raft = self.raft.clone();
        let command = Command {
            redo: bytes::Bytes::copy_from_slice(redo),
            origin: Some(origin),
        };
        self.runtime.spawn(async move {
            if let Err(e) = raft.client_write(command).await {
                let _ = events.send(Event::Failed(e.to_string()));
            }
        });
        let not_leader = |m: String| StorageError::NotLeader(m);
        match rx.recv() {
            Ok(Event::Apply(log_id, m)) => self.commit_at(txn, log_id, m, done_tx),
            Ok(Event::Abandoned(why)) => Err(not_leader(why)),
            Ok(Event::Failed(why)) => {
                if self.handoff.cancel(origin) {
                    return Err(not_leader(why));
                }
                // The state machine took it just now: it is committed.
                match rx.recv() {
                    Ok(Event::Apply(log_id, m)) => self.commit_at(txn, log_id, m, done_tx),
                    _ => Err(not_leader(why)),
                }
            }
            Err(_) => Err(not_leader("replication stopped".into())),
        }
    }

    fn done(&self, committed: bool) {
        if let Some(tx) = self.done.lock().expect("replicator lock").take() {
            let _ = tx.send(committed);
        }
    }
}
