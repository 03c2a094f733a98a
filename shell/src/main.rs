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
use holdfast_core::broker::Message;
use holdfast_core::node::protocol::{Request, Response};
use holdfast_shell::client::{Admin, ClientConfig, ClientError, ConsumeStatus, Consumer, Producer};
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
    /// The cluster's nodes (client addresses), in node-id order. Default: the client file's,
    /// else the local cluster's (127.0.0.1:7301-7303).
    #[arg(long, env = "HOLDFAST_SERVERS")]
    servers: Option<String>,
    /// A client file (servers, CA certificate, token), as `holdfast cluster` writes. Default:
    /// ./holdfast-data/client.toml if it exists, else plaintext without a credential.
    #[arg(long, env = "HOLDFAST_CLIENT")]
    client_file: Option<PathBuf>,
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

/// How a client command reaches the cluster: the client file's settings (named, or found
/// under ./holdfast-data), with `--servers` over its servers.
fn servers(s: &Servers) -> Result<ClientConfig, String> {
    ClientConfig::resolve(s.servers.as_deref(), s.client_file.as_deref()).map_err(|e| e.to_string())
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
            peer_base_port,
            broker_groups,
            no_auth,
        } => {
            let args = cluster::ClusterArgs {
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
            cluster::run(&args, stop_flag()?)
        }
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
            let mut consumer =
                Consumer::connect(servers(&s)?, &group, &topic).map_err(|e| e.to_string())?;
            let seen = consumer.run(count, Duration::from_secs(timeout), |d| {
                use std::io::Write as _;
                let line = String::from_utf8_lossy(&d.message.message.body);
                // Acknowledge only what reached stdout; the rest comes back to the group.
                match writeln!(std::io::stdout(), "{line}") {
                    Ok(()) => ConsumeStatus::Success,
                    Err(_) => ConsumeStatus::ReconsumeLater,
                }
            });
            let refusal = consumer.refusal().map(str::to_string);
            consumer.close();
            eprintln!("consumed {seen} message(s)");
            match refusal {
                Some(why) => Err(format!("refused: {why}")),
                None => Ok(()),
            }
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
                Ok(Response::TopicCreated { existed: false, .. }) => {
                    out!("created topic {name} with {queues} queues");
                    Ok(())
                }
                Ok(Response::TopicCreated { existed: true, .. }) => {
                    out!("topic {name} already exists with {queues} queues");
                    Ok(())
                }
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(ClientError::Refused(reason)) => Err(format!("topic {name}: {reason}")),
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

fn produce(servers: ClientConfig, topic: &str, messages: Vec<String>) -> Result<(), String> {
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

fn status(config: ClientConfig) -> Result<(), String> {
    let servers = config.servers.clone();
    let mut admin = Admin::connect(config).map_err(|e| e.to_string())?;
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
                        for c in g.consumers {
                            let entry = lag.entry((g.group, c.group)).or_default();
                            entry.0 += c.queue_len.saturating_sub(c.consume_offset);
                            entry.1 += 1;
                        }
                    }
                }
            }
            _ => match admin.refusal() {
                Some(why) => return Err(format!("refused: {why}")),
                None => out!("node {node} ({addr}): no answer"),
            },
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
