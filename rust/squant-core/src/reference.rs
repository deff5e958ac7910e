//! A deliberately plain scalar implementation of docs/algorithm.md sections 1-4, kept as
//! the test oracle of the fast path in `case.rs` (as ggml keeps
//! `quantize_row_*_ref`). Full stable sorts, explicit flip tables, no
//! shortcuts. Slow on purpose; do not optimise.

use crate::error::SquantError;
use crate::mode::Mode;
use crate::qparams::{code_range, params_of, rne, ChannelParams, Quantizer};

/// Up/down flip table of docs/algorithm.md section 2.
struct Table {
    value: Vec<f32>,
    error: Vec<f32>,
    priority: Vec<f32>,
}

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    Up,
    Down,
}

/// Positions sorted by priority, descending; ties keep the lower position first.
fn stable_order(priority: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..priority.len()).collect();
    // `sort_by` is stable.
    order.sort_by(|&a, &b| priority[b].total_cmp(&priority[a]));
    order
}

struct State {
    r: Vec<f32>,
    e: Vec<f32>,
    up: Table,
    down: Table,
}

impl State {
    fn table(&mut self, d: Dir) -> &mut Table {
        match d {
            Dir::Up => &mut self.up,
            Dir::Down => &mut self.down,
        }
    }

    fn flip(&mut self, j: usize, d: Dir) {
        let (v, err) = match d {
            Dir::Up => (self.up.value[j], self.up.error[j]),
            Dir::Down => (self.down.value[j], self.down.error[j]),
        };
        self.r[j] = v;
        self.e[j] = err;
    }

    /// docs/algorithm.md section 3 on the positions `group`, with the orders given
    /// (`up_order`, `down_order`, both as group-local indices).
    fn case_step(&mut self, group: &[usize], up_order: &[usize], down_order: &[usize]) -> usize {
        let s = crate::sum::group_sum(group.iter().map(|&j| self.e[j]), group.len());
        let dir = if s < 0.0 { Dir::Up } else { Dir::Down };
        let a = s.abs() as f32;
        let t = rne(a);
        let over = t >= a;
        let order = match dir {
            Dir::Up => up_order,
            Dir::Down => down_order,
        };
        // t never exceeds the group in practice; the clamp keeps a
        // pathological input from indexing out of bounds.
        let t = (t as usize).min(order.len());
        let mut changed = 0;
        for &local in order.iter().take(t) {
            let j = group[local];
            let before = self.r[j];
            self.flip(j, dir);
            changed += usize::from(self.r[j] != before);
        }
        if over {
            let local = if t == 0 {
                order[order.len() - 1]
            } else {
                order[t - 1]
            };
            let c = group[local];
            let opposite = if dir == Dir::Up { Dir::Down } else { Dir::Up };
            let v = self.e[c].abs();
            self.table(opposite).priority[c] = v;
        } else if t < order.len() {
            let c = group[order[t]];
            let v = self.e[c].abs();
            self.table(dir).priority[c] = v;
        }
        changed
    }
}

/// Reference quantization of one output channel `w` (`ic * k` values).
/// Returns the codes, the channel parameters and the K- and C-level counts
/// of elements whose value changed.
pub fn quantize_channel_ref(
    w: &[f32],
    ic: usize,
    k: usize,
    bits: u32,
    quantizer: Quantizer,
    mode: Mode,
    channel: usize,
) -> Result<(Vec<i8>, ChannelParams, usize, usize), SquantError> {
    if ic.checked_mul(k) != Some(w.len()) || w.is_empty() {
        return Err(SquantError::ShapeMismatch {
            what: "channel",
            expected: ic.saturating_mul(k),
            got: w.len(),
        });
    }
    let p = params_of(w, bits, quantizer, channel)?;
    let (tmin, tmax) = code_range(bits, quantizer);
    let g = w.len();

    // SQuant-E and the flip tables.
    let mut x = vec![0.0f32; g];
    let mut st = State {
        r: vec![0.0; g],
        e: vec![0.0; g],
        up: Table {
            value: vec![0.0; g],
            error: vec![0.0; g],
            priority: vec![0.0; g],
        },
        down: Table {
            value: vec![0.0; g],
            error: vec![0.0; g],
            priority: vec![0.0; g],
        },
    };
    for j in 0..g {
        let prod = p.scale * w[j];
        x[j] = prod - p.zero_point;
        st.r[j] = rne(x[j]);
        st.e[j] = st.r[j] - x[j];
        let e = st.e[j];
        if e < 0.0 && x[j] < tmax {
            st.up.value[j] = st.r[j] + 1.0;
            st.up.error[j] = e + 1.0;
            st.up.priority[j] = e.abs();
        } else {
            st.up.value[j] = st.r[j];
            st.up.error[j] = 0.0;
            st.up.priority[j] = 0.0;
        }
        if e > 0.0 && x[j] > tmin {
            st.down.value[j] = st.r[j] - 1.0;
            st.down.error[j] = e - 1.0;
            st.down.priority[j] = e;
        } else {
            st.down.value[j] = st.r[j];
            st.down.error[j] = 0.0;
            st.down.priority[j] = 0.0;
        }
    }

    let mut k_changed = 0;
    if mode.has_k() && k > 1 {
        // Orders of every kernel first, then every priority to zero.
        let mut orders = Vec::with_capacity(ic);
        for i in 0..ic {
            let span = i * k..(i + 1) * k;
            orders.push((
                stable_order(&st.up.priority[span.clone()]),
                stable_order(&st.down.priority[span]),
            ));
        }
        st.up.priority.iter_mut().for_each(|v| *v = 0.0);
        st.down.priority.iter_mut().for_each(|v| *v = 0.0);
        for (i, (uo, dn)) in orders.iter().enumerate() {
            let group: Vec<usize> = (i * k..(i + 1) * k).collect();
            k_changed += st.case_step(&group, uo, dn);
        }
    }

    let mut c_changed = 0;
    if mode.has_c() {
        let uo = stable_order(&st.up.priority);
        let dn = stable_order(&st.down.priority);
        let group: Vec<usize> = (0..g).collect();
        c_changed += st.case_step(&group, &uo, &dn);
    }

    let codes = st.r.iter().map(|&v| v.clamp(tmin, tmax) as i8).collect();
    Ok((codes, p, k_changed, c_changed))
}
