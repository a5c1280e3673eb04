//! The web console (`--console ADDR`): server-rendered HTML over the same
//! admin operations the CLI uses, so every page and action is checked
//! against the signed-in principal's grants exactly as a client request
//! is. Sign-in takes a bearer token (the admin token, or any principal's);
//! the session lives in memory, behind an `HttpOnly`, `SameSite=Strict`
//! cookie. No scripts: charts are inline SVG drawn from samples the
//! console takes every two seconds.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Shared;
use super::session::Session;

/// Samples kept for the overview's charts: 5 minutes at one per 2 s.
const SAMPLES: usize = 150;
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// A session ends after this long.
const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
const COOKIE: &str = "sy_session";

/// One topic at one moment: name, records published, stream-group lag,
/// queue depth.
type TopicSample = (String, u64, u64, u64);

/// Every topic at one moment.
struct Sample {
    at_ms: u64,
    topics: Vec<TopicSample>,
}

/// Picks one number of a topic's sample.
type Pick<'a> = &'a dyn Fn(&TopicSample) -> u64;

struct Console {
    shared: Arc<Shared>,
    sessions: Mutex<HashMap<String, (Arc<Session>, Instant)>>,
    samples: Mutex<VecDeque<Sample>>,
}

/// Serves the console on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let console = Arc::new(Console {
        shared,
        sessions: Mutex::new(HashMap::new()),
        samples: Mutex::new(VecDeque::new()),
    });
    let sampler = tokio::spawn(sample(console.clone()));
    let app = axum::Router::new()
        .route("/", get(overview))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/topics", get(topics))
        .route("/groups", get(groups))
        .route("/queues", get(queues))
        .route("/dlq/{topic}", get(dlq))
        .route("/dlq/{topic}/redrive", post(redrive))
        .route("/dlq/{topic}/purge", post(purge))
        .route("/plugins", get(plugins))
        .route("/plugins/{name}/rollback", post(rollback))
        .with_state(console);
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::warn!(error = %e, "console stopped");
    }
    sampler.abort();
}

async fn sample(c: Arc<Console>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tick.tick().await;
        let s = super::status::status_of(&c.shared, &|_| true);
        let lag = |t: &str| -> u64 {
            s["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|g| g["topic"] == t)
                .filter_map(|g| g["lag"].as_u64())
                .sum()
        };
        let depth = |t: &str| -> u64 {
            s["queues"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|q| q["topic"] == t)
                .map(|q| {
                    ["ready", "in_flight", "delayed"]
                        .iter()
                        .filter_map(|k| q[*k].as_u64())
                        .sum::<u64>()
                })
                .sum()
        };
        let topics = s["topics"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let name = t["name"].as_str().unwrap_or_default().to_string();
                let (l, d) = (lag(&name), depth(&name));
                (name, t["published"].as_u64().unwrap_or(0), l, d)
            })
            .collect();
        let mut samples = c.samples.lock().expect("samples lock");
        samples.push_back(Sample {
            at_ms: s["time_ms"].as_u64().unwrap_or(0),
            topics,
        });
        while samples.len() > SAMPLES {
            samples.pop_front();
        }
    }
}

/// HTML-escapes text.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A path segment, percent-encoded.
fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:0;color:#1d2330}\
nav{background:#1d2330;padding:10px 20px}nav a{color:#e8ecf4;margin-right:18px;text-decoration:none}\
nav form{display:inline;float:right}nav span{color:#9aa4b8;margin-right:12px}\
main{padding:16px 20px}table{border-collapse:collapse;margin:8px 0 20px}\
td,th{border-bottom:1px solid #dde2ea;padding:4px 12px;text-align:right}\
td:first-child,th:first-child{text-align:left}th{background:#f3f5f9}\
.msg{background:#e6f4ea;padding:8px 12px;margin-bottom:12px}.err{background:#fce8e6}\
.charts{display:flex;gap:24px;flex-wrap:wrap}.chart{border:1px solid #dde2ea;padding:8px}\
button{padding:4px 12px}h2{margin-top:24px}";

fn page(title: &str, who: Option<&str>, msg: Option<&str>, body: &str) -> Html<String> {
    let nav = match who {
        Some(p) => format!(
            "<nav><a href=\"/\">Overview</a><a href=\"/topics\">Topics</a><a href=\"/groups\">Groups</a>\
             <a href=\"/queues\">Queues</a><a href=\"/plugins\">Plugins</a>\
             <form method=\"post\" action=\"/logout\"><span>{}</span><button id=\"logout\">Sign out</button></form></nav>",
            esc(p)
        ),
        None => "<nav><a href=\"/\">Switchyard</a></nav>".into(),
    };
    let msg = msg
        .map(|m| {
            let class = if m.starts_with("error") {
                "msg err"
            } else {
                "msg"
            };
            format!("<div class=\"{class}\" id=\"message\">{}</div>", esc(m))
        })
        .unwrap_or_default();
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t} · Switchyard</title>\
         <style>{STYLE}</style></head><body>{nav}<main><h1>{t}</h1>{msg}{body}</main></body></html>",
        t = esc(title)
    ))
}

/// Rows as an HTML table; cells are already escaped.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::from("<table><tr>");
    for h in header {
        let _ = write!(out, "<th>{h}</th>");
    }
    out.push_str("</tr>");
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            out.push_str("<td>");
            out.push_str(c);
            out.push_str("</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
    out
}

#[derive(Deserialize)]
struct Flash {
    msg: Option<String>,
}

/// The signed-in session, if the cookie names a live one whose credential
/// still holds.
fn session(c: &Console, headers: &HeaderMap) -> Option<Arc<Session>> {
    let id = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(&format!("{COOKIE}=")))?
        .to_string();
    let mut sessions = c.sessions.lock().expect("sessions lock");
    sessions.retain(|_, (_, at)| at.elapsed() < SESSION_TTL);
    let s = sessions.get(&id)?.0.clone();
    if s.recheck(&c.shared.auth).is_err() {
        sessions.remove(&id);
        return None;
    }
    Some(s)
}

fn to_login() -> Response {
    Redirect::to("/login").into_response()
}

async fn admin(c: &Console, s: &Session, op: &str, body: Value) -> Result<Value, String> {
    let body = serde_json::to_vec(&body).expect("json serializes");
    super::plugin_admin::handle(&c.shared, s, op, &body, bytes::Bytes::new())
        .await
        .map_err(|e| format!("error: {e}"))
}

async fn login_form(Query(f): Query<Flash>) -> Html<String> {
    page(
        "Sign in",
        None,
        f.msg.as_deref(),
        "<form method=\"post\" action=\"/login\"><p><label>Token <input type=\"password\" \
         name=\"token\" id=\"token\" size=\"60\" autofocus></label></p>\
         <p><button id=\"signin\">Sign in</button></p><p>The admin token is in the router's data \
         directory (<code>admin.token</code>); any principal's token works, with its grants.</p></form>",
    )
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

async fn login(State(c): State<Arc<Console>>, Form(f): Form<Login>) -> Response {
    let auth = &c.shared.auth;
    let (principal, credential) = match auth.authenticate(Some(f.token.trim()), None) {
        Ok(p) => p,
        Err(_) => return Redirect::to("/login?msg=error:+token+not+recognised").into_response(),
    };
    let usage = auth.usage(&principal.name);
    let held = match usage.connect(&principal.quotas, &principal.name) {
        Ok(h) => h,
        Err(e) => {
            let m = format!("/login?msg=error:+{}", seg(&e.message));
            return Redirect::to(&m).into_response();
        }
    };
    tracing::info!(principal = %principal.name, "console sign-in");
    let session = Arc::new(Session::new(principal, credential, usage, held));
    let mut raw = [0u8; 24];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    c.sessions
        .lock()
        .expect("sessions lock")
        .insert(id.clone(), (session, Instant::now()));
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/"),
            ),
            (header::LOCATION, "/".to_string()),
        ],
    )
        .into_response()
}

async fn logout(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Some(s) = session(&c, &headers) {
        c.sessions
            .lock()
            .expect("sessions lock")
            .retain(|_, (x, _)| !Arc::ptr_eq(x, &s));
    }
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!("{COOKIE}=; Max-Age=0; HttpOnly; SameSite=Strict; Path=/"),
            ),
            (header::LOCATION, "/login".to_string()),
        ],
    )
        .into_response()
}

/// An inline SVG line chart of `points` (x: seconds ago, y: value).
fn chart(title: &str, id: &str, points: &[(f64, f64)]) -> String {
    let (w, h) = (420.0, 140.0);
    let max = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1.0);
    let span = points.first().map_or(1.0, |p| p.0).max(1.0);
    let path: Vec<String> = points
        .iter()
        .map(|(ago, v)| {
            let x = w * (1.0 - ago / span);
            let y = h - h * v / max;
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let last = points.last().map_or(0.0, |p| p.1);
    format!(
        "<div class=\"chart\"><b>{t}</b>: <span id=\"{id}\">{last:.0}</span> (max {max:.0}, last {m} min)\
         <br><svg width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\
         <rect width=\"{w}\" height=\"{h}\" fill=\"#f7f8fb\"/>\
         <polyline fill=\"none\" stroke=\"#2f6fde\" stroke-width=\"2\" points=\"{p}\"/></svg></div>",
        t = esc(title),
        m = (span / 60.0).ceil(),
        p = path.join(" ")
    )
}

async fn overview(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(f): Query<Flash>,
) -> Response {
    let Some(s) = session(&c, &headers) else {
        return to_login();
    };
    let p = s.principal();
    let (rate, lag, depth) = {
        let samples = c.samples.lock().expect("samples lock");
        let now = samples.back().map_or(0, |x| x.at_ms);
        let sum =
            |x: &Sample, f: Pick| -> u64 { x.topics.iter().filter(|t| p.sees(&t.0)).map(f).sum() };
        let ago = |x: &Sample| (now.saturating_sub(x.at_ms)) as f64 / 1000.0;
        let mut rate = Vec::new();
        for w in samples.iter().collect::<Vec<_>>().windows(2) {
            let dt = (w[1].at_ms.saturating_sub(w[0].at_ms)) as f64 / 1000.0;
            if dt > 0.0 {
                let d = sum(w[1], &|t| t.1).saturating_sub(sum(w[0], &|t| t.1));
                rate.push((ago(w[1]), d as f64 / dt));
            }
        }
        let series = |f: Pick| -> Vec<(f64, f64)> {
            samples.iter().map(|x| (ago(x), sum(x, f) as f64)).collect()
        };
        (rate, series(&|t| t.2), series(&|t| t.3))
    };
    let st = super::status::status(&c.shared, &s);
    let mut body = String::from("<div class=\"charts\">");
    body.push_str(&chart("Published messages/s", "chart-rate", &rate));
    body.push_str(&chart("Consumer lag (messages)", "chart-lag", &lag));
    body.push_str(&chart("Queue depth (messages)", "chart-depth", &depth));
    body.push_str("</div>");
    let b = |v: &Value| v.as_u64().map_or("?".into(), crate::cli::human_bytes);
    let _ = write!(
        body,
        "<p>{} · {} connection(s) · database {} · {} · free {}</p>",
        esc(&text(&st["server"])),
        text(&st["connections"]),
        b(&st["storage"]["database_bytes"]),
        if st["storage"]["raft_log_bytes"].is_u64() {
            format!("raft log {}", b(&st["storage"]["raft_log_bytes"]))
        } else {
            format!("journal {}", b(&st["storage"]["journal_bytes"]))
        },
        b(&st["storage"]["free_bytes"]),
    );
    let rows: Vec<Vec<String>> = st["topics"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            vec![
                format!("<a href=\"/topics#{0}\">{0}</a>", esc(&text(&t["name"]))),
                text(&t["messages"]),
                text(&t["published"]),
                text(&t["delivered"]),
            ]
        })
        .collect();
    body.push_str(&table(
        &["Topic", "Messages", "Published", "Delivered"],
        &rows,
    ));
    page("Overview", Some(&p.name), f.msg.as_deref(), &body).into_response()
}

async fn topics(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let Some(s) = session(&c, &headers) else {
        return to_login();
    };
    let st = super::status::status(&c.shared, &s);
    let mut body = String::new();
    for t in st["topics"].as_array().into_iter().flatten() {
        let name = text(&t["name"]);
        let _ = write!(
            body,
            "<h2 id=\"{n}\">{n}</h2><p>{} messages, {} bytes; published {}, delivered {}</p>",
            text(&t["messages"]),
            text(&t["bytes"]),
            text(&t["published"]),
            text(&t["delivered"]),
            n = esc(&name)
        );
        let rows: Vec<Vec<String>> = t["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let i = text(&p["partition"]);
                let cell =
                    |k: &str| format!("<span id=\"{k}-{}-{i}\">{}</span>", esc(&name), text(&p[k]));
                vec![i.clone(), cell("start"), cell("end"), text(&p["bytes"])]
            })
            .collect();
        body.push_str(&table(
            &["Partition", "Start offset", "End offset", "Bytes"],
            &rows,
        ));
    }
    page("Topics", Some(&s.principal().name), None, &body).into_response()
}

async fn groups(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let Some(s) = session(&c, &headers) else {
        return to_login();
    };
    let st = super::status::status(&c.shared, &s);
    let mut body = String::new();
    for g in st["groups"].as_array().into_iter().flatten() {
        let _ = write!(
            body,
            "<h2>{} on {}</h2><p>{} member(s), lag {}</p>",
            esc(&text(&g["group"])),
            esc(&text(&g["topic"])),
            text(&g["members"]),
            text(&g["lag"])
        );
        let rows: Vec<Vec<String>> = g["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                ["partition", "committed", "end", "lag"]
                    .iter()
                    .map(|k| text(&p[*k]))
                    .collect()
            })
            .collect();
        body.push_str(&table(&["Partition", "Committed", "End", "Lag"], &rows));
    }
    if body.is_empty() {
        body.push_str("<p>No stream consumer group has subscribed since the router started.</p>");
    }
    page("Consumer groups", Some(&s.principal().name), None, &body).into_response()
}

async fn queues(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let Some(s) = session(&c, &headers) else {
        return to_login();
    };
    let st = super::status::status(&c.shared, &s);
    let rows: Vec<Vec<String>> = st["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| {
            let topic = text(&q["topic"]);
            vec![
                esc(&text(&q["group"])),
                esc(&topic),
                text(&q["ready"]),
                text(&q["in_flight"]),
                text(&q["delayed"]),
                text(&q["acked"]),
                text(&q["redelivered"]),
                text(&q["dead_lettered"]),
                format!(
                    "<a href=\"/dlq/{}\">{} ({})</a>",
                    seg(&topic),
                    esc(&text(&q["dlq"])),
                    text(&q["dlq_size"])
                ),
            ]
        })
        .collect();
    let body = table(
        &[
            "Group",
            "Topic",
            "Ready",
            "In flight",
            "Delayed",
            "Acked",
            "Redelivered",
            "Dead-lettered",
            "Dead letters",
        ],
        &rows,
    );
    page("Queues", Some(&s.principal().name), None, &body).into_response()
}

async fn dlq(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(topic): Path<String>,
    Query(f): Query<Flash>,
) -> Response {
    let Some(s) = session(&c, &headers) else {
        return to_login();
    };
    let who = s.principal().name.clone();
    let list = match admin(&c, &s, "dlq-list", json!({ "topic": topic, "count": 100 })).await {
        Ok(v) => v,
        Err(e) => return page("Dead letters", Some(&who), Some(&e), "").into_response(),
    };
    let rows: Vec<Vec<String>> = list["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            vec![
                text(&m["offset"]),
                esc(&text(&m["headers"]["x-dlq-topic"])),
                esc(&text(&m["headers"]["x-dlq-attempts"])),
                esc(&text(&m["headers"]["x-dlq-error"])),
                esc(&text(&m["payload"])),
            ]
        })
        .collect();
    let t = seg(&topic);
    let body = format!(
        "<p>Dead-letter topic <b>{}</b>: <span id=\"dlq-total\">{}</span> letter(s).</p>\
         <form method=\"post\" action=\"/dlq/{t}/redrive\" style=\"display:inline\">\
         <button id=\"redrive\">Redrive all to their topics</button></form> \
         <form method=\"post\" action=\"/dlq/{t}/purge\" style=\"display:inline\">\
         <button id=\"purge\">Purge</button></form>{}",
        esc(&text(&list["topic"])),
        text(&list["total"]),
        table(&["Offset", "From", "Attempts", "Error", "Payload"], &rows)
    );
    page(
        &format!("Dead letters of {topic}"),
        Some(&who),
        f.msg.as_deref(),
        &body,
    )
    .into_response()
}

async fn redrive(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(topic): Path<String>,
) -> Response {
    dlq_action(c, headers, topic, "dlq-redrive", "redriven").await
}

async fn purge(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(topic): Path<String>,
) -> Response {
    dlq_action(c, headers, topic, "dlq-purge", "purged").await
}

async fn dlq_action(
    c: Arc<Console>,
    headers: HeaderMap,
    topic: String,
    op: &str,
    what: &str,
) -> Response {
    let Some(s) = session(&c, &headers) else {
        return to_login();
    };
    let msg = match admin(&c, &s, op, json!({ "topic": topic })).await {
        Ok(v) => {
            tracing::info!(principal = %s.principal().name, %topic, op, n = %v[what], "console action");
            format!("{} {what}", text(&v[what]))
        }
        Err(e) => e,
    };
    Redirect::to(&format!("/dlq/{}?msg={}", seg(&topic), seg(&msg))).into_response()
}

async fn plugins(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(f): Query<Flash>,
) -> Response {
    let Some(s) = session(&c, &headers) else {
        return to_login();
    };
    let who = s.principal().name.clone();
    let list = match admin(&c, &s, "list", json!({})).await {
        Ok(v) => v,
        Err(e) => return page("Plugins", Some(&who), Some(&e), "").into_response(),
    };
    let mut body = String::new();
    for p in list.as_array().into_iter().flatten() {
        let name = text(&p["name"]);
        let Ok(show) = admin(&c, &s, "show", json!({ "name": name })).await else {
            continue;
        };
        let live = show["live_version"].as_u64();
        let _ = write!(
            body,
            "<h2 id=\"plugin-{n}\">{n}</h2><p>{} on <b>{}</b>, live: <span id=\"live-{n}\">{}</span>, \
             versions {}</p>",
            esc(&text(&show["hook"])),
            esc(&text(&show["topic"])),
            live.map_or("none".into(), |v| format!("v{v}")),
            esc(&text(&show["versions"])),
            n = esc(&name)
        );
        let others: Vec<u64> = show["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .filter(|v| Some(*v) != live)
            .collect();
        if !others.is_empty() {
            let options: String = others
                .iter()
                .rev()
                .map(|v| format!("<option value=\"{v}\">v{v}</option>"))
                .collect();
            let _ = write!(
                body,
                "<form method=\"post\" action=\"/plugins/{}/rollback\"><select name=\"version\" \
                 id=\"rollback-version-{n}\">{options}</select> <button id=\"rollback-{n}\">Roll back</button></form>",
                seg(&name),
                n = esc(&name)
            );
        }
        let rows: Vec<Vec<String>> = show["history"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| {
                vec![
                    esc(&text(&h["event"])),
                    text(&h["version"]),
                    h["at_ms"].as_u64().map_or("-".into(), |ms| {
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_millis(ms),
                        )
                        .to_string()
                    }),
                    esc(&text(&h["by"])),
                    esc(&text(&h["cutover"])),
                ]
            })
            .collect();
        body.push_str(&table(
            &["Event", "Version", "At (UTC)", "By", "Cut-over offsets"],
            &rows,
        ));
    }
    if body.is_empty() {
        body.push_str("<p>No plugin is deployed.</p>");
    }
    page("Plugins", Some(&who), f.msg.as_deref(), &body).into_response()
}

#[derive(Deserialize)]
struct RollbackForm {
    version: u32,
}

async fn rollback(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(f): Form<RollbackForm>,
) -> Response {
    let Some(s) = session(&c, &headers) else {
        return to_login();
    };
    let msg = match admin(&c, &s, "rollback", json!({ "name": name, "to": f.version })).await {
        Ok(v) => format!("{name} is now v{}", text(&v["version"])),
        Err(e) => e,
    };
    Redirect::to(&format!("/plugins?msg={}", seg(&msg))).into_response()
}
