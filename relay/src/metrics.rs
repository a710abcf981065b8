//! Prometheus counters and the latency histogram, rendered as text on `/metrics`,
//! and the label values made safe from agent-chosen text. Hand-written: a few
//! counters and one histogram do not need a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::sync::Locked;
use crate::vendors::enrich::Counts;
use netpilot_proto::ErrorCode;

/// Upper bounds of the forwarded-call latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
pub struct Metrics {
    /// Forwarded calls by route pattern and status.
    forwarded: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Error answers by code, whatever the endpoint. Keyed by the wire string so the
    /// scrape lists codes alphabetically, not in the enum's order.
    errors: Mutex<BTreeMap<&'static str, u64>>,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    pub link_connects: AtomicU64,
    pub link_rejects: AtomicU64,
    /// Links that replaced a live link of the same router (two agents, one identity?).
    pub link_replacements: AtomicU64,
    /// Links closed because a PING went unanswered (a silent WAN; issue 16 item 8).
    pub link_silent: AtomicU64,
    pub enrollments: AtomicU64,
    /// Speed-test bytes served to agents and received from them.
    pub speedtest_download_bytes: AtomicU64,
    pub speedtest_upload_bytes: AtomicU64,
    /// Agent reports by (kind, state), label values already sanitised.
    reports: Mutex<BTreeMap<(String, String), u64>>,
    /// Connections dropped right after accept, and connections the relay closed
    /// for saying nothing (hardening: connections, issue 15).
    pub connections: ConnectionCounters,
    /// MAC vendor enrichment (issue 17): answers given vendors, and the devices
    /// looked up by result (hit, miss, private).
    vendor_answers: AtomicU64,
    vendor_lookups: [AtomicU64; 3],
}

/// Why the relay refused or cut client connections.
#[derive(Default)]
pub struct ConnectionCounters {
    /// Refused at accept: the global `limits.max_connections` was reached.
    pub refused_max_connections: AtomicU64,
    /// Refused at accept: the address already holds
    /// `limits.max_unauthenticated_per_address` unauthenticated connections.
    pub refused_per_address: AtomicU64,
    /// Refused at accept: connections and links hold the whole open-file budget.
    pub refused_fd_budget: AtomicU64,
    /// `accept` itself failed (`EMFILE`, `ENFILE`, …): the open-file limit was met
    /// by something the budget does not count.
    pub accept_errors: AtomicU64,
    /// Closed: no request within `timeouts.handshake` of accept (TLS included).
    pub closed_first_request: AtomicU64,
    /// Closed: an HTTP/2 connection with no call in flight for `timeouts.h2_idle`.
    pub closed_h2_idle: AtomicU64,
}

/// Distinct (kind, state) series kept for agent reports; later new pairs are counted
/// as (`other`, `other`) so the scrape stays small whatever agents send.
const MAX_REPORT_SERIES: usize = 64;

/// Values read at scrape time from the live state.
#[derive(Default)]
pub struct Gauges {
    pub connected_agents: usize,
    pub sessions: usize,
    pub speedtests: usize,
    /// Bytes of router answers the relay holds right now (the answer budget's use).
    pub answer_bytes_in_flight: usize,
    /// Client sockets (connections and links) held, and the budget the open-file
    /// limit leaves for them.
    pub fds_in_use: usize,
    pub fd_budget: usize,
    /// Link upgrades refused so far, by reason (`capacity`).
    pub links_refused: [(&'static str, u64); 3],
    /// MAC vendor registry blocks in use: embedded, and from the operator's files
    /// (both 0 when vendor lookup is off).
    pub vendor_entries: (usize, usize),
}

impl Metrics {
    pub fn record_forward(&self, route: &'static str, status: u16, elapsed: Duration) {
        *self.forwarded.locked().entry((route, status)).or_default() += 1;
        let secs = elapsed.as_secs_f64();
        for (i, upper) in BUCKETS.iter().enumerate() {
            if secs <= *upper {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// One answer's vendor look-ups; an answer with any counts as enriched.
    pub fn record_vendors(&self, counts: &Counts) {
        if counts.total() == 0 {
            return;
        }
        self.vendor_answers.fetch_add(1, Ordering::Relaxed);
        for (slot, n) in self
            .vendor_lookups
            .iter()
            .zip([counts.hit, counts.miss, counts.private])
        {
            slot.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn record_error(&self, code: ErrorCode) {
        *self.errors.locked().entry(code.as_str()).or_default() += 1;
    }

    pub fn record_report(&self, kind: &str, state: &str) {
        let key = (label(kind).to_owned(), label(state).to_owned());
        let mut map = self.reports.locked();
        let key = if map.contains_key(&key) || map.len() < MAX_REPORT_SERIES {
            key
        } else {
            ("other".to_owned(), "other".to_owned())
        };
        *map.entry(key).or_default() += 1;
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP netpilot_connected_agents Agents with a live link."
        );
        let _ = writeln!(out, "# TYPE netpilot_connected_agents gauge");
        let _ = writeln!(out, "netpilot_connected_agents {}", g.connected_agents);
        let _ = writeln!(
            out,
            "# HELP netpilot_active_sessions Web-app sessions alive (in memory; a cluster node counts the cluster's, in Redis)."
        );
        let _ = writeln!(out, "# TYPE netpilot_active_sessions gauge");
        let _ = writeln!(out, "netpilot_active_sessions {}", g.sessions);
        let _ = writeln!(
            out,
            "# HELP netpilot_speedtest_active Speed-test transfers in progress."
        );
        let _ = writeln!(out, "# TYPE netpilot_speedtest_active gauge");
        let _ = writeln!(out, "netpilot_speedtest_active {}", g.speedtests);
        let _ = writeln!(
            out,
            "# HELP netpilot_speedtest_bytes_total Speed-test bytes moved, by direction as the router sees it."
        );
        let _ = writeln!(out, "# TYPE netpilot_speedtest_bytes_total counter");
        let _ = writeln!(
            out,
            "netpilot_speedtest_bytes_total{{direction=\"download\"}} {}",
            self.speedtest_download_bytes.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "netpilot_speedtest_bytes_total{{direction=\"upload\"}} {}",
            self.speedtest_upload_bytes.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "netpilot_link_connects_total",
            "Agent links accepted.",
            &self.link_connects,
        );
        counter(
            &mut out,
            "netpilot_link_rejects_total",
            "Agent link attempts refused.",
            &self.link_rejects,
        );
        counter(
            &mut out,
            "netpilot_link_replacements_total",
            "Agent links that replaced a live link of the same router.",
            &self.link_replacements,
        );
        counter(
            &mut out,
            "netpilot_link_silent_total",
            "Agent links closed because a PING went unanswered.",
            &self.link_silent,
        );
        let _ = writeln!(
            out,
            "# HELP netpilot_answer_bytes_in_flight Bytes of router answers the relay holds."
        );
        let _ = writeln!(out, "# TYPE netpilot_answer_bytes_in_flight gauge");
        let _ = writeln!(
            out,
            "netpilot_answer_bytes_in_flight {}",
            g.answer_bytes_in_flight
        );
        counter(
            &mut out,
            "netpilot_enrollments_total",
            "Routers enrolled.",
            &self.enrollments,
        );

        let c = &self.connections;
        let _ = writeln!(
            out,
            "# HELP netpilot_connections_refused_total Connections dropped right after accept, by reason."
        );
        let _ = writeln!(out, "# TYPE netpilot_connections_refused_total counter");
        for (reason, v) in [
            ("max_connections", &c.refused_max_connections),
            ("per_address", &c.refused_per_address),
            ("fd_budget", &c.refused_fd_budget),
        ] {
            let _ = writeln!(
                out,
                "netpilot_connections_refused_total{{reason=\"{reason}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP netpilot_connections_closed_total Client connections the relay closed for silence, by reason."
        );
        let _ = writeln!(out, "# TYPE netpilot_connections_closed_total counter");
        for (reason, v) in [
            ("first_request_deadline", &c.closed_first_request),
            ("h2_idle", &c.closed_h2_idle),
        ] {
            let _ = writeln!(
                out,
                "netpilot_connections_closed_total{{reason=\"{reason}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }

        let _ = writeln!(
            out,
            "# HELP netpilot_accept_errors_total Failed accepts (EMFILE, ENFILE, ...)."
        );
        let _ = writeln!(out, "# TYPE netpilot_accept_errors_total counter");
        let _ = writeln!(
            out,
            "netpilot_accept_errors_total {}",
            c.accept_errors.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP netpilot_client_sockets Client connections and agent links held."
        );
        let _ = writeln!(out, "# TYPE netpilot_client_sockets gauge");
        let _ = writeln!(out, "netpilot_client_sockets {}", g.fds_in_use);
        let _ = writeln!(
            out,
            "# HELP netpilot_client_sockets_budget Client sockets the open-file limit allows."
        );
        let _ = writeln!(out, "# TYPE netpilot_client_sockets_budget gauge");
        let _ = writeln!(out, "netpilot_client_sockets_budget {}", g.fd_budget);
        let _ = writeln!(
            out,
            "# HELP netpilot_links_refused_total Agent link upgrades refused (503 LINKS_BUSY), by reason."
        );
        let _ = writeln!(out, "# TYPE netpilot_links_refused_total counter");
        for (reason, n) in g.links_refused {
            let _ = writeln!(
                out,
                "netpilot_links_refused_total{{reason=\"{reason}\"}} {n}"
            );
        }

        let _ = writeln!(out, "# HELP netpilot_forwarded_requests_total Calls forwarded to routers, by route and status.");
        let _ = writeln!(out, "# TYPE netpilot_forwarded_requests_total counter");
        for ((route, status), n) in self.forwarded.locked().iter() {
            let _ = writeln!(
                out,
                "netpilot_forwarded_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP netpilot_agent_reports_total Reports received from agents, by kind and state."
        );
        let _ = writeln!(out, "# TYPE netpilot_agent_reports_total counter");
        for ((kind, state), n) in self.reports.locked().iter() {
            let _ = writeln!(
                out,
                "netpilot_agent_reports_total{{kind=\"{kind}\",state=\"{state}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP netpilot_vendor_registry_entries MAC vendor registry blocks in use, by source (0 when vendor lookup is off)."
        );
        let _ = writeln!(out, "# TYPE netpilot_vendor_registry_entries gauge");
        for (source, n) in [
            ("embedded", g.vendor_entries.0),
            ("file", g.vendor_entries.1),
        ] {
            let _ = writeln!(
                out,
                "netpilot_vendor_registry_entries{{source=\"{source}\"}} {n}"
            );
        }
        counter(
            &mut out,
            "netpilot_vendor_enriched_answers_total",
            "Device answers (JSON, CSV exports) the relay added vendors to.",
            &self.vendor_answers,
        );
        let _ = writeln!(
            out,
            "# HELP netpilot_vendor_lookups_total Devices whose vendor was looked up, by result (private: a locally administered MAC; miss: no block, or no MAC)."
        );
        let _ = writeln!(out, "# TYPE netpilot_vendor_lookups_total counter");
        for (result, v) in ["hit", "miss", "private"].iter().zip(&self.vendor_lookups) {
            let _ = writeln!(
                out,
                "netpilot_vendor_lookups_total{{result=\"{result}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP netpilot_errors_total Error answers by code.");
        let _ = writeln!(out, "# TYPE netpilot_errors_total counter");
        for (code, n) in self.errors.locked().iter() {
            let _ = writeln!(out, "netpilot_errors_total{{code=\"{code}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP netpilot_forward_duration_seconds Time to answer a forwarded call."
        );
        let _ = writeln!(out, "# TYPE netpilot_forward_duration_seconds histogram");
        for (i, upper) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "netpilot_forward_duration_seconds_bucket{{le=\"{upper}\"}} {}",
                self.latency_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "netpilot_forward_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "netpilot_forward_duration_seconds_sum {}",
            self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "netpilot_forward_duration_seconds_count {count}");
        out
    }
}

/// A metric label value from agent-chosen text: lower-case letters, digits and `_`,
/// at most 32 of them; anything else counts as `other`, so an agent cannot inject
/// label syntax or blow up the number of series with long or odd values.
fn label(value: &str) -> &str {
    let ok = !value.is_empty()
        && value.len() <= 32
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        value
    } else {
        "other"
    }
}

fn counter(out: &mut String, name: &str, help: &str, v: &AtomicU64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_a_safe_charset_or_other() {
        assert_eq!(label("wifi_change"), "wifi_change");
        assert_eq!(label("rolled_back"), "rolled_back");
        assert_eq!(label("Wifi"), "other");
        assert_eq!(label("a\"} 1\nx{"), "other");
        assert_eq!(label(&"a".repeat(33)), "other");
        assert_eq!(label(""), "other");
    }

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.record_forward("/api/scan", 200, Duration::from_micros(300));
        m.record_forward("/api/scan", 200, Duration::from_millis(3));
        m.record_forward("/api/scan", 503, Duration::from_secs(10));
        let text = m.render(&Gauges {
            connected_agents: 2,
            sessions: 1,
            speedtests: 0,
            ..Default::default()
        });
        assert!(text.contains("netpilot_connected_agents 2\n"));
        assert!(text
            .contains("netpilot_forwarded_requests_total{route=\"/api/scan\",status=\"200\"} 2\n"));
        assert!(text.contains("netpilot_forward_duration_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("netpilot_forward_duration_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("netpilot_forward_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("netpilot_forward_duration_seconds_count 3\n"));
    }

    #[test]
    fn vendor_counters_add_up() {
        let m = Metrics::default();
        m.record_vendors(&Counts {
            hit: 3,
            miss: 1,
            private: 2,
        });
        m.record_vendors(&Counts::default());
        m.record_vendors(&Counts {
            hit: 1,
            miss: 0,
            private: 0,
        });
        let text = m.render(&Gauges {
            vendor_entries: (59_000, 9),
            ..Default::default()
        });
        for line in [
            "netpilot_vendor_registry_entries{source=\"embedded\"} 59000\n",
            "netpilot_vendor_registry_entries{source=\"file\"} 9\n",
            "netpilot_vendor_enriched_answers_total 2\n",
            "netpilot_vendor_lookups_total{result=\"hit\"} 4\n",
            "netpilot_vendor_lookups_total{result=\"miss\"} 1\n",
            "netpilot_vendor_lookups_total{result=\"private\"} 2\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn report_series_are_bounded() {
        let m = Metrics::default();
        m.record_report("wifi_change", "confirmed");
        m.record_report("wifi_change", "confirmed");
        m.record_report("Bad Kind", "x\"y");
        for i in 0..200 {
            m.record_report(&format!("k{i}"), "s");
        }
        let text = m.render(&Gauges {
            connected_agents: 0,
            sessions: 0,
            speedtests: 0,
            ..Default::default()
        });
        assert!(text.contains(
            "netpilot_agent_reports_total{kind=\"wifi_change\",state=\"confirmed\"} 2\n"
        ));
        let series = text
            .lines()
            .filter(|l| l.starts_with("netpilot_agent_reports_total{"))
            .count();
        assert!(series <= MAX_REPORT_SERIES + 1, "{series}");
        assert!(!text.contains("Bad Kind"));
    }
}
