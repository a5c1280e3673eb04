//! `switchyard top`: the `status` snapshot, live, in the terminal. Polls
//! the router over QUIC (the `status` admin request) every `--interval`,
//! computes rates between snapshots, and draws topics, consumer groups,
//! queues and plugins. Keys: `s` next sort column, `r` reverse, `q` quit.

use std::sync::mpsc;
use std::time::Duration;

use crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Row, Table};
use serde_json::Value;

use super::ConnectArgs;
use super::status::{sections, summary, with_rates};

/// Arguments of `switchyard top`.
#[derive(Debug, clap::Args)]
pub(super) struct TopArgs {
    /// Time between snapshots.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Topic column to sort by first: name, publish, deliver, messages.
    #[arg(long, default_value = "publish")]
    sort: Sort,
    #[command(flatten)]
    conn: ConnectArgs,
}

/// How the topic table is sorted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Sort {
    Name,
    Publish,
    Deliver,
    Messages,
}

impl Sort {
    fn next(self) -> Sort {
        match self {
            Sort::Name => Sort::Publish,
            Sort::Publish => Sort::Deliver,
            Sort::Deliver => Sort::Messages,
            Sort::Messages => Sort::Name,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Sort::Name => "name",
            Sort::Publish => "publish rate",
            Sort::Deliver => "deliver rate",
            Sort::Messages => "messages",
        }
    }
}

/// What the poller hands the screen.
enum Update {
    Snapshot(Value),
    Error(String),
}

pub(super) async fn run(args: TopArgs) -> anyhow::Result<()> {
    let client = args.conn.connect().await?;
    let (tx, rx) = mpsc::channel();
    let interval = args.interval.max(Duration::from_millis(100));
    let poller = tokio::spawn(async move {
        let mut prev: Option<Value> = None;
        loop {
            let update = match client.status().await {
                Ok(now) => {
                    let shown = match &prev {
                        Some(p) => with_rates(p, now.clone()),
                        None => now.clone(),
                    };
                    prev = Some(now);
                    Update::Snapshot(shown)
                }
                Err(e) => Update::Error(e.to_string()),
            };
            if tx.send(update).is_err() {
                break;
            }
            tokio::time::sleep(interval).await;
        }
        client.close().await;
    });
    let sort = args.sort;
    let result = tokio::task::spawn_blocking(move || screen(rx, sort)).await?;
    poller.abort();
    result
}

/// The terminal loop: draws the latest snapshot, handles keys.
fn screen(rx: mpsc::Receiver<Update>, mut sort: Sort) -> anyhow::Result<()> {
    let mut terminal = ratatui::init();
    let mut shown: Option<Value> = None;
    let mut error: Option<String> = None;
    let mut reverse = false;
    let outcome = loop {
        while let Ok(u) = rx.try_recv() {
            match u {
                Update::Snapshot(v) => {
                    shown = Some(v);
                    error = None;
                }
                Update::Error(e) => error = Some(e),
            }
        }
        if let Err(e) = terminal.draw(|f| draw(f, shown.as_ref(), error.as_deref(), sort, reverse))
        {
            break Err(e.into());
        }
        match event::poll(Duration::from_millis(100)) {
            Ok(true) => match event::read() {
                Ok(Event::Key(k)) if k.kind == KeyEventKind::Press => match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => break Ok(()),
                    KeyCode::Char('s') => sort = sort.next(),
                    KeyCode::Char('r') => reverse = !reverse,
                    _ => {}
                },
                Ok(_) => {}
                Err(e) => break Err(e.into()),
            },
            Ok(false) => {}
            Err(e) => break Err(e.into()),
        }
    };
    ratatui::restore();
    outcome
}

fn name(v: &Value) -> String {
    v["name"].as_str().unwrap_or_default().to_string()
}

fn table<'a>(title: &'a str, header: &'a [&'a str], rows: Vec<Vec<String>>) -> Table<'a> {
    let widths: Vec<Constraint> = header
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let w = rows
                .iter()
                .map(|r| r[i].chars().count())
                .chain([h.len()])
                .max()
                .unwrap_or(4);
            Constraint::Length(w as u16 + 1)
        })
        .collect();
    Table::new(rows.into_iter().map(Row::new), widths)
        .header(Row::new(header.to_vec()).style(Style::new().add_modifier(Modifier::BOLD)))
        .block(Block::bordered().title(title))
}

fn draw(f: &mut Frame, s: Option<&Value>, error: Option<&str>, sort: Sort, reverse: bool) {
    let Some(s) = s else {
        let msg = error.unwrap_or("waiting for the router's status...");
        f.render_widget(Line::from(msg.to_string()), f.area());
        return;
    };
    // The topics sorted as asked, then the same tables `status` prints.
    let mut s = s.clone();
    let key = |t: &Value| match sort {
        Sort::Name => 0.0,
        Sort::Publish => t["publish_per_s"].as_f64().unwrap_or(0.0),
        Sort::Deliver => t["deliver_per_s"].as_f64().unwrap_or(0.0),
        Sort::Messages => t["messages"].as_f64().unwrap_or(0.0),
    };
    if let Some(topics) = s["topics"].as_array_mut() {
        topics.sort_by(|a, b| {
            let o = key(b)
                .total_cmp(&key(a))
                .then_with(|| name(a).cmp(&name(b)));
            if reverse { o.reverse() } else { o }
        });
    }
    let header = format!(
        "{} · sort: {}{} (s, r; q quits){}",
        summary(&s),
        sort.label(),
        if reverse { ", reversed" } else { "" },
        error.map(|e| format!(" · {e}")).unwrap_or_default(),
    );
    let sections = sections(&s);
    let mut heights = vec![Constraint::Length(1)];
    heights.extend(
        sections
            .iter()
            .map(|sec| Constraint::Length(sec.rows.len() as u16 + 3)),
    );
    heights.push(Constraint::Min(0));
    let areas = Layout::vertical(heights).split(f.area());
    f.render_widget(Line::from(header), areas[0]);
    for (i, sec) in sections.into_iter().enumerate() {
        f.render_widget(table(sec.title, sec.header, sec.rows), areas[i + 1]);
    }
}
