//! Repository-wide tests live in `tests/`; this library holds what they share.

/// A conservative scan of `core`'s sources and manifest for anything that would make the core
/// impure: I/O, clocks, threads, environment, unseeded randomness, hash-ordered collections.
///
/// The scan works on tokens, not on a syntax tree. It drops line comments (`//`, `///`, `//!`)
/// and nothing else: string literals are scanned like code, so a pattern written inside a string
/// is reported too (a false alarm is cheap, a miss is not). Block comments are scanned as well.
/// It does not try to defeat deliberate tricks (macros that assemble paths, `include!`d files
/// are reported but not followed); it catches honest mistakes.
pub mod purity {
    use std::fmt;

    /// One forbidden construct found in a source file.
    #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
    pub struct Violation {
        pub file: String,
        /// 1-based.
        pub line: usize,
        /// The offending pattern as written, normalised (`std::fs`, `Instant::now`, `HashMap`).
        pub pattern: String,
        pub why: &'static str,
    }

    impl fmt::Display for Violation {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "{}:{}: `{}`: {}",
                self.file, self.line, self.pattern, self.why
            )
        }
    }

    /// Modules of `std` the core must not touch, and why.
    const FORBIDDEN_STD_MODULES: &[(&str, &str)] = &[
        (
            "fs",
            "filesystem access: the shell does I/O, the core only describes writes",
        ),
        ("net", "network access: the shell owns sockets"),
        (
            "io",
            "I/O traits and handles: the core has no business with I/O",
        ),
        (
            "thread",
            "threads: the core is single-threaded and driven by calls",
        ),
        (
            "process",
            "processes: the core never starts or exits processes",
        ),
        (
            "env",
            "environment/arguments: configuration is passed in explicitly",
        ),
        ("os", "platform-specific OS APIs"),
    ];

    /// Items under `std::<module>` that are forbidden although the module itself is fine.
    const FORBIDDEN_STD_ITEMS: &[(&str, &str, &str)] = &[
        (
            "time",
            "SystemTime",
            "reads the wall clock: time is passed in as `crate::time::Instant`",
        ),
        (
            "time",
            "UNIX_EPOCH",
            "wall-clock time: time is passed in as `crate::time::Instant`",
        ),
        (
            "time",
            "Instant",
            "std's Instant reads the monotonic clock: use `crate::time::Instant`",
        ),
        (
            "collections",
            "HashMap",
            "iteration order is randomised per process: use BTreeMap",
        ),
        (
            "collections",
            "HashSet",
            "iteration order is randomised per process: use BTreeSet",
        ),
        (
            "collections",
            "hash_map",
            "iteration order is randomised per process: use btree_map",
        ),
        (
            "collections",
            "hash_set",
            "iteration order is randomised per process: use btree_set",
        ),
        (
            "hash",
            "RandomState",
            "seeded from the OS: nondeterministic",
        ),
        (
            "hash",
            "DefaultHasher",
            "std's hasher makes no stability promise across releases",
        ),
    ];

    /// Crates that do I/O, threads or OS randomness; a path starting with one is forbidden.
    const FORBIDDEN_CRATES: &[&str] = &[
        "tokio",
        "mio",
        "libc",
        "nix",
        "socket2",
        "async_std",
        "smol",
        "getrandom",
        "rayon",
        "crossbeam",
        "memmap2",
        "tempfile",
        "fs_err",
        "hyper",
        "reqwest",
        "chrono",
    ];

    /// Functions at the root of `rand` that draw from the thread-local, OS-seeded generator.
    const FORBIDDEN_RAND_ROOT: &[&str] = &[
        "rng",
        "thread_rng",
        "random",
        "random_iter",
        "random_range",
        "random_bool",
        "random_ratio",
        "fill",
    ];

    /// Identifiers that are forbidden wherever they appear, whatever path leads to them.
    const FORBIDDEN_IDENTS: &[(&str, &str)] = &[
        (
            "SystemTime",
            "reads the wall clock: time is passed in as `crate::time::Instant`",
        ),
        (
            "UNIX_EPOCH",
            "wall-clock time: time is passed in as `crate::time::Instant`",
        ),
        ("thread_rng", "unseeded randomness: use a seeded ChaCha8Rng"),
        ("ThreadRng", "unseeded randomness: use a seeded ChaCha8Rng"),
        ("OsRng", "randomness from the OS: use a seeded ChaCha8Rng"),
        ("SysRng", "randomness from the OS: use a seeded ChaCha8Rng"),
        (
            "getrandom",
            "randomness from the OS: use a seeded ChaCha8Rng",
        ),
        (
            "from_entropy",
            "seeds from the OS: use `seed_from_u64` with a passed-in seed",
        ),
        (
            "from_os_rng",
            "seeds from the OS: use `seed_from_u64` with a passed-in seed",
        ),
        (
            "try_from_os_rng",
            "seeds from the OS: use `seed_from_u64` with a passed-in seed",
        ),
        ("RandomState", "seeded from the OS: nondeterministic"),
        (
            "HashMap",
            "iteration order is randomised per process: use BTreeMap",
        ),
        (
            "HashSet",
            "iteration order is randomised per process: use BTreeSet",
        ),
        (
            "spawn",
            "spawns a thread or task: the core is single-threaded",
        ),
    ];

    /// Macros that write to stdout/stderr or pull in source this scan does not see.
    const FORBIDDEN_MACROS: &[(&str, &str)] = &[
        (
            "println",
            "writes to stdout: the core returns values, the shell prints",
        ),
        (
            "print",
            "writes to stdout: the core returns values, the shell prints",
        ),
        (
            "eprintln",
            "writes to stderr: the core returns values, the shell prints",
        ),
        (
            "eprint",
            "writes to stderr: the core returns values, the shell prints",
        ),
        (
            "dbg",
            "writes to stderr: the core returns values, the shell prints",
        ),
        ("include", "pulls in source this scan does not see"),
    ];

    const INSTANT_NOW: &str = "reads a clock: the core's `crate::time::Instant` has no `now`; \
                               drivers pass `now` in";
    const STD_ALIAS: &str = "aliasing or glob-importing std hides paths from this scan";

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Tok {
        Ident(String),
        /// `::`
        PathSep,
        Punct(char),
    }

    #[derive(Clone, Debug)]
    struct Token {
        tok: Tok,
        line: usize,
    }

    impl Token {
        fn ident(&self) -> Option<&str> {
            match &self.tok {
                Tok::Ident(s) => Some(s),
                _ => None,
            }
        }
        fn is_punct(&self, c: char) -> bool {
            self.tok == Tok::Punct(c)
        }
        fn is_sep(&self) -> bool {
            self.tok == Tok::PathSep
        }
    }

    /// The part of `line` that is code: everything before a `//` comment. A `//` is taken
    /// as a comment only when no `"` precedes it on the line, so a `//` inside a string
    /// never hides code that follows it (at worst a comment gets scanned).
    fn code_part(line: &str) -> &str {
        match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        }
    }

    fn tokenize(source: &str) -> Vec<Token> {
        let mut tokens = Vec::new();
        for (number, line) in source.lines().enumerate() {
            let line_no = number + 1;
            let chars: Vec<char> = code_part(line).chars().collect();
            let mut i = 0;
            while i < chars.len() {
                let c = chars[i];
                if c.is_whitespace() {
                    i += 1;
                } else if c.is_alphanumeric() || c == '_' {
                    let start = i;
                    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                    let word: String = chars[start..i].iter().collect();
                    tokens.push(Token {
                        tok: Tok::Ident(word),
                        line: line_no,
                    });
                } else if c == ':' && chars.get(i + 1) == Some(&':') {
                    tokens.push(Token {
                        tok: Tok::PathSep,
                        line: line_no,
                    });
                    i += 2;
                } else {
                    tokens.push(Token {
                        tok: Tok::Punct(c),
                        line: line_no,
                    });
                    i += 1;
                }
            }
        }
        tokens
    }

    /// A path as written (`std::fs::read`, `::std::fs`), with the line of each segment.
    type Path = Vec<(String, usize)>;

    /// Checks one full path (from a use tree or an expression); `glob` if it ended in `::*`.
    fn check_path(
        path: &[(String, usize)],
        glob: bool,
        out: &mut Vec<(usize, String, &'static str)>,
    ) {
        let Some((root, root_line)) = path.first() else {
            return;
        };
        let seg = |i: usize| path.get(i).map(|(s, _)| s.as_str());
        let line_of = |i: usize| path.get(i).map_or(*root_line, |(_, l)| *l);
        match root.as_str() {
            "std" => {
                if path.len() == 1 && glob {
                    out.push((*root_line, "std::*".to_string(), STD_ALIAS));
                }
                if let Some(module) = seg(1) {
                    if let Some((m, why)) = FORBIDDEN_STD_MODULES.iter().find(|(m, _)| *m == module)
                    {
                        out.push((line_of(1), format!("std::{m}"), why));
                    }
                    if let Some(item) = seg(2)
                        && let Some((m, i, why)) = FORBIDDEN_STD_ITEMS
                            .iter()
                            .find(|(m, i, _)| *m == module && *i == item)
                    {
                        out.push((line_of(2), format!("std::{m}::{i}"), why));
                    }
                    if path.len() == 2 && glob {
                        out.push((line_of(1), format!("std::{module}::*"), STD_ALIAS));
                    }
                }
            }
            "rand" => {
                if let Some(f) = seg(1)
                    && FORBIDDEN_RAND_ROOT.contains(&f)
                {
                    out.push((
                        line_of(1),
                        format!("rand::{f}"),
                        "draws from the thread-local OS-seeded generator: use a seeded ChaCha8Rng",
                    ));
                }
            }
            krate if FORBIDDEN_CRATES.contains(&krate) => {
                out.push((
                    *root_line,
                    krate.to_string(),
                    "a crate that does I/O, threads or OS randomness",
                ));
            }
            _ => {}
        }
        for pair in path.windows(2) {
            if pair[0].0 == "Instant" && pair[1].0 == "now" {
                out.push((pair[1].1, "Instant::now".to_string(), INSTANT_NOW));
            }
        }
    }

    /// Parses a use tree starting at `tokens[*i]`, appending every full path it names to
    /// `paths` (with `true` for globs). Stops before `,`, `}` or `;` at its own level.
    fn parse_use_tree(
        tokens: &[Token],
        i: &mut usize,
        prefix: &Path,
        paths: &mut Vec<(Path, bool)>,
        out: &mut Vec<(usize, String, &'static str)>,
    ) {
        let mut path = prefix.clone();
        if tokens.get(*i).is_some_and(Token::is_sep) {
            *i += 1; // leading `::` as in `use ::std::fs`
        }
        loop {
            let Some(token) = tokens.get(*i) else {
                paths.push((path, false));
                return;
            };
            if let Some(word) = token.ident() {
                if word != "self" {
                    path.push((word.to_string(), token.line));
                }
                *i += 1;
                if tokens.get(*i).is_some_and(Token::is_sep) {
                    *i += 1;
                    continue;
                }
                if tokens.get(*i).and_then(Token::ident) == Some("as") {
                    *i += 1;
                    if path.len() == 1 && path[0].0 == "std" {
                        out.push((token.line, "use std as".to_string(), STD_ALIAS));
                    }
                    *i += 1; // the alias
                }
                paths.push((path, false));
                return;
            } else if token.is_punct('*') {
                *i += 1;
                paths.push((path, true));
                return;
            } else if token.is_punct('{') {
                *i += 1;
                loop {
                    match tokens.get(*i) {
                        None => return,
                        Some(t) if t.is_punct('}') => {
                            *i += 1;
                            return;
                        }
                        Some(t) if t.is_punct(',') => *i += 1,
                        Some(t) if t.is_punct(';') => return,
                        Some(_) => {
                            let before = *i;
                            parse_use_tree(tokens, i, &path, paths, out);
                            if *i == before {
                                *i += 1; // something unexpected: skip it rather than loop
                            }
                        }
                    }
                }
            } else {
                paths.push((path, false));
                return;
            }
        }
    }

    /// Scans the Rust source `source` of the file named `file` (the name is only used in the
    /// report) and returns every violation found, in line order, one per line and pattern.
    pub fn scan_source(file: &str, source: &str) -> Vec<Violation> {
        let tokens = tokenize(source);
        let mut found: Vec<(usize, String, &'static str)> = Vec::new();

        // Use declarations, with grouped imports expanded: `use std::{fs, io::Read}`.
        let mut i = 0;
        while i < tokens.len() {
            if tokens[i].ident() == Some("use") {
                i += 1;
                let mut paths = Vec::new();
                parse_use_tree(&tokens, &mut i, &Vec::new(), &mut paths, &mut found);
                for (path, glob) in paths {
                    check_path(&path, glob, &mut found);
                }
            } else {
                i += 1;
            }
        }

        // Paths anywhere (`std::fs::read(..)`, `::std::thread::spawn`), and loose identifiers.
        let mut i = 0;
        while i < tokens.len() {
            let token = &tokens[i];
            if let Some(word) = token.ident() {
                let continues_path = i > 0 && tokens[i - 1].is_sep() && {
                    // `a::b`: `b` belongs to the path started at `a` (handled there). After
                    // `::` with no identifier before it (`::std`), a new path starts.
                    i >= 2 && tokens[i - 2].ident().is_some()
                };
                if !continues_path {
                    let mut path: Path = vec![(word.to_string(), token.line)];
                    let mut j = i + 1;
                    while j + 1 < tokens.len() && tokens[j].is_sep() {
                        match tokens[j + 1].ident() {
                            Some(next) => path.push((next.to_string(), tokens[j + 1].line)),
                            None => break,
                        }
                        j += 2;
                    }
                    check_path(&path, false, &mut found);
                }
                if let Some((ident, why)) = FORBIDDEN_IDENTS.iter().find(|(w, _)| *w == word) {
                    found.push((token.line, ident.to_string(), why));
                }
                if tokens.get(i + 1).is_some_and(|t| t.is_punct('!'))
                    && let Some((name, why)) = FORBIDDEN_MACROS.iter().find(|(m, _)| *m == word)
                {
                    found.push((token.line, format!("{name}!"), why));
                }
                if word == "extern"
                    && tokens.get(i + 1).and_then(Token::ident) == Some("crate")
                    && let Some(name) = tokens.get(i + 2).and_then(Token::ident)
                {
                    if FORBIDDEN_CRATES.contains(&name) {
                        found.push((
                            token.line,
                            format!("extern crate {name}"),
                            "a crate that does I/O, threads or OS randomness",
                        ));
                    } else if name == "std"
                        && tokens.get(i + 3).and_then(Token::ident) == Some("as")
                    {
                        found.push((token.line, "extern crate std as".to_string(), STD_ALIAS));
                    }
                }
            }
            i += 1;
        }

        found.sort();
        found.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        found
            .into_iter()
            .map(|(line, pattern, why)| Violation {
                file: file.to_string(),
                line,
                pattern,
                why,
            })
            .collect()
    }

    /// The crates `core` may depend on. Every one of them is pure (or is used only through its
    /// pure parts, see the feature checks in [`check_dependencies`]).
    ///
    /// Adding a crate here requires a review of whether it (or a feature it turns on) does
    /// I/O, reads a clock, starts threads or seeds randomness from the OS.
    pub const ALLOWED_CORE_DEPENDENCIES: &[&str] = &[
        "bytes",
        "rand",
        "rand_chacha",
        "crc32c",
        "postcard",
        "serde",
    ];

    /// Crates that must be used without their default features, and features of theirs that
    /// would bring in OS randomness.
    const NO_DEFAULT_FEATURES: &[(&str, &[&str])] = &[
        (
            "rand",
            &["std", "thread_rng", "os_rng", "sys_rng", "getrandom"],
        ),
        ("rand_chacha", &["std", "os_rng", "sys_rng", "getrandom"]),
    ];

    /// One dependency of `core` as it resolves after workspace inheritance.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Dependency {
        /// The crate's name on the registry (`package = ".."` if renamed, else the key).
        pub package: String,
        /// The table it was found in (`dependencies`, `target.'cfg(unix)'.dependencies`).
        pub section: String,
        pub default_features: bool,
        pub features: Vec<String>,
    }

    /// Checks `core`'s resolved dependencies against [`ALLOWED_CORE_DEPENDENCIES`], and that
    /// `rand` and `rand_chacha` come without default features or OS-randomness features.
    /// Returns one line per problem.
    pub fn check_dependencies(deps: &[Dependency]) -> Vec<String> {
        let mut problems = Vec::new();
        for dep in deps {
            if !ALLOWED_CORE_DEPENDENCIES.contains(&dep.package.as_str()) {
                problems.push(format!(
                    "[{}] `{}` is not in ALLOWED_CORE_DEPENDENCIES (tests/src/lib.rs); adding it \
                     requires a review of whether it does I/O",
                    dep.section, dep.package
                ));
            }
            if let Some((_, forbidden)) =
                NO_DEFAULT_FEATURES.iter().find(|(n, _)| *n == dep.package)
            {
                if dep.default_features {
                    problems.push(format!(
                        "[{}] `{}` must have `default-features = false` (its defaults pull in \
                         OS randomness)",
                        dep.section, dep.package
                    ));
                }
                for feature in &dep.features {
                    if forbidden.contains(&feature.as_str()) {
                        problems.push(format!(
                            "[{}] `{}` feature `{feature}` brings in std or OS randomness",
                            dep.section, dep.package
                        ));
                    }
                }
            }
        }
        problems
    }
}
