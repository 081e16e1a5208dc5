//! `observer list`: the live connections of a running agent.

use std::io::Write as _;

use anyhow::Context as _;

use crate::{cli::ListArgs, conntrack::ConnectionView};

pub fn run(args: &ListArgs) -> anyhow::Result<()> {
    let url = format!("{}/connections", args.addr.trim_end_matches('/'));
    let body = ureq::get(&url)
        .call()
        .with_context(|| format!("cannot reach the agent at {url}; is `observer run` running?"))?
        .body_mut()
        .read_to_string()
        .context("reading the agent's answer")?;
    let mut connections: Vec<ConnectionView> =
        serde_json::from_str(&body).context("the agent's answer is not a connection list")?;
    connections.sort_by(ConnectionView::worst_first);

    let text = if args.json {
        let mut json = serde_json::to_string_pretty(&connections)?;
        json.push('\n');
        json
    } else {
        table(&connections)
    };
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        // The reader went away (`observer list | head`): what it wanted, it has.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => Ok(result?),
    }
}

fn age(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 60.0 => format!("{s:.1}s"),
        Some(s) if s < 3600.0 => format!("{:.1}m", s / 60.0),
        Some(s) => format!("{:.1}h", s / 3600.0),
    }
}

/// The connections as an aligned text table.
pub fn table(connections: &[ConnectionView]) -> String {
    let mut rows = vec![
        [
            "STATE",
            "ROLE",
            "LOCAL",
            "REMOTE",
            "PID",
            "COMM",
            "SEND-Q",
            "RECV-Q",
            "LAST-SEND",
            "LAST-RECV",
            "WS",
            "DETAIL",
        ]
        .map(String::from),
    ];
    for c in connections {
        rows.push([
            c.state.to_string(),
            c.role.to_string(),
            c.local_addr.to_string(),
            c.remote_addr.to_string(),
            c.pid.map_or("-".into(), |p| p.to_string()),
            c.comm.clone().unwrap_or_else(|| "-".into()),
            c.send_queue_bytes.to_string(),
            c.recv_queue_bytes.to_string(),
            age(c.last_send_age_seconds),
            age(c.last_recv_age_seconds),
            if c.websocket { "yes" } else { "no" }.into(),
            c.detail.clone(),
        ]);
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> =
            row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
