//! `core` must stay pure: no I/O, no clock, no threads, no environment, no unseeded randomness,
//! no hash-ordered collections, and no dependency that could bring any of those in.

use std::path::{Path, PathBuf};

use holdfast_tests::purity::{Dependency, Violation, check_dependencies, scan_source};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {dir:?}: {e}"));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn core_sources_are_pure() {
    let root = repo_root();
    let mut files = Vec::new();
    rust_files(&root.join("core/src"), &mut files);
    files.sort();
    assert!(
        files.iter().any(|f| f.ends_with("core/src/lib.rs"))
            && files.iter().any(|f| f.ends_with("core/src/time.rs")),
        "the walk of core/src found too little: {files:?}"
    );
    let mut violations = Vec::new();
    for file in &files {
        let source = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
        let name = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        violations.extend(scan_source(&name, &source));
    }
    if !violations.is_empty() {
        let list: Vec<String> = violations.iter().map(|v| format!("  {v}")).collect();
        panic!(
            "core/src must stay pure (no I/O, clock, threads, env, unseeded randomness, \
             HashMap/HashSet); {} violation(s) in {} file(s) scanned:\n{}\n",
            violations.len(),
            files.len(),
            list.join("\n")
        );
    }
}

// ----- dependencies -----

fn table<'a>(value: &'a toml::Value, what: &str) -> &'a toml::Table {
    value
        .as_table()
        .unwrap_or_else(|| panic!("{what} is not a table"))
}

fn flag(spec: &toml::Table, key: &str) -> Option<bool> {
    spec.get(key)
        .or_else(|| spec.get(&key.replace('-', "_")))
        .and_then(toml::Value::as_bool)
}

fn features(spec: &toml::Table) -> Vec<String> {
    spec.get("features")
        .and_then(toml::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `core`'s dependencies (normal, build and target-specific; not dev) as they resolve once
/// `workspace = true` entries are looked up in the workspace manifest. Where it is unclear
/// whether default features end up on, they count as on.
fn resolve(core_manifest: &str, workspace_manifest: &str) -> Vec<Dependency> {
    let core: toml::Table = core_manifest.parse().expect("core manifest parses");
    let workspace: toml::Table = workspace_manifest
        .parse()
        .expect("workspace manifest parses");
    let inherited = workspace
        .get("workspace")
        .and_then(|w| w.get("dependencies"))
        .and_then(toml::Value::as_table)
        .cloned()
        .unwrap_or_default();

    let mut sections: Vec<(String, &toml::Table)> = Vec::new();
    for name in ["dependencies", "build-dependencies", "build_dependencies"] {
        if let Some(deps) = core.get(name) {
            sections.push((name.to_string(), table(deps, name)));
        }
    }
    if let Some(targets) = core.get("target") {
        for (cfg, target) in table(targets, "target") {
            for name in ["dependencies", "build-dependencies", "build_dependencies"] {
                if let Some(deps) = target.get(name) {
                    sections.push((format!("target.{cfg}.{name}"), table(deps, name)));
                }
            }
        }
    }

    let mut resolved = Vec::new();
    for (section, deps) in sections {
        for (key, value) in deps {
            let own = value.as_table().cloned().unwrap_or_default();
            let inherits = flag(&own, "workspace") == Some(true);
            let base = if inherits {
                match inherited.get(key) {
                    Some(toml::Value::Table(t)) => t.clone(),
                    Some(_) => toml::Table::new(), // `name = "version"`: defaults on
                    None => panic!("`{key}.workspace = true` but the workspace does not define it"),
                }
            } else {
                own.clone()
            };
            let package = own
                .get("package")
                .or_else(|| base.get("package"))
                .and_then(toml::Value::as_str)
                .unwrap_or(key)
                .to_string();
            let default_features = if inherits {
                flag(&base, "default-features").unwrap_or(true)
                    || flag(&own, "default-features") == Some(true)
            } else {
                flag(&own, "default-features").unwrap_or(true)
            };
            let mut all_features = if inherits {
                features(&base)
            } else {
                Vec::new()
            };
            all_features.extend(features(&own));
            resolved.push(Dependency {
                package,
                section: section.clone(),
                default_features,
                features: all_features,
            });
        }
    }
    resolved
}

#[test]
fn core_dependencies_are_allowed() {
    let root = repo_root();
    let core = std::fs::read_to_string(root.join("core/Cargo.toml")).expect("core/Cargo.toml");
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let deps = resolve(&core, &workspace);
    assert!(
        deps.iter().any(|d| d.package == "rand"),
        "expected core to depend on rand: {deps:?}"
    );
    let problems = check_dependencies(&deps);
    assert!(
        problems.is_empty(),
        "core/Cargo.toml dependencies:\n  {}\n",
        problems.join("\n  ")
    );
    assert!(
        !root.join("core/build.rs").exists(),
        "core must not have a build script"
    );
}

// ----- self-tests of the dependency check -----

const WORKSPACE: &str = r#"
[workspace.dependencies]
bytes = { version = "1.10", features = ["serde"] }
rand = { version = "0.10", default-features = false }
rand_with_defaults = { package = "rand", version = "0.10" }
rand_chacha = "0.10"
"#;

fn problems(core_manifest: &str) -> Vec<String> {
    check_dependencies(&resolve(core_manifest, WORKSPACE))
}

#[test]
fn dependency_check_accepts_allowed_crates() {
    let core = r#"
[dependencies]
bytes.workspace = true
rand = { workspace = true }
serde = { version = "1", features = ["derive"] }
postcard = { version = "1", default-features = false, features = ["alloc"] }
crc32c = "0.6"

[dev-dependencies]
proptest = "1"
"#;
    assert_eq!(problems(core), Vec::<String>::new());
}

#[test]
fn dependency_check_rejects_crates_off_the_list() {
    for core in [
        "[dependencies]\ntokio = \"1\"\n",
        "[dependencies]\nlibc = { version = \"0.2\" }\n",
        "[target.'cfg(unix)'.dependencies]\nlibc = \"0.2\"\n",
        "[build-dependencies]\ncc = \"1\"\n",
        "[dependencies]\nbytes = { package = \"mio\", version = \"1\" }\n",
    ] {
        let found = problems(core);
        assert!(
            found
                .iter()
                .any(|p| p.contains("not in ALLOWED_CORE_DEPENDENCIES")),
            "not caught:\n{core}\n{found:?}"
        );
    }
}

#[test]
fn dependency_check_rejects_rand_with_default_or_os_features() {
    for (core, expect) in [
        (
            "[dependencies]\nrand = \"0.10\"\n",
            "default-features = false",
        ),
        (
            "[dependencies]\nrand = { version = \"0.10\" }\n",
            "default-features = false",
        ),
        (
            "[dependencies]\nrand = { workspace = true, features = [\"thread_rng\"] }\n",
            "feature `thread_rng`",
        ),
        (
            "[dependencies]\nrand = { workspace = true, default-features = true }\n",
            "default-features = false",
        ),
        (
            "[dependencies]\nrand.workspace = true\nrand.features = [\"os_rng\"]\n",
            "feature `os_rng`",
        ),
        (
            "[dependencies]\nrand_with_defaults.workspace = true\n",
            "default-features = false",
        ),
        (
            "[dependencies]\nrand_chacha.workspace = true\n",
            "default-features = false",
        ),
    ] {
        let found = problems(core);
        assert!(
            found.iter().any(|p| p.contains(expect)),
            "expected a problem mentioning {expect:?} for:\n{core}\ngot {found:?}"
        );
    }
}

// ----- self-tests of the source scanner -----

fn patterns(source: &str) -> Vec<String> {
    scan_source("snippet.rs", source)
        .into_iter()
        .map(|v| v.pattern)
        .collect()
}

#[test]
fn scanner_catches_each_forbidden_pattern() {
    let cases: &[(&str, &str)] = &[
        ("fn f() { let _ = std::fs::read(\"x\"); }", "std::fs"),
        ("use std::fs;", "std::fs"),
        ("use std::fs::File;", "std::fs"),
        ("use std::net::TcpStream;", "std::net"),
        ("let s = std::net::UdpSocket::bind(a);", "std::net"),
        ("use std::io::Write;", "std::io"),
        ("std::io::stdout()", "std::io"),
        ("use std::thread;", "std::thread"),
        ("std::thread::spawn(|| {});", "std::thread"),
        ("std::thread::spawn(|| {});", "spawn"),
        ("thread::spawn(move || work());", "spawn"),
        ("use std::process::exit;", "std::process"),
        ("std::process::exit(1)", "std::process"),
        ("let v = std::env::var(\"X\");", "std::env"),
        ("use std::env::args;", "std::env"),
        ("use std::os::unix::io::RawFd;", "std::os"),
        (
            "let t = std::time::SystemTime::now();",
            "std::time::SystemTime",
        ),
        ("let t = SystemTime::now();", "SystemTime"),
        ("let e = UNIX_EPOCH;", "UNIX_EPOCH"),
        ("use std::time::Instant;", "std::time::Instant"),
        ("let t = Instant::now();", "Instant::now"),
        ("let t = std::time::Instant::now();", "Instant::now"),
        ("let t = crate::time::Instant::now();", "Instant::now"),
        ("let t = Instant :: now();", "Instant::now"),
        (
            "use std::collections::HashMap;",
            "std::collections::HashMap",
        ),
        ("let m: HashMap<u8, u8> = HashMap::new();", "HashMap"),
        ("let s: HashSet<u8> = Default::default();", "HashSet"),
        (
            "use std::collections::hash_map::Entry;",
            "std::collections::hash_map",
        ),
        ("let h = RandomState::new();", "RandomState"),
        ("let mut r = rand::rng();", "rand::rng"),
        ("let mut r = rand::thread_rng();", "rand::thread_rng"),
        ("let x: u8 = rand::random();", "rand::random"),
        ("let r = ChaCha8Rng::from_entropy();", "from_entropy"),
        ("let r = ChaCha8Rng::from_os_rng();", "from_os_rng"),
        ("let r = OsRng;", "OsRng"),
        ("getrandom::fill(&mut buf)", "getrandom"),
        ("use tokio::net::TcpListener;", "tokio"),
        ("let p = mio::Poll::new();", "mio"),
        ("unsafe { libc::write(1, p, n) };", "libc"),
        ("extern crate libc;", "extern crate libc"),
        ("println!(\"hi\");", "println!"),
        ("eprintln!(\"hi\");", "eprintln!"),
        ("dbg!(x);", "dbg!"),
        ("include!(\"elsewhere.rs\");", "include!"),
        // Grouped imports, on one line and over several.
        ("use std::{fs, io};", "std::fs"),
        ("use std::{fs, io};", "std::io"),
        ("use std::{collections::BTreeMap, fs::File};", "std::fs"),
        (
            "use std::{time::{Duration, SystemTime}};",
            "std::time::SystemTime",
        ),
        ("use std::time::{Duration, Instant};", "std::time::Instant"),
        ("use std::{self, net::{self}};", "std::net"),
        (
            "use std::{\n    collections::BTreeMap,\n    fs::{self, File},\n};",
            "std::fs",
        ),
        // Aliases and absolute paths.
        ("use std::fs as disk;", "std::fs"),
        ("use std::thread as t;", "std::thread"),
        ("use ::std::fs;", "std::fs"),
        ("let x = ::std::fs::read(\"a\");", "std::fs"),
        ("pub use std::env;", "std::env"),
        ("pub(crate) use ::std::process as p;", "std::process"),
        ("use std as s;", "use std as"),
        ("use std::{self as s};", "use std as"),
        ("extern crate std as s;", "extern crate std as"),
        ("use std::*;", "std::*"),
        ("use std::fs::*;", "std::fs"),
        // Odd spacing, trailing comments, `//` inside a string before the code.
        ("let x = std :: fs :: read(\"a\");", "std::fs"),
        ("let x = std::\n    fs::read(\"a\");", "std::fs"),
        ("std::fs::read(\"a\"); // this is fine, right?", "std::fs"),
        ("let u = \"http://x\"; std::fs::read(u);", "std::fs"),
    ];
    let mut missed = Vec::new();
    for (source, expected) in cases {
        let found = patterns(source);
        if !found.iter().any(|p| p == expected) {
            missed.push(format!(
                "{source:?}: expected `{expected}`, found {found:?}"
            ));
        }
    }
    assert!(missed.is_empty(), "missed:\n  {}", missed.join("\n  "));
}

#[test]
fn scanner_reports_file_line_and_reason() {
    let source = "//! Module docs.\n\nuse std::{\n    collections::BTreeMap,\n    fs::{self, File},\n};\n\nfn f() {\n    let _ = Instant::now();\n}\n";
    let found = scan_source("core/src/x.rs", source);
    assert_eq!(
        found
            .iter()
            .map(|v| (v.line, v.pattern.as_str()))
            .collect::<Vec<_>>(),
        vec![(5, "std::fs"), (9, "Instant::now")]
    );
    let shown = found[0].to_string();
    assert!(
        shown.starts_with("core/src/x.rs:5: `std::fs`: filesystem access"),
        "{shown}"
    );
}

#[test]
fn scanner_passes_clean_code() {
    let clean = r#"
//! Time as a value; the core never calls std::time::Instant::now or std::fs::read.
/// Like std::thread::spawn, but not: this comment mentions HashMap and SystemTime.
// std::net, std::process, std::env, thread_rng, OsRng: all only mentioned in comments.
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::{Add, Sub};
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::time::Instant; // not std's: it has no `now`
use super::types::*;

impl std::fmt::Display for Instant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

fn f(now: Instant, map: &mut BTreeMap<u64, u64>, rng: &mut ChaCha8Rng) {
    let rng2 = ChaCha8Rng::seed_from_u64(7);
    let t = Instant::ZERO + std::time::Duration::from_millis(5);
    let later = crate::time::Instant::from_micros(5);
    let x = rand::RngExt::random_range(rng, 0..10);
    let taken = std::mem::take(map);
    let fs = 3;
    let io = self.io;
    let filesystem = self.fs;
    let deadline = self.now + Duration::ZERO;
    let once = std::iter::once(1);
    let url = "see the docs";
}
"#;
    assert_eq!(scan_source("clean.rs", clean), Vec::<Violation>::new());
}
