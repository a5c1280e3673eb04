//! Consumer groups for stream subscriptions.
//!
//! Members of a group split a topic's partitions: with members ordered by
//! join time, partition `p` targets member `p mod n`. A partition is handed
//! over only after its previous holder released it, and a holder releases
//! only between deliveries, after recording its position. So no partition is
//! ever read by two live members at once, and the next holder resumes exactly
//! where the last one stopped.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::protocol::StartPosition;
use crate::storage::{Storage, StorageError, TopicHandle};

/// A group's shared state for one topic.
pub struct Group {
    /// Group name; empty for an anonymous (single-member, uncommitted) group.
    pub name: Arc<str>,
    /// The topic the group reads.
    pub topic: Arc<TopicHandle>,
    state: Mutex<GroupState>,
    changed: watch::Sender<u64>,
    storage: Storage,
}

struct GroupState {
    members: Vec<u64>,
    next_member: u64,
    holder: Vec<Option<u64>>,
    /// Next offset to read per partition, as committed by the group.
    committed: Vec<Option<u64>>,
    generation: u64,
}

/// A partition a member currently holds, with its read position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// The partition.
    pub partition: u32,
    /// Next offset to deliver.
    pub position: u64,
}

impl Group {
    /// A group over `topic`, with committed offsets loaded from storage
    /// unless it is anonymous.
    pub fn new(
        name: Arc<str>,
        topic: Arc<TopicHandle>,
        storage: Storage,
    ) -> Result<Self, StorageError> {
        let n = topic.meta.partitions as usize;
        let mut committed = vec![None; n];
        if !name.is_empty() {
            for (p, slot) in committed.iter_mut().enumerate() {
                *slot = storage.committed_offset(&name, topic.meta.id, p as u32)?;
            }
        }
        Ok(Group {
            name,
            topic,
            state: Mutex::new(GroupState {
                members: Vec::new(),
                next_member: 1,
                holder: vec![None; n],
                committed,
                generation: 0,
            }),
            changed: watch::Sender::new(0),
            storage,
        })
    }

    /// True for a named group whose offsets are persisted.
    pub fn is_durable(&self) -> bool {
        !self.name.is_empty()
    }

    /// A receiver that changes whenever membership or ownership changes.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self, st: &mut GroupState) {
        st.generation += 1;
        self.changed.send_replace(st.generation);
    }

    /// Adds a member; returns its id.
    pub fn join(&self) -> u64 {
        let mut st = self.state.lock().expect("group lock");
        let id = st.next_member;
        st.next_member += 1;
        st.members.push(id);
        self.bump(&mut st);
        id
    }

    /// Removes a member and frees what it held.
    pub fn leave(&self, member: u64) {
        let mut st = self.state.lock().expect("group lock");
        st.members.retain(|m| *m != member);
        for h in st.holder.iter_mut() {
            if *h == Some(member) {
                *h = None;
            }
        }
        self.bump(&mut st);
    }

    /// Number of live members.
    pub fn member_count(&self) -> usize {
        self.state.lock().expect("group lock").members.len()
    }

    /// Brings `held` in line with the current target assignment: releases
    /// partitions that now belong to someone else, and takes targeted
    /// partitions that are free. Returns true if `held` changed.
    pub fn reconcile(
        &self,
        member: u64,
        held: &mut Vec<Held>,
        start: StartPosition,
    ) -> Result<bool, StorageError> {
        let mut st = self.state.lock().expect("group lock");
        let n_members = st.members.len();
        let Some(rank) = st.members.iter().position(|m| *m == member) else {
            return Ok(false);
        };
        let targets = |p: u32| n_members > 0 && (p as usize) % n_members == rank;
        let before = held.len();
        let mut released = false;
        held.retain(|h| {
            if targets(h.partition) {
                true
            } else {
                st.holder[h.partition as usize] = None;
                released = true;
                false
            }
        });
        let mut acquired = false;
        let infos = self.topic.partitions();
        for p in 0..st.holder.len() as u32 {
            if !targets(p) || st.holder[p as usize].is_some() {
                continue;
            }
            let info = infos[p as usize];
            let position = match st.committed[p as usize] {
                Some(o) => o.clamp(info.start, info.end),
                None => match start {
                    StartPosition::Earliest => info.start,
                    StartPosition::Latest => info.end,
                    StartPosition::Offset(o) => o.clamp(info.start, info.end),
                    StartPosition::Timestamp(t) => self.storage.offset_for_time(
                        self.topic.meta.id,
                        p,
                        info.start,
                        info.end,
                        t,
                    )?,
                },
            };
            st.holder[p as usize] = Some(member);
            held.push(Held {
                partition: p,
                position,
            });
            acquired = true;
        }
        held.sort_by_key(|h| h.partition);
        if released {
            // Wake members waiting for the partitions just freed.
            self.bump(&mut st);
        }
        Ok(released || acquired || held.len() != before)
    }

    /// Records that the group has processed `partition` up to `offset`.
    /// Only the current holder may commit; a stale member's commit is
    /// refused (returns false) so it cannot move a new holder's position.
    pub async fn commit(
        &self,
        member: u64,
        partition: u32,
        offset: u64,
    ) -> Result<bool, StorageError> {
        {
            let mut st = self.state.lock().expect("group lock");
            let Some(h) = st.holder.get(partition as usize) else {
                return Ok(false);
            };
            if *h != Some(member) {
                return Ok(false);
            }
            st.committed[partition as usize] = Some(offset);
        }
        if self.is_durable() {
            self.storage
                .commit_offset(self.name.clone(), self.topic.meta.id, partition, offset)
                .await?;
        }
        Ok(true)
    }
}

impl Group {
    /// Next offset to read per partition, as committed by the group
    /// (`None`: nothing committed in that partition).
    pub fn committed(&self) -> Vec<Option<u64>> {
        self.state.lock().expect("group lock").committed.clone()
    }

    /// Per partition: the committed offset, the end offset, and the lag
    /// (records not yet committed; all retained ones if nothing is).
    pub fn lag(&self) -> Vec<(Option<u64>, u64, u64)> {
        let parts = self.topic.partitions();
        self.committed()
            .into_iter()
            .zip(parts.iter())
            .map(|(c, info)| {
                let at = c.unwrap_or(info.start).max(info.start);
                (c, info.end, info.end.saturating_sub(at))
            })
            .collect()
    }

    /// The storage this group commits to.
    pub fn topic_storage(&self) -> &Storage {
        &self.storage
    }
}
