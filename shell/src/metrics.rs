//! Prometheus metrics and a health check, on an HTTP port of their own (`metrics_addr`).
//!
//! Two sources: the core's own counters ([`NodeStats`], a snapshot the event loop publishes
//! every [`STATS_INTERVAL`]) and what only the shell sees (fsyncs and their latency, bytes and
//! entries per sync and per AppendEntries, connections, request latency by kind, refusals made
//! before a request reaches the core, snapshot encoding). `prometheus-client` encodes both, the
//! first through a [`Collector`] over the latest snapshot, so a scrape never waits for the loop.
//!
//! The HTTP side is a small handler: an accepting thread, and a short-lived thread per
//! connection, at most [`HTTP_CONNECTIONS_MAX`] at once (more are closed unanswered), so a
//! stranger who connects and says nothing does not hold up Prometheus' scrapes. Each reads a
//! request head of at most [`HTTP_REQUEST_BYTES_MAX`] within [`HTTP_IO_TIMEOUT`], answers
//! `GET /metrics` and `GET /healthz`, anything else with a 404 or 400, then closes the
//! connection. It never panics on what a client sends.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use holdfast_core::node::NodeStats;
use holdfast_core::raft::Role;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tracing::{info, warn};

/// How often the event loop hands the collector a fresh [`NodeStats`].
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// Stats older than this make `/healthz` fail: the event loop is stuck.
pub const STATS_STALE_AFTER: Duration = Duration::from_secs(5);
/// The most a request head may be; longer ones get a 431 and are closed.
pub const HTTP_REQUEST_BYTES_MAX: usize = 8 << 10;
/// A client must send its request head, and take the answer, within this.
pub const HTTP_IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections answered at once; one accepted beyond this is closed at once, unanswered.
pub const HTTP_CONNECTIONS_MAX: usize = 8;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabel {
    pub port: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: u64,
}

/// What the shell measures; cheap to clone (every metric is an `Arc` inside).
#[derive(Clone)]
pub struct ShellMetrics {
    pub fsyncs: Counter,
    pub sync_seconds: Histogram,
    pub sync_entries: Histogram,
    pub sync_bytes: Histogram,
    pub append_entries: Histogram,
    pub append_bytes: Histogram,
    pub connections_open: Family<PortLabel, Gauge>,
    pub connections_accepted: Family<PortLabel, Counter>,
    /// Connections and requests refused by the shell (before the core sees them).
    pub refused: Family<ReasonLabel, Counter>,
    pub request_seconds: Family<KindLabel, Histogram>,
    pub snapshot_encode_seconds: Histogram,
    pub snapshot_bytes: Histogram,
}

fn seconds_histogram() -> Histogram {
    // 50 µs to about 13 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

impl ShellMetrics {
    fn new(registry: &mut Registry) -> ShellMetrics {
        let m = ShellMetrics {
            fsyncs: Counter::default(),
            sync_seconds: seconds_histogram(),
            sync_entries: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            sync_bytes: Histogram::new(exponential_buckets(256.0, 4.0, 12)),
            append_entries: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            append_bytes: Histogram::new(exponential_buckets(256.0, 4.0, 12)),
            connections_open: Family::default(),
            connections_accepted: Family::default(),
            refused: Family::default(),
            request_seconds: Family::new_with_constructor(seconds_histogram),
            snapshot_encode_seconds: seconds_histogram(),
            snapshot_bytes: Histogram::new(exponential_buckets(1024.0, 4.0, 14)),
        };
        registry.register(
            "holdfast_fsyncs",
            "fdatasyncs made by the storage thread (log, state and snapshot files, directories)",
            m.fsyncs.clone(),
        );
        registry.register_with_unit(
            "holdfast_sync",
            "time to write and sync one group's batch",
            Unit::Seconds,
            m.sync_seconds.clone(),
        );
        registry.register(
            "holdfast_sync_entries",
            "log entries made durable by one group's sync",
            m.sync_entries.clone(),
        );
        registry.register_with_unit(
            "holdfast_sync",
            "command bytes made durable by one group's sync",
            Unit::Bytes,
            m.sync_bytes.clone(),
        );
        registry.register(
            "holdfast_append_entries",
            "entries per AppendEntries message sent",
            m.append_entries.clone(),
        );
        registry.register_with_unit(
            "holdfast_append",
            "command bytes per AppendEntries message sent",
            Unit::Bytes,
            m.append_bytes.clone(),
        );
        registry.register(
            "holdfast_connections_open",
            "connections open, by port (client or peer)",
            m.connections_open.clone(),
        );
        registry.register(
            "holdfast_connections_accepted",
            "connections accepted, by port",
            m.connections_accepted.clone(),
        );
        registry.register(
            "holdfast_shell_refused",
            "connections and requests the server refused before the core saw them, by reason",
            m.refused.clone(),
        );
        registry.register_with_unit(
            "holdfast_request",
            "client request latency from read to answer queued, by kind",
            Unit::Seconds,
            m.request_seconds.clone(),
        );
        registry.register_with_unit(
            "holdfast_snapshot_encode",
            "time to encode a snapshot of a group's state",
            Unit::Seconds,
            m.snapshot_encode_seconds.clone(),
        );
        registry.register_with_unit(
            "holdfast_snapshot",
            "size of each snapshot encoded here",
            Unit::Bytes,
            m.snapshot_bytes.clone(),
        );
        m
    }

    /// One group's batch was written and synced.
    pub fn synced(&self, took: Duration, entries: u64, bytes: u64) {
        self.sync_seconds.observe(took.as_secs_f64());
        self.sync_entries.observe(entries as f64);
        self.sync_bytes.observe(bytes as f64);
    }
}

/// The latest [`NodeStats`] the event loop published, and when.
#[derive(Debug, Default)]
pub struct LatestStats(Mutex<Option<(Instant, NodeStats)>>);

impl LatestStats {
    pub fn publish(&self, stats: NodeStats) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some((Instant::now(), stats));
    }

    /// Whether the node is ready: fresh stats, and every local replica knows its leader.
    pub fn health(&self) -> Result<(), String> {
        let latest = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((at, stats)) = latest.as_ref() else {
            return Err("starting".into());
        };
        if at.elapsed() > STATS_STALE_AFTER {
            return Err(format!(
                "the event loop has not reported for {} s",
                at.elapsed().as_secs()
            ));
        }
        let leaderless: Vec<String> = stats
            .groups
            .iter()
            .filter(|g| g.leader.is_none())
            .map(|g| g.group.to_string())
            .collect();
        if stats.groups.is_empty() || !leaderless.is_empty() {
            return Err(format!(
                "no known leader for groups {}",
                leaderless.join(", ")
            ));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct StatsCollector(Arc<LatestStats>);

type Labels = Vec<(&'static str, String)>;
type GroupField = fn(&holdfast_core::node::GroupStats) -> u64;

fn encode_gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    for (labels, value) in rows {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn encode_counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (labels, value) in rows {
        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn group(g: u64) -> Labels {
    vec![("group", g.to_string())]
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for StatsCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let latest = self.0.0.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((_, s)) = latest.as_ref() else {
            return Ok(());
        };
        let groups = &s.groups;
        let g = |f: &dyn Fn(&holdfast_core::node::GroupStats) -> u64| {
            groups
                .iter()
                .map(|x| (group(x.group), gauge(f(x))))
                .collect::<Vec<_>>()
        };
        let c = |f: &dyn Fn(&holdfast_core::node::GroupStats) -> u64| {
            groups
                .iter()
                .map(|x| (group(x.group), f(x)))
                .collect::<Vec<_>>()
        };
        encode_gauges(
            &mut e,
            "holdfast_raft_leader",
            "1 where this node's replica leads its group",
            g(&|x| u64::from(x.role == Role::Leader)),
        )?;
        encode_gauges(
            &mut e,
            "holdfast_raft_known_leader",
            "the node this replica follows (0: none known)",
            g(&|x| x.leader.unwrap_or(0)),
        )?;
        encode_gauges(&mut e, "holdfast_raft_term", "current term", g(&|x| x.term))?;
        encode_gauges(
            &mut e,
            "holdfast_raft_commit_index",
            "highest index known committed",
            g(&|x| x.commit_index),
        )?;
        encode_gauges(
            &mut e,
            "holdfast_raft_applied_index",
            "highest index applied",
            g(&|x| x.applied_index),
        )?;
        encode_gauges(
            &mut e,
            "holdfast_raft_last_index",
            "last index in the log",
            g(&|x| x.last_index),
        )?;
        encode_gauges(
            &mut e,
            "holdfast_raft_snapshot_index",
            "index of the latest snapshot",
            g(&|x| x.snapshot_index),
        )?;
        encode_gauges(
            &mut e,
            "holdfast_snapshot_last_bytes",
            "size of the newest snapshot taken or installed",
            g(&|x| x.counters.snapshot_bytes_last),
        )?;
        let counters: [(&str, &str, GroupField); 9] = [
            (
                "holdfast_raft_elections_won",
                "elections this replica won",
                |x| x.counters.elections_won,
            ),
            (
                "holdfast_raft_stepped_down",
                "times this replica stopped leading",
                |x| x.counters.stepped_down,
            ),
            (
                "holdfast_raft_leader_changes",
                "new leaders this replica learned of, itself included",
                |x| x.counters.leader_changes,
            ),
            (
                "holdfast_raft_entries_applied",
                "log entries applied",
                |x| x.counters.entries_applied,
            ),
            ("holdfast_raft_commands_applied", "commands applied", |x| {
                x.counters.commands_applied
            }),
            (
                "holdfast_reconsumed",
                "messages moved to a retry queue (ReconsumeLater), applied",
                |x| x.counters.reconsumed,
            ),
            (
                "holdfast_dead_lettered",
                "messages moved to a dead-letter queue, applied",
                |x| x.counters.dead_lettered,
            ),
            (
                "holdfast_snapshots_restored",
                "snapshots from the leader installed",
                |x| x.counters.snapshots_restored,
            ),
            (
                "holdfast_snapshots_compacted",
                "snapshots taken here that replaced a log prefix",
                |x| x.counters.snapshots_compacted,
            ),
        ];
        for (name, help, f) in counters {
            encode_counters(&mut e, name, help, c(&f))?;
        }
        let by_kind = |m: &std::collections::BTreeMap<&'static str, u64>, key: &'static str| {
            m.iter()
                .map(|(k, v)| (vec![(key, k.to_string())], *v))
                .collect::<Vec<_>>()
        };
        encode_counters(
            &mut e,
            "holdfast_requests",
            "client requests the node took, by kind",
            by_kind(&s.requests, "kind"),
        )?;
        encode_counters(
            &mut e,
            "holdfast_responses",
            "answers the node gave, by kind (refused, not_leader, busy and revoked are refusals)",
            by_kind(&s.responses, "kind"),
        )?;
        let topic = |f: fn(&holdfast_core::node::TopicCounters) -> u64| {
            s.topics
                .iter()
                .map(|(t, c)| (vec![("topic", t.clone())], f(c)))
                .collect::<Vec<_>>()
        };
        encode_counters(
            &mut e,
            "holdfast_topic_send_messages",
            "messages of send requests this node proposed as leader",
            topic(|c| c.send_messages),
        )?;
        encode_counters(
            &mut e,
            "holdfast_topic_send_bytes",
            "body bytes of send requests this node proposed as leader",
            topic(|c| c.send_bytes),
        )?;
        encode_counters(
            &mut e,
            "holdfast_topic_pulled_messages",
            "messages this node handed to consumers",
            topic(|c| c.pulled_messages),
        )?;
        encode_counters(
            &mut e,
            "holdfast_topic_pulled_bytes",
            "body bytes this node handed to consumers",
            topic(|c| c.pulled_bytes),
        )?;
        encode_counters(
            &mut e,
            "holdfast_topic_redelivered",
            "messages handed to a consumer group that had been handed to it before",
            topic(|c| c.redelivered),
        )?;
        let queue_labels = |group: u64, q: &holdfast_core::broker::QueueId| -> Labels {
            vec![
                ("group", group.to_string()),
                ("topic", q.topic.to_string()),
                ("queue", q.queue.to_string()),
            ]
        };
        encode_gauges(
            &mut e,
            "holdfast_queue_next_offset",
            "messages ever appended to the queue (the next message's offset)",
            s.queues
                .iter()
                .map(|q| (queue_labels(q.group, &q.queue), gauge(q.next_offset))),
        )?;
        encode_gauges(
            &mut e,
            "holdfast_queue_start_offset",
            "the oldest offset retention kept",
            s.queues
                .iter()
                .map(|q| (queue_labels(q.group, &q.queue), gauge(q.start_offset))),
        )?;
        let lag_labels = |l: &holdfast_core::node::LagStats| {
            let mut labels = queue_labels(l.group, &l.queue);
            labels.push(("consumer_group", l.consumer_group.clone()));
            labels
        };
        encode_gauges(
            &mut e,
            "holdfast_consumer_lag",
            "messages a consumer group has not acknowledged on a queue",
            s.lag.iter().map(|l| (lag_labels(l), gauge(l.lag))),
        )?;
        encode_gauges(
            &mut e,
            "holdfast_consumer_offset",
            "a consumer group's committed offset on a queue",
            s.lag
                .iter()
                .map(|l| (lag_labels(l), gauge(l.consume_offset))),
        )?;
        // Labelled like the lag, so one consumer group's lag, retries and dead letters on a
        // queue line up in a query.
        let consumer = |f: fn(&holdfast_core::node::ConsumerCounters) -> u64| {
            s.consumers
                .iter()
                .map(|c| {
                    let mut labels = queue_labels(c.group, &c.queue);
                    labels.push(("consumer_group", c.consumer_group.clone()));
                    (labels, f(&c.counters))
                })
                .collect::<Vec<_>>()
        };
        encode_counters(
            &mut e,
            "holdfast_consumer_redelivered",
            "messages of a queue handed to a consumer group again (this node as leader)",
            consumer(|c| c.redelivered),
        )?;
        encode_counters(
            &mut e,
            "holdfast_consumer_reconsumed",
            "messages of a queue a consumer group moved to its retry queue (applied)",
            consumer(|c| c.reconsumed),
        )?;
        encode_counters(
            &mut e,
            "holdfast_consumer_dead_lettered",
            "messages of a queue moved to a consumer group's dead-letter queue (applied)",
            consumer(|c| c.dead_lettered),
        )?;
        encode_counters(
            &mut e,
            "holdfast_consumer_counters_uncounted",
            "events left out of the per consumer group series (CONSUMER_COUNTERS_MAX reached)",
            [(Vec::new(), s.consumer_counters_uncounted)],
        )?;
        encode_gauges(
            &mut e,
            "holdfast_parked_pulls",
            "long polls waiting",
            [(Vec::new(), gauge(s.parked_pulls))],
        )?;
        encode_gauges(
            &mut e,
            "holdfast_stats_truncated",
            "1 when per-queue series stopped at STATS_QUEUES_MAX",
            [(Vec::new(), i64::from(s.truncated))],
        )?;
        Ok(())
    }
}

/// The registry, the shell's metrics and the latest core stats of one node.
pub struct Metrics {
    registry: Registry,
    pub shell: ShellMetrics,
    pub stats: Arc<LatestStats>,
}

impl Metrics {
    pub fn new(node: u64) -> Metrics {
        let mut registry = Registry::default();
        let shell = ShellMetrics::new(&mut registry);
        let stats = Arc::new(LatestStats::default());
        registry.register_collector(Box::new(StatsCollector(stats.clone())));
        let info = Gauge::<i64>::default();
        info.set(i64::try_from(node).unwrap_or(0));
        registry.register("holdfast_node_id", "this node's id", info);
        Metrics {
            registry,
            shell,
            stats,
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!("cannot encode the metrics: {e}");
        }
        out
    }
}

/// Serves `/metrics` and `/healthz` on `addr` from a thread of its own until `stop` is set.
/// Binding happens here, so a taken port is an error at start.
pub fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    let listener =
        TcpListener::bind(addr).map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
    info!(%addr, "metrics on http://{addr}/metrics, health on /healthz");
    serve_on(listener, metrics, stop, HTTP_IO_TIMEOUT)
}

/// [`serve`] on a listener already bound, each connection given `io_timeout`.
fn serve_on(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    io_timeout: Duration,
) -> Result<std::thread::JoinHandle<()>, String> {
    // Non-blocking accept, so the thread sees `stop` within a tick.
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("metrics listener: {e}"))?;
    let answering = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("holdfast-metrics".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => answer_aside(stream, &metrics, &answering, io_timeout),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        warn!("metrics accept: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the metrics thread: {e}"))
}

/// Counts a connection being answered for as long as it lives.
struct Answering(Arc<AtomicUsize>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Answers `stream` on a thread of its own, or closes it unanswered when
/// [`HTTP_CONNECTIONS_MAX`] are being answered already.
fn answer_aside(
    stream: TcpStream,
    metrics: &Arc<Metrics>,
    answering: &Arc<AtomicUsize>,
    io_timeout: Duration,
) {
    let refuse = |metrics: &Metrics| {
        let reason = "metrics_connections_max";
        metrics
            .shell
            .refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    };
    if answering.load(Ordering::Relaxed) >= HTTP_CONNECTIONS_MAX {
        refuse(metrics);
        return;
    }
    answering.fetch_add(1, Ordering::Relaxed);
    // Made before the spawn, so a thread that cannot start still gives its count back.
    let counted = Answering(answering.clone());
    let for_thread = metrics.clone();
    let spawned = std::thread::Builder::new()
        .name("holdfast-metrics-answer".into())
        .spawn(move || {
            let _counted = counted;
            answer(stream, &for_thread, io_timeout);
        });
    if let Err(e) = spawned {
        warn!("cannot start a thread to answer a metrics request: {e}");
        refuse(metrics);
    }
}

/// What a request head asks for, or the status to refuse it with.
pub fn route(head: &[u8]) -> Result<&'static str, (u16, &'static str)> {
    let line_end = head
        .iter()
        .position(|b| *b == b'\n')
        .ok_or((400, "no request line"))?;
    let line = std::str::from_utf8(&head[..line_end]).map_err(|_| (400, "not UTF-8"))?;
    let mut parts = line.trim_end().split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err((400, "not an HTTP/1 request line"));
    }
    if method != "GET" && method != "HEAD" {
        return Err((405, "only GET"));
    }
    // The query string is ignored (Prometheus may add one).
    match target.split('?').next().unwrap_or("") {
        "/metrics" => Ok("metrics"),
        "/healthz" => Ok("healthz"),
        _ => Err((404, "not found: try /metrics or /healthz")),
    }
}

fn answer(mut stream: TcpStream, metrics: &Metrics, io_timeout: Duration) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(io_timeout));
    let _ = stream.set_write_timeout(Some(io_timeout));
    let deadline = Instant::now() + io_timeout;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() > HTTP_REQUEST_BYTES_MAX || Instant::now() > deadline {
            break false;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    };
    let (status, content_type, body) = if head.len() > HTTP_REQUEST_BYTES_MAX {
        (431, "text/plain", "request head too large\n".to_string())
    } else if !complete {
        return;
    } else {
        match route(&head) {
            Ok("metrics") => (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.encode(),
            ),
            Ok(_) => match metrics.stats.health() {
                Ok(()) => (200, "text/plain", "ok\n".to_string()),
                Err(why) => (503, "text/plain", format!("not ready: {why}\n")),
            },
            Err((status, why)) => (status, "text/plain", format!("{why}\n")),
        }
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head_only = head.starts_with(b"HEAD ");
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
    if !head_only {
        let _ = stream.write_all(body.as_bytes());
    }
    let _ = stream.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `GET /metrics` on a new connection to `addr`: the answer (empty if closed unanswered).
    fn scrape(addr: SocketAddr) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    }

    /// Silent connections, held open by the server for `io_timeout` (a minute here, so that
    /// no step of the test races it): each holds a thread of its own, not the port, up to
    /// the limit; one beyond it is closed unanswered; once they go, scrapes are answered.
    #[test]
    fn silent_connections_hold_up_no_scrape_and_beyond_the_limit_are_closed_unanswered() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a port");
        let addr = listener.local_addr().expect("its address");
        let metrics = Arc::new(Metrics::new(1));
        let stop = Arc::new(AtomicBool::new(false));
        let io_timeout = Duration::from_secs(60);
        let server = serve_on(listener, metrics.clone(), stop.clone(), io_timeout).expect("serve");

        let mut silent: Vec<TcpStream> = (0..HTTP_CONNECTIONS_MAX - 1)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        let answer = scrape(addr).expect("a scrape beside silent connections is answered");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");

        silent.push(TcpStream::connect(addr).expect("connect"));
        // Closed with the request unread, so reset as often as ended; a timeout would be the
        // connection left waiting.
        match scrape(addr) {
            Ok(answer) => assert_eq!(answer, "", "answered beyond the limit"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        let refused = metrics.encode();
        assert!(
            refused.contains("holdfast_shell_refused_total{reason=\"metrics_connections_max\"} 1"),
            "{refused}"
        );

        drop(silent);
        let mut answered = None;
        for _ in 0..600 {
            match scrape(addr) {
                Ok(a) if !a.is_empty() => {
                    answered = Some(a);
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        let answer = answered.expect("answered again once the silent connections went");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        stop.store(true, Ordering::Relaxed);
        server.join().expect("the metrics thread ends");
    }

    #[test]
    fn routes_requests_and_refuses_junk_without_panicking() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n\r\n"), Ok("metrics"));
        assert_eq!(route(b"GET /healthz?x=1 HTTP/1.0\r\n\r\n"), Ok("healthz"));
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n").map_err(|e| e.0),
            Err(405)
        );
        assert_eq!(
            route(b"GET /nope HTTP/1.1\r\n\r\n").map_err(|e| e.0),
            Err(404)
        );
        for junk in [
            &b""[..],
            b"\n",
            b"\xff\xfe\n\n",
            b"GET\n\n",
            b"GET /metrics\n\n",
            b"  \r\n\r\n",
        ] {
            assert!(route(junk).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn health_needs_fresh_stats_with_every_leader_known() {
        let latest = LatestStats::default();
        assert!(latest.health().is_err(), "no stats yet");
        let mut stats = NodeStats {
            node: 1,
            groups: Vec::new(),
            requests: Default::default(),
            responses: Default::default(),
            topics: Default::default(),
            queues: Vec::new(),
            lag: Vec::new(),
            consumers: Vec::new(),
            consumer_counters_uncounted: 0,
            parked_pulls: 0,
            truncated: false,
        };
        latest.publish(stats.clone());
        assert!(latest.health().is_err(), "no groups");
        let group = |leader| holdfast_core::node::GroupStats {
            group: 0,
            role: Role::Follower,
            term: 1,
            leader,
            commit_index: 0,
            applied_index: 0,
            last_index: 0,
            snapshot_index: 0,
            counters: Default::default(),
            raft: Default::default(),
        };
        stats.groups = vec![group(Some(2)), group(None)];
        latest.publish(stats.clone());
        assert!(latest.health().unwrap_err().contains("no known leader"));
        stats.groups = vec![group(Some(2)), group(Some(2))];
        latest.publish(stats);
        assert_eq!(latest.health(), Ok(()));
    }
}
