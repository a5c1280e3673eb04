//! Principal administration on the control stream: tokens, grants,
//! quotas, and `whoami`. Everything but `whoami` needs `cluster-admin`.

use serde::Deserialize;

use super::session::Session;
use crate::auth::{Auth, Class, Grant, Quotas};
use crate::protocol::{ErrorCode, WireError};

/// The operations this module handles.
pub(super) const OPS: [&str; 6] = [
    "whoami",
    "auth-token-create",
    "auth-token-list",
    "auth-token-revoke",
    "auth-grant",
    "auth-revoke",
];

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(body)
        .map_err(|e| WireError::new(ErrorCode::InvalidArgument, format!("bad request body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    #[serde(default)]
    grants: Vec<Grant>,
    #[serde(default)]
    quotas: Quotas,
    #[serde(default)]
    rotate: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Named {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    name: String,
    #[serde(default)]
    grants: Vec<Grant>,
    /// `NAME=VALUE` pairs, as `--quota` takes them.
    #[serde(default)]
    quotas: Vec<(String, String)>,
}

/// Handles one of [`OPS`].
pub(super) async fn handle(
    auth: &Auth,
    session: &Session,
    op: &str,
    body: &[u8],
) -> Result<serde_json::Value, WireError> {
    let me = session.principal();
    if op == "whoami" {
        let mut v = me.describe();
        let (connections, subscriptions, in_flight) = session.usage.snapshot();
        v["usage"] = serde_json::json!({
            "connections": connections,
            "subscriptions": subscriptions,
            "queue_in_flight": in_flight,
            "throttled_batches": session.usage.throttled.load(std::sync::atomic::Ordering::Relaxed),
            "refused": session.usage.refused.load(std::sync::atomic::Ordering::Relaxed),
        });
        return Ok(v);
    }
    me.check(Class::ClusterAdmin, "*", "")?;
    match op {
        "auth-token-create" => {
            let r: Create = parse(body)?;
            let token = auth
                .create_token(&r.name, r.grants, r.quotas, r.rotate)
                .await?;
            let p = auth.principal(&r.name).expect("just created");
            let mut v = p.describe();
            v["secret"] = token.into();
            Ok(v)
        }
        "auth-token-list" => Ok(serde_json::Value::Array(auth.list())),
        "auth-token-revoke" => {
            let r: Named = parse(body)?;
            auth.revoke_token(&r.name).await?;
            Ok(serde_json::json!({ "name": r.name, "revoked": true }))
        }
        "auth-grant" | "auth-revoke" => {
            let r: Change = parse(body)?;
            let (add, remove) = if op == "auth-grant" {
                (r.grants, Vec::new())
            } else {
                (Vec::new(), r.grants)
            };
            auth.update(&r.name, add, remove, &r.quotas).await?;
            Ok(auth
                .principal(&r.name)
                .map(|p| p.describe())
                .unwrap_or_default())
        }
        other => Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!("unknown auth operation '{other}'"),
        )),
    }
}
