//! A run drawn as a timeline a person can read (in the spirit of Jepsen's timeline plots):
//! one lane per node, grey while it is down, a bar per group it leads with the term, faults
//! as ticks above the lanes (hover for the kind), the healing and the first violation as
//! vertical lines. Drawn from the text trace, so it shows exactly what `--trace` shows.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

const LEFT: f64 = 70.0;
const WIDTH: f64 = 1_100.0;
const TOP: f64 = 60.0;
const ROW: f64 = 14.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
];

enum Mark {
    Start(u64),
    Crash(u64),
    Leader { node: u64, group: u64, term: u64 },
    Fault(String),
    Heal,
    Violation(String),
}

fn parse(line: &str) -> Option<(f64, Mark)> {
    let (time, rest) = line.split_once(' ')?;
    let at: f64 = time.strip_suffix('s')?.parse().ok()?;
    if let Some(fault) = rest.strip_prefix("FAULT ") {
        return Some((at, Mark::Fault(fault.to_string())));
    }
    if rest.starts_with("HEAL") {
        return Some((at, Mark::Heal));
    }
    if let Some(what) = rest.strip_prefix("VIOLATION ") {
        return Some((at, Mark::Violation(what.to_string())));
    }
    let mut words = rest.split_whitespace();
    let node: u64 = words.next()?.strip_prefix('n')?.parse().ok()?;
    let second = words.next()?;
    if second == "CRASH" && words.next().is_none() {
        return Some((at, Mark::Crash(node)));
    }
    if second == "start" {
        return Some((at, Mark::Start(node)));
    }
    let group: u64 = second.strip_prefix('g')?.parse().ok()?;
    match (words.next()?, words.next()) {
        ("start", _) => Some((at, Mark::Start(node))),
        ("LEADER", Some(term)) => {
            let term = term.strip_prefix("term=")?.parse().ok()?;
            Some((at, Mark::Leader { node, group, term }))
        }
        _ => None,
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An HTML page with the timeline of the trace `lines`, headed by `title`.
pub fn render(lines: &[String], title: &str) -> String {
    let marks: Vec<(f64, Mark)> = lines.iter().filter_map(|l| parse(l)).collect();
    let end = marks.iter().map(|(t, _)| *t).fold(0.001, f64::max);
    let x = |t: f64| LEFT + t / end * WIDTH;
    let mut nodes = BTreeSet::new();
    let mut groups = BTreeSet::new();
    for (_, mark) in &marks {
        match mark {
            Mark::Start(n) | Mark::Crash(n) => {
                nodes.insert(*n);
            }
            Mark::Leader { node, group, .. } => {
                nodes.insert(*node);
                groups.insert(*group);
            }
            _ => {}
        }
    }
    let rows = groups.len().max(1) as f64;
    let lane = ROW * rows + 16.0;
    let lane_y = |node: u64| {
        let i = nodes.iter().position(|n| *n == node).unwrap_or(0) as f64;
        TOP + i * lane
    };
    let row_y = |node: u64, group: u64| {
        let g = groups.iter().position(|g| *g == group).unwrap_or(0) as f64;
        lane_y(node) + 8.0 + g * ROW
    };
    let height = TOP + lane * nodes.len() as f64 + 40.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="monospace" font-size="11">"#,
        LEFT + WIDTH + 20.0
    );
    for node in &nodes {
        let y = lane_y(*node);
        let _ = write!(
            svg,
            r##"<text x="4" y="{}">n{node}</text><line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#ccc"/>"##,
            y + lane / 2.0,
            LEFT + WIDTH
        );
    }
    // Down periods, from each crash to the next start of that node.
    let mut down: BTreeMap<u64, f64> = BTreeMap::new();
    // Leaderships: group to (node, term, since).
    let mut leading: BTreeMap<u64, (u64, u64, f64)> = BTreeMap::new();
    let leader_bar = |svg: &mut String,
                      group: u64,
                      (node, term, since): (u64, u64, f64),
                      to: f64| {
        let g = groups.iter().position(|x| *x == group).unwrap_or(0);
        let (x1, x2) = (x(since), x(to).max(x(since) + 1.0));
        let _ = write!(
            svg,
            r#"<rect x="{x1}" y="{}" width="{}" height="{}" fill="{}" opacity="0.8"><title>group {group} term {term}: n{node} leads from {since:.3}s to {to:.3}s</title></rect>"#,
            row_y(node, group),
            x2 - x1,
            ROW - 3.0,
            COLOURS[g % COLOURS.len()]
        );
        if x2 - x1 > 30.0 {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" fill="white">g{group} t{term}</text>"#,
                x1 + 2.0,
                row_y(node, group) + ROW - 5.0
            );
        }
    };
    for (at, mark) in &marks {
        match mark {
            Mark::Crash(node) => {
                down.insert(*node, *at);
                let ended: Vec<u64> = leading
                    .iter()
                    .filter(|(_, (n, _, _))| n == node)
                    .map(|(g, _)| *g)
                    .collect();
                for group in ended {
                    if let Some(led) = leading.remove(&group) {
                        leader_bar(&mut svg, group, led, *at);
                    }
                }
            }
            Mark::Start(node) => {
                if let Some(from) = down.remove(node) {
                    let _ = write!(
                        svg,
                        r##"<rect x="{}" y="{}" width="{}" height="{lane}" fill="#999" opacity="0.35"><title>n{node} down {from:.3}s to {at:.3}s</title></rect>"##,
                        x(from),
                        lane_y(*node),
                        (x(*at) - x(from)).max(1.0)
                    );
                }
            }
            Mark::Leader { node, group, term } => {
                if let Some(led) = leading.insert(*group, (*node, *term, *at)) {
                    leader_bar(&mut svg, *group, led, *at);
                }
            }
            Mark::Fault(what) => {
                let _ = write!(
                    svg,
                    r##"<line x1="{0}" x2="{0}" y1="{1}" y2="{2}" stroke="#d62728" stroke-width="2"><title>{at:.3}s FAULT {3}</title></line>"##,
                    x(*at),
                    TOP - 30.0,
                    TOP - 8.0,
                    escape(what)
                );
            }
            Mark::Heal => {
                let _ = write!(
                    svg,
                    r##"<line x1="{0}" x2="{0}" y1="{1}" y2="{2}" stroke="#2ca02c" stroke-dasharray="4"/><text x="{3}" y="{4}" fill="#2ca02c">heal</text>"##,
                    x(*at),
                    TOP - 30.0,
                    height - 30.0,
                    x(*at) + 3.0,
                    TOP - 32.0
                );
            }
            Mark::Violation(what) => {
                let _ = write!(
                    svg,
                    r##"<line x1="{0}" x2="{0}" y1="{1}" y2="{2}" stroke="red" stroke-width="3"><title>{3}</title></line><text x="{4}" y="{5}" fill="red">VIOLATION</text>"##,
                    x(*at),
                    TOP - 30.0,
                    height - 30.0,
                    escape(what),
                    (x(*at) - 70.0).max(0.0),
                    height - 18.0
                );
            }
        }
    }
    for (node, from) in down {
        let _ = write!(
            svg,
            r##"<rect x="{}" y="{}" width="{}" height="{lane}" fill="#999" opacity="0.35"/>"##,
            x(from),
            lane_y(node),
            (x(end) - x(from)).max(1.0)
        );
    }
    for (group, led) in std::mem::take(&mut leading) {
        leader_bar(&mut svg, group, led, end);
    }
    for i in 0..=10 {
        let t = end * f64::from(i) / 10.0;
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}">{t:.1}s</text>"#,
            x(t) - 10.0,
            height - 4.0
        );
    }
    svg.push_str("</svg>");
    let violation = marks.iter().find_map(|(at, m)| match m {
        Mark::Violation(what) => Some(format!(
            "<p style=\"color:red\">{at:.6}s VIOLATION {}</p>",
            escape(what)
        )),
        _ => None,
    });
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{0}</title></head><body \
         style=\"font-family:sans-serif\"><h3>{0}</h3><p>Lanes are nodes (grey: down); bars are \
         the groups each node leads, with the term; red ticks are faults (hover for the kind); \
         the dashed line is the healing.</p>{1}{svg}</body></html>\n",
        escape(title),
        violation.unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_becomes_lanes_bars_and_marks() {
        let lines: Vec<String> = [
            "0.000000s n1 start",
            "0.000000s n2 g1 start term=0 commit=0 last=0 damage=None",
            "0.300000s n1 g1 LEADER term=2",
            "0.500000s FAULT #0 crash",
            "0.500000s n1 CRASH",
            "0.700000s n2 g1 LEADER term=3",
            "0.900000s n1 start",
            "1.000000s HEAL: liveness phase",
            "1.200000s VIOLATION lost: producer 1 seq 2 <gone>",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let html = render(&lines, "seed 1");
        assert!(html.contains("n1 down 0.500s to 0.900s"), "{html}");
        assert!(html.contains("group 1 term 2: n1 leads from 0.300s to 0.500s"));
        assert!(html.contains("group 1 term 3: n2 leads from 0.700s to 1.200s"));
        assert!(html.contains("FAULT #0 crash"));
        assert!(html.contains("VIOLATION lost: producer 1 seq 2 &lt;gone&gt;"));
    }
}
