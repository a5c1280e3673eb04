//! Administration requests on the control stream: plugins (deploy, list,
//! show, rollback, remove, dry-run test) here, queue operations in
//! [`super::queue_admin`].

use bytes::Bytes;
use serde::Deserialize;

use crate::broker::Broker;
use crate::plugins::DeployRequest;
use crate::protocol::{ErrorCode, WireError};

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(body)
        .map_err(|e| WireError::new(ErrorCode::InvalidArgument, format!("bad request body: {e}")))
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
    broker: &Broker,
    op: &str,
    body: &[u8],
    wasm: Bytes,
) -> Result<serde_json::Value, WireError> {
    let plugins = broker.plugins();
    match op {
        "deploy" => {
            let req: DeployRequest = parse(body)?;
            let topic_exists = broker.topic(&req.topic).is_ok();
            if req.on_failure == crate::plugins::FailureMode::DeadLetter && topic_exists {
                // Route failures are stored on `<topic>.dlq`: make sure it exists.
                let dlq = format!("{}.dlq", req.topic);
                if broker.topic(&dlq).is_err() {
                    let partitions = broker.topic(&req.topic)?.meta.partitions;
                    match broker.create_topic(&dlq, partitions, 0, 0).await {
                        Ok(_) => {}
                        Err(e) if e.code == ErrorCode::TopicExists => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            plugins.deploy(req, wasm.to_vec(), topic_exists).await
        }
        "list" => Ok(plugins.list()),
        "show" => plugins.show(&parse::<Named>(body)?.name),
        "rollback" => {
            let r: Rollback = parse(body)?;
            plugins.rollback(&r.name, r.to).await
        }
        "remove" => plugins.remove(&parse::<Named>(body)?.name).await,
        "kv-get" => {
            let r: KvGet = parse(body)?;
            let v = plugins.kv_get(&r.name, &r.key)?;
            Ok(serde_json::json!({
                "name": r.name,
                "key": r.key,
                "value": v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()),
            }))
        }
        "test" => super::plugin_test::dry_run(broker, parse(body)?, wasm).await,
        other if super::queue_admin::OPS.contains(&other) => {
            super::queue_admin::handle(broker, other, body).await
        }
        other => Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "unknown admin operation '{other}' (plugins: deploy, list, show, rollback, \
                     remove, test, kv-get; queues: topic-policy, feeds, queue-stats, dlq-list, \
                     dlq-redrive, dlq-purge)"
            ),
        )),
    }
}
