//! The module structure of the agent and the relay, checked from their source:
//! no import cycle among the modules of any folder, and each crate's top-level
//! modules only reach down the layers ARCHITECTURE.md describes.
//!
//! A module "uses" another when its source names a path into it (`use crate::x`,
//! `crate::x::f()`, `super::x`, `self::x`). Test code (`#[cfg(test)]` items and
//! `tests.rs` files) is left out: tests may reach across layers. The check is over
//! text, not resolved names, so a path built by a macro is not seen; nothing in
//! this tree does that.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type ModPath = Vec<String>;

/// One reference: the file, the path as written (resolved to the crate root), and
/// the module it lands in.
#[derive(Debug, Clone)]
struct Use {
    file: String,
    from: ModPath,
    to: ModPath,
    written: String,
}

struct Crate {
    modules: BTreeSet<ModPath>,
    uses: Vec<Use>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn module_of(rel: &Path) -> Option<ModPath> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop()?;
    let stem = file.strip_suffix(".rs")?;
    match stem {
        "lib" if parts.is_empty() => {}
        // The binary is its own crate; bins and benches are not modules.
        "main" if parts.is_empty() => return None,
        "mod" => {}
        // Test modules kept in files of their own.
        "tests" => return None,
        _ => parts.push(stem.to_owned()),
    }
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    Some(parts)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("source folder").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without comments, string and char literals (their text could look
/// like paths), keeping everything else byte for byte.
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == b'r'
            && matches!(b.get(i + 1), Some(b'#') | Some(b'"'))
            && !ident_before(b, i)
        {
            // Raw string: r"…", r#"…"#, …
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c as char);
                i += 1;
                continue;
            }
            j += 1;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while j < b.len() && !b[j..].starts_with(&close) {
                j += 1;
            }
            i = j + close.len();
            out.push_str("\"\"");
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}', '"'), or a lifetime ('a).
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&x| x == b'\'')
                    .map(|p| i + 2 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                // Multi-byte UTF-8 char literal.
                let s = &src[i + 1..];
                s.chars()
                    .next()
                    .filter(|ch| s[ch.len_utf8()..].starts_with('\''))
                    .map(|ch| i + 1 + ch.len_utf8())
            };
            match end {
                Some(e) => {
                    out.push_str("' '");
                    i = e + 1;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let ch = src[i..].chars().next().expect("char boundary");
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn ident_before(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// Removes every item under `#[cfg(test)]` (a `mod tests { … }` or a `mod tests;`).
fn without_test_items(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let brace = after.find('{');
        let semi = after.find(';');
        match (brace, semi) {
            (Some(b), Some(s)) if s < b => rest = &after[s + 1..],
            (Some(b), _) => {
                let mut depth = 0;
                let mut end = after.len();
                for (k, ch) in after[b..].char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &after[end..];
            }
            (None, Some(s)) => rest = &after[s + 1..],
            (None, None) => rest = "",
        }
    }
    out.push_str(rest);
    out
}

/// Expands a use tree starting at `s` (just after `crate::`, `super::`, …) into
/// its leaf paths: `a::{b, c::d}` → `a::b`, `a::c::d`.
fn expand(s: &str) -> Vec<Vec<String>> {
    fn tree(s: &[u8], i: &mut usize) -> Vec<Vec<String>> {
        let skip_ws = |i: &mut usize| {
            while *i < s.len() && s[*i].is_ascii_whitespace() {
                *i += 1;
            }
        };
        skip_ws(i);
        if s.get(*i) == Some(&b'{') {
            *i += 1;
            let mut all = Vec::new();
            loop {
                skip_ws(i);
                match s.get(*i) {
                    Some(b'}') => {
                        *i += 1;
                        return all;
                    }
                    Some(b',') => *i += 1,
                    None => return all,
                    _ => {
                        let before = *i;
                        all.extend(tree(s, i));
                        if *i == before {
                            *i += 1;
                        }
                    }
                }
            }
        }
        let start = *i;
        while *i < s.len() && (s[*i].is_ascii_alphanumeric() || s[*i] == b'_' || s[*i] == b'*') {
            *i += 1;
        }
        if *i == start {
            return vec![Vec::new()];
        }
        let seg = String::from_utf8_lossy(&s[start..*i]).into_owned();
        let mut j = *i;
        while j < s.len() && s[j].is_ascii_whitespace() {
            j += 1;
        }
        if s[j..].starts_with(b"::") {
            *i = j + 2;
            let mut subs = tree(s, i);
            for p in &mut subs {
                p.insert(0, seg.clone());
            }
            subs
        } else {
            vec![vec![seg]]
        }
    }
    let mut i = 0;
    tree(s.as_bytes(), &mut i)
}

fn load(src_dir: &Path) -> Crate {
    let mut files = Vec::new();
    rust_files(src_dir, &mut files);
    files.sort();
    let mut modules = BTreeSet::new();
    let mut texts = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(src_dir).expect("under src");
        let Some(m) = module_of(rel) else { continue };
        modules.insert(m.clone());
        let text = without_test_items(&strip(&std::fs::read_to_string(f).expect("readable")));
        texts.push((rel.display().to_string(), m, text));
    }
    let mut uses = Vec::new();
    for (file, m, text) in &texts {
        let b = text.as_bytes();
        let mut k = 0;
        while k < b.len() {
            let at_word = !ident_before(b, k) && (k == 0 || b[k - 1] != b':');
            let rest = &text[k..];
            let base: Option<(ModPath, usize)> = if !at_word {
                None
            } else if rest.starts_with("crate::") {
                Some((Vec::new(), 7))
            } else if rest.starts_with("self::") {
                Some((m.clone(), 6))
            } else if rest.starts_with("super::") {
                // Relative to the module, whatever file holds it: each `super`
                // is one step up.
                let mut base = m.clone();
                let mut len = 0;
                let mut r = rest;
                while let Some(after) = r.strip_prefix("super::") {
                    base.pop();
                    len += 7;
                    r = after;
                }
                Some((base, len))
            } else {
                None
            };
            let Some((base, len)) = base else {
                k += 1;
                continue;
            };
            for tail in expand(&text[k + len..]) {
                let mut full = base.clone();
                full.extend(tail.iter().filter(|s| *s != "*").cloned());
                // The deepest known module on the path.
                let mut to = full.clone();
                while !to.is_empty() && !modules.contains(&to) {
                    to.pop();
                }
                uses.push(Use {
                    file: file.clone(),
                    from: m.clone(),
                    to,
                    written: full.join("::"),
                });
            }
            k += len;
        }
    }
    Crate { modules, uses }
}

/// Strongly connected components with more than one member (Tarjan).
fn cycles(
    nodes: &BTreeSet<String>,
    edges: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<Vec<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        if let Some(next) = t.edges.get(v) {
            for w in next {
                let w = w.as_str();
                if !t.index.contains_key(w) {
                    visit(t, w);
                    let lw = t.low[w];
                    let lv = t.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if t.on.contains(w) {
                    let iw = t.index[w];
                    let lv = t.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().expect("on stack");
                t.on.remove(w);
                comp.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in nodes {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// Every folder's child modules, checked for cycles among themselves: a child uses
/// a sibling when anything inside it names anything inside the sibling.
fn module_cycles(c: &Crate) -> Vec<String> {
    let mut problems = Vec::new();
    for parent in &c.modules {
        let children: BTreeSet<String> = c
            .modules
            .iter()
            .filter(|m| m.len() == parent.len() + 1 && m.starts_with(parent))
            .map(|m| m[parent.len()].clone())
            .collect();
        if children.len() < 2 {
            continue;
        }
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut why: BTreeMap<(String, String), &Use> = BTreeMap::new();
        for u in &c.uses {
            if u.from.len() <= parent.len()
                || u.to.len() <= parent.len()
                || !u.from.starts_with(parent)
                || !u.to.starts_with(parent)
            {
                continue;
            }
            let (a, b) = (&u.from[parent.len()], &u.to[parent.len()]);
            if a != b {
                edges.entry(a.clone()).or_default().insert(b.clone());
                why.entry((a.clone(), b.clone())).or_insert(u);
            }
        }
        for comp in cycles(&children, &edges) {
            let mut lines = Vec::new();
            for a in &comp {
                for b in &comp {
                    if let Some(u) = why.get(&(a.clone(), b.clone())) {
                        lines.push(format!(
                            "    {a} -> {b}: {} names crate::{}",
                            u.file, u.written
                        ));
                    }
                }
            }
            let at = if parent.is_empty() {
                "the crate root".to_owned()
            } else {
                parent.join("::")
            };
            problems.push(format!(
                "cycle among the modules of {at}: {}\n{}",
                comp.join(", "),
                lines.join("\n")
            ));
        }
    }
    problems
}

/// Top-level modules may use their own layer's or lower ones'; a cycle within a
/// layer is caught by [`module_cycles`].
fn layer_violations(c: &Crate, layers: &[(&str, &[&str])]) -> Vec<String> {
    let layer_of = |m: &str| layers.iter().position(|(_, ms)| ms.contains(&m));
    let mut problems = Vec::new();
    for m in c.modules.iter().filter(|m| m.len() == 1) {
        if layer_of(&m[0]).is_none() {
            problems.push(format!(
                "module {} has no layer: add it to this test's table and to ARCHITECTURE.md",
                m[0]
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for u in &c.uses {
        let (Some(a), Some(b)) = (u.from.first(), u.to.first()) else {
            continue;
        };
        let (Some(la), Some(lb)) = (layer_of(a), layer_of(b)) else {
            continue;
        };
        if lb > la && seen.insert((a.clone(), b.clone())) {
            problems.push(format!(
                "{a} ({}) uses {b} ({}), a higher layer: {} names crate::{}",
                layers[la].0, layers[lb].0, u.file, u.written
            ));
        }
    }
    problems
}

/// Agent layers, bottom to top (ARCHITECTURE.md says what each holds).
const AGENT_LAYERS: &[(&str, &[&str])] = &[
    ("runtime", &["runtime", "error", "uci_format"]),
    ("adapters", &["system", "store", "link"]),
    (
        "domain services",
        &[
            "policy",
            "dns",
            "wifi",
            "usage",
            "scan",
            "speedtest",
            "offload",
        ],
    ),
    ("configuration and the simulated router", &["config", "sim"]),
    ("app", &["app"]),
    ("api", &["api", "control"]),
    ("entry points", &["cleanup"]),
];

/// Relay layers, bottom to top.
const RELAY_LAYERS: &[(&str, &[&str])] = &[
    (
        "foundation",
        &[
            "error",
            "http",
            "auth",
            "config",
            "ratelimit",
            "tls",
            "answer",
            "peer_limits",
            "conn_activity",
            "sync",
            "private",
            "vendors",
        ],
    ),
    (
        "state",
        &[
            "registry",
            "sessions",
            "cluster",
            "session_store",
            "metrics",
            "link_health",
            "capacity",
            "link_registry",
            "drain",
            "recent_reports",
            "speedtest_slots",
            "inflight",
            "state",
        ],
    ),
    (
        "handlers",
        &[
            "admin",
            "enroll",
            "forward",
            "report",
            "session_api",
            "speedtest",
            "cluster_sync",
            "agent_link",
            "peer_api",
            "metrics_http",
        ],
    ),
    ("routing and serving", &["api", "server"]),
];

fn check(src: &str, layers: &[(&str, &[&str])]) {
    let c = load(&workspace().join(src));
    assert!(c.modules.len() > 5, "{src}: the modules were not found");
    assert!(c.uses.len() > 20, "{src}: the references were not found");
    let mut problems = module_cycles(&c);
    problems.extend(layer_violations(&c, layers));
    assert!(problems.is_empty(), "{src}:\n{}", problems.join("\n"));
}

#[test]
fn agent_modules_have_no_cycle_and_respect_the_layers() {
    check("agent/src", AGENT_LAYERS);
}

#[test]
fn relay_modules_have_no_cycle_and_respect_the_layers() {
    check("relay/src", RELAY_LAYERS);
}

/// The checker itself: it must see a cycle when there is one, through the path
/// forms the tree uses, and ignore text that only looks like a path.
#[test]
fn the_checker_finds_cycles_and_ignores_comments_strings_and_tests() {
    let dir = tempfile::tempdir().unwrap();
    let w = |p: &str, s: &str| {
        let path = dir.path().join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, s).unwrap();
    };
    w("lib.rs", "pub mod a;\npub mod b;\npub mod c;\npub mod d;\n");
    w(
        "a.rs",
        "use crate::{b::{self, X}, c};\n// crate::d::nothing\n",
    );
    w(
        "b/mod.rs",
        "pub mod inner;\nfn f() { let s = \"crate::d::x\"; }\n",
    );
    w("b/inner.rs", "fn g() { super::super::a::h(); }\n");
    w(
        "c.rs",
        "#[cfg(test)]\nmod tests {\n    use crate::d::T;\n}\nfn k<'a>(x: &'a str) -> char { '\"' }\n",
    );
    w("d.rs", "fn m() { crate::c::k(\"\"); }\n");
    let c = load(dir.path());
    let problems = module_cycles(&c);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("a, b"), "{}", problems[0]);
    assert!(!problems[0].contains(", d"), "{}", problems[0]);
    // Layers: d (bottom) using c (top) is a violation; a using b within a layer is not.
    let v = layer_violations(&c, &[("low", &["d"]), ("high", &["a", "b", "c"])]);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].starts_with("d (low) uses c (high)"), "{}", v[0]);
    assert_eq!(expand("a::{b, c::{d, e}}, z").len(), 3);
}
