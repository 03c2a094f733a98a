//! `holdfast-sim`: run many seeds, replay one, replay the regression list, list the canaries.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant as WallClock;

use clap::{Parser, Subcommand};
use holdfast_core::raft::Canary;
use holdfast_sim::report::SummaryFile;
use holdfast_sim::runner::{Summary, explore_start, first_failure, run_each, run_one, run_seeds};
use holdfast_sim::swarm::{FaultMix, Mix};
use holdfast_sim::{CANARIES_BUILT, Options, Workload};
use indicatif::{ProgressBar, ProgressStyle};

/// See sim/Cargo.toml: the simulator's time went a fifth to malloc and free.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "holdfast-sim",
    version,
    about = "Deterministic simulation of holdfast's Raft core under faults"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum WorkloadArg {
    /// Producers and two consumer groups on a topic over whole broker nodes.
    Queue,
    /// Clients proposing raw batches straight to Raft replicas.
    Raft,
}

#[derive(clap::Args, Clone)]
struct Cluster {
    /// What the clients do.
    #[arg(long, value_enum, default_value = "queue")]
    workload: WorkloadArg,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3, value_parser = parse_nodes)]
    nodes: usize,
    /// Raft groups, each with a replica on every node (queue workload: broker groups, at
    /// least 2, plus the metadata group).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    groups: u64,
    /// Plant a bug (see `holdfast-sim canaries`); needs a build with `--features canaries`.
    #[arg(long, value_name = "NAME")]
    canary: Option<String>,
    /// Simulated milliseconds of the fault phase.
    #[arg(long, default_value_t = 10_000)]
    fault_phase_ms: u64,
    /// Simulated milliseconds allowed to converge after healing.
    #[arg(long, default_value_t = 20_000)]
    liveness_limit_ms: u64,
    /// Hex bytes that choose the fault schedule instead of the seed (what the `sim_schedule`
    /// fuzz target prints when it finds a failure).
    #[arg(long, value_name = "HEX")]
    fault_script: Option<String>,
    /// Pin the fault mix instead of drawing it from the seed: `kind=weight,...` (kinds left
    /// out are off; `replay` prints a seed's mix), or `fixed` for the one blend every seed
    /// explored before swarm testing (runs replay as they did then).
    #[arg(long, value_name = "MIX")]
    faults: Option<String>,
    /// Apply only these faults, by number in the run (`replay --trace` shows `FAULT #n`); the
    /// others are drawn but left out (`none`: no fault at all). What `shrink` prints.
    #[arg(long, value_name = "N,N,...", value_parser = parse_fault_numbers)]
    only_faults: Option<FaultNumbers>,
}

/// Fault numbers, as `--only-faults` takes them.
#[derive(Clone, Debug)]
struct FaultNumbers(Vec<u64>);

fn parse_fault_numbers(text: &str) -> Result<FaultNumbers, String> {
    if text == "none" {
        return Ok(FaultNumbers(Vec::new()));
    }
    text.split(',')
        .map(|n| {
            n.trim()
                .parse()
                .map_err(|_| format!("{n:?} is not a fault number"))
        })
        .collect::<Result<_, _>>()
        .map(FaultNumbers)
}

impl std::fmt::Display for FaultNumbers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return write!(f, "none");
        }
        let numbers: Vec<String> = self.0.iter().map(u64::to_string).collect();
        write!(f, "{}", numbers.join(","))
    }
}

fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err("an even number of hex digits".into());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| format!("not hex at position {i}"))
        })
        .collect()
}

#[derive(Subcommand)]
enum Command {
    /// Run many seeds on every core and summarise; exit 1 if any seed fails.
    Run {
        /// How many seeds to run.
        #[arg(long)]
        seeds: u64,
        /// The first seed.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Start instead at a seed derived from TEXT (CI passes the commit hash and the date):
        /// a window of seeds no fixed range and, almost surely, no earlier window has tried.
        #[arg(long, value_name = "TEXT", conflicts_with = "from")]
        explore: Option<String>,
        /// Run only slice K of N (K from 0) of those seeds: N shards, each on its own
        /// machine (a Kubernetes indexed Job, GNU parallel), cover them exactly once.
        #[arg(long, value_name = "K/N", value_parser = parse_shard)]
        shard: Option<(u64, u64)>,
        /// Worker threads (default: every core).
        #[arg(long)]
        jobs: Option<usize>,
        /// Also write what the run found as JSON (seeds, failures with replay lines, faults,
        /// coverage, simulated and wall time), for `merge`.
        #[arg(long, value_name = "FILE")]
        summary_json: Option<PathBuf>,
        /// Fail (exit 1) if a fault kind or protocol path of the workload was never reached.
        #[arg(long)]
        require_coverage: bool,
        #[command(flatten)]
        cluster: Cluster,
    },
    /// Combine the `--summary-json` files of a campaign's shards (same shape, disjoint seeds)
    /// and print what the whole campaign found; exit 1 if any seed failed.
    Merge {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Write the combined summary as JSON too.
        #[arg(long, value_name = "FILE")]
        summary_json: Option<PathBuf>,
        /// Fail (exit 1) if a fault kind or protocol path was never reached in any shard.
        #[arg(long)]
        require_coverage: bool,
    },
    /// Re-run one seed and print what happened; the last line is the run's trace hash.
    Replay {
        seed: u64,
        /// Print every event.
        #[arg(long)]
        trace: bool,
        /// Also draw the run as an HTML page: nodes as lanes, leaders and terms, faults, the
        /// first violation.
        #[arg(long, value_name = "FILE")]
        timeline: Option<PathBuf>,
        #[command(flatten)]
        cluster: Cluster,
    },
    /// Replay every seed of a regression list (each line: `replay` arguments, then `# why`);
    /// exit 1 if any fails.
    Regress {
        /// The list.
        #[arg(default_value = "sim/regressions.txt")]
        file: PathBuf,
        /// Worker threads (default: every core).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// List the planted bugs, one a line; with `--seeds N` (a build with canaries), find the
    /// first seed of each workload's default run that catches each one and print a markdown
    /// table (what the README shows); exit 1 if a canary escapes the default workload.
    Canaries {
        /// Look for the first catching seed among seeds 0..N.
        #[arg(long)]
        seeds: Option<u64>,
        /// Only these canaries (default: all).
        #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
        only: Vec<String>,
        /// Worker threads (default: every core).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// Reduce a failing seed's faults, by delta debugging, to a few that still make it fail
    /// with the same checker, then shorten its fault phase; print the replay line.
    Shrink {
        seed: u64,
        /// Worker threads (default: every core).
        #[arg(long)]
        jobs: Option<usize>,
        #[command(flatten)]
        cluster: Cluster,
    },
}

fn parse_shard(text: &str) -> Result<(u64, u64), String> {
    holdfast_sim::report::parse_shard(text)
}

fn parse_nodes(value: &str) -> Result<usize, String> {
    match value {
        "3" => Ok(3),
        "5" => Ok(5),
        _ => Err("a cluster has 3 or 5 nodes".into()),
    }
}

fn options(cluster: &Cluster, seed: u64) -> Result<Options, String> {
    let canary = match &cluster.canary {
        None => None,
        Some(name) => {
            let canary = Canary::from_name(name).ok_or_else(|| {
                format!("unknown canary {name:?}; `holdfast-sim canaries` lists them")
            })?;
            if !CANARIES_BUILT {
                return Err(format!(
                    "canary {name:?} needs a build with canaries: \
                     cargo run -p holdfast-sim --release --features canaries -- ..."
                ));
            }
            Some(canary)
        }
    };
    let mut options = Options::new(seed);
    options.workload = match cluster.workload {
        WorkloadArg::Queue => Workload::Queue,
        WorkloadArg::Raft => Workload::Raft,
    };
    options.nodes = cluster.nodes;
    options.groups = cluster.groups as usize;
    options.canary = canary;
    options.fault_phase_ms = cluster.fault_phase_ms;
    options.liveness_limit_ms = cluster.liveness_limit_ms;
    options.fault_script = match &cluster.fault_script {
        Some(hex) => Some(parse_hex(hex).map_err(|e| format!("--fault-script: {e}"))?),
        None => None,
    };
    if let Some(text) = &cluster.faults {
        let mix = Mix::parse(text).map_err(|e| format!("--faults: {e}"))?;
        options.faults = FaultMix::Pinned(mix);
    }
    options.only_faults = cluster
        .only_faults
        .as_ref()
        .map(|only| only.0.iter().copied().collect());
    Ok(options)
}

fn main() -> ExitCode {
    // A researcher pipes a trace into `head` or `less`: a closed pipe ends the run quietly, as
    // for any Unix tool, instead of a panic in `println!`.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A seed's memory comes and goes (mimalloc returns freed pages to the kernel); backed by
    // transparent huge pages, every page taken back is a 2 MB page the kernel zeroes first:
    // a tenth of a queue run's CPU time was the kernel clearing pages. Small pages only.
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE reads its integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Canaries { seeds: None, .. } => {
            for canary in Canary::ALL {
                println!("{}", canary.name());
            }
            Ok(true)
        }
        Command::Canaries {
            seeds: Some(seeds),
            only,
            jobs,
        } => canary_table(seeds, &only, jobs_or_cores(jobs)),
        Command::Run {
            seeds,
            from,
            explore,
            shard,
            jobs,
            summary_json,
            require_coverage,
            cluster,
        } => {
            let from = match &explore {
                Some(text) => explore_start(text),
                None => from,
            };
            if let Some(text) = &explore {
                println!(
                    "exploring seeds {from}..{} (derived from {text:?})",
                    from + seeds
                );
            }
            let range = match shard {
                Some((k, n)) => holdfast_sim::report::shard(from, seeds, k, n),
                None => from..from + seeds,
            };
            if let Some((k, n)) = shard {
                println!(
                    "shard {k}/{n} of seeds {from}..{}: seeds {}..{}",
                    from + seeds,
                    range.start,
                    range.end
                );
            }
            options(&cluster, range.start).and_then(|o| {
                let (passed, summary) = run(&o, &cluster, range.end - range.start, jobs);
                let covered = report_coverage(require_coverage, &summary.never_reached);
                if let Some(path) = &summary_json {
                    write_json(path, &summary)?;
                }
                Ok(passed && covered)
            })
        }
        Command::Merge {
            files,
            summary_json,
            require_coverage,
        } => merge(&files, summary_json.as_deref(), require_coverage),
        Command::Regress { file, jobs } => regress(&file, jobs),
        Command::Shrink {
            seed,
            jobs,
            cluster,
        } => shrink(seed, &cluster, jobs_or_cores(jobs)),
        Command::Replay {
            seed,
            trace,
            timeline,
            cluster,
        } => options(&cluster, seed).and_then(|mut o| {
            o.trace = trace || timeline.is_some();
            replay(&o, trace, timeline.as_deref(), &replay_args(seed, &cluster))
        }),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

/// CPU seconds (user and system) this process has used so far; 0 where unknown.
fn cpu_seconds() -> f64 {
    #[cfg(unix)]
    {
        // SAFETY: getrusage writes only the struct it is handed.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
            let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            return seconds(usage.ru_utime) + seconds(usage.ru_stime);
        }
    }
    0.0
}

fn jobs_or_cores(jobs: Option<usize>) -> usize {
    jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The arguments of `holdfast-sim replay` that rerun `seed` as `cluster` ran it, every option
/// spelled out, so that the line still means the same run if a default changes: what a failure
/// prints, and what a line of the regression list holds.
fn replay_args(seed: u64, cluster: &Cluster) -> String {
    format!("{seed} {}", shape_args(cluster))
}

/// The arguments of `replay` after the seed: the run's shape, which every seed of a batch
/// shares.
fn shape_args(cluster: &Cluster) -> String {
    let workload = match cluster.workload {
        WorkloadArg::Queue => "queue",
        WorkloadArg::Raft => "raft",
    };
    let mut args = format!(
        "--workload {workload} --nodes {} --groups {} --fault-phase-ms {} \
         --liveness-limit-ms {}",
        cluster.nodes, cluster.groups, cluster.fault_phase_ms, cluster.liveness_limit_ms
    );
    if let Some(name) = &cluster.canary {
        args.push_str(&format!(" --canary {name}"));
    }
    if let Some(hex) = &cluster.fault_script {
        args.push_str(&format!(" --fault-script {hex}"));
    }
    if let Some(mix) = &cluster.faults {
        args.push_str(&format!(" --faults {mix}"));
    }
    if let Some(only) = &cluster.only_faults {
        args.push_str(&format!(" --only-faults {only}"));
    }
    args
}

/// Says what `--require-coverage` found; false if it asked for coverage that is missing.
fn report_coverage(require: bool, never: &[String]) -> bool {
    if !require {
        return true;
    }
    if never.is_empty() {
        println!("--require-coverage: every fault kind and protocol path reached");
        return true;
    }
    println!(
        "--require-coverage: FAILED: never reached: {}",
        never.join(" ")
    );
    false
}

fn write_json(path: &Path, summary: &SummaryFile) -> Result<(), String> {
    let text = serde_json::to_string_pretty(summary).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    println!("summary written to {}", path.display());
    Ok(())
}

fn merge(files: &[PathBuf], out: Option<&Path>, require_coverage: bool) -> Result<bool, String> {
    let summaries = files
        .iter()
        .map(|path| {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            serde_json::from_str::<SummaryFile>(&text)
                .map_err(|e| format!("{}: not a summary: {e}", path.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let merged = SummaryFile::merge(&summaries)?;
    println!("merged {} summaries", files.len());
    println!("{merged}");
    if let Some(path) = out {
        write_json(path, &merged)?;
    }
    let covered = report_coverage(require_coverage, &merged.never_reached);
    Ok(merged.failed == 0 && covered)
}

/// Runs `seeds` seeds from `options.seed` and prints the summary; true if every seed passed.
fn run(
    options: &Options,
    cluster: &Cluster,
    seeds: u64,
    jobs: Option<usize>,
) -> (bool, SummaryFile) {
    let jobs = jobs_or_cores(jobs);
    println!(
        "holdfast-sim: {:?} workload, seeds {}..{} nodes={} groups={} canary={} jobs={jobs}",
        options.workload,
        options.seed,
        options.seed + seeds,
        options.nodes,
        options.groups,
        cluster.canary.as_deref().unwrap_or("none"),
    );
    let bar = ProgressBar::new(seeds);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} seeds, {msg} ({eta} left)",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message("0 failed");
    let failed = std::sync::atomic::AtomicU64::new(0);
    let cpu_before = cpu_seconds();
    let started = WallClock::now();
    let outcomes = run_seeds(options, options.seed, seeds, jobs, &|outcome| {
        if !outcome.passed() {
            let n = failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            bar.set_message(format!("{n} failed"));
        }
        bar.inc(1);
    });
    bar.finish();
    let summary = Summary::new(options.workload, &outcomes, started.elapsed());
    let cpu = cpu_seconds() - cpu_before;
    println!("{summary}");
    let wall = summary.wall.as_secs_f64().max(1e-9);
    let simulated = summary.stats.simulated_us as f64 / 1e6;
    println!(
        "{:.1} seeds per wall s; {:.0} simulated s per wall s per core ({jobs} jobs)",
        outcomes.len() as f64 / wall,
        simulated / wall / jobs as f64
    );
    if cpu > 0.0 {
        // What a shared machine's wall clock hides: the CPU time the seeds took.
        println!(
            "{cpu:.1} CPU s: {:.1} seeds per CPU s; {:.0} simulated s per CPU s",
            outcomes.len() as f64 / cpu,
            simulated / cpu
        );
    }
    if let Some((seed, _)) = summary.failed.first() {
        let args = replay_args(*seed, cluster);
        println!("replay the first failure: holdfast-sim replay {args} --trace");
        // Every failure, as a line to add to the regression list (sim/regressions.txt).
        for (seed, violation) in summary.failed.iter().take(20) {
            let detail: String = violation.detail.chars().take(100).collect();
            println!(
                "regression: {} # {}: {detail}",
                replay_args(*seed, cluster),
                violation.checker
            );
        }
    }
    let mut file = SummaryFile::new(
        &summary,
        shape_args(cluster),
        options.seed..options.seed + seeds,
        jobs,
        &|seed| replay_args(seed, cluster),
    );
    file.cpu_s = cpu;
    (summary.failed.is_empty(), file)
}

/// One line of a regression list: where it is, its `replay` arguments and why it is there.
struct Regression {
    line: usize,
    args: String,
    why: String,
    options: Options,
    /// An open failure (`# OPEN checker: ...`): the seed must still fail, with this checker,
    /// until a fix makes it pass and the line drops its `OPEN`.
    open: Option<String>,
}

/// Reads a regression list: blank lines and lines starting with `#` are skipped; every other
/// line is the arguments of `holdfast-sim replay` (seed first), then `#` and why the seed is
/// kept. A why that starts with `OPEN checker:` marks a failure not fixed yet: it must go on
/// failing with that checker (so CI stays green while it is tracked, and turns red once it
/// passes, to have the `OPEN` dropped). A line that does not parse, says no why, or plants a
/// canary is refused with its line number.
fn read_regressions(path: &Path) -> Result<Vec<Regression>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut regressions = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = format!("{}:{}", path.display(), n + 1);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((args, why)) = line
            .split_once('#')
            .filter(|(_, why)| !why.trim().is_empty())
        else {
            return Err(format!("{at}: say why the seed is kept, after a `#`"));
        };
        let words = ["holdfast-sim", "replay"]
            .into_iter()
            .chain(args.split_whitespace());
        let cli = Cli::try_parse_from(words).map_err(|e| {
            let first = e.to_string().lines().next().unwrap_or_default().to_string();
            format!("{at}: {first}")
        })?;
        let Command::Replay { seed, cluster, .. } = cli.command else {
            return Err(format!("{at}: not the arguments of `replay`"));
        };
        if cluster.canary.is_some() {
            return Err(format!(
                "{at}: a regression seed must pass; planted bugs belong in the canary tests"
            ));
        }
        let why = why.trim();
        let open = match why.strip_prefix("OPEN") {
            None => None,
            Some(rest) => {
                let checker = rest.split_once(':').map(|(c, _)| c.trim());
                match checker.filter(|c| !c.is_empty() && !c.contains(' ')) {
                    Some(checker) => Some(checker.to_string()),
                    None => {
                        return Err(format!(
                            "{at}: an open failure says which checker fails: `# OPEN checker: why`"
                        ));
                    }
                }
            }
        };
        regressions.push(Regression {
            line: n + 1,
            args: args.trim().to_string(),
            why: why.to_string(),
            open,
            options: options(&cluster, seed).map_err(|e| format!("{at}: {e}"))?,
        });
    }
    if regressions.is_empty() {
        return Err(format!("{}: no seeds in the list", path.display()));
    }
    Ok(regressions)
}

fn regress(path: &Path, jobs: Option<usize>) -> Result<bool, String> {
    let regressions = read_regressions(path)?;
    let jobs = jobs_or_cores(jobs);
    println!(
        "holdfast-sim: {} regression seeds from {} jobs={jobs}",
        regressions.len(),
        path.display()
    );
    let started = WallClock::now();
    let runs: Vec<Options> = regressions.iter().map(|r| r.options.clone()).collect();
    let outcomes = run_each(&runs, jobs);
    let (mut failed, mut open) = (0, 0);
    for (regression, outcome) in regressions.iter().zip(&outcomes) {
        let (args, line, why) = (&regression.args, regression.line, &regression.why);
        match (&outcome.violation, &regression.open) {
            (None, None) => println!("ok    {args}  ({why})"),
            (Some((_, v)), Some(checker)) if v.checker == checker => {
                open += 1;
                println!("open  {args}  (still fails, line {line}: {why})");
            }
            (None, Some(_)) => {
                failed += 1;
                println!(
                    "FAIL  {args}  (line {line}: {why})\n      it passes now: if a fix made it \
                     pass, drop the `OPEN` from line {line}"
                );
            }
            (Some((at, v)), _) => {
                failed += 1;
                println!(
                    "FAIL  {args}  (line {line}: {why})\n      at {at}: {}: {}\n      replay: \
                     holdfast-sim replay {args} --trace",
                    v.checker, v.detail
                );
            }
        }
    }
    println!(
        "regressions passed: {}, open (failing as recorded): {open}, failed: {failed} ({:.1} s \
         wall)",
        outcomes.len() - failed - open,
        started.elapsed().as_secs_f64()
    );
    Ok(failed == 0)
}

fn replay(
    options: &Options,
    print_trace: bool,
    timeline: Option<&Path>,
    args: &str,
) -> Result<bool, String> {
    let outcome = run_one(options);
    if print_trace {
        for line in &outcome.trace {
            println!("{line}");
        }
    }
    if let Some(path) = timeline {
        let page =
            holdfast_sim::timeline::render(&outcome.trace, &format!("holdfast-sim replay {args}"));
        std::fs::write(path, page).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("timeline written to {}", path.display());
    }
    let s = &outcome.stats;
    match &outcome.violation {
        None => println!("seed {} passed", outcome.seed),
        Some((at, v)) => println!(
            "seed {} FAILED at {at}: {}: {}",
            outcome.seed, v.checker, v.detail
        ),
    }
    println!(
        "simulated {:.3} s, {} events, {} elections, {} entries committed, faults {:?}",
        s.simulated_us as f64 / 1e6,
        s.events,
        s.elections,
        s.entries_committed,
        s.faults
    );
    println!(
        "snapshots: {} taken, {} installed, {} chunks sent",
        s.snapshots_taken, s.snapshots_installed, s.snapshot_chunks
    );
    match options.workload {
        Workload::Raft => println!(
            "proposals: {} acked, {} dropped, {} indeterminate",
            s.proposals_acked, s.proposals_dropped, s.proposals_indeterminate
        ),
        Workload::Queue => println!(
            "messages: {} acked, {} failed, {} ambiguous; {} deliveries, {} redeliveries, {} dead-lettered",
            s.messages_acked,
            s.messages_failed,
            s.messages_ambiguous,
            s.deliveries,
            s.redeliveries,
            s.dead_lettered
        ),
    }
    let swarm = options.swarm();
    println!(
        "fault mix: {} (pipeline {}, append_entries_max {:?}, retention {})",
        swarm.mix, swarm.pipeline, swarm.append_entries_max, swarm.retention
    );
    println!("trace_hash={:016x}", outcome.trace_hash);
    Ok(outcome.passed())
}

/// For every canary and workload, the first seed of the default run (`run --canary NAME`)
/// that catches it, as a markdown table. True if the default (queue) workload catches every
/// canary.
fn canary_table(seeds: u64, only: &[String], jobs: usize) -> Result<bool, String> {
    let canaries: Vec<Canary> = if only.is_empty() {
        Canary::ALL.to_vec()
    } else {
        only.iter()
            .map(|name| {
                Canary::from_name(name).ok_or_else(|| {
                    format!("unknown canary {name:?}; `holdfast-sim canaries` lists them")
                })
            })
            .collect::<Result<_, _>>()?
    };
    let started = WallClock::now();
    println!(
        "First seed (of 0..{seeds}) whose default run catches each canary, and the checker \
         that does (`holdfast-sim canaries --seeds {seeds}`):\n"
    );
    println!("| canary | queue workload | raft workload |");
    println!("|---|---|---|");
    let mut escaped = Vec::new();
    for canary in canaries {
        let mut cells = Vec::new();
        for workload in ["queue", "raft"] {
            let words = [
                "holdfast-sim",
                "replay",
                "0",
                "--workload",
                workload,
                "--canary",
                canary.name(),
            ];
            let cli = Cli::try_parse_from(words).map_err(|e| e.to_string())?;
            let Command::Replay { cluster, .. } = cli.command else {
                return Err("not a replay".into());
            };
            let template = options(&cluster, 0)?;
            let cell = match first_failure(&template, 0, seeds, jobs) {
                Some((seed, v)) => format!("{seed} ({})", v.checker),
                None => {
                    if workload == "queue" {
                        escaped.push(canary.name());
                    }
                    format!("not in {seeds}")
                }
            };
            cells.push(cell);
        }
        println!("| `{}` | {} | {} |", canary.name(), cells[0], cells[1]);
    }
    println!(
        "\nThe raft workload drives bare Raft replicas: a canary planted in the broker, the \
         node or the client library is out of its reach, so `not in {seeds}` is expected there."
    );
    if escaped.is_empty() {
        println!("The default (queue) workload catches every canary within {seeds} seeds.");
    } else {
        println!(
            "The default (queue) workload misses within {seeds} seeds: {}",
            escaped.join(" ")
        );
    }
    eprintln!("({:.0} s wall)", started.elapsed().as_secs_f64());
    Ok(escaped.is_empty())
}

/// The checker `cluster` fails `seed` with, if it fails; and how many faults it drew.
fn checker_of(seed: u64, cluster: &Cluster) -> Result<(Option<&'static str>, u64), String> {
    let outcome = run_one(&options(cluster, seed)?);
    let checker = outcome.violation.map(|(_, v)| v.checker);
    Ok((checker, outcome.stats.faults_drawn))
}

/// Delta debugging (Zeller's ddmin) over the faults a failing run applies: keep a subset that
/// still fails with the same checker and from which no chunk can be dropped. Candidates of one
/// round run in parallel; the first failing one in order is kept, so the result is the same
/// however many jobs ran.
fn shrink(seed: u64, cluster: &Cluster, jobs: usize) -> Result<bool, String> {
    let (Some(checker), drawn) = checker_of(seed, cluster)? else {
        println!("seed {seed} passes: nothing to shrink");
        return Ok(false);
    };
    let mut keep: Vec<u64> = match &cluster.only_faults {
        Some(only) => only.0.clone(),
        None => (0..drawn).collect(),
    };
    let before = keep.len();
    println!("seed {seed} fails with {checker} after {drawn} faults; shrinking {before} of them");
    let with_faults = |keep: &[u64]| {
        let mut c = cluster.clone();
        c.only_faults = Some(FaultNumbers(keep.to_vec()));
        c
    };
    let fails = |candidates: &[Cluster]| -> Result<Option<usize>, String> {
        let runs = candidates
            .iter()
            .map(|c| options(c, seed))
            .collect::<Result<Vec<_>, _>>()?;
        let outcomes = run_each(&runs, jobs);
        Ok(outcomes.iter().position(|o| {
            o.violation
                .as_ref()
                .is_some_and(|(_, v)| v.checker == checker)
        }))
    };
    let mut chunks = 2;
    while keep.len() >= 2 {
        let size = keep.len().div_ceil(chunks);
        let parts: Vec<Vec<u64>> = keep.chunks(size).map(<[u64]>::to_vec).collect();
        let mut candidates: Vec<Vec<u64>> = parts.clone();
        for i in 0..parts.len() {
            let rest: Vec<u64> = (0..parts.len())
                .filter(|j| *j != i)
                .flat_map(|j| parts[j].iter().copied())
                .collect();
            candidates.push(rest);
        }
        let clusters: Vec<Cluster> = candidates.iter().map(|k| with_faults(k)).collect();
        match fails(&clusters)? {
            Some(i) if i < parts.len() => {
                keep = candidates[i].clone();
                chunks = 2;
            }
            Some(i) => {
                keep = candidates[i].clone();
                chunks = (chunks - 1).max(2);
            }
            None if chunks >= keep.len() => break,
            None => chunks = (chunks * 2).min(keep.len()),
        }
        println!("  {} faults still fail with {checker}", keep.len());
    }
    if keep.len() == 1 && fails(&[with_faults(&[])])?.is_some() {
        keep.clear();
    }
    // Then the fault phase: the shortest of a few that still fails.
    let mut shrunk = with_faults(&keep);
    let phases: Vec<u64> = [8, 4, 2]
        .iter()
        .map(|d| cluster.fault_phase_ms / d)
        .filter(|ms| *ms >= 500)
        .collect();
    let candidates: Vec<Cluster> = phases
        .iter()
        .map(|ms| {
            let mut c = shrunk.clone();
            c.fault_phase_ms = *ms;
            c
        })
        .collect();
    if let Some(i) = fails(&candidates)? {
        shrunk = candidates[i].clone();
        // Faults past the shorter phase are never drawn: leave them out of the line.
        let (_, drawn) = checker_of(seed, &shrunk)?;
        keep.retain(|n| *n < drawn);
        shrunk.only_faults = Some(FaultNumbers(keep.clone()));
    }
    println!(
        "shrunk from {before} faults to {} and a {} ms fault phase, failing with {checker}:",
        keep.len(),
        shrunk.fault_phase_ms
    );
    println!("holdfast-sim replay {} --trace", replay_args(seed, &shrunk));
    Ok(true)
}
