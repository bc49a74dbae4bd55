//! The crate's layout as its issue states it: a one-way stack. Reads the sources and checks
//! that no module uses one above it, that the modules of one layer use each other without a
//! circle, that no file passes 500 lines, and that the thread-local is touched only by the
//! thread module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom to top, by top-level module.
const LAYERS: &[&str] = &[
    "id",
    "sys",
    "space",
    "accounting",
    "thread",
    "overflow",
    "profile",
    "route",
    "ctl",
];

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A file's module path (`space::hooks`; `lib` for the root).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The source without `#[cfg(test)]` modules and comments (what the crate itself uses).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| {
            let t = l.trim_start();
            !t.starts_with("//")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules of this crate a file names (`crate::a::b` → `a::b`, `super::x` resolved).
fn uses(module: &str, code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let parent: Vec<&str> = module.split("::").collect();
    for (prefix, base) in [
        ("crate::", Vec::new()),
        ("super::", parent[..parent.len().saturating_sub(1)].to_vec()),
    ] {
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let after = &rest[i + prefix.len()..];
            let path: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let mut full: Vec<&str> = base.clone();
            full.extend(path.split("::").filter(|s| !s.is_empty()));
            // Keep the module part: lower-case names.
            let m: Vec<&str> = full
                .into_iter()
                .take_while(|s| s.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
                .collect();
            if !m.is_empty() {
                out.insert(m.join("::"));
            }
            rest = &after[path.len()..];
        }
    }
    out
}

fn layer(module: &str) -> Option<usize> {
    let top = module.split("::").next()?;
    LAYERS.iter().position(|l| *l == top)
}

#[test]
fn the_allocator_is_a_one_way_stack() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut modules = BTreeSet::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for f in &all {
        let text = std::fs::read_to_string(f).unwrap();
        let lines = text.lines().count();
        if lines > 500 {
            problems.push(format!("{}: {lines} lines", f.display()));
        }
        let m = module_of(&src, f);
        modules.insert(m.clone());
        let code = code(&text);
        if !m.starts_with("thread") && (code.contains("THREAD.") || code.contains("static THREAD:"))
        {
            problems.push(format!("{m} touches the thread-local"));
        }
        graph.insert(m.clone(), uses(&m, &code));
    }
    // Resolve each used path to the longest module it names.
    let resolve = |p: &str| {
        let parts: Vec<&str> = p.split("::").collect();
        (1..=parts.len())
            .rev()
            .map(|n| parts[..n].join("::"))
            .find(|c| modules.contains(c))
    };
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, used) in &graph {
        for u in used {
            let Some(target) = resolve(u) else { continue };
            // A module may name its own descendants (its submodules) and itself.
            if target == *m || target.starts_with(&format!("{m}::")) || *m == "lib" || *m == "model"
            {
                continue;
            }
            if let (Some(a), Some(b)) = (layer(m), layer(&target))
                && b > a
            {
                problems.push(format!("{m} (layer {a}) uses {target} (layer {b})"));
            }
            edges.entry(m.clone()).or_default().insert(target);
        }
    }
    // No circle among modules.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
        problems: &mut Vec<String>,
    ) {
        match state.get(m) {
            Some(2) => return,
            Some(1) => {
                let at = stack.iter().position(|s| s == m).unwrap_or(0);
                problems.push(format!("circle: {} -> {m}", stack[at..].join(" -> ")));
                return;
            }
            _ => {}
        }
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for n in edges.get(m).into_iter().flatten() {
            visit(n, edges, state, stack, problems);
        }
        stack.pop();
        state.insert(m.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    for m in &modules {
        visit(m, &edges, &mut state, &mut Vec::new(), &mut problems);
    }
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(modules.len() > 20, "{modules:?}");
}
