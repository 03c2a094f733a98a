//! Which fault comes next. Network faults apply to the network at once; faults of one node
//! come back to the world that owns the node.

use std::time::Duration;

use holdfast_core::raft::NodeId;
use rand::{Rng, RngExt, SeedableRng, TryRng};
use rand_chacha::ChaCha8Rng;

use crate::disk::Corruption;
use crate::network::Network;
use crate::swarm::Mix;

pub enum NodeFault {
    Crash(NodeId),
    Pause(NodeId, Duration),
    /// Pause these nodes until the same instant.
    PauseTogether(Vec<NodeId>, Duration),
    /// Slow the node's fsyncs down, or back to normal if they are slow.
    ToggleSlowDisk(NodeId),
    /// Damage synced bytes of one replica's log on the node (the world picks the group, and
    /// only where the group keeps a majority of undamaged replicas); `crash` says whether the
    /// node then crashes, so a restart reads the damage soon.
    Corrupt {
        node: NodeId,
        corruption: Corruption,
        crash: bool,
    },
    /// The node's next fsync fails (an I/O error, or the disk is full): the node must stop,
    /// and does, as a crash. Never reported as synced.
    FailSync(NodeId),
    /// The node crashes and every file of every replica on it is gone.
    Wipe(NodeId),
    /// A consumer process dies (the queue workload picks which).
    ConsumerCrash,
    /// Cut off the leader of a group (the world picks the group), as `isolate` cuts off a node.
    IsolateLeader,
}

/// Draws one fault over `nodes`, by the weights of `mix`; returns its kind for the summary.
/// (The fixed mix draws exactly what the fixed ranges of earlier versions drew.)
pub fn draw<R: Rng>(
    rng: &mut R,
    network: &mut Network,
    nodes: &[NodeId],
    mix: &Mix,
) -> (&'static str, Option<NodeFault>) {
    let pick = |rng: &mut R| nodes[rng.random_range(0..nodes.len())];
    let kind = mix.kind_at(rng.random_range(0..mix.total()));
    match kind {
        "isolate" => {
            let node = pick(rng);
            network.split(&[node], nodes);
            ("isolate", None)
        }
        "partition" => {
            let minority = rng.random_range(1..=(nodes.len() - 1) / 2);
            let mut side = nodes.to_vec();
            for i in 0..side.len() {
                let j = rng.random_range(i..side.len());
                side.swap(i, j);
            }
            side.truncate(minority);
            network.split(&side, nodes);
            ("partition", None)
        }
        "one-way" => {
            let node = pick(rng);
            let outbound = rng.random_bool(0.5);
            network.one_way(node, nodes, outbound);
            ("one-way", None)
        }
        "heal-partition" => {
            network.blocked.clear();
            ("heal-partition", None)
        }
        "crash" => ("crash", Some(NodeFault::Crash(pick(rng)))),
        "pause" => {
            let node = pick(rng);
            let pause = Duration::from_millis(rng.random_range(10..1_500));
            ("pause", Some(NodeFault::Pause(node, pause)))
        }
        "lossy-network" => {
            network.loss_ppm = rng.random_range(10_000..300_000);
            network.duplicate_ppm = rng.random_range(0..100_000);
            ("lossy-network", None)
        }
        "slow-network" => {
            network.delay_min_us = 1_000;
            network.delay_max_us = rng.random_range(10_000..200_000);
            ("slow-network", None)
        }
        "calm-network" => {
            let blocked = std::mem::take(&mut network.blocked);
            network.heal();
            network.blocked = blocked;
            ("calm-network", None)
        }
        "slow-disk" => ("slow-disk", Some(NodeFault::ToggleSlowDisk(pick(rng)))),
        "bit-flip" => {
            let fault = NodeFault::Corrupt {
                node: pick(rng),
                corruption: Corruption::BitFlip,
                crash: rng.random_bool(0.5),
            };
            ("bit-flip", Some(fault))
        }
        "misdirected-write" => {
            let fault = NodeFault::Corrupt {
                node: pick(rng),
                corruption: Corruption::Misdirect,
                crash: rng.random_bool(0.5),
            };
            ("misdirected-write", Some(fault))
        }
        "fsync-error" => ("fsync-error", Some(NodeFault::FailSync(pick(rng)))),
        "disk-full" => ("disk-full", Some(NodeFault::FailSync(pick(rng)))),
        "late-messages" => {
            network.late_ppm = rng.random_range(20_000..200_000);
            ("late-messages", None)
        }
        "pause-together" => {
            let mut stalled = nodes.to_vec();
            for i in 0..stalled.len() {
                let j = rng.random_range(i..stalled.len());
                stalled.swap(i, j);
            }
            stalled.truncate(rng.random_range(2..=nodes.len().max(2)));
            // Past the longest election timeout (300 ms), so every stalled timer has run out.
            let pause = Duration::from_millis(rng.random_range(300..1_500));
            (
                "pause-together",
                Some(NodeFault::PauseTogether(stalled, pause)),
            )
        }
        "consumer-crash" => ("consumer-crash", Some(NodeFault::ConsumerCrash)),
        "isolate-leader" => ("isolate-leader", Some(NodeFault::IsolateLeader)),
        _ => ("wipe", Some(NodeFault::Wipe(pick(rng)))),
    }
}

/// When a late copy of a peer message arrives: long enough after it was sent that an
/// election may have come and gone (timeouts are 150-300 ms).
pub fn late_delay<R: Rng>(rng: &mut R) -> Duration {
    Duration::from_millis(rng.random_range(150..1_500))
}

/// How long a crashed node stays down: half the crashes are quick bounces, within one
/// election, when a forgotten vote or a lost write would do the most harm.
pub fn downtime(rng: &mut ChaCha8Rng) -> Duration {
    let ms = if rng.random_bool(0.5) {
        rng.random_range(1..100)
    } else {
        rng.random_range(100..3_000)
    };
    Duration::from_millis(ms)
}

/// The fsync latency range of a node after [`NodeFault::ToggleSlowDisk`].
pub fn toggle_fsync_us(range: (u64, u64)) -> (u64, u64) {
    if range.1 > FSYNC_US.1 {
        FSYNC_US
    } else {
        (1_000, 50_000)
    }
}

/// Normal fsync latency, in microseconds.
pub const FSYNC_US: (u64, u64) = (50, 2_000);

/// A fault schedule chosen byte by byte (`Options::fault_script`: the `sim_schedule` fuzz
/// target, `--fault-script`). Every decision that [`draw`] and the spacing of faults would take
/// from the seeded RNG is read from the script instead, so changing byte `i` changes one
/// decision, not the whole run as changing the seed would. Values are read big-endian: ranges
/// are mapped from the high bits, so the first byte of each value weighs most. Once the script
/// runs out, an RNG seeded from the run's seed takes over.
pub struct FaultScript {
    bytes: Vec<u8>,
    at: usize,
    rest: ChaCha8Rng,
}

impl FaultScript {
    pub fn new(bytes: Vec<u8>, seed: u64) -> FaultScript {
        FaultScript {
            bytes,
            at: 0,
            rest: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_fa17),
        }
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let chunk = self.bytes.get(self.at..self.at + N)?;
        self.at += N;
        chunk.try_into().ok()
    }
}

impl TryRng for FaultScript {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(match self.take::<4>() {
            Some(bytes) => u32::from_be_bytes(bytes),
            None => self.rest.next_u32(),
        })
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(match self.take::<8>() {
            Some(bytes) => u64::from_be_bytes(bytes),
            None => self.rest.next_u64(),
        })
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for byte in dst {
            *byte = match self.take::<1>() {
                Some([b]) => b,
                None => self.rest.next_u32() as u8,
            };
        }
        Ok(())
    }
}
