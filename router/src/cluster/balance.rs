//! Spreading the leadership of a node's Raft groups over the nodes.
//!
//! A node that is a member of several groups (one [`RaftHost`] carries
//! them all) runs a [`Balancer`]: from its own view of who leads each
//! group, it counts the groups each voter leads, and while it leads at
//! least two more than one of its groups' other voters, it hands one of
//! those groups to that voter ([`Handover::hand_over`], one round trip).
//! Every node runs the same rule and each move lowers the spread, so the
//! leaderships settle as even as the count allows (three groups on three
//! nodes: one each), and settle again after a node is lost or comes back.
//! Nothing central decides: a node's view of the other groups' leaders
//! is the one Raft already gives each member.
//!
//! A node marked **drained** (`switchyard cluster drain`, a row of group
//! 0 every node reads from its own replica) is handed no group, and while
//! it is drained it hands every group it leads to the other voters, one
//! at a time, whatever the counts: maintenance mode, as RabbitMQ's
//! `rabbitmq-upgrade drain`. Undrained, it is handed its share again.
//!
//! [`RaftHost`]: super::net::RaftHost

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::ServerState;

use super::NodeId;
use super::net::GroupId;
use super::node::Handover;

/// One group as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupView {
    /// The group.
    pub group: GroupId,
    /// Its leader, as this node knows it.
    pub leader: Option<NodeId>,
    /// Whether this node leads it now.
    pub mine: bool,
    /// Its voting members.
    pub voters: Vec<NodeId>,
}

/// The move the rule makes from node `me`'s view: one of the groups `me`
/// leads, and the voter of it to hand it to. Some voter must lead at
/// least two fewer groups than `me` (a move to one that leads one fewer
/// would only swap the two); among those, the one leading fewest, then
/// the lowest id, takes the lowest-numbered group. Only a voter that is
/// `live` (answering this node) is handed a group: a move holds the
/// group's writes back until the target has the whole log, which one that
/// is down never will. A `drained` node is handed nothing, and when `me`
/// is drained, each group it leads goes to the live, undrained voter
/// leading fewest, however few `me` leads.
pub fn next_move(
    me: NodeId,
    views: &[GroupView],
    live: &dyn Fn(NodeId) -> bool,
    drained: &BTreeSet<NodeId>,
) -> Option<(GroupId, NodeId)> {
    let mut leads: BTreeMap<NodeId, usize> = BTreeMap::new();
    for v in views {
        for &voter in &v.voters {
            leads.entry(voter).or_default();
        }
        if let Some(l) = v.leader {
            *leads.entry(l).or_default() += 1;
        }
    }
    let own = views.iter().filter(|v| v.mine).count();
    // Draining, any target will do; otherwise only one leading two fewer.
    let draining = drained.contains(&me);
    let leads = &leads;
    views
        .iter()
        .filter(|v| v.mine)
        .flat_map(|v| {
            v.voters
                .iter()
                .filter(|&&to| to != me && live(to) && !drained.contains(&to))
                .map(move |&to| (leads[&to], to, v.group))
        })
        .filter(|&(n, _, _)| draining || n + 2 <= own)
        .min()
        .map(|(_, to, group)| (group, to))
}

/// This node's view of each group.
fn views(groups: &[(GroupId, Handover)]) -> Vec<GroupView> {
    groups
        .iter()
        .map(|(group, h)| {
            let metrics = h.raft().metrics();
            let m = metrics.borrow();
            GroupView {
                group: *group,
                leader: m.current_leader,
                mine: m.state == ServerState::Leader,
                voters: m.membership_config.membership().voter_ids().collect(),
            }
        })
        .collect()
}

/// How recently a voter must have answered this node to be handed a
/// group: ten heartbeats.
const LIVE: Duration = Duration::from_secs(1);

/// Runs [`next_move`] for one node's groups every `every`, until dropped.
pub struct Balancer {
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    /// Starts balancing node `me`'s `groups`. A move that fails (the
    /// target did not catch up in time) held the group's writes back
    /// while it ran, so the next is tried only after a pause that doubles
    /// with each failure, up to 32 times `every`. `drained` reads the
    /// nodes marked drained (from the node's replica of group 0); a node
    /// that is drained hands its groups over one after another, without
    /// waiting for the next tick between them.
    pub fn spawn(
        me: NodeId,
        groups: Vec<(GroupId, Handover)>,
        drained: Box<dyn Fn() -> BTreeSet<NodeId> + Send + Sync>,
        others: Box<dyn Fn() -> Vec<GroupView> + Send + Sync>,
        every: Duration,
    ) -> Balancer {
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failed = 0u32;
            let mut again = false;
            loop {
                if !std::mem::take(&mut again) {
                    tick.tick().await;
                }
                let live = |node| {
                    groups
                        .first()
                        .is_some_and(|(_, h)| h.answered_within(node, LIVE))
                };
                let drained = drained();
                // This node's own view of the groups it is a voter of, and
                // their leaders' of the others.
                let mut all = views(&groups);
                all.retain(|v| v.voters.contains(&me));
                // A group whose members are changing stays where it is
                // until the change is done.
                for v in &mut all {
                    let changing = groups
                        .iter()
                        .any(|(g, h)| *g == v.group && h.is_changing_members());
                    v.mine &= !changing;
                }
                for o in others() {
                    if !all.iter().any(|v| v.group == o.group) {
                        all.push(o);
                    }
                }
                let Some((group, to)) = next_move(me, &all, &live, &drained) else {
                    continue;
                };
                let Some((_, handover)) = groups.iter().find(|(g, _)| *g == group) else {
                    continue;
                };
                let draining = drained.contains(&me);
                match handover.hand_over(Some(to)).await {
                    Some(now) => {
                        failed = 0;
                        again = draining;
                        let why = if draining {
                            "leadership moved off this drained node"
                        } else {
                            "leadership moved to spread it"
                        };
                        tracing::info!(group, to = now, "{why}");
                    }
                    None => {
                        failed = (failed + 1).min(5);
                        let pause = every * (1 << failed);
                        tracing::info!(
                            group,
                            to,
                            ?pause,
                            "leadership did not move; trying again later"
                        );
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        });
        Balancer { task }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> BTreeSet<NodeId> {
        BTreeSet::new()
    }

    fn view(group: GroupId, leader: NodeId, me: NodeId) -> GroupView {
        GroupView {
            group,
            leader: Some(leader),
            mine: leader == me,
            voters: vec![1, 2, 3],
        }
    }

    #[test]
    fn a_node_leading_every_group_gives_one_to_a_node_leading_none() {
        let views: Vec<GroupView> = (0..3).map(|g| view(g, 1, 1)).collect();
        assert_eq!(next_move(1, &views, &|_| true, &none()), Some((0, 2)));
        // The others lead nothing, so they have nothing to move.
        let views: Vec<GroupView> = (0..3).map(|g| view(g, 1, 2)).collect();
        assert_eq!(next_move(2, &views, &|_| true, &none()), None);
    }

    #[test]
    fn moves_stop_once_no_voter_leads_two_fewer() {
        // 2 / 1 / 0: the node leading two gives one to the one leading none.
        let views = vec![view(0, 1, 1), view(1, 1, 1), view(2, 2, 1)];
        assert_eq!(next_move(1, &views, &|_| true, &none()), Some((0, 3)));
        // 1 / 1 / 1 and 2 / 1 / 1 (four groups) are as even as they get.
        let views = vec![view(0, 1, 1), view(1, 2, 1), view(2, 3, 1)];
        assert_eq!(next_move(1, &views, &|_| true, &none()), None);
        let views = vec![view(0, 1, 1), view(1, 1, 1), view(2, 2, 1), view(3, 3, 1)];
        assert_eq!(next_move(1, &views, &|_| true, &none()), None);
    }

    #[test]
    fn only_a_voter_of_the_group_takes_it() {
        // Node 3 leads nothing but votes only in group 1, which node 1
        // does not lead; node 2 leads one, so it is not two fewer.
        let views = vec![
            GroupView {
                group: 0,
                leader: Some(1),
                mine: true,
                voters: vec![1, 2],
            },
            GroupView {
                group: 1,
                leader: Some(2),
                mine: false,
                voters: vec![1, 2, 3],
            },
            GroupView {
                group: 2,
                leader: Some(1),
                mine: true,
                voters: vec![1, 2],
            },
        ];
        assert_eq!(next_move(1, &views, &|_| true, &none()), None);
    }

    /// A node that is down leads nothing, but is handed nothing either:
    /// the move would hold the group's writes until it timed out.
    #[test]
    fn a_voter_that_does_not_answer_is_handed_nothing() {
        // Node 1 is down; node 2 leads two groups, node 3 one.
        let views = vec![view(0, 2, 2), view(1, 2, 2), view(2, 3, 2)];
        assert_eq!(next_move(2, &views, &|_| true, &none()), Some((0, 1)));
        assert_eq!(next_move(2, &views, &|n| n != 1, &none()), None);
        // Every group on node 2: one goes to node 3, not to node 1.
        let views: Vec<GroupView> = (0..3).map(|g| view(g, 2, 2)).collect();
        assert_eq!(next_move(2, &views, &|n| n != 1, &none()), Some((0, 3)));
    }

    #[test]
    fn groups_without_a_leader_count_for_nobody() {
        let mut views: Vec<GroupView> = (0..3).map(|g| view(g, 1, 1)).collect();
        views[2].leader = None;
        views[2].mine = false;
        assert_eq!(next_move(1, &views, &|_| true, &none()), Some((0, 2)));
    }

    /// A drained node is handed nothing, and hands on every group it
    /// leads, one at a time, even when it leads only one.
    #[test]
    fn a_drained_node_leads_nothing() {
        let drained: BTreeSet<NodeId> = [2].into();
        // 3 / 0 / 0: group 0 goes to node 3, not to the drained node 2.
        let views: Vec<GroupView> = (0..3).map(|g| view(g, 1, 1)).collect();
        assert_eq!(next_move(1, &views, &|_| true, &drained), Some((0, 3)));
        // 1 / 1 / 1 is even, but node 2 is drained: its group goes to the
        // lower of the two others, and then to the other.
        let views = vec![view(0, 1, 2), view(1, 2, 2), view(2, 3, 2)];
        assert_eq!(next_move(2, &views, &|_| true, &drained), Some((1, 1)));
        assert_eq!(next_move(2, &views, &|n| n != 1, &drained), Some((1, 3)));
        // The others do not hand it one back: 2 / 0 / 1 stays.
        let views = vec![view(0, 1, 1), view(1, 1, 1), view(2, 3, 1)];
        assert_eq!(next_move(1, &views, &|_| true, &drained), None);
        // With every other voter down or drained, it goes on leading.
        let views = vec![view(0, 2, 2)];
        assert_eq!(next_move(2, &views, &|n| n == 2, &drained), None);
        let both: BTreeSet<NodeId> = [1, 2, 3].into();
        assert_eq!(next_move(2, &views, &|_| true, &both), None);
    }
}
