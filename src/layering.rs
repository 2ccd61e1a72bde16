//! The layer rule, checked: every `crate::…` path in `src/` points down the layer order of
//! ARCHITECTURE.md, and no two top-level modules import each other.
//!
//! The reader is deliberately simple: it strips comments and string literals, cuts each file
//! at its `#[cfg(test)]` module, and collects `crate::name` and `crate::{a, b::c}` paths. The
//! edges that break the order today are listed in [`KNOWN_DEBT`]; the test fails on any edge
//! outside that list, and on any listed edge that no longer exists, so the list only shrinks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Bottom to top. A module may import from its own layer (without cycles) or from below.
const LAYERS: &[&[&str]] = &[
    // Config types and utilities.
    &[
        "clock",
        "text",
        "csv",
        "shutdown",
        "outbound",
        "proxy_protocol",
        "config",
    ],
    // Domain: grants, preauth limits.
    &["grant", "preauth", "policy"],
    // Stores.
    &["state", "storage", "vault", "keys", "signing", "credential"],
    // Evidence: recorder, formats, verify, exports.
    &["record", "verify", "audit_export", "report", "findings"],
    // Audit: SIEM and alerts.
    &["siem", "alerts"],
    // The protocol-neutral session core.
    &["session", "cluster", "services"],
    // Protocol adapters.
    &["ssh", "pg"],
    // Workflow.
    &["review", "rotation", "incident"],
    // Surfaces.
    &["control", "api", "web"],
    // The composition root.
    &["server"],
];

/// Imports that still point the wrong way, as (from, to). Remove an entry when you fix it;
/// the test insists. Empty: keep it so.
const KNOWN_DEBT: &[(&str, &str)] = &[];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// `src/x.rs` and `src/x/…` belong to module `x`; `lib.rs`, `main.rs` and the CLI are the
/// crate root and the binary, outside the order.
fn module_of(rel: &Path) -> Option<String> {
    let mut parts = rel.components();
    let first = parts.next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    match name {
        "lib" | "main" | "cli" => None,
        n => Some(n.to_string()),
    }
}

/// Source text with comments, string and char literals blanked, cut at the first test module.
fn code_of(src: &str) -> String {
    let cut = src.find("#[cfg(test)]\nmod tests").unwrap_or(src.len());
    let b = &src.as_bytes()[..cut];
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'r' if matches!(b.get(i + 1), Some(b'"') | Some(b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                // Raw string: r"…", r#"…"#, …
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&b'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                j += 1;
                loop {
                    if j >= b.len() {
                        break;
                    }
                    if b[j] == b'"'
                        && b[j + 1..]
                            .iter()
                            .take(hashes)
                            .filter(|c| **c == b'#')
                            .count()
                            == hashes
                    {
                        j += 1 + hashes;
                        break;
                    }
                    j += 1;
                }
                out.push_str("\"\"");
                i = j;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' => {
                // A char literal ('x', '\n', '\'') or a lifetime ('a): skip only the former.
                let end = if b.get(i + 1) == Some(&b'\\') {
                    b[i + 2..]
                        .iter()
                        .position(|c| *c == b'\'')
                        .map(|p| i + 2 + p)
                } else if b.get(i + 2) == Some(&b'\'') {
                    Some(i + 2)
                } else {
                    None
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
            }
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    out
}

/// The top-level modules named by `crate::` paths in `code`.
fn imports_of(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(p) = rest.find("crate::") {
        let before = rest[..p].chars().next_back();
        rest = &rest[p + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let t = rest.trim_start();
        if let Some(group) = t.strip_prefix('{') {
            // Top-level names of a `{a, b::{c, d}, e}` group.
            let mut depth = 0usize;
            let mut at_start = true;
            for (k, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => at_start = true,
                    c if at_start && (c.is_alphanumeric() || c == '_') => {
                        at_start = false;
                        found.insert(ident_at(&group[k..]));
                    }
                    _ => {}
                }
            }
        } else {
            let id = ident_at(t);
            if !id.is_empty() {
                found.insert(id);
            }
        }
    }
    found
}

fn ident_at(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

fn rs_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every edge between distinct top-level modules, with the file that makes it.
fn edges() -> BTreeMap<(String, String), String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src");
        let Some(from) = module_of(rel) else { continue };
        let text = std::fs::read_to_string(&f).expect("read source");
        for to in imports_of(&code_of(&text)) {
            if to != from && layer_of(&to).is_some() {
                out.entry((from.clone(), to))
                    .or_insert_with(|| rel.display().to_string());
            }
        }
    }
    out
}

#[test]
fn every_module_has_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let unplaced: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_of(f.strip_prefix(&src).ok()?))
        .filter(|m| layer_of(m).is_none() && m != "layering")
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules without a layer in LAYERS: {unplaced:?}"
    );
}

#[test]
fn imports_point_down_the_layers_and_form_no_cycle() {
    let edges = edges();
    assert!(
        edges.len() > 40,
        "the reader found too few imports to be reading: {}",
        edges.len()
    );
    let debt: BTreeSet<(String, String)> = KNOWN_DEBT
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let mut wrong = Vec::new();
    for ((from, to), file) in &edges {
        let (lf, lt) = (layer_of(from).unwrap_or(0), layer_of(to).unwrap_or(0));
        if lt > lf && !debt.contains(&(from.clone(), to.clone())) {
            wrong.push(format!(
                "{file}: {from} (layer {lf}) imports {to} (layer {lt})"
            ));
        }
    }
    // Within a layer, imports must not close a cycle (of any length).
    let names: Vec<&str> = LAYERS.iter().flat_map(|l| l.iter().copied()).collect();
    let n = names.len();
    let idx = |m: &str| names.iter().position(|x| *x == m);
    let mut reach = vec![vec![false; n]; n];
    for (from, to) in edges.keys() {
        if let (Some(a), Some(b)) = (idx(from), idx(to)) {
            if layer_of(from) == layer_of(to) {
                reach[a][b] = true;
            }
        }
    }
    for k in 0..n {
        for a in 0..n {
            for b in 0..n {
                if reach[a][k] && reach[k][b] {
                    reach[a][b] = true;
                }
            }
        }
    }
    for (a, name) in names.iter().enumerate() {
        if reach[a][a] {
            wrong.push(format!("cycle within a layer through {name}"));
        }
    }
    let gone: Vec<_> = debt.iter().filter(|e| !edges.contains_key(*e)).collect();
    assert!(
        wrong.is_empty(),
        "imports against the layer order:\n{}",
        wrong.join("\n")
    );
    assert!(
        gone.is_empty(),
        "fixed debt still listed in KNOWN_DEBT (remove it): {gone:?}"
    );
}

#[test]
fn the_reader_sees_groups_and_ignores_comments_and_strings() {
    let code = code_of(
        "use crate::{a::X, b::{C, D}, e};\n// crate::f\nlet s = \"crate::g\";\nlet r = r#\"crate::h\"#;\n\
         fn x<'a>(c: char) { crate::i::y(); let q = '\"'; }\n/* crate::j */ crate::k::Z\n\
         #[cfg(test)]\nmod tests { use crate::l; }",
    );
    let got: Vec<String> = imports_of(&code).into_iter().collect();
    assert_eq!(got, ["a", "b", "e", "i", "k"]);
}
