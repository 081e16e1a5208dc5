use observer_common::Direction;

use super::*;
use crate::conntrack::ConnectionView;

const S: u64 = 1_000_000_000;

fn settings() -> Settings {
    Settings {
        proxy_timeout_seconds: 60.0,
        nat_timeouts_seconds: vec![30.0, 60.0, 90.0, 350.0],
        pong_miss_ratio: 0.01,
        dead_after_seconds: 30.0,
        idle_after_seconds: 60.0,
        stall_after_seconds: 10.0,
        pong_timeout_seconds: 10.0,
        refresh_seconds: 1.0,
        show_paths: false,
    }
}

fn id(cookie: u64, role: &'static str) -> EndId {
    EndId { cookie, port: 8080, role, pid: Some(42), comm: Some("chat".into()) }
}

fn note(cookie: u64, role: &'static str, at_ns: u64, what: NoteKind) -> Note {
    Note { id: id(cookie, role), at_ns, what }
}

fn ping(cookie: u64, role: &'static str, at_ns: u64, direction: Direction) -> Note {
    note(cookie, role, at_ns, NoteKind::Ping { direction })
}

fn view(cookie: u64, role: &str, age: f64, silent: f64) -> ConnectionView {
    ConnectionView {
        cookie,
        role: role.to_owned().into(),
        port: 8080,
        pid: Some(42),
        comm: Some("chat".into()),
        local_addr: format!("127.0.0.1:{}", if role == "server" { 8080 } else { 50000 })
            .parse()
            .unwrap(),
        remote_addr: "127.0.0.1:50000".parse().unwrap(),
        websocket: true,
        age_seconds: age,
        last_send_age_seconds: Some(silent),
        last_recv_age_seconds: Some(silent + 1.0),
        path: Some("/chat".into()),
        ..ConnectionView::default()
    }
}

fn report(audit: &Audit) -> Report {
    audit.report("2026-12-03T15:00:00Z".into(), Duration::from_secs(300), false)
}

fn kinds(report: &Report) -> Vec<&str> {
    report.findings.iter().map(|f| f.kind.as_str()).collect()
}

#[test]
fn pings_every_second_by_the_server_give_an_interval_and_no_finding() {
    let mut audit = Audit::new(settings());
    let handshake = NoteKind::Handshake { seconds: Some(0.004) };
    audit.notes([note(1, "server", S, handshake)]);
    for i in 0..10 {
        let at = (10 + i) * S;
        audit.notes([
            ping(1, "server", at, Direction::Egress),
            note(
                1,
                "server",
                at + 2_000_000,
                NoteKind::Pong { direction: Direction::Ingress, latency_ns: Some(2_000_000) },
            ),
        ]);
    }
    audit.refresh(&[view(1, "server", 20.0, 0.5)], 0);
    let report = report(&audit);
    let service = &report.services[0];
    assert_eq!(service.key.name(), "port 8080 server chat");
    assert_eq!(service.heartbeat.who_pings, "server");
    assert_eq!(service.heartbeat.from_server.pings, 10);
    assert_eq!(service.heartbeat.from_server.interval_median_seconds, Some(1.0));
    assert_eq!(service.heartbeat.from_client.pings, 0);
    assert_eq!(service.pongs.answered, 10);
    assert_eq!(service.pongs.latency_p50_seconds, Some(0.002));
    assert_eq!(service.handshakes.count, 1);
    assert_eq!(service.handshakes.p99_seconds, Some(0.004));
    assert_eq!(service.longest_silence_seconds, 0.5);
    assert!(report.findings.is_empty(), "{:?}", report.findings);
}

#[test]
fn the_client_end_names_the_same_pings_as_the_server_s() {
    let mut audit = Audit::new(settings());
    audit.notes([
        ping(2, "client", S, Direction::Ingress),
        ping(2, "client", 3 * S, Direction::Ingress),
    ]);
    audit.notes([ping(3, "client", S, Direction::Egress)]);
    let report = report(&audit);
    let service = &report.services[0];
    assert_eq!(service.key.role, "client");
    assert_eq!(service.heartbeat.who_pings, "both");
    assert_eq!(service.heartbeat.from_server.interval_median_seconds, Some(2.0));
    assert_eq!(service.heartbeat.from_client.interval_median_seconds, None);
}

#[test]
fn silence_without_any_ping_is_a_critical_no_heartbeat() {
    let mut audit = Audit::new(settings());
    audit.refresh(&[view(1, "server", 900.0, 100.0), view(2, "server", 900.0, 10.0)], 0);
    audit.refresh(&[view(1, "server", 901.0, 840.0), view(2, "server", 901.0, 11.0)], 0);
    let report = report(&audit);
    assert_eq!(kinds(&report), ["no_heartbeat"]);
    let finding = &report.findings[0];
    assert_eq!(finding.severity, "critical");
    assert!(finding.evidence.contains("silent for up to 14.0 min"), "{}", finding.evidence);
    assert!(finding.evidence.contains("1 of 2 connections"), "{}", finding.evidence);
    assert!(finding.recommendation.contains("add a ping every 15 s"), "{}", finding.recommendation);
    assert!(
        finding.recommendation.contains("the 350 s NAT idle timeout"),
        "{}",
        finding.recommendation
    );
    let service = &report.services[0];
    let past: Vec<(f64, u64)> =
        service.idle_past.iter().map(|p| (p.timeout_seconds, p.connections)).collect();
    assert_eq!(past, [(30.0, 1), (60.0, 1), (90.0, 1), (350.0, 1)]);
    assert_eq!(service.heartbeat.who_pings, "nobody");
}

#[test]
fn busy_connections_without_pings_are_only_a_warning() {
    let mut audit = Audit::new(settings());
    audit.refresh(&[view(1, "server", 120.0, 0.2)], 0);
    let report = report(&audit);
    assert_eq!(kinds(&report), ["no_heartbeat"]);
    assert_eq!(report.findings[0].severity, "warning");
}

#[test]
fn a_heartbeat_slower_than_a_timeout_is_named_with_the_timeouts_it_exceeds() {
    let mut audit = Audit::new(Settings { nat_timeouts_seconds: vec![90.0, 350.0], ..settings() });
    for i in 0..4 {
        let at = (1 + 120 * i) * S;
        let pong = NoteKind::Pong { direction: Direction::Ingress, latency_ns: Some(1000) };
        audit.notes([ping(1, "server", at, Direction::Egress), note(1, "server", at + 1000, pong)]);
    }
    audit.refresh(&[view(1, "server", 400.0, 100.0)], 0);
    let report = report(&audit);
    assert_eq!(kinds(&report), ["slow_heartbeat"]);
    let finding = &report.findings[0];
    assert_eq!(
        finding.summary,
        "pings every 120 s: longer than the 60 s proxy read timeout or the 90 s NAT idle timeout"
    );
    assert_eq!(finding.recommendation, "ping every 30 s or less");
}

#[test]
fn missed_pongs_above_the_ratio_are_a_finding() {
    for (missed, expected) in [(0, 0), (1, 1)] {
        let mut audit = Audit::new(Settings { pong_miss_ratio: 0.05, ..settings() });
        for i in 0..10 {
            audit.notes([ping(1, "client", i * S, Direction::Egress)]);
        }
        for i in 0..10 - missed {
            let what = NoteKind::Pong { direction: Direction::Ingress, latency_ns: Some(1000) };
            audit.notes([note(1, "client", i * S + 1000, what)]);
        }
        // The last ping is not due an answer yet: 10 s of pong timeout from 9 s.
        audit.refresh(&[], 18 * S);
        assert_eq!(report(&audit).services[0].pongs.missed, 0, "not due yet");
        audit.refresh(&[], 100 * S);
        let report = report(&audit);
        assert_eq!(report.services[0].pongs.missed, missed);
        let found = kinds(&report).iter().filter(|k| **k == "pongs_missing").count();
        assert_eq!(found, expected, "{missed} missed");
        if expected > 0 {
            assert_eq!(report.findings[0].summary, "pongs missing on 10 % of pings");
            assert_eq!(report.services[0].pongs.miss_ratio, 0.1);
        }
    }
}

#[test]
fn dead_verdicts_count_once_held_for_dead_after() {
    let mut audit = Audit::new(settings());
    let mut frozen = view(1, "server", 400.0, 0.1);
    frozen.state = Verdict::NotReading;
    frozen.detail = "357 KiB unread for 6 s".into();
    frozen.state_age_seconds = 29.0;
    audit.refresh(&[frozen.clone()], 0);
    assert!(report(&audit).services[0].dead.is_empty(), "not yet");
    frozen.state_age_seconds = 310.0;
    audit.refresh(&[frozen.clone()], 0);
    frozen.state = Verdict::Active;
    frozen.state_age_seconds = 1.0;
    audit.refresh(&[frozen], 0);
    let report = report(&audit);
    let dead = &report.services[0].dead;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].verdict, dead[0].for_seconds, dead[0].pid),
        (Verdict::NotReading, 310.0, Some(42))
    );
    let finding = report.findings.iter().find(|f| f.kind == "dead_connections").unwrap();
    assert_eq!(finding.summary, "1 connection not read for over 30 s (chat pid 42)");
    assert!(finding.evidence.starts_with("up to 310 s; 357 KiB"), "{}", finding.evidence);
}

#[test]
fn endings_give_close_codes_reasons_and_a_last_silence() {
    let mut audit = Audit::new(settings());
    audit.refresh(&[view(1, "server", 10.0, 1.0), view(2, "server", 10.0, 1.0)], 0);
    let ended = |close_code, outcome, reason| NoteKind::Ended {
        outcome,
        reason,
        close_code,
        last_activity_ns: 100 * S,
    };
    audit.notes([
        note(1, "server", 145 * S, ended(Some(1000), Outcome::Close, "clean")),
        note(2, "server", 101 * S, ended(None, Outcome::Abort, "reset_received")),
    ]);
    let report = report(&audit);
    let service = &report.services[0];
    assert_eq!(service.connections, 2);
    assert_eq!(service.open_at_end, 0);
    assert_eq!(service.closes.codes, BTreeMap::from([(1000, 1)]));
    assert_eq!(service.closes.abnormal, 1);
    assert_eq!(service.closes.reasons["reset_received"], 1);
    assert_eq!(service.longest_silence_seconds, 45.0);
    assert_eq!(service.idle_past[0].connections, 1);
}

#[test]
fn rejected_upgrades_count_without_making_a_connection() {
    let mut audit = Audit::new(settings());
    audit.notes([note(9, "server", S, NoteKind::Reject)]);
    let report = report(&audit);
    assert_eq!(report.services[0].handshakes.rejects, 1);
    assert_eq!(report.services[0].connections, 0);
    assert!(report.findings.is_empty());
}

#[test]
fn paths_are_shown_only_when_asked_for() {
    for show_paths in [false, true] {
        let mut audit = Audit::new(Settings { show_paths, ..settings() });
        audit.refresh(&[view(1, "server", 1.0, 0.1)], 0);
        let report = report(&audit);
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(json.contains("/chat"), show_paths, "{json}");
        assert_eq!(text(&report).contains("/chat"), show_paths);
        assert_eq!(markdown(&report).contains("/chat"), show_paths);
    }
}

#[test]
fn percentiles_are_nearest_rank() {
    let mut values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
    assert_eq!(percentile(&mut values, 0.5), Some(50.0));
    assert_eq!(percentile(&mut values, 0.99), Some(99.0));
    assert_eq!(percentile(&mut values, 0.1), Some(10.0));
    assert_eq!(percentile(&mut [], 0.5), None);
    assert_eq!(percentile(&mut [7.0], 0.99), Some(7.0));
}

/// A fixed report with every part filled in, for the golden files.
fn fixed_report() -> Report {
    let mut audit = Audit::new(Settings { show_paths: true, ..settings() });
    // A chat server nobody pings, silent for long.
    audit.notes([note(1, "server", S, NoteKind::Handshake { seconds: Some(0.003) })]);
    audit.refresh(&[view(1, "server", 900.0, 840.0)], 0);
    // A feed whose server pings every 120 s and whose clients miss one pong in ten.
    let feed = |cookie| EndId {
        cookie,
        port: 9000,
        role: "server",
        pid: Some(7),
        comm: Some("feed".into()),
    };
    for i in 0..10u64 {
        let at = (1 + 120 * i) * S;
        audit.notes([Note {
            id: feed(2),
            at_ns: at,
            what: NoteKind::Ping { direction: Direction::Egress },
        }]);
        if i != 3 {
            let latency_ns = Some((i + 1) * 1_000_000);
            let what = NoteKind::Pong { direction: Direction::Ingress, latency_ns };
            audit.notes([Note { id: feed(2), at_ns: at + 1_000_000, what }]);
        }
    }
    let mut frozen = view(3, "server", 1300.0, 0.5);
    frozen.port = 9000;
    frozen.pid = Some(7);
    frozen.comm = Some("feed".into());
    frozen.local_addr = "10.0.0.5:9000".parse().unwrap();
    frozen.remote_addr = "10.0.0.9:41000".parse().unwrap();
    frozen.path = Some("/feed".into());
    frozen.state = Verdict::NotReading;
    frozen.state_age_seconds = 400.0;
    frozen.detail =
        "357 KiB unread for 6.7 min and nothing written for 6.7 min: the process looks frozen"
            .into();
    audit.refresh(&[frozen], 0);
    audit.notes([Note {
        id: feed(2),
        at_ns: 1300 * S,
        what: NoteKind::Ended {
            outcome: Outcome::Close,
            reason: "clean",
            close_code: Some(1001),
            last_activity_ns: 1250 * S,
        },
    }]);
    audit.notes([Note { id: feed(4), at_ns: 5 * S, what: NoteKind::Reject }]);
    audit.report("2026-12-03T15:00:00Z".into(), Duration::from_secs(300), true)
}

/// Compares with a checked-in file; `OBSERVER_UPDATE_GOLDEN=1` rewrites it.
fn golden(name: &str, got: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/audit/golden").join(name);
    if std::env::var_os("OBSERVER_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (OBSERVER_UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(got, want, "{} differs; OBSERVER_UPDATE_GOLDEN=1 rewrites it", path.display());
}

#[test]
fn text_report_matches_its_golden_file() {
    golden("report.txt", &text(&fixed_report()));
}

#[test]
fn markdown_report_matches_its_golden_file() {
    golden("report.md", &markdown(&fixed_report()));
}

#[test]
fn json_report_round_trips() {
    let report = fixed_report();
    let json = serde_json::to_string_pretty(&report).unwrap();
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back, report);
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["services"][0]["port"], 8080);
    assert_eq!(value["findings"][0]["kind"], "no_heartbeat");
    assert_eq!(value["findings"][1]["kind"], "dead_connections");
}

#[test]
fn pings_gathered_in_one_retransmitted_segment_are_not_an_interval() {
    let mut audit = Audit::new(settings());
    // Pings a second apart, then three that a retransmission carried together.
    audit.notes([
        ping(1, "server", 10 * S, Direction::Egress),
        ping(1, "server", 11 * S, Direction::Egress),
        ping(1, "server", 20 * S, Direction::Egress),
        ping(1, "server", 20 * S, Direction::Egress),
        ping(1, "server", 20 * S + 1000, Direction::Egress),
    ]);
    audit.refresh(&[view(1, "server", 30.0, 10.0)], 0);
    let report = report(&audit);
    let from_server = &report.services[0].heartbeat.from_server;
    assert_eq!(from_server.pings, 5);
    // Intervals of 1 s and 9 s; none of the zero ones.
    assert_eq!(from_server.interval_p10_seconds, Some(1.0));
    assert!(from_server.interval_median_seconds.unwrap() >= 1.0);
}
