//! The `sim_schedule` target: whole simulated clusters with fuzzer-chosen parameters.
//!
//! The fuzzer picks what `holdfast_sim::Options` lets a caller pick: the seed (which decides
//! every fault, delay and client action), the workload, 3 or 5 nodes, the number of groups
//! and the length of the fault phase. Runs are kept short (a fault phase of 0.5 to 1.5
//! simulated seconds, then the usual liveness phase, which ends as soon as the cluster has
//! converged) so the fuzzer gets many runs a second; the queue workload's producers start
//! sending about half a second in. Every checker of the simulator runs; a
//! violation panics with the options and the command that replays the run.
//!
//! The bytes after those choose the fault schedule itself (`Options::fault_script`): each
//! fault's kind, target, parameters and the gap before the next are read from them in turn, so
//! a mutation of one byte changes one decision; when they run out the seed takes over.

use std::cell::RefCell;
use std::sync::Once;

use arbitrary::{Arbitrary, Unstructured};
use holdfast_sim::{Options, Workload};

/// The cluster's shape comes first, so that even the shortest inputs choose it; the rest of the
/// input is the fault script.
#[derive(Arbitrary, Debug)]
struct Input {
    raft: bool,
    five_nodes: bool,
    /// Raft workload: `% 3 + 1` groups; queue workload: `% 2 + 2` broker groups.
    groups: u8,
    /// `500 + (x % 11) * 100` simulated milliseconds of faults.
    fault_phase: u8,
    /// `% 16 == 0`: run twice and compare the trace hashes (a run must be deterministic).
    twice: u8,
    seed: u64,
    script: Vec<u8>,
}

impl Input {
    fn options(&self) -> Options {
        let mut options = Options::new(self.seed);
        (options.workload, options.groups) = if self.raft {
            (Workload::Raft, usize::from(self.groups % 3) + 1)
        } else {
            (Workload::Queue, usize::from(self.groups % 2) + 2)
        };
        options.nodes = if self.five_nodes { 5 } else { 3 };
        options.fault_phase_ms = 500 + u64::from(self.fault_phase % 11) * 100;
        options.fault_script = (!self.script.is_empty()).then(|| self.script.clone());
        options
    }
}

/// The command that replays a run of `options`, with its trace.
pub fn replay_command(options: &Options) -> String {
    let workload = match options.workload {
        Workload::Queue => "queue",
        Workload::Raft => "raft",
    };
    let script = options
        .fault_script
        .as_ref()
        .map_or(String::new(), |bytes| {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!(" --fault-script {hex}")
        });
    format!(
        "cargo run -p holdfast-sim --release -- replay {} --workload {workload} --nodes {} \
         --groups {} --fault-phase-ms {} --liveness-limit-ms {}{script} --trace",
        options.seed,
        options.nodes,
        options.groups,
        options.fault_phase_ms,
        options.liveness_limit_ms
    )
}

thread_local! {
    /// The run in progress on this thread, for the panic hook.
    static RUNNING: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A panic inside the simulator or the core (rather than a checker's violation) still names
/// the run: the hook prints it, then hands over to the hook before it (libFuzzer's aborts).
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // `try_with`: the thread may be tearing down its locals.
            let _ = RUNNING.try_with(|running| {
                if let Ok(running) = running.try_borrow()
                    && let Some(replay) = running.as_ref()
                {
                    eprintln!(
                        "sim_schedule: the simulated run that panicked replays with\n  {replay}"
                    );
                }
            });
            previous(info);
        }));
    });
}

/// What one run reached; used by the corpus test to show the corpus is not trivial.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    pub runs: usize,
    pub faults: u64,
    pub elections: u64,
    pub entries_committed: u64,
    pub messages_acked: u64,
    pub simulated_ms: u64,
}

/// Runs the simulator with options decoded from `data`; panics on any violation, naming the
/// options and the replay command.
pub fn run_sim_schedule(data: &[u8]) -> SimStats {
    let u = Unstructured::new(data);
    let Ok(input) = Input::arbitrary_take_rest(u) else {
        return SimStats::default();
    };
    let options = input.options();
    let replay = replay_command(&options);
    install_panic_hook();
    RUNNING.with(|running| *running.borrow_mut() = Some(replay.clone()));
    let outcome = holdfast_sim::run(&options);
    let again = (input.twice % 16 == 0).then(|| holdfast_sim::run(&options).trace_hash);
    RUNNING.with(|running| *running.borrow_mut() = None);

    if let Some((at, violation)) = &outcome.violation {
        panic!(
            "sim_schedule: checker {} failed at {:?} simulated: {}\n  options: {options:?}\n  \
             replay: {replay}",
            violation.checker, at, violation.detail
        );
    }
    if let Some(hash) = again {
        assert_eq!(
            hash, outcome.trace_hash,
            "sim_schedule: the same options ran differently twice\n  options: {options:?}\n  \
             replay: {replay}"
        );
    }
    let stats = &outcome.stats;
    SimStats {
        runs: 1,
        faults: stats.faults.values().sum(),
        elections: stats.elections,
        entries_committed: stats.entries_committed,
        messages_acked: stats.messages_acked + stats.proposals_acked,
        simulated_ms: stats.simulated_us / 1_000,
    }
}

/// The `sim_schedule` fuzz target: see [`run_sim_schedule`].
pub fn sim_schedule(data: &[u8]) {
    run_sim_schedule(data);
}
