//! Which tensors of a checkpoint are quantized: the rule of the Python
//! `select_state_dict`, with Python's `fnmatch.fnmatchcase` patterns.

use crate::dtype;
use crate::read::Entry;

/// Default include pattern.
pub const DEFAULT_INCLUDE: &str = "*weight";

/// `fnmatch.fnmatchcase(name, pattern)`: `*`, `?`, `[seq]`, `[!seq]`; a `[`
/// without its `]` is literal.
pub fn fnmatch(name: &str, pattern: &str) -> bool {
    let n: Vec<char> = name.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    matches(&n, &p)
}

/// The set at `p[0] == '['`: (negated, items, length in pattern), or
/// `None` when it does not close.
/// A parsed `[...]` set: negated, its ranges, its length in the pattern.
type CharSet = (bool, Vec<(char, char)>, usize);

fn parse_set(p: &[char]) -> Option<CharSet> {
    let mut i = 1;
    let neg = p.get(i) == Some(&'!');
    if neg {
        i += 1;
    }
    let start = i;
    let mut items = Vec::new();
    loop {
        let c = *p.get(i)?;
        if c == ']' && i > start {
            return Some((neg, items, i + 1));
        }
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|&e| e != ']') {
            let e = p[i + 2];
            items.push((c, e));
            i += 3;
        } else {
            items.push((c, c));
            i += 1;
        }
    }
}

fn matches(n: &[char], p: &[char]) -> bool {
    // Iterative with backtracking to the last '*'.
    let (mut ni, mut pi) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
                continue;
            }
            Some('?') => Some(1),
            Some('[') => match parse_set(&p[pi..]) {
                Some((neg, items, len)) => {
                    let hit = items.iter().any(|&(a, b)| a <= n[ni] && n[ni] <= b);
                    (hit != neg).then_some(len)
                }
                None => (n[ni] == '[').then_some(1),
            },
            Some(&c) => (n[ni] == c).then_some(1),
            None => None,
        };
        match step {
            Some(len) => {
                pi += len;
                ni += 1;
            }
            None => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether `name` matches one of `patterns`.
pub fn matches_any(name: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| fnmatch(name, p))
}

/// Whether a stored tensor is quantized: floating, 2+ dimensions, at least
/// one element, its name matching `include` (default `*weight`) and no
/// `skip` pattern (tried on the name and on its [`layer_name`]).
pub fn is_selected(e: &Entry, include: &[String], skip: &[String]) -> bool {
    if !(dtype::is_float(e.dtype) && e.shape.len() >= 2 && e.numel() > 0) {
        return false;
    }
    let included = if include.is_empty() {
        fnmatch(&e.name, DEFAULT_INCLUDE)
    } else {
        matches_any(&e.name, include)
    };
    if !included {
        return false;
    }
    !(matches_any(&e.name, skip) || matches_any(layer_name(&e.name), skip))
}

/// An attention's projection weights, stored as `<attention>.in_proj_weight`
/// (`q_proj_weight`...): the layer the Python `quantize_model` calls
/// `<attention>.in_proj`.
const PROJECTION_SUFFIXES: [&str; 4] = [
    "in_proj_weight",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
];

/// The layer name of a tensor name, as the Python package's `layer_name`:
/// `fc.weight` -> `fc`, `attn.in_proj_weight` -> `attn.in_proj`; other
/// names as they are.
pub fn layer_name(name: &str) -> &str {
    if let Some(module) = name.strip_suffix(".weight") {
        return module;
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if PROJECTION_SUFFIXES.contains(&last) {
        return &name[..name.len() - "_weight".len()];
    }
    name
}

#[cfg(test)]
mod tests {
    use super::fnmatch;

    #[test]
    fn layer_names_like_python() {
        use super::layer_name;
        assert_eq!(layer_name("fc.weight"), "fc");
        assert_eq!(layer_name("a.in_proj_weight"), "a.in_proj");
        assert_eq!(layer_name("k_proj_weight"), "k_proj");
        assert_eq!(layer_name("a.in_proj_bias"), "a.in_proj_bias");
        assert_eq!(layer_name("a.xin_proj_weight"), "a.xin_proj_weight");
        assert_eq!(layer_name("weight"), "weight");
    }

    #[test]
    fn fnmatch_like_python() {
        assert!(fnmatch("fc.weight", "*weight"));
        assert!(!fnmatch("fc.bias", "*weight"));
        assert!(fnmatch("features.0.weight", "features.?.*"));
        assert!(fnmatch("c2", "c[0-9]"));
        assert!(!fnmatch("c2", "c[!0-9]"));
        assert!(fnmatch("a[b", "a[b"));
        assert!(fnmatch("a]", "a[]]"));
        assert!(fnmatch("", "*"));
        assert!(!fnmatch("", "?"));
        assert!(fnmatch("abcabd", "*ab?"));
        assert!(fnmatch("a-b", "a[a-]b"));
    }
}
