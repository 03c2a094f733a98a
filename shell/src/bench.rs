//! `holdfast bench`: producers and consumers against a running cluster; throughput and latency.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use holdfast_core::broker::Message;
use holdfast_core::node::protocol::{Request, Response};

use crate::client::{Admin, ClientConfig, ConsumeStatus, Consumer, Producer};
use crate::output::Failed;

#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Messages in all.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Bytes per message body.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Sends in flight per producer.
    #[arg(long, default_value_t = 32)]
    pub inflight: usize,
    #[arg(long, default_value_t = 2)]
    pub producers: usize,
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    #[arg(long, default_value = "bench")]
    pub topic: String,
    #[arg(long, default_value_t = 8)]
    pub queues: u32,
    /// The cluster's nodes (default: the client file's, else the local cluster's).
    #[arg(long, env = "HOLDFAST_SERVERS")]
    pub servers: Option<String>,
    /// A client file (servers, CA, token); default: ./holdfast-data/client.toml if it exists.
    #[arg(long, env = "HOLDFAST_CLIENT")]
    pub client_file: Option<std::path::PathBuf>,
    /// Keep what the run created afterwards: the consumer group `bench-<pid>`, and the topic
    /// if it did not exist before (by default both are deleted, so runs leave no groups
    /// behind in `group list` and the lag metrics, and no messages on disk).
    #[arg(long, alias = "keep-group")]
    pub keep: bool,
    /// Sends per second over all producers (0: as fast as the in-flight limit allows). A rate
    /// the consumers keep up with measures end-to-end latency without a backlog in it.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
}

/// Bytes at the start of a body that carry its send time (microseconds since the Unix epoch),
/// for the end-to-end latency; bodies shorter than this carry none.
const STAMP_BYTES: usize = 8;

/// Runs the benchmark; fails like every client command (exit 3, naming each address and why,
/// when no server accepts a connection; 4 when refused; 5 on no answer in time).
pub fn run(args: BenchArgs) -> Result<(), Failed> {
    let servers = ClientConfig::resolve(args.servers.as_deref(), args.client_file.as_deref())
        .map_err(|e| e.to_string())?;
    crate::output::reachable(&servers.servers)?;
    let mut admin = Admin::connect(servers.clone()).map_err(|e| e.to_string())?;
    let create = Request::CreateTopic {
        topic: args.topic.clone(),
        queues: args.queues,
    };
    // A topic that existed before the run is the user's: only one the run created goes.
    let created_topic = match admin.ask_leader(create, Duration::from_secs(10)) {
        Ok(Response::TopicCreated { existed, .. }) => !existed,
        Ok(Response::Refused { reason }) => {
            return Err(Failed::refused(format!(
                "cannot create topic {}: refused: {reason}",
                args.topic
            )));
        }
        Ok(other) => {
            return Err(format!("cannot create topic {}: {other:?}", args.topic).into());
        }
        Err(e) => {
            let failed = Failed::from(e);
            return Err(Failed::new(
                failed.kind,
                format!("cannot create topic {}: {}", args.topic, failed.message),
            ));
        }
    };
    crate::out!(
        "bench: {} messages of {} bytes, {} producers x {} in flight, {} consumers, topic {} ({} queues), {}",
        args.messages,
        args.size,
        args.producers,
        args.inflight,
        args.consumers,
        args.topic,
        args.queues,
        if args.rate == 0 {
            "unpaced".to_string()
        } else {
            format!("paced at {} sends/s", args.rate)
        }
    );
    crate::out!(
        "durability: acked after a majority synced it to disk (fdatasync per batch, group commit)"
    );
    crate::out!(
        "transport: {}",
        if servers.tls.is_some() {
            "TLS 1.3, token authentication"
        } else {
            "plaintext, no authentication"
        }
    );

    let group = format!("bench-{}", std::process::id());
    let started = Instant::now();
    let per_producer = args.messages / args.producers.max(1) as u64;
    let counts = Counts::default();
    let producers: Vec<_> = (0..args.producers)
        .map(|_| {
            let (servers, topic, args) = (servers.clone(), args.topic.clone(), args.clone());
            let counted = counts.produced.clone();
            std::thread::spawn(move || produce(servers, &topic, per_producer, &args, &counted))
        })
        .collect();
    let total = per_producer * args.producers.max(1) as u64;
    let consumers: Vec<_> = (0..args.consumers)
        .map(|_| {
            let (servers, topic, group) = (servers.clone(), args.topic.clone(), group.clone());
            let share = total.div_ceil(args.consumers.max(1) as u64) as usize;
            let counted = counts.consumed.clone();
            std::thread::spawn(move || consume(servers, &topic, &group, share, &counted))
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let bars = show_progress(total, &counts, &done);

    let mut latency = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut sent = 0u64;
    let mut failed = 0u64;
    let mut acked_at = Vec::new();
    for handle in producers {
        let (h, ok, bad, at) = handle
            .join()
            .map_err(|_| "a producer thread panicked".to_string())??;
        latency.add(h).map_err(|e| e.to_string())?;
        sent += ok;
        failed += bad;
        acked_at.extend(at);
    }
    // The longest stretch in which no producer had a send acknowledged: what a node restart
    // or a failover costs the writers.
    acked_at.sort_unstable();
    let longest_gap = std::iter::once(&started)
        .chain(&acked_at)
        .zip(&acked_at)
        .map(|(a, b)| b.duration_since(*a))
        .max()
        .unwrap_or_default();
    let produce_secs = started.elapsed().as_secs_f64();
    let mut consumed = 0;
    let mut samples = Vec::new();
    // The group settles (members join, queues are handed out) while the first sends go:
    // latency counts from when every consumer has had a message, so it measures the path,
    // not the start-up.
    let mut settled_us = 0;
    for handle in consumers {
        let seen = handle
            .join()
            .map_err(|_| "a consumer thread panicked".to_string())?;
        consumed += seen.count;
        settled_us = settled_us.max(seen.first_us.unwrap_or(u64::MAX));
        samples.extend(seen.samples);
    }
    let mut end_to_end = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    for (sent_us, latency_us) in samples {
        if sent_us >= settled_us {
            let _ = end_to_end.record(latency_us);
        }
    }
    let consume_secs = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    if let Some(bars) = bars {
        let _ = bars.join();
    }
    let msgs_per_s = sent as f64 / produce_secs.max(1e-9);
    let mb_per_s = msgs_per_s * args.size as f64 / 1e6;
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1_000.0;
    crate::out!(
        "produced {sent} ({failed} failed) in {produce_secs:.2} s; consumed {consumed} in {consume_secs:.2} s"
    );
    crate::out!(
        "send latency: p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        latency.max() as f64 / 1_000.0
    );
    let e2e_ms = |q: f64| end_to_end.value_at_quantile(q) as f64 / 1_000.0;
    if !end_to_end.is_empty() {
        crate::out!(
            "end-to-end latency (send to the consumer's listener, {} messages sent once every consumer had one): p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms",
            end_to_end.len(),
            e2e_ms(0.5),
            e2e_ms(0.99),
            e2e_ms(0.999),
            end_to_end.max() as f64 / 1_000.0
        );
    }
    crate::out!(
        "longest gap without an acknowledged send: {:.1} ms",
        longest_gap.as_secs_f64() * 1e3
    );
    crate::out!(
        "msgs_per_s={msgs_per_s:.0} mb_per_s={mb_per_s:.2} p50_ms={:.2} p99_ms={:.2} p999_ms={:.2} e2e_p50_ms={:.2} e2e_p99_ms={:.2} e2e_p999_ms={:.2}",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        e2e_ms(0.5),
        e2e_ms(0.99),
        e2e_ms(0.999)
    );
    if !args.keep {
        // Its consumers have finished: forcing only covers a lease not yet released.
        if let Err(e) = crate::admin::delete(servers.clone(), &group, true, false) {
            crate::out!("cannot delete consumer group {group}: {}", e.message);
        }
        if created_topic {
            let deleted = Admin::connect(servers)
                .and_then(|mut admin| admin.delete_topic(&args.topic, Duration::from_secs(10)));
            match deleted {
                Ok(_) => crate::out!("deleted topic {} (--keep keeps it)", args.topic),
                Err(e) => crate::out!("cannot delete topic {}: {e}", args.topic),
            }
        }
    }
    Ok(())
}

/// Messages acknowledged to the producers and handed to the consumers so far.
#[derive(Default)]
struct Counts {
    produced: Arc<AtomicU64>,
    consumed: Arc<AtomicU64>,
}

/// Bars for produced and consumed messages, redrawn until `done`, when stderr is a terminal.
fn show_progress(
    total: u64,
    counts: &Counts,
    done: &Arc<AtomicBool>,
) -> Option<std::thread::JoinHandle<()>> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let template = "{prefix:>9} {bar:30} {pos}/{len} ({per_sec}) {elapsed}";
    let multi = indicatif::MultiProgress::new();
    let bar = |name: &'static str| {
        let bar = multi.add(indicatif::ProgressBar::new(total));
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_prefix(name);
        bar
    };
    let (produced_bar, consumed_bar) = (bar("produced"), bar("consumed"));
    let (produced, consumed, done) = (
        counts.produced.clone(),
        counts.consumed.clone(),
        done.clone(),
    );
    Some(std::thread::spawn(move || {
        while !done.load(Ordering::Relaxed) {
            produced_bar.set_position(produced.load(Ordering::Relaxed));
            consumed_bar.set_position(consumed.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(100));
        }
        produced_bar.finish_and_clear();
        consumed_bar.finish_and_clear();
    }))
}

/// Latencies, sends acked, sends failed, and when each ack came.
type ProduceResult = Result<(Histogram<u64>, u64, u64, Vec<Instant>), String>;

fn produce(
    servers: ClientConfig,
    topic: &str,
    count: u64,
    args: &BenchArgs,
    counted: &AtomicU64,
) -> ProduceResult {
    let mut producer = Producer::connect(servers).map_err(|e| e.to_string())?;
    let mut latency = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut body = vec![b'x'; args.size];
    let mut started = BTreeMap::new();
    let (mut issued, mut ok, mut failed) = (0u64, 0u64, 0u64);
    let mut acked_at = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let pace = pace_of(args);
    let begun = Instant::now();
    while ok + failed < count {
        while issued < count && producer.in_flight() < args.inflight {
            // Paced: the n-th send goes no earlier than n intervals after the start.
            if pace.is_some_and(|every| {
                begun + Duration::from_nanos(every.saturating_mul(issued)) > Instant::now()
            }) {
                break;
            }
            stamp(&mut body);
            let id = producer
                .send_async(
                    topic,
                    vec![Message::with_body(Bytes::copy_from_slice(&body))],
                )
                .map_err(|e| e.to_string())?;
            started.insert(id, Instant::now());
            issued += 1;
        }
        let wait = match pace {
            Some(every) if issued < count => Duration::from_nanos(every.clamp(1, 50_000_000)),
            _ => Duration::from_millis(50),
        };
        for (id, result) in producer.poll(wait) {
            if let Some(at) = started.remove(&id) {
                let _ = latency.record(at.elapsed().as_micros() as u64);
            }
            match result {
                Ok(_) => {
                    ok += 1;
                    counted.fetch_add(1, Ordering::Relaxed);
                    acked_at.push(Instant::now());
                }
                Err(_) => failed += 1,
            }
        }
    }
    Ok((latency, ok, failed, acked_at))
}

/// The interval between one producer's sends in nanoseconds, when paced.
fn pace_of(args: &BenchArgs) -> Option<u64> {
    let per_producer = args.rate / args.producers.max(1) as u64;
    (args.rate > 0).then(|| 1_000_000_000 / per_producer.max(1))
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Writes the send time into the body's first bytes (producers and consumers of a bench run
/// share one clock: the machine the bench runs on).
fn stamp(body: &mut [u8]) {
    if let Some(head) = body.get_mut(..STAMP_BYTES) {
        head.copy_from_slice(&now_us().to_le_bytes());
    }
}

/// A body's send time, if it is long enough to carry one.
fn stamp_of(body: &[u8]) -> Option<u64> {
    let head: [u8; STAMP_BYTES] = body.get(..STAMP_BYTES)?.try_into().ok()?;
    Some(u64::from_le_bytes(head))
}

/// What one consumer saw: how many messages, when the first came, and each first delivery's
/// send time and latency (microseconds).
struct Seen {
    count: usize,
    first_us: Option<u64>,
    samples: Vec<(u64, u64)>,
}

fn consume(
    servers: ClientConfig,
    topic: &str,
    group: &str,
    count: usize,
    counted: &AtomicU64,
) -> Seen {
    let mut seen = Seen {
        count: 0,
        first_us: None,
        samples: Vec::with_capacity(count.min(10_000_000)),
    };
    let Ok(mut consumer) = Consumer::connect(servers, group, topic) else {
        return seen;
    };
    seen.count = consumer.run(Some(count), Duration::from_secs(10), |delivery| {
        counted.fetch_add(1, Ordering::Relaxed);
        let now = now_us();
        seen.first_us.get_or_insert(now);
        // A redelivery's latency is the redelivery's, not the path's: leave it out.
        if let Some(sent) = stamp_of(&delivery.message.message.body)
            && !delivery.redelivered
        {
            seen.samples.push((sent, now.saturating_sub(sent)));
        }
        ConsumeStatus::Success
    });
    // Leave the group (answers confirmed, queues released) before the run deletes it: a
    // consumer merely dropped keeps polling its queues until its connection closes, and a
    // poll after the deletion claims a queue again, so the group came back.
    consumer.close();
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_carries_its_send_time_when_it_is_long_enough() {
        let mut body = vec![b'x'; 16];
        let before = now_us();
        stamp(&mut body);
        let sent = stamp_of(&body).expect("16 bytes carry a stamp");
        assert!(before <= sent && sent <= now_us());
        assert_eq!(
            &body[STAMP_BYTES..],
            &[b'x'; 8],
            "only the head is the stamp"
        );

        let mut short = vec![b'x'; STAMP_BYTES - 1];
        stamp(&mut short);
        assert_eq!(
            short,
            vec![b'x'; STAMP_BYTES - 1],
            "a short body is left alone"
        );
        assert_eq!(stamp_of(&short), None);
    }

    #[test]
    fn a_paced_run_spreads_the_rate_over_its_producers() {
        let args = |rate, producers| BenchArgs {
            messages: 1,
            size: 8,
            inflight: 1,
            producers,
            consumers: 1,
            topic: "t".into(),
            queues: 1,
            servers: None,
            client_file: None,
            keep: false,
            rate,
        };
        assert_eq!(pace_of(&args(0, 2)), None);
        assert_eq!(
            pace_of(&args(2_000, 2)),
            Some(1_000_000),
            "1,000 a second each"
        );
        assert_eq!(
            pace_of(&args(1, 4)),
            Some(1_000_000_000),
            "at least one a second each"
        );
    }
}
