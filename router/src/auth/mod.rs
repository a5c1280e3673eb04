//! Who a connection is and what it may do: principals, their credentials
//! (bearer tokens, client certificates), grants and quotas.
//!
//! Principals come from three places: the admin token in the data
//! directory (`admin.token`, written on first start), the `[auth]` section
//! of the configuration file (static, managed as files), and the database
//! (created with `switchyard auth token create`, effective at once). The
//! live set is one immutable [`State`] behind an `ArcSwap`: a request's
//! check is a pointer load and a scan of a few grants, and a change
//! publishes a new state and bumps a generation that open connections
//! watch, so a revoked credential's connections are closed at once.

pub mod grant;
pub mod quota;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use grant::{Class, Grant, Pattern};
pub use quota::{Held, Quotas, Usage};

use crate::protocol::{ErrorCode, WireError};
use crate::server::placement::GroupZero;
use crate::storage::{Storage, now_ms};

/// Every token starts with this, so a leaked one is easy to search for.
pub const TOKEN_PREFIX: &str = "sy_";

/// The principal whose token `serve` writes to `<data>/admin.token`.
pub const ADMIN: &str = "admin";

/// The principal of connections without a credential, when allowed.
pub const ANONYMOUS: &str = "anonymous";

/// A new bearer token: 256 bits from the system's secure random source.
pub fn new_token() -> String {
    use ring::rand::SecureRandom;
    let mut raw = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut raw)
        .expect("the system random source works");
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    )
}

/// The SHA-256 of a token: all the router ever stores. Tokens carry 256
/// bits of randomness, so a fast hash is enough (no password stretching).
pub fn hash_token(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.trim().as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// Lower-case hex of a hash.
pub fn hex(h: &[u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A principal as stored in the database or written in the config file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PrincipalRecord {
    /// Unique name; for client certificates, the certificate's subject
    /// common name.
    pub name: String,
    /// SHA-256 (hex) of the principal's bearer token, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// What it may do.
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// Its limits (unset ones fall back to the router's defaults).
    #[serde(default)]
    pub quotas: Quotas,
    /// Creation time, ms since the epoch.
    #[serde(default)]
    pub created_ms: u64,
}

/// Where a principal is defined, which decides who may change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The admin token in the data directory.
    DataDir,
    /// The `[auth]` section of the configuration file.
    Config,
    /// The database: managed with `switchyard auth`.
    Stored,
    /// A client certificate whose subject has no principal of its own: it
    /// is someone, with no grants.
    Certificate,
    /// A connection with no credential, on a router started with
    /// `--allow-anonymous`.
    Anonymous,
}

/// A principal, as connections see it.
#[derive(Debug)]
pub struct Principal {
    /// Its name.
    pub name: Arc<str>,
    /// What it may do.
    pub grants: Vec<Grant>,
    /// Its effective limits (its own, else the router's defaults).
    pub quotas: Quotas,
    /// Where it is defined.
    pub source: Source,
    /// Hash of its token, if it has one.
    token: Option<[u8; 32]>,
    created_ms: u64,
}

impl Principal {
    /// True if it may do `class` on `name` (in `group`, for consume).
    pub fn may(&self, class: Class, name: &str, group: &str) -> bool {
        grant::allowed(&self.grants, class, name, group)
    }

    /// True if any of its grants names `name`: enough to see that a topic
    /// exists and read its description.
    pub fn sees(&self, name: &str) -> bool {
        self.grants.iter().any(|g| g.touches(name))
    }

    /// `Ok` if it may do `class` on `name`, else a `forbidden` error naming
    /// the grant that is missing.
    pub fn check(&self, class: Class, name: &str, group: &str) -> Result<(), WireError> {
        if self.may(class, name, group) {
            return Ok(());
        }
        let needed = if class == Class::Consume && !group.is_empty() {
            format!("{}:{name}@{group}", class.name())
        } else {
            format!("{}:{name}", class.name())
        };
        Err(WireError::new(
            ErrorCode::Forbidden,
            format!(
                "principal '{}' lacks the grant {needed} (an administrator can add it: \
                 `switchyard auth grant {} {needed}`)",
                self.name, self.name
            ),
        ))
    }

    /// `Ok` if any grant names `name`, else `forbidden`.
    pub fn check_sees(&self, name: &str) -> Result<(), WireError> {
        if self.sees(name) {
            return Ok(());
        }
        Err(WireError::new(
            ErrorCode::Forbidden,
            format!(
                "principal '{}' has no grant on '{name}' (an administrator can add one: \
                 `switchyard auth grant {} consume:{name}`)",
                self.name, self.name
            ),
        ))
    }

    fn from_record(r: &PrincipalRecord, source: Source, defaults: Quotas) -> Principal {
        Principal {
            name: r.name.as_str().into(),
            grants: r.grants.clone(),
            quotas: r.quotas.or(defaults),
            source,
            token: r.token_sha256.as_deref().and_then(unhex),
            created_ms: r.created_ms,
        }
    }

    /// A description for `auth token list` and `whoami` (never the hash).
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "name": &*self.name,
            "source": self.source,
            "token": self.token.is_some(),
            "grants": self.grants,
            "quotas": self.quotas,
            "created_ms": self.created_ms,
        })
    }
}

/// How a connection proved who it is; re-checked when principals change.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A bearer token (its hash).
    Token([u8; 32]),
    /// A client certificate verified against the client CA, by subject name.
    Certificate(String),
    /// Nothing, on a router that allows anonymous access.
    Anonymous,
}

/// The authentication settings: the `[auth]` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Write an admin token to `<data>/admin.token` and accept it (default
    /// true): the CLI beside the router then works with no setup.
    pub admin_token: bool,
    /// PEM file of the CA whose client certificates are accepted (mutual
    /// TLS); a certificate's subject common name is its principal.
    pub client_ca: Option<PathBuf>,
    /// Let connections without a credential act as principal `anonymous`.
    pub allow_anonymous: bool,
    /// What `anonymous` may do (default: everything, as before principals).
    pub anonymous_grants: Vec<Grant>,
    /// Principals defined in the file, for deployments managed as files;
    /// `switchyard auth` cannot change them.
    pub principals: Vec<PrincipalRecord>,
    /// Quotas for principals that set none of their own.
    pub default_quotas: Quotas,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            admin_token: true,
            client_ca: None,
            allow_anonymous: false,
            anonymous_grants: vec![Grant::parse("cluster-admin:*").expect("valid grant")],
            principals: Vec::new(),
            default_quotas: Quotas::default(),
        }
    }
}

/// The live set of principals: replaced whole on every change.
#[derive(Default)]
struct State {
    by_name: HashMap<Arc<str>, Arc<Principal>>,
    by_token: HashMap<[u8; 32], Arc<Principal>>,
}

/// Outcome of re-checking a connection's principal after a change.
pub enum Recheck {
    /// Still valid; here is its current form (grants may have grown).
    Valid(Arc<Principal>),
    /// The credential was revoked, or grants were narrowed: close the
    /// connection with this reason.
    Revoked(String),
}

/// Principals, credentials and usage, shared by every connection.
pub struct Auth {
    state: ArcSwap<State>,
    /// Principals from the data directory and the config file.
    fixed: Vec<(PrincipalRecord, Source)>,
    /// Principals in the database, as stored.
    stored: Mutex<BTreeMap<String, PrincipalRecord>>,
    anonymous: Option<Arc<Principal>>,
    defaults: Quotas,
    storage: Storage,
    generation: watch::Sender<u64>,
    usage: Mutex<HashMap<Arc<str>, Arc<Usage>>>,
    /// Serializes changes so each is read-modify-write against the last.
    admin: tokio::sync::Mutex<()>,
    data_dir: PathBuf,
    /// Set on the router of a cluster group other than 0: the principals
    /// are group 0's, followed from the node's replica of it, and changed
    /// only through group 0's router.
    following: bool,
}

/// The principals (name, JSON record) in a router's tables, read outside
/// its storage writer: a cluster follower's, or another group's.
pub fn stored_principals(db: &redb::Database) -> Vec<(String, Vec<u8>)> {
    crate::storage::rows_of(db, crate::storage::tables::PRINCIPALS, |name, record| {
        (name.to_string(), record.to_vec())
    })
}

/// Why principals could not be loaded at start.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The admin token file could not be read or written.
    #[error("{path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A principal in the configuration is invalid.
    #[error("[auth] principal '{0}': {1}")]
    Config(String, String),
    /// Stored principals could not be read.
    #[error("reading principals: {0}")]
    Storage(String),
}

/// The principals that are not stored: the data directory's admin token
/// (generated if missing and `config.admin_token`) and the configuration
/// file's, checked.
fn fixed_principals(
    config: &AuthConfig,
    data: &Path,
) -> Result<Vec<(PrincipalRecord, Source)>, AuthError> {
    let mut fixed: Vec<(PrincipalRecord, Source)> = Vec::new();
    let is_fixed =
        |fixed: &[(PrincipalRecord, Source)], name: &str| fixed.iter().any(|(r, _)| r.name == name);
    if config.admin_token {
        let path = admin_token_path(data);
        let token = match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => t,
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                return Err(AuthError::TokenFile { path, source });
            }
            _ => {
                let t = new_token();
                write_private(&path, format!("{t}\n").as_bytes()).map_err(|source| {
                    AuthError::TokenFile {
                        path: path.clone(),
                        source,
                    }
                })?;
                tracing::info!(path = %path.display(), "admin token written");
                t
            }
        };
        let admin = PrincipalRecord {
            name: ADMIN.into(),
            token_sha256: Some(hex(&hash_token(&token))),
            grants: vec![Grant::parse("cluster-admin:*").expect("valid grant")],
            quotas: Quotas::default(),
            created_ms: 0,
        };
        fixed.push((admin, Source::DataDir));
    }
    for p in &config.principals {
        if p.name.is_empty() || is_fixed(&fixed, &p.name) {
            return Err(AuthError::Config(
                p.name.clone(),
                "names must be non-empty and unique (and not 'admin' while admin_token is on)"
                    .into(),
            ));
        }
        if let Some(h) = &p.token_sha256
            && unhex(h).is_none()
        {
            return Err(AuthError::Config(
                p.name.clone(),
                "token_sha256 must be 64 hex digits (`switchyard auth hash` prints it for a token)"
                    .into(),
            ));
        }
        fixed.push((p.clone(), Source::Config));
    }
    Ok(fixed)
}

/// Whether `token` is a principal's that may do `class` on `name`, from
/// the fixed principals and the `stored` records (name, JSON) alone: for a
/// cluster follower, which has the replicated principals table but no
/// storage writer to open an [`Auth`] on.
pub fn token_may(
    config: &AuthConfig,
    data: &Path,
    stored: impl IntoIterator<Item = (String, Vec<u8>)>,
    token: &str,
    class: Class,
    name: &str,
) -> bool {
    let Ok(fixed) = fixed_principals(config, data) else {
        return false;
    };
    let h = hash_token(token);
    let stored: Vec<(PrincipalRecord, Source)> = stored
        .into_iter()
        .filter(|(n, _)| !fixed.iter().any(|(r, _)| &r.name == n))
        .filter_map(|(_, b)| serde_json::from_slice::<PrincipalRecord>(&b).ok())
        .map(|r| (r, Source::Stored))
        .collect();
    fixed
        .iter()
        .chain(&stored)
        .map(|(r, source)| Principal::from_record(r, *source, config.default_quotas))
        .any(|p| p.token == Some(h) && p.may(class, name, ""))
}

/// The stored principals among `records` (name, JSON), but those named
/// like a fixed one.
fn parse_stored(
    fixed: &[(PrincipalRecord, Source)],
    records: Vec<(String, Vec<u8>)>,
) -> BTreeMap<String, PrincipalRecord> {
    let mut stored = BTreeMap::new();
    for (name, bytes) in records {
        match serde_json::from_slice::<PrincipalRecord>(&bytes) {
            Ok(_) if fixed.iter().any(|(r, _)| r.name == name) => tracing::warn!(
                principal = %name,
                "a stored principal has the name of one from the data directory or the config file; the stored one is ignored"
            ),
            Ok(r) => {
                stored.insert(name, r);
            }
            Err(e) => {
                tracing::error!(principal = %name, error = %e, "stored principal unreadable; ignored")
            }
        }
    }
    stored
}

/// Where `serve` keeps the admin token in a data directory.
pub fn admin_token_path(data: &Path) -> PathBuf {
    data.join("admin.token")
}

impl Auth {
    /// Loads principals: the admin token (generated into `data` if missing
    /// and `config.admin_token`), the configured ones and the stored ones.
    pub fn open(config: &AuthConfig, data: &Path, storage: Storage) -> Result<Auth, AuthError> {
        let records = storage
            .principal_records()
            .map_err(|e| AuthError::Storage(e.to_string()))?;
        Self::open_with(config, data, storage, records, false)
    }

    /// As [`Auth::open`] for the router of a cluster group other than 0:
    /// the stored principals are `replica`'s (group 0's), followed with
    /// [`Auth::follow`], and cannot be changed here.
    pub fn open_following(
        config: &AuthConfig,
        data: &Path,
        storage: Storage,
        replica: &GroupZero,
    ) -> Result<Auth, AuthError> {
        Self::open_with(config, data, storage, replica.principals(), true)
    }

    /// Keeps this router's principals equal to `replica`'s until the
    /// router is gone: connections whose token was revoked or whose grants
    /// were narrowed there are re-checked and closed, as on group 0.
    pub fn follow(self: &Arc<Self>, replica: GroupZero) {
        let weak = Arc::downgrade(self);
        let mut changed = replica.changed.clone();
        tokio::spawn(async move {
            while changed.changed().await.is_ok() {
                let Some(auth) = weak.upgrade() else { return };
                let fresh = parse_stored(&auth.fixed, replica.principals());
                {
                    // The change may have been to the topic assignment,
                    // which group 0 also keeps: nothing to re-check then.
                    let mut stored = auth.stored.lock().expect("stored lock");
                    if *stored == fresh {
                        continue;
                    }
                    *stored = fresh;
                }
                auth.rebuild();
            }
        });
    }

    fn open_with(
        config: &AuthConfig,
        data: &Path,
        storage: Storage,
        records: Vec<(String, Vec<u8>)>,
        following: bool,
    ) -> Result<Auth, AuthError> {
        let fixed = fixed_principals(config, data)?;
        let stored = parse_stored(&fixed, records);
        let anonymous = config.allow_anonymous.then(|| {
            Arc::new(Principal {
                name: ANONYMOUS.into(),
                grants: config.anonymous_grants.clone(),
                quotas: config.default_quotas,
                source: Source::Anonymous,
                token: None,
                created_ms: 0,
            })
        });
        let auth = Auth {
            state: ArcSwap::from_pointee(State::default()),
            fixed,
            stored: Mutex::new(stored),
            anonymous,
            defaults: config.default_quotas,
            storage,
            generation: watch::channel(0).0,
            usage: Mutex::new(HashMap::new()),
            admin: tokio::sync::Mutex::new(()),
            data_dir: data.to_path_buf(),
            following,
        };
        auth.rebuild();
        Ok(auth)
    }

    /// True if some principal other than the data directory's admin can
    /// connect: the condition for listening beyond loopback.
    pub fn has_principals_beyond_admin(&self, client_ca: bool) -> bool {
        client_ca
            || self.anonymous.is_some()
            || self.fixed.iter().any(|(_, s)| *s == Source::Config)
            || !self.stored.lock().expect("stored lock").is_empty()
    }

    fn rebuild(&self) {
        let stored = self.stored.lock().expect("stored lock");
        let mut state = State::default();
        let all = self
            .fixed
            .iter()
            .map(|(r, s)| (r, *s))
            .chain(stored.values().map(|r| (r, Source::Stored)));
        for (r, source) in all {
            let p = Arc::new(Principal::from_record(r, source, self.defaults));
            if let Some(t) = p.token {
                state.by_token.insert(t, p.clone());
            }
            state.by_name.insert(p.name.clone(), p);
        }
        self.state.store(Arc::new(state));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Who a new connection is. A token wins over a certificate; with
    /// neither, the anonymous principal if allowed.
    pub fn authenticate(
        &self,
        token: Option<&str>,
        certificate: Option<&str>,
    ) -> Result<(Arc<Principal>, Credential), WireError> {
        if let Some(token) = token {
            let h = hash_token(token);
            return match self.state.load().by_token.get(&h) {
                Some(p) => Ok((p.clone(), Credential::Token(h))),
                None => Err(WireError::new(
                    ErrorCode::Unauthenticated,
                    "token not recognised: it is wrong or was revoked \
                     (an administrator creates one with `switchyard auth token create`)",
                )),
            };
        }
        if let Some(name) = certificate {
            let cred = Credential::Certificate(name.to_string());
            return Ok((self.by_certificate(name), cred));
        }
        match &self.anonymous {
            Some(p) => Ok((p.clone(), Credential::Anonymous)),
            None => Err(WireError::new(
                ErrorCode::Unauthenticated,
                format!(
                    "this router requires a credential: pass a token (--token, SWITCHYARD_TOKEN or \
                     --token-file; beside the router the admin token is {}) or a client certificate",
                    admin_token_path(&self.data_dir).display()
                ),
            )),
        }
    }

    fn by_certificate(&self, name: &str) -> Arc<Principal> {
        self.state
            .load()
            .by_name
            .get(name)
            .cloned()
            .unwrap_or_else(|| {
                Arc::new(Principal {
                    name: name.into(),
                    grants: Vec::new(),
                    quotas: self.defaults,
                    source: Source::Certificate,
                    token: None,
                    created_ms: 0,
                })
            })
    }

    /// Re-checks a connection after principals changed.
    pub fn recheck(&self, current: &Principal, credential: &Credential) -> Recheck {
        let now = match credential {
            Credential::Token(h) => match self.state.load().by_token.get(h) {
                Some(p) => p.clone(),
                None => {
                    return Recheck::Revoked(format!(
                        "the token of '{}' was revoked",
                        current.name
                    ));
                }
            },
            Credential::Certificate(name) => self.by_certificate(name),
            Credential::Anonymous => {
                return Recheck::Valid(self.anonymous.clone().expect("anonymous allowed"));
            }
        };
        if grant::covers(&now.grants, &current.grants) {
            Recheck::Valid(now)
        } else {
            Recheck::Revoked(format!(
                "the grants of '{}' were narrowed; reconnect to continue with the new ones",
                current.name
            ))
        }
    }

    /// A receiver that changes whenever principals change.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The principal named `name`, if any: what a plugin deployed by it
    /// may do is checked against this.
    pub fn principal(&self, name: &str) -> Option<Arc<Principal>> {
        self.state.load().by_name.get(name).cloned()
    }

    /// The live usage of a principal, shared by all its connections.
    pub fn usage(&self, name: &Arc<str>) -> Arc<Usage> {
        self.usage
            .lock()
            .expect("usage lock")
            .entry(name.clone())
            .or_default()
            .clone()
    }

    /// Every principal, sorted by name.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let state = self.state.load();
        let mut all: Vec<_> = state.by_name.values().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all.into_iter().map(|p| p.describe()).collect()
    }

    fn not_managed(&self, name: &str) -> Option<WireError> {
        let (_, source) = self.fixed.iter().find(|(r, _)| r.name == name)?;
        let why = match source {
            Source::DataDir => format!(
                "principal '{name}' is the data directory's admin token ({}): to rotate it, delete \
                 that file and restart the router; to turn it off, set admin_token = false in [auth]",
                admin_token_path(&self.data_dir).display()
            ),
            _ => format!(
                "principal '{name}' is defined in the configuration file's [auth] section: change it there and restart"
            ),
        };
        Some(WireError::new(ErrorCode::InvalidArgument, why))
    }

    async fn change(
        &self,
        name: &str,
        f: impl FnOnce(Option<PrincipalRecord>) -> Result<Option<PrincipalRecord>, WireError>,
    ) -> Result<Option<PrincipalRecord>, WireError> {
        if let Some(e) = self.not_managed(name) {
            return Err(e);
        }
        if self.following {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                "principals are kept by the cluster's group 0 and hold in every group: \
                 change them through a client of group 0 (`switchyard auth` is one)",
            ));
        }
        let _admin = self.admin.lock().await;
        let current = self.stored.lock().expect("stored lock").get(name).cloned();
        let next = f(current)?;
        let bytes = next
            .as_ref()
            .map(|r| serde_json::to_vec(r).expect("record serializes"));
        self.storage
            .put_principal(name, bytes)
            .await
            .map_err(|e| e.to_wire())?;
        {
            let mut stored = self.stored.lock().expect("stored lock");
            match &next {
                Some(r) => stored.insert(name.to_string(), r.clone()),
                None => stored.remove(name),
            };
        }
        self.rebuild();
        Ok(next)
    }

    /// Creates a principal with a new token (or, with `rotate`, gives an
    /// existing one a new token, which ends the old one's connections).
    /// Returns the token: the only time it is ever shown.
    pub async fn create_token(
        &self,
        name: &str,
        grants: Vec<Grant>,
        quotas: Quotas,
        rotate: bool,
    ) -> Result<String, WireError> {
        validate_name(name)?;
        let token = new_token();
        let hash = hex(&hash_token(&token));
        self.change(name, |cur| match (cur, rotate) {
            (Some(mut r), true) => {
                r.token_sha256 = Some(hash);
                r.grants.extend(grants);
                r.grants.dedup();
                Ok(Some(r))
            }
            (None, true) => Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!("no principal '{name}' to rotate (create it without --rotate)"),
            )),
            (Some(r), false) if r.token_sha256.is_some() => Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "principal '{name}' already has a token: --rotate replaces it, \
                     `auth token revoke {name}` removes it"
                ),
            )),
            (Some(mut r), false) => {
                r.token_sha256 = Some(hash);
                r.grants.extend(grants);
                Ok(Some(r))
            }
            (None, false) => Ok(Some(PrincipalRecord {
                name: name.to_string(),
                token_sha256: Some(hash),
                grants,
                quotas,
                created_ms: now_ms(),
            })),
        })
        .await?;
        tracing::info!(principal = name, rotate, "token created");
        Ok(token)
    }

    /// Removes a principal with its token and grants; its connections are
    /// closed.
    pub async fn revoke_token(&self, name: &str) -> Result<(), WireError> {
        self.change(name, |cur| match cur {
            Some(_) => Ok(None),
            None => Err(unknown_principal(name)),
        })
        .await?;
        tracing::info!(principal = name, "principal revoked");
        Ok(())
    }

    /// Adds (`add`) or removes grants, and sets quotas, of a principal;
    /// adding to a name with no principal creates one without a token (for
    /// a client certificate with that subject).
    pub async fn update(
        &self,
        name: &str,
        add: Vec<Grant>,
        remove: Vec<Grant>,
        quotas: &[(String, String)],
    ) -> Result<PrincipalRecord, WireError> {
        validate_name(name)?;
        let creates = !add.is_empty() || !quotas.is_empty();
        let r = self
            .change(name, |cur| {
                let mut r = match cur {
                    Some(r) => r,
                    None if creates => PrincipalRecord {
                        name: name.to_string(),
                        token_sha256: None,
                        grants: Vec::new(),
                        quotas: Quotas::default(),
                        created_ms: now_ms(),
                    },
                    None => return Err(unknown_principal(name)),
                };
                for g in add {
                    if !r.grants.contains(&g) {
                        r.grants.push(g);
                    }
                }
                for g in &remove {
                    if !r.grants.contains(g) {
                        return Err(WireError::new(
                            ErrorCode::InvalidArgument,
                            format!(
                                "principal '{name}' has no grant {g} (its grants: {})",
                                r.grants
                                    .iter()
                                    .map(|g| g.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    }
                    r.grants.retain(|x| x != g);
                }
                for (k, v) in quotas {
                    r.quotas
                        .set(k, v)
                        .map_err(|m| WireError::new(ErrorCode::InvalidArgument, m))?;
                }
                Ok(Some(r))
            })
            .await?
            .expect("update keeps the principal");
        tracing::info!(principal = name, "grants changed");
        Ok(r)
    }
}

fn unknown_principal(name: &str) -> WireError {
    WireError::new(
        ErrorCode::InvalidArgument,
        format!("no principal named '{name}' (see `switchyard auth token list`)"),
    )
}

fn validate_name(name: &str) -> Result<(), WireError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@=, ".contains(c));
    if ok && name != ANONYMOUS {
        Ok(())
    } else {
        Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "principal name '{name}': 1-128 characters from A-Z a-z 0-9 . _ - @ = , and space, \
                 and not '{ANONYMOUS}'"
            ),
        ))
    }
}

#[cfg(unix)]
pub(crate) fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(not(unix))]
pub(crate) fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::with_test_storage;

    #[test]
    fn a_follower_admits_to_metrics_the_tokens_the_leader_would() {
        let data = tempfile::tempdir().unwrap();
        let config = AuthConfig {
            admin_token: true,
            ..AuthConfig::default()
        };
        // The admin token written into the data directory.
        fixed_principals(&config, data.path()).unwrap();
        let admin = std::fs::read_to_string(admin_token_path(data.path())).unwrap();
        let record = |name: &str, token: &str, grant: &str| {
            let r = PrincipalRecord {
                name: name.into(),
                token_sha256: Some(hex(&hash_token(token))),
                grants: vec![Grant::parse(grant).unwrap()],
                quotas: Quotas::default(),
                created_ms: 0,
            };
            (name.to_string(), serde_json::to_vec(&r).unwrap())
        };
        let stored = vec![
            record("prometheus", "scrape-token", "cluster-admin:*"),
            record("app", "app-token", "publish:*"),
        ];
        let may = |token: &str| {
            token_may(
                &config,
                data.path(),
                stored.clone(),
                token,
                Class::ClusterAdmin,
                "*",
            )
        };
        assert!(may(admin.trim()));
        assert!(may("scrape-token"));
        assert!(!may("app-token"), "a publisher may not read metrics");
        assert!(!may("made-up"));
    }

    #[test]
    fn static_principals_from_the_config_file_authenticate_and_cannot_be_changed() {
        let token = new_token();
        let text = format!(
            r#"
            [auth]
            default_quotas = {{ connections = 64 }}
            [[auth.principals]]
            name = "billing"
            token_sha256 = "{}"
            grants = ["publish:orders.*", "consume:orders.*@billing"]
            quotas = {{ publish_msgs_per_s = 5000 }}
            [[auth.principals]]
            name = "ingest"
            grants = ["publish:events.*"]
            "#,
            hex(&hash_token(&token))
        );
        let config: crate::server::RouterConfig = toml::from_str(&text).unwrap();
        let data = tempfile::tempdir().unwrap();
        with_test_storage(|storage| async move {
            let auth = Auth::open(&config.auth, data.path(), storage).unwrap();
            assert!(
                admin_token_path(data.path()).exists(),
                "admin token written"
            );
            let (p, _) = auth.authenticate(Some(&token), None).unwrap();
            assert_eq!(&*p.name, "billing");
            assert_eq!(p.source, Source::Config);
            assert!(p.may(Class::Publish, "orders.eu", ""));
            assert!(!p.may(Class::Consume, "orders.eu", "shipping"));
            assert_eq!(p.quotas.publish_msgs_per_s, Some(5000));
            assert_eq!(p.quotas.connections, Some(64), "defaults fill the gaps");
            let (cert, _) = auth.authenticate(None, Some("ingest")).unwrap();
            assert!(cert.may(Class::Publish, "events.x", ""));
            let e = auth.revoke_token("billing").await.unwrap_err();
            assert!(e.message.contains("configuration file"), "{}", e.message);
            let e = auth.revoke_token(ADMIN).await.unwrap_err();
            assert!(e.message.contains("admin.token"), "{}", e.message);
            assert!(
                auth.authenticate(None, None).is_err(),
                "no anonymous by default"
            );
            assert!(auth.has_principals_beyond_admin(false));
        });
    }

    #[test]
    fn stored_principals_survive_a_restart_and_revocation_is_seen_by_recheck() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().to_path_buf();
        let db = data.join("db.redb");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let config = AuthConfig::default();
        let token = rt.block_on(async {
            let storage = Storage::open(&db, Default::default()).unwrap();
            let auth = Auth::open(&config, &data, storage.clone()).unwrap();
            assert!(!auth.has_principals_beyond_admin(false), "only the admin");
            let g = vec![Grant::parse("publish:a").unwrap()];
            let t = auth
                .create_token("svc", g, Quotas::default(), false)
                .await
                .unwrap();
            storage.shutdown().await;
            t
        });
        rt.block_on(async {
            let storage = Storage::open(&db, Default::default()).unwrap();
            let auth = Auth::open(&config, &data, storage.clone()).unwrap();
            let (p, cred) = auth.authenticate(Some(&token), None).unwrap();
            assert_eq!(&*p.name, "svc");
            let mut watch = auth.watch();
            watch.borrow_and_update();
            // Widening keeps the connection; narrowing or revoking ends it.
            auth.update("svc", vec![Grant::parse("publish:b").unwrap()], vec![], &[])
                .await
                .unwrap();
            assert!(watch.has_changed().unwrap());
            let Recheck::Valid(p) = auth.recheck(&p, &cred) else {
                panic!("widened grants keep the connection")
            };
            auth.update("svc", vec![], vec![Grant::parse("publish:a").unwrap()], &[])
                .await
                .unwrap();
            assert!(matches!(auth.recheck(&p, &cred), Recheck::Revoked(_)));
            auth.revoke_token("svc").await.unwrap();
            assert!(matches!(auth.recheck(&p, &cred), Recheck::Revoked(_)));
            assert_eq!(
                auth.authenticate(Some(&token), None).unwrap_err().code,
                ErrorCode::Unauthenticated
            );
            storage.shutdown().await;
        });
    }

    #[test]
    fn tokens_are_random_prefixed_and_hash_to_hex() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 43, "256 bits, base64url");
        let h = hash_token(&a);
        assert_eq!(unhex(&hex(&h)), Some(h));
        assert_eq!(
            hash_token(&format!("{a}\n")),
            h,
            "a trailing newline is ignored"
        );
        assert_ne!(hash_token(&b), h);
    }
}
