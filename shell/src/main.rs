//! `holdfast`: the server, a one-command local cluster, and the client commands.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use holdfast_core::broker::Message;
use holdfast_core::node::protocol::{Request, Response};
use holdfast_shell::client::{
    Admin, ClientError, ConsumeStatus, Consumer, DEFAULT_SERVERS, Producer, parse_servers,
};
use holdfast_shell::config::{InitialClusterState, ServerConfig};
use holdfast_shell::{bench, cluster, out, server};

#[derive(Parser)]
#[command(
    name = "holdfast",
    version,
    about = "A replicated message queue that never loses an acknowledged message"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Servers {
    /// The cluster's nodes, in node-id order.
    #[arg(long, env = "HOLDFAST_SERVERS", default_value = DEFAULT_SERVERS)]
    servers: String,
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
        /// and stores data, but never votes again. Ignored once the directory is initialised.
        #[arg(long, value_enum)]
        initial_cluster_state: Option<InitialClusterState>,
    },
    /// Start a local cluster on loopback and keep it running until Ctrl-C.
    Cluster {
        #[arg(long, default_value_t = 3)]
        nodes: u16,
        /// Where the nodes keep their data; started again, the cluster finds it there.
        #[arg(long, default_value = "./holdfast-data")]
        dir: PathBuf,
        /// Node n listens on base_port + n - 1.
        #[arg(long, default_value_t = 7301)]
        base_port: u16,
        #[arg(long, default_value_t = 2)]
        broker_groups: u64,
    },
    /// Create, list and describe topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Send messages (the arguments, or one per line of stdin), printing each one's offset.
    Produce {
        topic: String,
        messages: Vec<String>,
        #[command(flatten)]
        servers: Servers,
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
        #[command(flatten)]
        servers: Servers,
    },
    /// Nodes, groups, leaders, terms and commit indexes.
    Status {
        #[command(flatten)]
        servers: Servers,
    },
    /// Measure throughput and latency against a running cluster.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum TopicCommand {
    Create {
        name: String,
        #[arg(long, default_value_t = 4)]
        queues: u32,
        #[command(flatten)]
        servers: Servers,
    },
    List {
        #[command(flatten)]
        servers: Servers,
    },
    Describe {
        name: String,
        #[command(flatten)]
        servers: Servers,
    },
}

fn main() -> ExitCode {
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
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn servers(s: &Servers) -> Result<Vec<SocketAddr>, String> {
    parse_servers(&s.servers).map_err(|e| e.to_string())
}

/// Set by SIGINT or SIGTERM.
fn stop_flag() -> Result<Arc<AtomicBool>, String> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).map_err(|e| e.to_string())?;
    }
    Ok(stop)
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Server {
            config,
            data_dir,
            initial_cluster_state,
        } => {
            let mut config = ServerConfig::from_file(&config).map_err(|e| e.to_string())?;
            if let Some(dir) = data_dir {
                config.data_dir = dir;
            }
            if let Some(state) = initial_cluster_state {
                config.initial_cluster_state = state;
            }
            server::run(config, stop_flag()?).map_err(|e| e.to_string())
        }
        Command::Cluster {
            nodes,
            dir,
            base_port,
            broker_groups,
        } => cluster::run(nodes, &dir, base_port, broker_groups, stop_flag()?),
        Command::Topic { command } => topic(command),
        Command::Produce {
            topic,
            messages,
            servers: s,
        } => produce(servers(&s)?, &topic, messages),
        Command::Consume {
            topic,
            group,
            count,
            timeout,
            servers: s,
        } => {
            let servers = servers(&s)?;
            let mut consumer =
                Consumer::connect(servers.clone(), &group, &topic).map_err(|e| e.to_string())?;
            // Ctrl-C or SIGTERM: stop taking messages, confirm what was printed, and hand the
            // queues over at once (close), rather than leave them to the session timeout.
            consumer.stop_when(stop_flag()?);
            let mut redelivered = 0usize;
            let seen = consumer.run(count, Duration::from_secs(timeout), |d| {
                use std::io::Write as _;
                let line = String::from_utf8_lossy(&d.message.message.body);
                redelivered += usize::from(d.redelivered);
                // Acknowledge only what reached stdout; the rest comes back to the group.
                match writeln!(std::io::stdout(), "{line}") {
                    Ok(()) => ConsumeStatus::Success,
                    Err(_) => ConsumeStatus::ReconsumeLater,
                }
            });
            consumer.close();
            eprintln!(
                "consumed {seen} message(s), {redelivered} of them redelivered (handed to the group before and not acknowledged, or retried after ReconsumeLater)"
            );
            if seen == 0 {
                // Nothing came: say so if it is because the topic does not exist.
                let mut admin = Admin::connect(servers).map_err(|e| e.to_string())?;
                let route = Request::Route {
                    topic: topic.clone(),
                };
                if let Err(ClientError::Refused(reason)) =
                    admin.ask_leader(route, Duration::from_secs(5))
                {
                    return Err(format!("consumed nothing: {reason}"));
                }
            }
            Ok(())
        }
        Command::Status { servers: s } => status(servers(&s)?),
        Command::Bench(args) => bench::run(args),
    }
}

fn topic(command: TopicCommand) -> Result<(), String> {
    let wait = Duration::from_secs(10);
    match command {
        TopicCommand::Create {
            name,
            queues,
            servers: s,
        } => {
            let mut admin = Admin::connect(servers(&s)?).map_err(|e| e.to_string())?;
            let request = Request::CreateTopic {
                topic: name.clone(),
                queues,
            };
            match admin.ask_leader(request, wait) {
                Ok(Response::TopicCreated { .. }) => {
                    out!("created topic {name} with {queues} queues");
                    Ok(())
                }
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(ClientError::Refused(reason)) => Err(format!(
                    "topic {name}: {reason} (does it exist with another queue count?)"
                )),
                Err(e) => Err(e.to_string()),
            }
        }
        TopicCommand::List { servers: s } => {
            let mut admin = Admin::connect(servers(&s)?).map_err(|e| e.to_string())?;
            match admin.ask_leader(Request::Topics, wait) {
                Ok(Response::Topics { topics }) => {
                    for (name, queues) in topics {
                        out!("{name}\t{queues} queues");
                    }
                    Ok(())
                }
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        }
        TopicCommand::Describe { name, servers: s } => {
            let mut admin = Admin::connect(servers(&s)?).map_err(|e| e.to_string())?;
            match admin.ask_leader(Request::Route { topic: name }, wait) {
                Ok(Response::Routes { topic, routes }) => {
                    out!("{topic}");
                    for r in routes {
                        let leader = r.leader.map_or("?".into(), |l| format!("node {l}"));
                        out!("  {}\tgroup {}\tleader {leader}", r.queue, r.group);
                    }
                    Ok(())
                }
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

fn produce(servers: Vec<SocketAddr>, topic: &str, messages: Vec<String>) -> Result<(), String> {
    let mut producer = Producer::connect(servers).map_err(|e| e.to_string())?;
    let mut send = |text: String| -> Result<(), String> {
        let message = Message::with_body(Bytes::from(text));
        let receipt = producer
            .send(topic, vec![message])
            .map_err(|e| e.to_string())?;
        out!("{}@{}", receipt.queue, receipt.offset);
        Ok(())
    };
    if messages.is_empty() {
        for line in std::io::stdin().lock().lines() {
            send(line.map_err(|e| e.to_string())?)?;
        }
    } else {
        for text in messages {
            send(text)?;
        }
    }
    Ok(())
}

fn status(servers: Vec<SocketAddr>) -> Result<(), String> {
    let mut admin = Admin::connect(servers.clone()).map_err(|e| e.to_string())?;
    // Consumer progress as each broker group's leader has applied it: (group, consumer
    // group) -> (messages waiting, queues).
    let mut lag: BTreeMap<(u64, String), (u64, usize)> = BTreeMap::new();
    for (i, addr) in servers.iter().enumerate() {
        let node = i as u64 + 1;
        match admin.ask(node, Request::Status) {
            Some(Response::Status { node, groups }) => {
                out!("node {node} ({addr})");
                for g in groups {
                    let leader = g.leader.map_or("-".into(), |l| l.to_string());
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
                    if g.role == "Leader" {
                        for h in g.holders.iter().filter(|h| !h.queue.is_retry()) {
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
            }
            _ => out!("node {node} ({addr}): no answer"),
        }
    }
    if !lag.is_empty() {
        out!(
            "consumer groups: messages not yet acknowledged, per broker group, on the queues where the group has acknowledged any"
        );
        for ((group, consumers), (waiting, queues)) in lag {
            out!("  {consumers:<20} group {group:<3} lag {waiting:<8} over {queues} queue(s)");
        }
    }
    Ok(())
}
