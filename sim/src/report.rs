//! Machine-readable summaries of a batch of seeds (`run --summary-json`), and `merge`, which
//! combines the summaries of the shards of one campaign. Seeds are independent, so a campaign
//! is any scheduler's array job: each shard runs `run --shard K/N --summary-json FILE`, and
//! `merge` adds the files up and says what the whole campaign found.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::options::Workload;
use crate::runner::Summary;

/// The format version `merge` accepts; bumped on any change that old readers would misread.
pub const VERSION: u32 = 1;

/// Most failures one summary lists in full (the count is always exact): a badly broken build
/// fails every seed, and a million replay lines help nobody.
pub const FAILURES_LISTED_MAX: usize = 1_000;

/// Seeds `K/N` of `count` seeds from `from` stand for: the K-th of N contiguous, near-equal
/// slices (K from 0), so that N shards cover the range exactly once.
pub fn shard(from: u64, count: u64, k: u64, n: u64) -> Range<u64> {
    let at = |i: u64| from + (u128::from(count) * u128::from(i) / u128::from(n)) as u64;
    at(k)..at(k + 1)
}

/// `K/N` with `K < N`, as `--shard` takes it.
pub fn parse_shard(text: &str) -> Result<(u64, u64), String> {
    let (k, n) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?}: expected K/N, e.g. 3/16"))?;
    let k: u64 = k.parse().map_err(|_| format!("{k:?} is not a number"))?;
    let n: u64 = n.parse().map_err(|_| format!("{n:?} is not a number"))?;
    if n == 0 || k >= n {
        return Err(format!("shard {k}/{n}: K counts from 0 and is below N"));
    }
    Ok((k, n))
}

/// One failing seed: what broke, and the line that replays it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub seed: u64,
    pub checker: String,
    pub detail: String,
    /// Arguments of `holdfast-sim replay` (also a line of a regression list).
    pub replay: String,
}

/// What a batch of seeds found, as `run --summary-json` writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SummaryFile {
    pub version: u32,
    /// The run's shape, as `replay` arguments without the seed: only summaries of the same
    /// shape merge.
    pub shape: String,
    pub workload: String,
    /// Seed ranges run, `[start, end)`, sorted and disjoint.
    pub ranges: Vec<(u64, u64)>,
    pub seeds: u64,
    pub passed: u64,
    /// Every failing seed up to [`FAILURES_LISTED_MAX`]; `failed` counts them all.
    pub failed: u64,
    pub failures: Vec<Failure>,
    pub faults: BTreeMap<String, u64>,
    /// Protocol paths the core counted.
    pub coverage: BTreeMap<String, u64>,
    /// Fault kinds and paths of the workload no seed reached.
    pub never_reached: Vec<String>,
    pub simulated_s: f64,
    pub wall_s: f64,
    /// Wall seconds times worker threads: what the batch held in cores.
    pub core_s: f64,
    /// CPU seconds the process used for the batch (user and system; 0 where not measured):
    /// what it cost, even on a machine shared with other work.
    pub cpu_s: f64,
}

impl SummaryFile {
    pub fn new(
        summary: &Summary,
        shape: String,
        range: Range<u64>,
        jobs: usize,
        replay: &dyn Fn(u64) -> String,
    ) -> SummaryFile {
        let s = &summary.stats;
        let wall_s = summary.wall.as_secs_f64();
        SummaryFile {
            version: VERSION,
            shape,
            workload: workload_name(summary.workload).into(),
            ranges: vec![(range.start, range.end)],
            seeds: range.end - range.start,
            passed: summary.passed,
            failed: summary.failed.len() as u64,
            failures: summary
                .failed
                .iter()
                .take(FAILURES_LISTED_MAX)
                .map(|(seed, v)| Failure {
                    seed: *seed,
                    checker: v.checker.into(),
                    detail: v.detail.clone(),
                    replay: replay(*seed),
                })
                .collect(),
            faults: s.faults.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            coverage: s
                .coverage
                .counts
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            never_reached: summary
                .never_reached()
                .into_iter()
                .map(String::from)
                .collect(),
            simulated_s: s.simulated_us as f64 / 1e6,
            wall_s,
            core_s: wall_s * jobs as f64,
            cpu_s: 0.0,
        }
    }

    /// Adds up summaries of one shape over disjoint seed ranges (a campaign's shards).
    pub fn merge(files: &[SummaryFile]) -> Result<SummaryFile, String> {
        let Some(first) = files.first() else {
            return Err("nothing to merge".into());
        };
        let mut merged = SummaryFile {
            version: VERSION,
            shape: first.shape.clone(),
            workload: first.workload.clone(),
            ranges: Vec::new(),
            seeds: 0,
            passed: 0,
            failed: 0,
            failures: Vec::new(),
            faults: BTreeMap::new(),
            coverage: BTreeMap::new(),
            never_reached: Vec::new(),
            simulated_s: 0.0,
            wall_s: 0.0,
            core_s: 0.0,
            cpu_s: 0.0,
        };
        for (i, file) in files.iter().enumerate() {
            if file.version != VERSION {
                return Err(format!(
                    "summary {i}: format version {}, this build reads {VERSION}",
                    file.version
                ));
            }
            if file.shape != first.shape {
                return Err(format!(
                    "summary {i} ran another shape ({:?}) than the first ({:?})",
                    file.shape, first.shape
                ));
            }
            merged.ranges.extend(&file.ranges);
            merged.seeds += file.seeds;
            merged.passed += file.passed;
            merged.failed += file.failed;
            merged.failures.extend(file.failures.iter().cloned());
            for (k, v) in &file.faults {
                *merged.faults.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &file.coverage {
                *merged.coverage.entry(k.clone()).or_default() += v;
            }
            merged.simulated_s += file.simulated_s;
            // Shards run side by side: the campaign took as long as its slowest shard.
            merged.wall_s = merged.wall_s.max(file.wall_s);
            merged.core_s += file.core_s;
            merged.cpu_s += file.cpu_s;
        }
        merged.ranges.sort_unstable();
        for pair in merged.ranges.windows(2) {
            if pair[1].0 < pair[0].1 {
                return Err(format!(
                    "seed ranges {}..{} and {}..{} overlap: a shard was merged twice, or two \
                     shards ran the same seeds",
                    pair[0].0, pair[0].1, pair[1].0, pair[1].1
                ));
            }
        }
        merged.failures.sort_by_key(|f| f.seed);
        merged.failures.truncate(FAILURES_LISTED_MAX);
        // Reached in any shard is reached: what stays missing was missing everywhere.
        merged.never_reached = first
            .never_reached
            .iter()
            .filter(|name| files.iter().all(|f| f.never_reached.contains(name)))
            .cloned()
            .collect();
        Ok(merged)
    }

    /// Seed ranges as `a..b, c..d`, adjacent ones joined.
    pub fn ranges_text(&self) -> String {
        let mut joined: Vec<(u64, u64)> = Vec::new();
        for &(start, end) in &self.ranges {
            match joined.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => joined.push((start, end)),
            }
        }
        let parts: Vec<String> = joined.iter().map(|(a, b)| format!("{a}..{b}")).collect();
        parts.join(", ")
    }
}

impl fmt::Display for SummaryFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "shape: {}", self.shape)?;
        writeln!(f, "seeds: {} ({})", self.seeds, self.ranges_text())?;
        writeln!(f, "seeds passed: {}", self.passed)?;
        writeln!(f, "seeds failed: {}", self.failed)?;
        for failure in &self.failures {
            let detail: String = failure.detail.chars().take(100).collect();
            writeln!(
                f,
                "regression: {} # {}: {detail}",
                failure.replay, failure.checker
            )?;
        }
        let faults: u64 = self.faults.values().sum();
        writeln!(f, "faults injected: {faults}")?;
        for (kind, count) in &self.faults {
            writeln!(f, "  {kind:<24} {count}")?;
        }
        writeln!(f, "protocol paths reached (counted by the core):")?;
        for (name, count) in &self.coverage {
            writeln!(f, "  {name:<24} {count}")?;
        }
        if self.never_reached.is_empty() {
            writeln!(f, "coverage: every fault kind and protocol path reached")?;
        } else {
            writeln!(
                f,
                "coverage: NEVER REACHED: {}",
                self.never_reached.join(" ")
            )?;
        }
        let per_core = self.simulated_s / self.core_s.max(1e-9);
        writeln!(
            f,
            "simulated {:.0} s; {:.0} core-seconds ({:.1} seeds per core-second, {per_core:.0} \
             simulated s per core-second); slowest shard {:.1} s wall",
            self.simulated_s,
            self.core_s,
            self.seeds as f64 / self.core_s.max(1e-9),
            self.wall_s
        )?;
        write!(
            f,
            "{:.0} CPU seconds: {:.2} CPU hours per million seeds",
            self.cpu_s,
            self.cpu_s / self.seeds.max(1) as f64 * 1e6 / 3600.0
        )
    }
}

pub fn workload_name(workload: Workload) -> &'static str {
    match workload {
        Workload::Queue => "queue",
        Workload::Raft => "raft",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(range: (u64, u64), never: &[&str], failed: &[u64]) -> SummaryFile {
        SummaryFile {
            version: VERSION,
            shape: "--workload queue".into(),
            workload: "queue".into(),
            ranges: vec![range],
            seeds: range.1 - range.0,
            passed: range.1 - range.0 - failed.len() as u64,
            failed: failed.len() as u64,
            failures: failed
                .iter()
                .map(|s| Failure {
                    seed: *s,
                    checker: "c".into(),
                    detail: "d".into(),
                    replay: format!("{s}"),
                })
                .collect(),
            faults: [("crash".to_string(), 2)].into(),
            coverage: [("redirect".to_string(), 3)].into(),
            never_reached: never.iter().map(|s| s.to_string()).collect(),
            simulated_s: 10.0,
            wall_s: 2.0,
            core_s: 4.0,
            cpu_s: 3.0,
        }
    }

    #[test]
    fn shards_cover_the_range_exactly_once() {
        for (count, n) in [(10, 3), (1_000_000, 7), (5, 8), (0, 2)] {
            let mut next = 100;
            for k in 0..n {
                let r = shard(100, count, k, n);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, 100 + count);
        }
        assert_eq!(parse_shard("3/16"), Ok((3, 16)));
        assert!(parse_shard("16/16").is_err());
        assert!(parse_shard("1/0").is_err());
        assert!(parse_shard("x").is_err());
    }

    #[test]
    fn merging_adds_up_and_refuses_overlaps_and_other_shapes() {
        let a = file((0, 10), &["wipe", "pause"], &[3]);
        let b = file((10, 20), &["wipe"], &[]);
        let m = SummaryFile::merge(&[b.clone(), a.clone()]).unwrap();
        assert_eq!((m.seeds, m.passed, m.failed), (20, 19, 1));
        assert_eq!(m.ranges_text(), "0..20");
        assert_eq!(m.faults["crash"], 4);
        assert_eq!(m.coverage["redirect"], 6);
        assert_eq!(m.never_reached, ["wipe"]);
        assert_eq!((m.wall_s, m.core_s, m.cpu_s), (2.0, 8.0, 6.0));
        assert!(SummaryFile::merge(&[a.clone(), a.clone()]).is_err());
        let mut other = b;
        other.shape = "--workload raft".into();
        assert!(SummaryFile::merge(&[a.clone(), other]).is_err());
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<SummaryFile>(&text).unwrap(), m);
    }
}
