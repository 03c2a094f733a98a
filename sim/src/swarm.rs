//! Swarm testing (Groce et al., "Swarm Testing", 2012): every seed draws which fault kinds
//! are enabled and at what weight, and a few workload knobs, instead of every seed exploring
//! the same blend. A seed whose mix leaves out crashes explores long partitions; one without
//! network faults, disk damage under a quiet network; and so on.
//!
//! The draws come from an RNG of their own, seeded from the run's seed, so the mix is a pure
//! function of the seed (and shown in the trace header and by `replay`), and `--faults` can pin
//! it instead.

use std::fmt;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::options::Workload;

/// How many fault kinds there are.
pub const KIND_COUNT: usize = 19;

/// Every fault kind the fault phase can draw, in the order of [`FIXED`].
pub const KINDS: [&str; KIND_COUNT] = [
    "isolate",
    "partition",
    "one-way",
    "heal-partition",
    "crash",
    "pause",
    "lossy-network",
    "slow-network",
    "calm-network",
    "slow-disk",
    "bit-flip",
    "misdirected-write",
    "fsync-error",
    "disk-full",
    "wipe",
    // Peer messages arrive again, or only, long after they were sent: across an election
    // timeout, from a leader that has been deposed since (Raft's rare states).
    "late-messages",
    // A consumer process dies with what it was handed; the queue workload only.
    "consumer-crash",
    // Cut off whichever node leads a group: in a row, these leave leaders with entries only
    // they hold and bring them back (Raft's figure 8).
    "isolate-leader",
    // Several nodes stall at once (a hypervisor or a shared disk hiccups) and wake at the same
    // instant with their election timers run out: they campaign together, votes split, and
    // candidates lose elections (where a candidate's vote in its own term must hold).
    "pause-together",
];

/// The blend every seed explored before swarm testing (`--faults fixed`): these weights, and
/// consumer crashes drawn apart, one fault in eight. A run with it replays exactly as it did
/// then, which keeps the regression list's old seeds meaningful.
pub const FIXED: [u32; KIND_COUNT] = [
    12, 10, 10, 15, 15, 10, 8, 8, 6, 6, 4, 3, 3, 2, 2, 0, 0, 0, 0,
];

/// The weight of each fault kind, in the order of [`KINDS`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mix {
    pub weights: [u32; KIND_COUNT],
}

impl Mix {
    pub fn fixed() -> Mix {
        Mix { weights: FIXED }
    }

    /// `kind=weight,kind=weight,...` (kinds left out are off), or `fixed`.
    pub fn parse(text: &str) -> Result<Mix, String> {
        if text == "fixed" {
            return Ok(Mix::fixed());
        }
        let mut weights = [0; KIND_COUNT];
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (kind, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected kind=weight"))?;
            let at = KINDS.iter().position(|k| *k == kind).ok_or_else(|| {
                format!("unknown fault kind {kind:?}; kinds: {}", KINDS.join(" "))
            })?;
            weights[at] = weight
                .parse()
                .map_err(|_| format!("{part:?}: the weight is not a number"))?;
        }
        if weights.iter().all(|w| *w == 0) {
            return Err("a mix enables at least one fault kind".into());
        }
        Ok(Mix { weights })
    }

    pub fn total(&self) -> u32 {
        self.weights.iter().sum()
    }

    /// The kind `pick` (in `0..total()`) lands on.
    pub fn kind_at(&self, mut pick: u32) -> &'static str {
        for (kind, weight) in KINDS.iter().zip(self.weights) {
            if pick < weight {
                return kind;
            }
            pick -= weight;
        }
        KINDS[4]
    }
}

impl fmt::Display for Mix {
    /// What `--faults` takes back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Mix::fixed() {
            return write!(f, "fixed");
        }
        let parts: Vec<String> = KINDS
            .iter()
            .zip(self.weights)
            .filter(|(_, w)| *w > 0)
            .map(|(k, w)| format!("{k}={w}"))
            .collect();
        write!(f, "{}", parts.join(","))
    }
}

/// How a run chooses its fault mix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultMix {
    /// Drawn from the seed (the default).
    Swarm,
    /// Pinned by hand (`--faults`); `fixed` also turns the other per-seed draws off, so a run
    /// replays as before swarm testing.
    Pinned(Mix),
}

/// What one seed explores.
#[derive(Clone, Debug)]
pub struct Swarm {
    pub mix: Mix,
    /// Whether fault decisions come from the world's shared RNG as before swarm testing
    /// (`--faults fixed`), rather than an RNG of their own.
    pub legacy: bool,
    /// Sends each queue producer keeps in flight.
    pub pipeline: usize,
    /// The queue workload's Raft batch limit (`None`: the default); the Raft workload draws
    /// its own.
    pub append_entries_max: Option<usize>,
    /// The queue workload's operator adds, promotes, removes and replaces nodes during the
    /// fault phase (half the seeds; never with the fixed mix, whose runs stay as they were).
    /// The Raft workload draws its own (`membership::Plan`).
    pub membership: bool,
    /// The queue workload's retention: by age, by size per queue, both or neither. Retention
    /// deletes messages consumed or not, so the queue oracle checks each trim (a message goes
    /// only once retention allows it) and excuses exactly what was trimmed.
    pub retention: Retention,
}

/// A broker group's retention policy ([`holdfast_core::broker::BrokerConfig::retention_ms`]
/// and `retention_bytes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    pub ms: Option<u64>,
    pub bytes: Option<u64>,
}

impl Retention {
    pub fn is_on(&self) -> bool {
        self.ms.is_some() || self.bytes.is_some()
    }

    /// A third of the seeds keep messages for a while: by age (from about one check interval
    /// to half the fault phase), by size per queue (a few messages to a few hundred), or both.
    fn draw(rng: &mut ChaCha8Rng) -> Retention {
        let kind = rng.random_range(0..9);
        let ms = [700, 2_000, 5_000][rng.random_range(0..3)];
        let bytes = [40, 300, 2_000][rng.random_range(0..3)];
        match kind {
            6 => Retention {
                ms: Some(ms),
                bytes: None,
            },
            7 => Retention {
                ms: None,
                bytes: Some(bytes),
            },
            8 => Retention {
                ms: Some(ms),
                bytes: Some(bytes),
            },
            _ => Retention::default(),
        }
    }
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ms, self.bytes) {
            (None, None) => write!(f, "off"),
            (Some(ms), None) => write!(f, "{ms}ms"),
            (None, Some(bytes)) => write!(f, "{bytes}B"),
            (Some(ms), Some(bytes)) => write!(f, "{ms}ms+{bytes}B"),
        }
    }
}

impl Swarm {
    pub fn new(seed: u64, workload: Workload, mix: &FaultMix) -> Swarm {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5377_6172_6d5f_6d69);
        let drawn = draw_mix(&mut rng, workload);
        let pipeline = [1, 1, 1, 2, 3][rng.random_range(0..5)];
        // Two entries per AppendEntries in some seeds: a group that commits slowly, where
        // clients' retries meet a full queue (`raft::Config::proposal_wait_max`). One per
        // append, as the Raft workload draws, costs a queue seed too much time.
        let append_entries_max = [None, None, Some(2), Some(4), Some(8)][rng.random_range(0..5)];
        // Drawn last, so the draws above stay what they were before it existed.
        let membership = rng.random_bool(0.5);
        // Drawn last, so that the draws before it (and the seeds that relied on them) stay.
        let retention = match workload {
            Workload::Queue => Retention::draw(&mut rng),
            Workload::Raft => Retention::default(),
        };
        match mix {
            FaultMix::Pinned(mix) if *mix == Mix::fixed() => Swarm {
                mix: mix.clone(),
                legacy: true,
                pipeline: 1,
                append_entries_max: None,
                membership: false,
                retention: Retention::default(),
            },
            FaultMix::Pinned(mix) => Swarm {
                mix: mix.clone(),
                legacy: false,
                pipeline,
                append_entries_max,
                membership,
                retention,
            },
            FaultMix::Swarm => Swarm {
                mix: drawn,
                legacy: false,
                pipeline,
                append_entries_max,
                membership,
                retention,
            },
        }
    }
}

/// Each kind is on in about two seeds of three, at a weight around its fixed one; crashes
/// and isolation of a leader are what most bugs need, so they are on more often.
fn draw_mix(rng: &mut ChaCha8Rng, workload: Workload) -> Mix {
    let mut weights = [0; KIND_COUNT];
    for (i, kind) in KINDS.iter().enumerate() {
        if *kind == "consumer-crash" && workload != Workload::Queue {
            continue;
        }
        let on = match *kind {
            "crash" | "isolate" | "isolate-leader" => 0.85,
            _ => 0.65,
        };
        if rng.random_bool(on) {
            // Leader isolation, back to back, is what builds figure 8's states: weigh it up.
            let typical = if *kind == "isolate-leader" {
                20
            } else {
                FIXED[i].max(6)
            };
            weights[i] = rng.random_range(1..=typical * 2);
        }
    }
    if weights.iter().all(|w| *w == 0) {
        weights[4] = 15;
    }
    Mix { weights }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_reads_back_what_it_prints() {
        let mix = Swarm::new(7, Workload::Queue, &FaultMix::Swarm).mix;
        assert_eq!(Mix::parse(&mix.to_string()), Ok(mix));
        assert_eq!(Mix::parse("fixed"), Ok(Mix::fixed()));
        assert!(Mix::parse("crash=x").is_err());
        assert!(Mix::parse("meteor=3").is_err());
        assert!(Mix::parse("crash=0").is_err());
    }

    #[test]
    fn seeds_draw_different_mixes_and_the_same_seed_the_same() {
        let mix = |seed| Swarm::new(seed, Workload::Raft, &FaultMix::Swarm).mix;
        assert_eq!(mix(3), mix(3));
        let distinct: std::collections::BTreeSet<String> =
            (0..20).map(|s| mix(s).to_string()).collect();
        assert!(distinct.len() > 15, "{distinct:?}");
        assert!(!mix(3).to_string().contains("consumer-crash"));
    }

    #[test]
    fn a_third_of_the_queue_seeds_draw_retention_and_the_fixed_mix_none() {
        let drawn = |seed| Swarm::new(seed, Workload::Queue, &FaultMix::Swarm).retention;
        let on = (0..300).filter(|s| drawn(*s).is_on()).count();
        assert!((70..130).contains(&on), "{on} of 300");
        assert!((0..300).any(|s| drawn(s).ms.is_some() && drawn(s).bytes.is_none()));
        assert!((0..300).any(|s| drawn(s).ms.is_none() && drawn(s).bytes.is_some()));
        assert!((0..300).any(|s| drawn(s).ms.is_some() && drawn(s).bytes.is_some()));
        let fixed = FaultMix::Pinned(Mix::fixed());
        assert!((0..50).all(|s| !Swarm::new(s, Workload::Queue, &fixed).retention.is_on()));
        let raft = |s| Swarm::new(s, Workload::Raft, &FaultMix::Swarm).retention;
        assert!((0..50).all(|s| !raft(s).is_on()));
    }

    #[test]
    fn the_fixed_mix_lands_where_the_fixed_ranges_did() {
        let fixed = Mix::fixed();
        assert_eq!(fixed.total(), 114);
        assert_eq!(fixed.kind_at(0), "isolate");
        assert_eq!(fixed.kind_at(47), "crash");
        assert_eq!(fixed.kind_at(61), "crash");
        assert_eq!(fixed.kind_at(62), "pause");
        assert_eq!(fixed.kind_at(113), "wipe");
    }
}
