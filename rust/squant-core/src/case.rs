//! The fast CASE path: one output channel at a time, everything in a
//! per-thread scratch that stays in cache. Produces exactly the codes of
//! `reference::quantize_channel_ref`.
//!
//! Differences from the reference, none observable in the codes:
//! - the flip tables are never materialised; they are recomputed from `x`;
//! - only the ranks of an order that a step actually uses are selected
//!   (`t` flips plus the carry), with keys that make the order total;
//! - carries are only tracked when the C level follows the K level.

use crate::error::SquantError;
use crate::mode::Mode;
use crate::qparams::{code_range, params_of, rne, ChannelParams};
use crate::sum;

/// Numbers of elements whose value changed at each level.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flips {
    /// Kernel-wise (SQuant-K) changes.
    pub k: u64,
    /// Channel-wise (SQuant-C) changes.
    pub c: u64,
}

impl std::ops::Add for Flips {
    type Output = Flips;
    fn add(self, o: Flips) -> Flips {
        Flips {
            k: self.k + o.k,
            c: self.c + o.c,
        }
    }
}

/// Per-thread working memory, reused across channels.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    r: Vec<f32>,
    e: Vec<f32>,
    keys: Vec<u64>,
    /// Carries of the K level: position in channel, up table?, priority.
    carries: Vec<(u32, bool, f32)>,
    zeros: Vec<u32>,
}

/// A sort key that orders by priority descending, then position ascending,
/// when keys are compared descending. Priorities are non-negative floats,
/// whose bit patterns order like their values.
#[inline(always)]
fn key(priority: f32, pos: usize) -> u64 {
    ((priority.to_bits() as u64) << 32) | (!(pos as u32)) as u64
}

#[inline(always)]
fn key_pos(k: u64) -> usize {
    (!(k as u32)) as usize
}

/// Priority of an element in the up (`up = true`) or down table, from its
/// E-level state (`e` is the nearest-rounding error).
#[inline(always)]
fn priority(x: f32, e: f32, up: bool, tmin: f32, tmax: f32) -> f32 {
    if up {
        if e < 0.0 && x < tmax {
            -e
        } else {
            0.0
        }
    } else if e > 0.0 && x > tmin {
        e
    } else {
        0.0
    }
}

/// Table entry `(value, error)` of an element for a flip in direction `up`.
#[inline(always)]
fn table(x: f32, up: bool, tmin: f32, tmax: f32) -> (f32, f32) {
    let r0 = rne(x);
    let e0 = r0 - x;
    if up {
        if e0 < 0.0 && x < tmax {
            (r0 + 1.0, e0 + 1.0)
        } else {
            (r0, 0.0)
        }
    } else if e0 > 0.0 && x > tmin {
        (r0 - 1.0, e0 - 1.0)
    } else {
        (r0, 0.0)
    }
}

/// Direction, flip count and over flag of one CASE step (SPEC section 3).
#[inline(always)]
fn step_params(s: f64, len: usize) -> (bool, usize, bool) {
    let up = s < 0.0;
    let a = s.abs() as f32;
    let t = rne(a);
    let over = t >= a;
    (up, (t as usize).min(len), over)
}

/// Moves the `m` largest keys to the front of `keys`, sorted descending.
fn top_sorted(keys: &mut [u64], m: usize) {
    let m = m.min(keys.len());
    if m == 0 {
        return;
    }
    if m < keys.len() {
        keys.select_nth_unstable_by(m - 1, |a, b| b.cmp(a));
    }
    keys[..m].sort_unstable_by(|a, b| b.cmp(a));
}

impl Scratch {
    fn resize(&mut self, g: usize) {
        if self.x.len() != g {
            self.x.resize(g, 0.0);
            self.r.resize(g, 0.0);
            self.e.resize(g, 0.0);
        }
        self.carries.clear();
    }

    #[inline(always)]
    fn flip(&mut self, j: usize, up: bool, tmin: f32, tmax: f32) -> u64 {
        let (v, err) = table(self.x[j], up, tmin, tmax);
        let changed = u64::from(self.r[j] != v);
        self.r[j] = v;
        self.e[j] = err;
        changed
    }

    /// SQuant-K on every kernel of the channel; records carries when `carry`.
    fn kernel_level(&mut self, k: usize, carry: bool, tmin: f32, tmax: f32) -> u64 {
        let g = self.x.len();
        let f = sum::frac_bits(k);
        let mut changed = 0;
        let mut keys = std::mem::take(&mut self.keys);
        for base in (0..g).step_by(k) {
            let (up, t, over) = step_params(sum::slice_sum(&self.e[base..base + k], f), k);
            // Ranks of the order this step reads.
            let need = if carry && !over { (t + 1).min(k) } else { t };
            keys.clear();
            keys.extend((0..k).map(|i| {
                let j = base + i;
                key(priority(self.x[j], self.e[j], up, tmin, tmax), i)
            }));
            let last = if carry && over && t == 0 {
                keys.iter().copied().min().map(key_pos)
            } else {
                None
            };
            top_sorted(&mut keys, need);
            for &kk in &keys[..t] {
                changed += self.flip(base + key_pos(kk), up, tmin, tmax);
            }
            if carry {
                let c = if over {
                    match last {
                        Some(i) => Some((i, !up)),
                        None => Some((key_pos(keys[t - 1]), !up)),
                    }
                } else if t < k {
                    Some((key_pos(keys[t]), up))
                } else {
                    None
                };
                if let Some((i, table_up)) = c {
                    let j = base + i;
                    self.carries.push((j as u32, table_up, self.e[j].abs()));
                }
            }
        }
        self.keys = keys;
        changed
    }

    /// SQuant-C on the whole channel. `after_k`: the only non-zero
    /// priorities are the K-level carries; otherwise they are the E-level
    /// element priorities (and `e` still holds the E-level errors).
    fn channel_level(&mut self, after_k: bool, tmin: f32, tmax: f32) -> u64 {
        let g = self.x.len();
        let (up, t, _over) = step_params(sum::slice_sum(&self.e, sum::frac_bits(g)), g);
        if t == 0 {
            return 0;
        }
        let mut keys = std::mem::take(&mut self.keys);
        let mut zeros = std::mem::take(&mut self.zeros);
        keys.clear();
        zeros.clear();
        if after_k {
            keys.extend(
                self.carries
                    .iter()
                    .filter(|&&(_, tu, p)| tu == up && p > 0.0)
                    .map(|&(j, _, p)| key(p, j as usize)),
            );
        } else {
            for j in 0..g {
                let p = priority(self.x[j], self.e[j], up, tmin, tmax);
                if p > 0.0 {
                    keys.push(key(p, j));
                }
            }
        }
        let n_pos = keys.len();
        if t < n_pos {
            keys.select_nth_unstable_by(t - 1, |a, b| b.cmp(a));
            keys.truncate(t);
        } else if t > n_pos {
            // The order continues with zero-priority positions, ascending.
            let mut positive: Vec<usize> = keys.iter().map(|&kk| key_pos(kk)).collect();
            positive.sort_unstable();
            let mut p = positive.iter().peekable();
            for j in 0..g {
                if zeros.len() == t - n_pos {
                    break;
                }
                if p.peek() == Some(&&j) {
                    p.next();
                } else {
                    zeros.push(j as u32);
                }
            }
        }
        let mut changed = 0;
        for &kk in &keys {
            changed += self.flip(key_pos(kk), up, tmin, tmax);
        }
        for &j in &zeros {
            changed += self.flip(j as usize, up, tmin, tmax);
        }
        self.keys = keys;
        self.zeros = zeros;
        changed
    }
}

/// Quantizes one output channel `w` (`ic * k` values) into `codes`.
pub fn quantize_channel(
    w: &[f32],
    k: usize,
    bits: u32,
    mode: Mode,
    channel: usize,
    codes: &mut [i8],
    sc: &mut Scratch,
) -> Result<(ChannelParams, Flips), SquantError> {
    let p = params_of(w, bits, channel)?;
    let (tmin, tmax) = code_range(bits);
    sc.resize(w.len());

    // SQuant-E.
    for (((x, r), e), &wv) in sc.x.iter_mut().zip(&mut sc.r).zip(&mut sc.e).zip(w) {
        let prod = p.scale * wv;
        *x = prod - p.zero_point;
        *r = rne(*x);
        *e = *r - *x;
    }

    let mut flips = Flips::default();
    let run_k = mode.has_k() && k > 1;
    if run_k {
        flips.k = sc.kernel_level(k, mode.has_c(), tmin, tmax);
    }
    if mode.has_c() {
        flips.c = sc.channel_level(run_k, tmin, tmax);
    }
    for (q, &r) in codes.iter_mut().zip(&sc.r) {
        *q = r.clamp(tmin, tmax) as i8;
    }
    Ok((p, flips))
}
