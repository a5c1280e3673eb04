//! A connection's principal: who it is, what it may do, what it uses.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::{Auth, Class, Credential, Held, Principal, Recheck, Usage};
use crate::protocol::{RawRecord, WireError};

/// The principal a connection acts as, shared by its streams. Requests are
/// checked against the current form, which follows grant changes; the
/// connection task re-checks it whenever principals change and closes the
/// connection if its credential was revoked or its grants narrowed.
pub(crate) struct Session {
    principal: ArcSwap<Principal>,
    credential: Credential,
    /// The principal's usage, shared with its other connections.
    pub(crate) usage: Arc<Usage>,
    /// This connection's share of the connection quota.
    _connection: Held,
    /// When it last made a request or opened or closed a stream.
    last_active: std::sync::Mutex<std::time::Instant>,
}

impl Session {
    pub(crate) fn new(
        principal: Arc<Principal>,
        credential: Credential,
        usage: Arc<Usage>,
        connection: Held,
    ) -> Session {
        Session {
            principal: ArcSwap::new(principal),
            credential,
            usage,
            _connection: connection,
            last_active: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    /// Notes activity: a request, or a stream opened or closed.
    pub(crate) fn touch(&self) {
        *self.last_active.lock().expect("activity lock") = std::time::Instant::now();
    }

    /// Time since the last activity.
    pub(crate) fn idle_for(&self) -> std::time::Duration {
        self.last_active.lock().expect("activity lock").elapsed()
    }

    /// The principal as it is now.
    pub(crate) fn principal(&self) -> Arc<Principal> {
        self.principal.load_full()
    }

    /// `Ok` if the principal may do `class` on `name` (in `group`).
    pub(crate) fn check(&self, class: Class, name: &str, group: &str) -> Result<(), WireError> {
        let p = self.principal.load();
        p.check(class, name, group).inspect_err(|e| {
            tracing::info!(principal = %p.name, class = class.name(), name, group,
                code = %e.code, "request refused");
        })
    }

    /// Admits a publish batch to `topic`: `Err` if the principal may not
    /// publish there, else how long its rate quota asks it to wait first.
    /// One load of the principal per batch.
    pub(crate) fn admit_publish(
        &self,
        topic: &str,
        records: &[RawRecord],
    ) -> Result<Option<std::time::Duration>, WireError> {
        let p = self.principal.load();
        p.check(Class::Publish, topic, "")?;
        if !p.quotas.limits_publish() {
            return Ok(None);
        }
        let bytes = records.iter().map(|r| r.as_bytes().len() as u64).sum();
        Ok(self
            .usage
            .publish_delay(&p.quotas, records.len() as u64, bytes))
    }

    /// Re-checks after principals changed: `Err` with the reason to close.
    pub(crate) fn recheck(&self, auth: &Auth) -> Result<(), String> {
        match auth.recheck(&self.principal.load(), &self.credential) {
            Recheck::Valid(p) => {
                self.principal.store(p);
                Ok(())
            }
            Recheck::Revoked(why) => Err(why),
        }
    }
}
