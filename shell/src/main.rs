//! `holdfast`: the server, a one-command local cluster, and the client commands.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use holdfast_core::broker::{Message, SeekTo};
use holdfast_core::node::protocol::{Request, Response};
use holdfast_shell::client::{
    Admin, ClientConfig, ClientError, ConsumeStatus, Consumer, Producer, SendReceipt,
};
use holdfast_shell::config::{InitialClusterState, ServerConfig};
use holdfast_shell::output::{self, Failed, Failure, Format};
use holdfast_shell::{bench, cluster, out, server};
use serde_json::json;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay`: its place in mimalloc.h's `mi_option_e` (the same in mimalloc 2
/// and 3). The bindings name only some options.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Memory a node frees goes back to the system at once. mimalloc 3 waits a second by
/// default, and keeps it if nothing else is allocated meanwhile: a burst of hostile input
/// (megabyte frames refused, thousands of answers parked) then stays resident after it is
/// dealt with (+58 MiB in `hostile.rs`, against +26 MiB purging at once).
///
/// And in small pages: with transparent huge pages, each buffer grown again after a purge
/// faulted in a whole 2 MiB page, zeroed, and a fresh cluster's publishing nodes spent 26%
/// of their CPU in `clear_page` (30% more CPU per message than without; BENCHMARKS.md).
/// The `no_thp` feature stops mimalloc asking for them; this also refuses them where the
/// system gives them unasked (`transparent_hugepage=always`).
fn return_freed_memory_at_once() {
    // SAFETY: mi_option_set only stores a value that mimalloc reads when it next purges;
    // it is valid for every option index and any value, at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    // SAFETY: PR_SET_THP_DISABLE takes one integer flag and changes only this process's
    // future page faults. It can fail on old kernels, where nothing is lost but speed.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[derive(Parser)]
#[command(
    name = "holdfast",
    version,
    about = "A replicated message queue that never loses an acknowledged message",
    after_help = output::EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Servers {
    /// The cluster's nodes (client addresses), in node-id order. Default: the client file's,
    /// else the local cluster's (127.0.0.1:7301-7303).
    #[arg(long, env = "HOLDFAST_SERVERS")]
    servers: Option<String>,
    /// A client file (servers, CA certificate, token), as `holdfast cluster` writes. Default:
    /// ./holdfast-data/client.toml if it exists, else plaintext without a credential.
    #[arg(long, env = "HOLDFAST_CLIENT")]
    client_file: Option<PathBuf>,
}

/// How a command prints what it finds.
#[derive(clap::Args, Clone, Copy)]
struct OutputArgs {
    /// `text` for people, `json` for programs (see --json).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    output: Format,
    /// Same as `--output json`.
    #[arg(long)]
    json: bool,
}

impl OutputArgs {
    fn json(self) -> bool {
        self.json || self.output == Format::Json
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run one node.
    Server {
        /// The node's TOML config (id, nodes, data_dir, broker_groups, initial_cluster_state).
        #[arg(long)]
        config: PathBuf,
        /// Overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides `initial_cluster_state`: what an empty data directory means. `new` (the
        /// default): a first start. `existing`: this node's disk was lost; it rejoins, follows
        /// and stores data, but never votes again. `join`: a new node for `holdfast node add`.
        /// Ignored once the directory is initialised.
        #[arg(long, value_enum)]
        initial_cluster_state: Option<InitialClusterState>,
        /// Overrides `metrics_addr`: serve Prometheus metrics on http://ADDR/metrics and a
        /// readiness check on /healthz (ready when every local replica knows its leader).
        #[arg(long, value_name = "HOST:PORT", value_parser = holdfast_shell::config::resolve_addr)]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Start a local cluster on loopback and keep it running until Ctrl-C.
    Cluster {
        #[arg(long, default_value_t = 3)]
        nodes: u16,
        /// Where the nodes keep their data; started again, the cluster finds it there.
        #[arg(long, default_value = "./holdfast-data")]
        dir: PathBuf,
        /// Node n serves clients on base_port + n - 1.
        #[arg(long, default_value_t = 7301)]
        base_port: u16,
        /// Node n listens for the other nodes on peer_base_port + n - 1 (default: base_port
        /// + 100).
        #[arg(long)]
        peer_base_port: Option<u16>,
        #[arg(long, default_value_t = 2)]
        broker_groups: u64,
        /// No TLS and no credentials: anyone who reaches a port can act as a client or a
        /// node. For experiments only.
        #[arg(long)]
        no_auth: bool,
        /// Node n serves Prometheus metrics and /healthz on metrics_base_port + n - 1
        /// (default: base_port + 200).
        #[arg(long)]
        metrics_base_port: Option<u16>,
        /// Serve no metrics.
        #[arg(long, conflicts_with = "metrics_base_port")]
        no_metrics: bool,
    },
    /// Create, list, describe and delete topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// List, describe, seek (reset offsets) and delete consumer groups; add broker groups;
    /// move a Raft group's leader.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Read and re-drive a consumer group's dead-letter queue (messages answered
    /// ReconsumeLater more than max_reconsume times).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Send messages (the arguments, or one per line of stdin), printing each one's
    /// `queue@offset`, marked `ambiguous` when it may have been stored twice.
    Produce {
        topic: String,
        messages: Vec<String>,
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Print messages, one a line, acknowledging each one printed.
    Consume {
        topic: String,
        #[arg(long)]
        group: String,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds without a message.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        /// How each message prints: `body` (the body alone), `line` (`topic/queue@offset
        /// redeliveries=N body`, the body with newlines and control characters escaped), or
        /// `json` (one object per line).
        #[arg(long, value_enum, default_value_t = holdfast_shell::output::MessageFormat::Body)]
        format: holdfast_shell::output::MessageFormat,
        /// Answer ReconsumeLater instead of Success for this fraction of the messages (0 to 1;
        /// 1: all), spread evenly: they come back from the group's retry queue later, and to
        /// its dead-letter queue after the last retry.
        #[arg(long, value_name = "FRACTION", default_value_t = 0.0, num_args = 0..=1,
              default_missing_value = "1", value_parser = fraction)]
        reconsume_later: f64,
        /// Same as `--format json`.
        #[arg(long, conflicts_with = "format")]
        json: bool,
        #[command(flatten)]
        servers: Servers,
    },
    /// Add, remove or replace a node of a running cluster (admin only).
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Nodes, groups, leaders, terms and commit indexes; each group's voters and learners,
    /// and on its leader how far each member's log matches (`match`).
    Status {
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Measure throughput and latency against a running cluster.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Every consumer group with its queues, lag and the members holding its queues.
    List {
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// A group's queues: committed offset, end offset, lag, and who holds each.
    Describe {
        group: String,
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Moves a group's committed offsets on a topic's queues (admin only). Refused while a
    /// member holds one of the queues, unless --force (the member then goes on from its own
    /// position until its queue moves).
    Seek {
        group: String,
        #[arg(long)]
        topic: String,
        /// Only this queue (default: every queue of the topic).
        #[arg(long)]
        queue: Option<u32>,
        /// To the oldest message retained: everything is consumed again.
        #[arg(long, group = "target", required = true)]
        to_earliest: bool,
        /// To the end: everything there now counts as consumed.
        #[arg(long, group = "target")]
        to_latest: bool,
        /// To this offset (clamped to what the queue retains).
        #[arg(long, group = "target")]
        to_offset: Option<u64>,
        /// To the first message stored at or after this time: RFC 3339
        /// (`2026-12-03T01:00:00Z`, `2026-12-03T02:00:00+01:00`) or milliseconds since the Unix
        /// epoch. The end of a queue with none as new.
        #[arg(long, group = "target", value_parser = parse_time_ms)]
        to_time: Option<u64>,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Forgets a group's committed offsets and queue leases in every broker group (admin
    /// only). Refused while a member holds a queue, unless --force.
    Delete {
        group: String,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Adds a broker group to the running cluster (admin only): its voters NODES each create
    /// a replica, and topics created from then on place queues in it too (existing topics'
    /// queues stay where they are). GROUP is its id (default: one past the highest).
    Add {
        group: Option<u64>,
        /// The group's first voters, comma-separated node ids (`1,2,3`).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u64>,
        /// Allow fewer voters than the replication factor.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Hands Raft group GROUP's leadership (0: metadata, 1..: broker groups) to node TO
    /// (admin only): the leader catches it up and tells it to campaign at once, so the move
    /// costs no election timeout. Waits until TO leads.
    Transfer {
        group: u64,
        #[arg(long)]
        to: u64,
        #[command(flatten)]
        servers: Servers,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Adds node ID, serving clients at ADDR: records its addresses in the node table (every
    /// node then links to it), adds it to every group as a learner, and promotes it to voter
    /// once it holds the group's log. Start it first with `initial_cluster_state = "join"`.
    /// Run again after an interruption, it goes on where it stopped.
    Add {
        id: u64,
        /// Its client address, host:port.
        addr: String,
        /// Its address for the other nodes (default: the client port + 100).
        #[arg(long, value_name = "HOST:PORT")]
        peer_addr: Option<String>,
        /// Give up after this many seconds (a large log takes a while to copy).
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Removes node ID from every group (handing over the groups it leads first), then from
    /// the node table: the others close its links and refuse it, and its id is never used
    /// again. Refused if a group would keep fewer voters than the replication factor, unless
    /// --force.
    Remove {
        id: u64,
        /// Remove it even if a group is left below its replication factor.
        #[arg(long)]
        force: bool,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Replaces node ID (its disk lost, or its machine retired) by a new node NEW at ADDR: adds
    /// and promotes NEW everywhere, then removes ID, so no group drops below its size. A node
    /// whose disk was lost comes back under a new id: its old vote promises are gone.
    Replace {
        id: u64,
        /// The new node's id (never one used before).
        #[arg(long = "with", value_name = "NEW")]
        new: u64,
        /// The new node's client address, host:port.
        #[arg(long)]
        addr: String,
        #[arg(long, value_name = "HOST:PORT")]
        peer_addr: Option<String>,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// The group's dead-lettered messages not yet redriven, in every broker group (admin
    /// only): broker group, offset, origin queue and offset, redeliveries, body (escaped).
    List {
        group: String,
        /// Only messages that came from this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Show at most this many.
        #[arg(long, default_value_t = 1_000)]
        count: usize,
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Moves the group's dead-lettered messages back to its first retry queue, redelivery
    /// count reset (admin only): its members consume them again after the first retry delay.
    /// Each message moves by one command of its broker group's log, copied and removed from
    /// the dead-letter queue at once: none is lost or moved twice if this is interrupted (run
    /// it again for the rest); delivery stays at-least-once.
    Redrive {
        group: String,
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
}

#[derive(Subcommand)]
enum TopicCommand {
    /// Creates a topic with this many queues; refused if it exists with another count.
    Create {
        name: String,
        #[arg(long, default_value_t = 4)]
        queues: u32,
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Lists the topics and their queue counts.
    List {
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Each queue of a topic: its broker group and that group's leader.
    Describe {
        name: String,
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Deletes a topic with its messages, consumer offsets and leases (admin only); a topic
    /// created again with the same name starts empty.
    Delete {
        name: String,
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        output: OutputArgs,
    },
}

fn main() -> ExitCode {
    return_freed_memory_at_once();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failed) => {
            eprintln!("error: {}", failed.message);
            failed.exit_code()
        }
    }
}

/// How a client command reaches the cluster: the client file's settings (named, or found
/// under ./holdfast-data), with `--servers` over its servers; fails at once if no server
/// accepts a connection.
fn servers(s: &Servers) -> Result<ClientConfig, Failed> {
    let config = ClientConfig::resolve(s.servers.as_deref(), s.client_file.as_deref())
        .map_err(|e| e.to_string())?;
    output::reachable(&config.servers)?;
    Ok(config)
}

/// A number from 0 to 1.
fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{text:?} is not a fraction from 0 to 1")),
    }
}

/// Set by SIGINT or SIGTERM.
fn stop_flag() -> Result<Arc<AtomicBool>, String> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).map_err(|e| e.to_string())?;
    }
    Ok(stop)
}

fn run(cli: Cli) -> Result<(), Failed> {
    match cli.command {
        Command::Server {
            config,
            data_dir,
            initial_cluster_state,
            metrics_addr,
        } => {
            let mut config = ServerConfig::from_file(&config).map_err(|e| e.to_string())?;
            if let Some(dir) = data_dir {
                config.data_dir = dir;
            }
            if let Some(state) = initial_cluster_state {
                config.initial_cluster_state = state;
            }
            if metrics_addr.is_some() {
                config.metrics_addr = metrics_addr;
            }
            Ok(server::run(config, stop_flag()?).map_err(|e| e.to_string())?)
        }
        Command::Cluster {
            nodes,
            dir,
            base_port,
            peer_base_port,
            broker_groups,
            no_auth,
            metrics_base_port,
            no_metrics,
        } => {
            let metrics_base_port = match (no_metrics, metrics_base_port) {
                (true, _) => None,
                (false, Some(port)) => Some(port),
                (false, None) => Some(base_port.checked_add(200).ok_or_else(|| {
                    format!("--base-port {base_port}: give --metrics-base-port or --no-metrics")
                })?),
            };
            let args = cluster::ClusterArgs {
                metrics_base_port,
                nodes,
                dir,
                base_port,
                peer_base_port: match peer_base_port {
                    Some(port) => port,
                    None => base_port.checked_add(100).ok_or_else(|| {
                        format!("--base-port {base_port}: give --peer-base-port too")
                    })?,
                },
                broker_groups,
                no_auth,
            };
            Ok(cluster::run(&args, stop_flag()?)?)
        }
        Command::Topic { command } => topic(command),
        Command::Group { command } => group(command),
        Command::Dlq { command } => match command {
            DlqCommand::List {
                group,
                topic,
                count,
                servers: s,
                output,
            } => holdfast_shell::admin::dlq_list(
                servers(&s)?,
                &group,
                topic.as_deref(),
                count,
                output.json(),
            ),
            DlqCommand::Redrive {
                group,
                servers: s,
                output,
            } => holdfast_shell::admin::dlq_redrive(servers(&s)?, &group, output.json()),
        },
        Command::Produce {
            topic,
            messages,
            servers: s,
            output,
        } => produce(servers(&s)?, &topic, messages, output.json()),
        Command::Consume {
            topic,
            group,
            count,
            timeout,
            format,
            reconsume_later,
            json,
            servers: s,
        } => {
            let format = if json {
                holdfast_shell::output::MessageFormat::Json
            } else {
                format
            };
            let servers = servers(&s)?;
            let mut consumer =
                Consumer::connect(servers.clone(), &group, &topic).map_err(|e| e.to_string())?;
            // Ctrl-C or SIGTERM: stop taking messages, confirm what was printed, and hand the
            // queues over at once (close), rather than leave them to the session timeout.
            consumer.stop_when(stop_flag()?);
            let mut redelivered = 0usize;
            let (mut later, mut owed) = (0usize, 0.0f64);
            let progress = output::progress(
                count.map(|c| c as u64),
                match count {
                    Some(_) => "{bar:30} {pos}/{len} consumed ({per_sec}), {msg} {elapsed}",
                    None => "{spinner} {pos} consumed ({per_sec}), {msg} {elapsed}",
                },
            );
            let seen = consumer.run(count, Duration::from_secs(timeout), |d| {
                use std::io::Write as _;
                redelivered += usize::from(d.redelivered);
                if let Some(bar) = &progress {
                    bar.inc(1);
                    bar.set_message(format!("{redelivered} redelivered"));
                }
                owed += reconsume_later;
                let answer = if owed >= 1.0 {
                    owed -= 1.0;
                    later += 1;
                    ConsumeStatus::ReconsumeLater
                } else {
                    ConsumeStatus::Success
                };
                let line = holdfast_shell::output::message_line(format, d, answer);
                // Acknowledge only what reached stdout; the rest comes back to the group.
                match writeln!(std::io::stdout(), "{line}") {
                    Ok(()) => answer,
                    Err(_) => ConsumeStatus::ReconsumeLater,
                }
            });
            if let Some(bar) = progress {
                bar.finish_and_clear();
            }
            let refusal = consumer.refusal().map(str::to_string);
            consumer.close();
            eprintln!(
                "consumed {seen} message(s), {redelivered} of them redelivered (handed to the group before and not acknowledged, or retried after ReconsumeLater)"
            );
            if later > 0 {
                eprintln!("answered ReconsumeLater for {later} of them (--reconsume-later)");
            }
            if let Some(why) = refusal {
                return Err(Failed::refused(format!("refused: {why}")));
            }
            if seen == 0 {
                // Nothing came: say so if it is because the topic does not exist.
                let mut admin = Admin::connect(servers)?;
                let route = Request::Route {
                    topic: topic.clone(),
                };
                if let Err(ClientError::Refused(reason)) =
                    admin.ask_leader(route, Duration::from_secs(5))
                {
                    return Err(Failed::refused(format!("consumed nothing: {reason}")));
                }
            }
            Ok(())
        }
        Command::Node { command } => match command {
            NodeCommand::Add {
                id,
                addr,
                peer_addr,
                timeout,
                servers: s,
                output,
            } => holdfast_shell::admin::node_add(
                servers(&s)?,
                id,
                &addr,
                peer_addr.as_deref(),
                Duration::from_secs(timeout),
                output.json(),
            ),
            NodeCommand::Remove {
                id,
                force,
                timeout,
                servers: s,
                output,
            } => holdfast_shell::admin::node_remove(
                servers(&s)?,
                id,
                force,
                Duration::from_secs(timeout),
                output.json(),
            ),
            NodeCommand::Replace {
                id,
                new,
                addr,
                peer_addr,
                timeout,
                servers: s,
                output,
            } => holdfast_shell::admin::node_replace(
                servers(&s)?,
                id,
                new,
                &addr,
                peer_addr.as_deref(),
                Duration::from_secs(timeout),
                output.json(),
            ),
        },
        Command::Status { servers: s, output } => status(servers(&s)?, output.json()),
        Command::Bench(args) => Ok(bench::run(args)?),
    }
}

fn group(command: GroupCommand) -> Result<(), Failed> {
    match command {
        GroupCommand::List { servers: s, output } => {
            holdfast_shell::admin::list(servers(&s)?, output.json())
        }
        GroupCommand::Describe {
            group,
            servers: s,
            output,
        } => holdfast_shell::admin::describe(servers(&s)?, &group, output.json()),
        GroupCommand::Seek {
            group,
            topic,
            queue,
            to_earliest: _,
            to_latest,
            to_offset,
            to_time,
            force,
            servers: s,
            output,
        } => {
            let to = match (to_latest, to_offset, to_time) {
                (true, _, _) => SeekTo::Latest,
                (false, Some(offset), _) => SeekTo::Offset(offset),
                (false, None, Some(ms)) => SeekTo::Time(ms),
                (false, None, None) => SeekTo::Earliest,
            };
            holdfast_shell::admin::seek(
                servers(&s)?,
                &group,
                &topic,
                queue,
                to,
                force,
                output.json(),
            )
        }
        GroupCommand::Delete {
            group,
            force,
            servers: s,
            output,
        } => holdfast_shell::admin::delete(servers(&s)?, &group, force, output.json()),
        GroupCommand::Transfer {
            group,
            to,
            servers: s,
        } => holdfast_shell::admin::transfer(servers(&s)?, group, to),
        GroupCommand::Add {
            group,
            nodes,
            force,
            servers: s,
            output,
        } => holdfast_shell::admin::group_add(servers(&s)?, group, &nodes, force, output.json()),
    }
}

fn topic(command: TopicCommand) -> Result<(), Failed> {
    let wait = Duration::from_secs(10);
    match command {
        TopicCommand::Create {
            name,
            queues,
            servers: s,
            output,
        } => {
            let mut admin = Admin::connect(servers(&s)?)?;
            let request = Request::CreateTopic {
                topic: name.clone(),
                queues,
            };
            match admin.ask_leader(request, wait) {
                Ok(Response::TopicCreated { existed, .. }) if output.json() => {
                    output::json_line(&json!({
                        "topic": name,
                        "queues": queues,
                        "created": !existed,
                    }));
                    Ok(())
                }
                Ok(Response::TopicCreated { existed: false, .. }) => {
                    out!("created topic {name} with {queues} queues");
                    Ok(())
                }
                Ok(Response::TopicCreated { existed: true, .. }) => {
                    out!("topic {name} already exists with {queues} queues");
                    Ok(())
                }
                Ok(other) => Err(format!("unexpected answer {other:?}").into()),
                Err(ClientError::Refused(reason)) => {
                    Err(Failed::refused(format!("topic {name}: {reason}")))
                }
                Err(e) => Err(e.into()),
            }
        }
        TopicCommand::Delete {
            name,
            servers: s,
            output,
        } => {
            let mut admin = Admin::connect(servers(&s)?)?;
            match admin.delete_topic(&name, wait) {
                Ok(queues) if output.json() => {
                    output::json_line(&json!({"topic": name, "queues": queues, "deleted": true}));
                    Ok(())
                }
                Ok(queues) => {
                    out!("deleted topic {name} ({queues} queues)");
                    Ok(())
                }
                Err(ClientError::Refused(reason)) => {
                    Err(Failed::refused(format!("topic {name}: {reason}")))
                }
                Err(e) => Err(e.into()),
            }
        }
        TopicCommand::List { servers: s, output } => {
            let mut admin = Admin::connect(servers(&s)?)?;
            match admin.ask_leader(Request::Topics, wait)? {
                Response::Topics { topics } => {
                    if output.json() {
                        let topics: Vec<_> = topics
                            .into_iter()
                            .map(|(name, queues)| json!({"name": name, "queues": queues}))
                            .collect();
                        output::json_line(&json!({ "topics": topics }));
                        return Ok(());
                    }
                    for (name, queues) in topics {
                        out!("{name}\t{queues} queues");
                    }
                    Ok(())
                }
                other => Err(format!("unexpected answer {other:?}").into()),
            }
        }
        TopicCommand::Describe {
            name,
            servers: s,
            output,
        } => {
            let mut admin = Admin::connect(servers(&s)?)?;
            match admin.ask_leader(Request::Route { topic: name }, wait)? {
                Response::Routes { topic, routes } => {
                    if output.json() {
                        let queues: Vec<_> = routes
                            .iter()
                            .map(|r| {
                                json!({"queue": r.queue.queue, "group": r.group, "leader": r.leader})
                            })
                            .collect();
                        output::json_line(&json!({"topic": topic, "queues": queues}));
                        return Ok(());
                    }
                    out!("{topic}");
                    for r in routes {
                        let leader = r.leader.map_or("?".into(), |l| format!("node {l}"));
                        out!("  {}\tgroup {}\tleader {leader}", r.queue, r.group);
                    }
                    Ok(())
                }
                other => Err(format!("unexpected answer {other:?}").into()),
            }
        }
    }
}

/// Sends from stdin in flight at once: enough to hide the round trip, well under what a
/// server reads ahead of its answers (`REQUESTS_PENDING_PER_CONNECTION_MAX`).
const PRODUCE_IN_FLIGHT_MAX: usize = 256;

/// Sends each message as it is read, up to [`PRODUCE_IN_FLIGHT_MAX`] in flight, and prints
/// the receipts in input order. Stops reading at the first failed send, lets the others end,
/// and fails.
fn produce(
    servers: ClientConfig,
    topic: &str,
    messages: Vec<String>,
    json: bool,
) -> Result<(), Failed> {
    let mut producer = Producer::connect(servers)?;
    let mut lines: Box<dyn Iterator<Item = Result<String, Failed>>> = if messages.is_empty() {
        Box::new(
            std::io::stdin()
                .lock()
                .lines()
                .map(|l| l.map_err(|e| Failed::from(format!("reading stdin: {e}")))),
        )
    } else {
        Box::new(messages.into_iter().map(Ok))
    };
    let progress = output::progress(None, "{spinner} {pos} sent ({per_sec}), {msg} {elapsed}");
    // Receipts by send id (ids ascend in input order), printed once all before them are.
    let mut done: BTreeMap<u64, SendReceipt> = BTreeMap::new();
    let mut next_to_print = None;
    let mut failed: Option<Failed> = None;
    let mut ambiguous = 0u64;
    let mut reading = true;
    loop {
        while reading && failed.is_none() && producer.in_flight() < PRODUCE_IN_FLIGHT_MAX {
            match lines.next() {
                None => reading = false,
                Some(Err(e)) => failed = Some(e),
                Some(Ok(text)) => {
                    let message = Message::with_body(Bytes::from(text));
                    match producer.send_async(topic, vec![message]) {
                        Ok(id) => {
                            next_to_print.get_or_insert(id);
                        }
                        Err(e) => failed = Some(e.into()),
                    }
                }
            }
        }
        if producer.in_flight() == 0 {
            break;
        }
        if let Some(why) = producer.refusal() {
            failed.get_or_insert(Failed::refused(format!("refused: {why}")));
            break;
        }
        for (id, result) in producer.poll(Duration::from_millis(100)) {
            match result {
                Ok(receipt) => {
                    ambiguous += u64::from(receipt.ambiguous);
                    done.insert(id, receipt);
                }
                Err(e) => {
                    failed.get_or_insert(e.into());
                }
            }
        }
        while let Some(next) = next_to_print {
            let Some(receipt) = done.remove(&next) else {
                break;
            };
            print_receipt(&receipt, json);
            if let Some(bar) = &progress {
                bar.inc(1);
                bar.set_message(format!("{ambiguous} ambiguous"));
            }
            next_to_print = Some(next + 1);
        }
    }
    // What came back after a failed send, in order; a gap is the failed one.
    for receipt in done.values() {
        print_receipt(receipt, json);
    }
    if let Some(bar) = progress {
        bar.finish();
    }
    if ambiguous > 0 {
        eprintln!("{ambiguous} send(s) ambiguous: resent after a lost answer, may be stored twice");
    }
    match failed {
        Some(failed) => Err(failed),
        None => Ok(()),
    }
}

/// `queue@offset`, or one JSON object a line; an ambiguous send (resent after a lost answer,
/// so possibly stored twice) says so.
fn print_receipt(receipt: &SendReceipt, json: bool) {
    if json {
        output::json_line(&json!({
            "topic": receipt.queue.topic,
            "queue": receipt.queue.queue,
            "offset": receipt.offset,
            "ambiguous": receipt.ambiguous,
        }));
    } else if receipt.ambiguous {
        out!(
            "{}@{} ambiguous (resent after a lost answer: may be stored twice)",
            receipt.queue,
            receipt.offset
        );
    } else {
        out!("{}@{}", receipt.queue, receipt.offset);
    }
}

fn status(config: ClientConfig, json: bool) -> Result<(), Failed> {
    let mut admin = Admin::connect(config)?;
    // Consumer progress as each broker group's leader has applied it: (group, consumer
    // group) -> (messages waiting, queues).
    let mut lag: BTreeMap<(u64, String), (u64, usize)> = BTreeMap::new();
    let mut nodes_json = Vec::new();
    let mut answered = 0;
    for node in admin.node_ids() {
        let addr = admin
            .addr_of(node)
            .map_or_else(|| "?".to_string(), |a| a.to_string());
        match admin.ask(node, Request::Status) {
            Some(Response::Status { node, groups }) => {
                answered += 1;
                if !json {
                    out!("node {node} ({addr})");
                }
                let mut groups_json = Vec::new();
                for g in groups {
                    let leader = g.leader.map_or("-".into(), |l| l.to_string());
                    if json {
                        groups_json.push(json!({
                            "group": g.group,
                            "role": g.role,
                            "term": g.term,
                            "leader": g.leader,
                            "commit_index": g.commit_index,
                            "applied_index": g.applied_index,
                            "last_index": g.last_index,
                            "snapshot_index": g.snapshot_index,
                            "voters": g.voters,
                            "learners": g.learners,
                            "matches": g.matches.iter().map(|(n, m)| json!({"node": n, "match_index": m})).collect::<Vec<_>>(),
                        }));
                    } else {
                        out!(
                            "  group {:<3} {:<12} term {:<5} leader {:<3} commit {:<8} applied {:<8} last {:<8} snapshot {}",
                            g.group,
                            g.role,
                            g.term,
                            leader,
                            g.commit_index,
                            g.applied_index,
                            g.last_index,
                            g.snapshot_index
                        );
                        let matches: Vec<String> =
                            g.matches.iter().map(|(n, m)| format!("{n}@{m}")).collect();
                        out!(
                            "            voters {:?} learners {:?}{}",
                            g.voters,
                            g.learners,
                            if matches.is_empty() {
                                String::new()
                            } else {
                                format!(" match {}", matches.join(" "))
                            }
                        );
                    }
                    if g.role == "Leader" {
                        for h in g.holders.iter().filter(|h| !json && !h.queue.is_retry()) {
                            let member = h.member.as_deref().unwrap_or("(released)");
                            out!(
                                "    {} {} held by {member} (generation {})",
                                h.group,
                                h.queue,
                                h.generation
                            );
                        }
                        for c in g.consumers {
                            let entry = lag.entry((g.group, c.group)).or_default();
                            entry.0 += c.queue_len.saturating_sub(c.consume_offset);
                            entry.1 += 1;
                        }
                    }
                }
                nodes_json.push(json!({
                    "node": node,
                    "addr": addr.clone(),
                    "answered": true,
                    "groups": groups_json,
                }));
            }
            _ => match admin.refusal() {
                Some(why) => return Err(Failed::refused(format!("refused: {why}"))),
                None => {
                    if !json {
                        out!("node {node} ({addr}): no answer");
                    }
                    nodes_json.push(json!({
                        "node": node,
                        "addr": addr.clone(),
                        "answered": false,
                    }));
                }
            },
        }
    }
    if json {
        let lag: Vec<_> = lag
            .into_iter()
            .map(|((group, consumers), (waiting, queues))| {
                json!({
                    "consumer_group": consumers,
                    "broker_group": group,
                    "lag": waiting,
                    "queues": queues,
                })
            })
            .collect();
        output::json_line(&json!({"nodes": nodes_json, "consumer_lag": lag}));
    } else if !lag.is_empty() {
        out!(
            "consumer groups: messages not yet acknowledged, per broker group, on the queues where the group has acknowledged any"
        );
        for ((group, consumers), (waiting, queues)) in lag {
            out!("  {consumers:<20} group {group:<3} lag {waiting:<8} over {queues} queue(s)");
        }
    }
    if answered == 0 {
        return Err(Failed::new(
            Failure::Timeout,
            "no server answered in time (they accept connections: no node is serving)",
        ));
    }
    Ok(())
}

/// `--to-time`: RFC 3339, or milliseconds since the Unix epoch.
fn parse_time_ms(text: &str) -> Result<u64, String> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            format!("{text:?} is neither RFC 3339 (2026-12-03T01:00:00Z) nor milliseconds: {e}")
        })?;
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("{text:?} is before 1970"))
}
