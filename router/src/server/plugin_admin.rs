//! Administration requests on the control stream: plugins (deploy, list,
//! show, rollback, remove, dry-run test) here, queue operations in
//! [`super::queue_admin`].

use bytes::Bytes;
use serde::Deserialize;

use super::Shared;
use super::session::Session;
use crate::auth::Class;
use crate::plugins::DeployRequest;
use crate::protocol::{ErrorCode, WireError};

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(body)
        .map_err(|e| WireError::new(ErrorCode::InvalidArgument, format!("bad request body: {e}")))
}

/// A node to add or remove (`cluster_add_node`, `cluster_remove_node`).
#[derive(Deserialize)]
struct NodeRequest {
    id: u64,
    addr: Option<std::net::SocketAddr>,
}

/// Where to hand leadership (`cluster_step_down`): a voter, or any.
#[derive(Deserialize)]
struct StepDown {
    #[serde(default)]
    to: Option<u64>,
}

/// A replica of the asked router's group to move (`cluster_move_replica`).
#[derive(Deserialize)]
struct MoveReplica {
    from: u64,
    #[serde(default)]
    to: Option<u64>,
}

/// A node to mark drained or not (`cluster_drain`).
#[derive(Deserialize)]
struct Drain {
    node: u64,
    #[serde(default = "yes")]
    drained: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct Named {
    name: String,
}

#[derive(Deserialize)]
struct KvGet {
    name: String,
    key: String,
}

#[derive(Deserialize)]
struct Rollback {
    name: String,
    #[serde(default)]
    to: Option<u32>,
}

pub(super) async fn handle(
    shared: &Shared,
    session: &Session,
    op: &str,
    body: &[u8],
    wasm: Bytes,
) -> Result<serde_json::Value, WireError> {
    let broker = &shared.broker;
    let plugins = broker.plugins();
    // plugin-admin grants name the topic a plugin is bound to.
    let on_binding = |name: &str| -> Result<(), WireError> {
        session.check(Class::PluginAdmin, &plugins.topic_of(name)?, "")
    };
    match op {
        "deploy" => {
            let mut req: DeployRequest = parse(body)?;
            session.check(Class::PluginAdmin, &req.topic, "")?;
            if let Ok(current) = plugins.topic_of(&req.name) {
                // Redeploying may not move another team's plugin either.
                session.check(Class::PluginAdmin, &current, "")?;
            }
            req.deployed_by = Some(session.principal().name.to_string());
            // A binding names one topic, or a pattern (`orders.*`) that
            // applies to every topic it matches, present or future.
            let pattern = crate::plugins::registry::topic_pattern(&req.topic);
            let bound: Vec<_> = match pattern {
                Some(prefix) => broker
                    .storage()
                    .topics()
                    .into_iter()
                    .filter(|t| t.meta.name.starts_with(prefix))
                    .collect(),
                None => broker.topic(&req.topic).ok().into_iter().collect(),
            };
            let topic_exists = pattern.is_some() || !bound.is_empty();
            if req.on_failure == crate::plugins::FailureMode::DeadLetter {
                // Route failures are stored on each topic's dead-letter
                // topic: make sure they exist.
                for t in bound {
                    let dlq = t.policy().dlq_of(&t.meta.name);
                    if broker.topic(&dlq).is_err() {
                        match broker.create_topic(&dlq, t.meta.partitions, 0, 0).await {
                            Ok(_) => {}
                            Err(e) if e.code == ErrorCode::TopicExists => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            plugins.deploy(req, wasm.to_vec(), topic_exists).await
        }
        "list" => {
            let p = session.principal();
            let mut all = plugins.list();
            if let serde_json::Value::Array(list) = &mut all {
                list.retain(|v| {
                    v["topic"]
                        .as_str()
                        .is_some_and(|t| p.may(Class::PluginAdmin, t, ""))
                });
            }
            Ok(all)
        }
        "show" => {
            let name = parse::<Named>(body)?.name;
            on_binding(&name)?;
            plugins.show(&name)
        }
        "rollback" => {
            let r: Rollback = parse(body)?;
            on_binding(&r.name)?;
            let by = Some(session.principal().name.to_string());
            plugins.rollback(&r.name, r.to, by).await
        }
        "remove" => {
            let name = parse::<Named>(body)?.name;
            on_binding(&name)?;
            plugins.remove(&name).await
        }
        "kv-get" => {
            let r: KvGet = parse(body)?;
            on_binding(&r.name)?;
            let v = plugins.kv_get(&r.name, &r.key)?;
            Ok(serde_json::json!({
                "name": r.name,
                "key": r.key,
                "value": v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()),
            }))
        }
        "test" => {
            let req: super::plugin_test::TestRequest = parse(body)?;
            session.check(Class::PluginAdmin, &req.topic, "")?;
            super::plugin_test::dry_run(broker, req, wasm).await
        }
        "status" => Ok(super::status::status(shared, session)),
        "topic-group" => super::placement::topic_group(shared, session, body).await,
        "cluster_status"
        | "cluster_add_node"
        | "cluster_remove_node"
        | "cluster_step_down"
        | "cluster_move_replica"
        | "cluster_drain" => {
            session.check(Class::ClusterAdmin, "*", "")?;
            let Some(r) = &shared.config.replica else {
                return Err(WireError::new(
                    ErrorCode::InvalidArgument,
                    "this router is not a cluster node (start it with --node-id and --cluster)",
                ));
            };
            let failed = |e: super::ControlError| {
                WireError::new(e.code(), format!("membership change failed: {e}"))
            };
            match op {
                "cluster_add_node" => {
                    let n: NodeRequest = parse(body)?;
                    let addr = n.addr.ok_or_else(|| {
                        WireError::new(ErrorCode::InvalidArgument, "addr is required")
                    })?;
                    r.control.add_node(n.id, addr).await.map_err(failed)?;
                    Ok(r.control.status())
                }
                "cluster_remove_node" => {
                    let n: NodeRequest = parse(body)?;
                    r.control.remove_node(n.id).await.map_err(failed)?;
                    // A node gone is drained no more: a new node given its
                    // id later starts undrained.
                    let zero = r.placement.as_ref().is_none_or(|p| p.group == 0);
                    if zero && crate::storage::drained_nodes(&r.db).contains(&n.id) {
                        shared
                            .broker
                            .storage()
                            .drain_node(n.id, false)
                            .await
                            .map_err(|e| e.to_wire())?;
                    }
                    Ok(r.control.status())
                }
                "cluster_move_replica" => {
                    let req: MoveReplica = parse(body)?;
                    let to = r
                        .control
                        .move_replica(req.from, req.to)
                        .await
                        .map_err(|e| WireError::new(e.code(), format!("replica not moved: {e}")))?;
                    let mut status = r.control.status();
                    status["moved_to"] = to.into();
                    Ok(status)
                }
                "cluster_step_down" => {
                    let req: StepDown = parse(body)?;
                    let previous = r.control.status()["node"].clone();
                    let leader =
                        r.control.step_down(req.to).await.map_err(|e| {
                            WireError::new(e.code(), format!("step-down failed: {e}"))
                        })?;
                    Ok(serde_json::json!({ "leader": leader, "previous": previous }))
                }
                "cluster_drain" => {
                    let req: Drain = parse(body)?;
                    drain(shared, r, req).await
                }
                _ => Ok(r.control.status()),
            }
        }
        other if super::queue_admin::OPS.contains(&other) => {
            super::queue_admin::handle(broker, session, other, body).await
        }
        other if super::auth_admin::OPS.contains(&other) => {
            super::auth_admin::handle(&shared.auth, session, other, body).await
        }
        other => Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "unknown admin operation '{other}' (plugins: deploy, list, show, rollback, \
                     remove, test, kv-get; queues: topic-policy, feeds, queue-stats, dlq-list, \
                     dlq-redrive, dlq-purge; status; topic-group; cluster_status, cluster_add_node, \
                     cluster_remove_node, cluster_step_down, cluster_move_replica, cluster_drain; auth: \
                     {})",
                super::auth_admin::OPS.join(", ")
            ),
        )),
    }
}

/// `cluster_drain`: marks a node drained (`"drained": true`, the default)
/// or not, a row of group 0 that every node's balancer reads: a drained
/// node is handed no leadership and hands over the groups it leads.
/// Answers the cluster's status once the mark is committed; the moves
/// follow within a second or so (the client waits for them).
async fn drain(
    shared: &Shared,
    r: &super::Replica,
    req: Drain,
) -> Result<serde_json::Value, WireError> {
    if r.placement.as_ref().is_some_and(|p| p.group != 0) {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            "nodes are drained through the cluster's group 0: ask a client of group 0",
        ));
    }
    let status = r.control.status();
    let voters: Vec<u64> = status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["role"] != "learner")
        .filter_map(|n| n["id"].as_u64())
        .collect();
    if !voters.contains(&req.node) {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "node {} is not a voter of the cluster (voters: {voters:?})",
                req.node
            ),
        ));
    }
    // This router is group 0's: its tables hold the marks.
    let drained: Vec<u64> = crate::storage::drained_nodes(&r.db).into_iter().collect();
    if req.drained && voters.iter().all(|v| *v == req.node || drained.contains(v)) {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "draining node {} would leave no voter to lead (drained: {drained:?}); undrain \
                 one first",
                req.node
            ),
        ));
    }
    shared
        .broker
        .storage()
        .drain_node(req.node, req.drained)
        .await
        .map_err(|e| e.to_wire())?;
    tracing::info!(
        node = req.node,
        drained = req.drained,
        "node drain mark changed"
    );
    Ok(r.control.status())
}
