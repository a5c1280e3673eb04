//! Which Raft group of a cluster holds a topic.
//!
//! A cluster of several groups spreads whole topics over them, so a
//! publish to one topic is one entry in one group's log. Group 0, which
//! every node is a member of, keeps the assignment (`topic_groups`: name
//! -> group) beside the principals; every node applies group 0's log, so
//! every router reads the assignment from the node's own replica of it.
//!
//! - **Assigning** is group 0's router's: asked for a topic no group
//!   holds, it picks the group with the fewest partitions assigned (the
//!   lowest id on a tie) and records it, a replicated commit, before it
//!   answers.
//! - **Creating** is the topic's group's router's: it makes a topic only
//!   once the node's replica of group 0 shows the topic assigned to it
//!   (waiting up to [`ASSIGNMENT_WAIT`] for that replica to apply the
//!   assignment), and refuses one assigned elsewhere with `wrong_group`.
//!   So a name is in at most one group.
//! - **A topic's dotted children go with it**: a topic no row names is in
//!   the group of its nearest dotted parent that one does (`orders.dlq`,
//!   `orders.eu.retry` with `orders`). That keeps a queue's dead-letter
//!   topic (`<topic>.dlq` by default), which the router creates itself,
//!   in its topic's group, where dead-lettering is one atomic commit.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use super::Shared;
use super::session::Session;
use crate::auth::Class;
use crate::protocol::{ErrorCode, WireError};

/// How long a router waits for the node's replica of group 0 to show a
/// topic's assignment before it refuses to create the topic: the
/// assignment was committed by group 0's leader before the client asked,
/// so this is about one replication round trip.
pub const ASSIGNMENT_WAIT: Duration = Duration::from_secs(5);

/// The node's replica of group 0's tables, which hold the cluster-wide
/// rows (the principals and the topic assignment), and a receiver that
/// changes when that replica applies a change to them. Every node is a
/// member of group 0, so every node holds one.
#[derive(Clone)]
pub struct GroupZero {
    /// The node's group 0 tables.
    pub db: Arc<redb::Database>,
    /// Changes after each applied change to the cluster-wide rows.
    pub changed: watch::Receiver<u64>,
}

impl GroupZero {
    /// The stored principals (name, JSON record) as the replica holds them
    /// now.
    pub fn principals(&self) -> Vec<(String, Vec<u8>)> {
        crate::auth::stored_principals(&self.db)
    }

    /// Every assignment: topic name -> (group, partitions).
    fn assignments(&self) -> Vec<(String, u32, u32)> {
        let table = crate::storage::tables::TOPIC_GROUPS;
        crate::storage::rows_of(&self.db, table, |name, (group, partitions)| {
            (name.to_string(), group, partitions)
        })
    }

    /// The group holding `name` as the replica shows it now: its own
    /// assignment, or else its nearest dotted parent's.
    pub fn group_of(&self, name: &str) -> Option<u32> {
        use redb::ReadableDatabase;
        let txn = self.db.begin_read().ok()?;
        let table = txn.open_table(crate::storage::tables::TOPIC_GROUPS).ok()?;
        let mut candidate = name;
        loop {
            if let Ok(Some(row)) = table.get(candidate) {
                return Some(row.value().0);
            }
            candidate = &candidate[..candidate.rfind('.')?];
        }
    }
}

/// Where a router of a cluster of several groups stands: its group, how
/// many there are, and the node's replica of group 0.
#[derive(Clone)]
pub struct Placement {
    /// The group this router serves.
    pub group: u32,
    /// How many groups the cluster spreads its topics over.
    pub groups: u32,
    /// The node's replica of group 0.
    pub zero: GroupZero,
    /// Serializes assignments on group 0's router, so that two clients
    /// creating one name at once are given the same group.
    assigning: Arc<tokio::sync::Mutex<()>>,
    /// The voters each group has, or is meant to have (group 0 every
    /// node; the others the cluster's replication factor, where it is
    /// below the number of nodes): a topic's replication factor is its
    /// group's size.
    sizes: Arc<dyn Fn() -> Vec<u32> + Send + Sync>,
}

impl Placement {
    /// The placement of the router of `group`, one of `groups`.
    pub fn new(group: u32, groups: u32, zero: GroupZero) -> Placement {
        Placement {
            group,
            groups,
            zero,
            assigning: Arc::default(),
            sizes: Arc::new(move || vec![0; groups as usize]),
        }
    }

    /// The same, with each group's size from `sizes`.
    pub fn with_sizes(mut self, sizes: Arc<dyn Fn() -> Vec<u32> + Send + Sync>) -> Placement {
        self.sizes = sizes;
        self
    }

    /// The group holding `name`, waiting up to `within` for the replica
    /// of group 0 to show it.
    pub async fn wait_group_of(&self, name: &str, within: Duration) -> Option<u32> {
        let mut changed = self.zero.changed.clone();
        let until = tokio::time::Instant::now() + within;
        loop {
            changed.borrow_and_update();
            if let Some(g) = self.zero.group_of(name) {
                return Some(g);
            }
            match tokio::time::timeout_at(until, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// Whether this router may create topic `name`: only if it is assigned
    /// to this router's group.
    pub async fn may_create(&self, name: &str) -> Result<(), WireError> {
        match self.wait_group_of(name, ASSIGNMENT_WAIT).await {
            Some(g) if g == self.group => Ok(()),
            Some(g) => Err(wrong_group(name, g)),
            None => Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "topic '{name}' is assigned to no group of the cluster: a client creates \
                     it by asking group 0 to assign it first (the Rust client and the CLI do)"
                ),
            )),
        }
    }

    /// Among the groups of `replicas` voters (by default the cluster's
    /// replication factor), the one with the fewest partitions assigned
    /// (the lowest id on a tie); refused where no group has that many.
    fn least_loaded(&self, replicas: Option<u32>) -> Result<u32, WireError> {
        let mut load = vec![0u64; self.groups as usize];
        for (_, g, partitions) in self.zero.assignments() {
            if let Some(l) = load.get_mut(g as usize) {
                *l += u64::from(partitions);
            }
        }
        let sizes = (self.sizes)();
        let size = |g: u32| sizes.get(g as usize).copied().unwrap_or(0);
        // By default, the size of the groups but group 0 (the cluster's
        // replication factor): group 0 then takes a topic only where
        // every group is as large.
        let want = replicas.unwrap_or_else(|| size(self.groups.min(2) - 1));
        (0..self.groups)
            .filter(|g| size(*g) == want)
            .min_by_key(|g| load[*g as usize])
            .ok_or_else(|| {
                let mut offered: Vec<u32> = sizes.clone();
                offered.sort_unstable();
                offered.dedup();
                WireError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "replication factor {want} is not available here: this cluster's \
                         groups keep {offered:?} copies (group 0 has every node; the others the \
                         replication factor `serve --replication-factor` formed it with)"
                    ),
                )
            })
    }
}

/// The refusal of a request for topic `name`, which group `group` holds.
pub fn wrong_group(name: &str, group: u32) -> WireError {
    WireError::new(
        ErrorCode::WrongGroup,
        format!("topic '{name}' is held by group={group} of the cluster; ask that group's router"),
    )
}

#[derive(Deserialize)]
struct TopicGroup {
    name: String,
    /// Assign the topic to a group if none holds it (group 0's router
    /// only); otherwise only look it up.
    #[serde(default)]
    assign: bool,
    /// The partitions the topic will have: its weight in the choice.
    #[serde(default)]
    partitions: u32,
    /// The copies it is to have: a group of that many voters holds it
    /// (none: the cluster's replication factor).
    #[serde(default)]
    replicas: Option<u32>,
}

/// The `topic-group` admin request: which group holds a topic
/// (`{"name"}`), or, asked of group 0 with `"assign": true`, which group
/// will (chosen and recorded if none is yet). Answers
/// `{"name", "group", "groups"}`; a single router and a one-group cluster
/// answer group 0 of 1.
pub(super) async fn topic_group(
    shared: &Shared,
    session: &Session,
    body: &[u8],
) -> Result<serde_json::Value, WireError> {
    let req: TopicGroup = serde_json::from_slice(body)
        .map_err(|e| WireError::new(ErrorCode::InvalidArgument, format!("bad request: {e}")))?;
    crate::broker::validate_topic_name(&req.name)?;
    if req.assign {
        session.check(Class::TopicAdmin, &req.name, "")?;
    } else {
        session.principal().check_sees(&req.name)?;
    }
    let answer = |group: u32, groups: u32| serde_json::json!({ "name": req.name, "group": group, "groups": groups });
    let Some(p) = shared
        .config
        .replica
        .as_ref()
        .and_then(|r| r.placement.as_ref())
    else {
        return Ok(answer(0, 1));
    };
    if let Some(g) = super::outbox::group_of(&req.name).filter(|g| *g < p.groups) {
        return Ok(answer(g, p.groups));
    }
    if let Some(g) = p.zero.group_of(&req.name) {
        return Ok(answer(g, p.groups));
    }
    super::outbox::reserved(&req.name)?;
    if !req.assign {
        return Err(WireError::new(
            ErrorCode::UnknownTopic,
            format!("topic '{}' is in no group of the cluster", req.name),
        ));
    }
    if p.group != 0 {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            "topics are assigned to groups by the cluster's group 0: ask a client of group 0",
        ));
    }
    let _one_at_a_time = p.assigning.lock().await;
    if let Some(g) = p.zero.group_of(&req.name) {
        return Ok(answer(g, p.groups));
    }
    let g = p.least_loaded(req.replicas)?;
    shared
        .broker
        .storage()
        .assign_topic(&req.name, g, req.partitions.max(1))
        .await
        .map_err(|e| e.to_wire())?;
    tracing::info!(topic = %req.name, group = g, "topic assigned");
    Ok(answer(g, p.groups))
}
