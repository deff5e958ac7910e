//! Stress test of the fast builds against the scalar reference: random
//! tensors from 14 distributions (grids, clamp corners, sums placed at and
//! near multiples of 0.5, tiny, huge, subnormal, constant, pruned, ...),
//! K in {1, 2, 3, 4, 5, 6, 7, 9, 11, 25}, bits 2..8, all modes, both
//! quantizers; each is
//! checked with quantize_isa for every build and with quantize_serial.
//! `cargo run --release -p squant-core --example stress [SEED] [SECONDS] [DIST]`
//! (`BOUNDARY=1`: channels at the lane path's length limit). Not part of CI.
use squant_core::case::Isa;
use squant_core::{
    quantize_isa, quantize_ref, quantize_serial, Layout, Mode, Quantizer, SquantError,
};
use std::time::{Duration, Instant};

struct Rng(u64);
impl Rng {
    fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.u64() % n
    }
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }
    fn unif(&mut self) -> f64 {
        (self.u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let u1 = self.unif().max(1e-300);
        let u2 = self.unif();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unif() < p
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
}

const NDIST: usize = 14;

/// Pinned channel: s = 2^p, s*mn = A = -n + c, returns (s, z, mn, mx) with the x of any w being s*w - z.
fn pinned(rng: &mut Rng, bits: u32, c: f64) -> (f64, f64, f64, f64) {
    let n = (1u32 << (bits - 1)) as f64;
    let levels = ((1u32 << bits) - 1) as f64;
    let p = rng.range(-4, 6) as i32;
    let s = 2f64.powi(p);
    let a = -n + c;
    let z = a.round_ties_even() + n; // rne(A) + n
    let mn = a / s;
    let mx = mn + levels / s;
    (s, z, mn, mx)
}

fn fill_pins(rng: &mut Rng, w: &mut [f32], mn: f64, mx: f64, extreme_p: f64) {
    let g = w.len();
    for v in w.iter_mut() {
        if rng.chance(extreme_p) {
            *v = if rng.chance(0.5) {
                mn as f32
            } else {
                mx as f32
            };
        }
    }
    let i = rng.below(g as u64) as usize;
    w[i] = mn as f32;
    if g > 1 {
        let mut j = rng.below(g as u64) as usize;
        if j == i {
            j = (i + 1) % g;
        }
        w[j] = mx as f32;
    }
}

fn gen_channel(rng: &mut Rng, g: usize, k: usize, bits: u32, dist: usize) -> Vec<f32> {
    let n = (1i64 << (bits - 1)) as f64;
    let tmin = -n;
    let tmax = n - 1.0;
    let mut w = vec![0f32; g];
    match dist {
        0 => {
            let sigma = 10f64.powf(rng.unif() * 6.0 - 4.0);
            let mu = if rng.chance(0.3) {
                rng.normal() * sigma * 3.0
            } else {
                0.0
            };
            for v in w.iter_mut() {
                *v = (mu + sigma * rng.normal()) as f32;
            }
        }
        1 => {
            let a = rng.normal() as f32;
            let b = a + (rng.unif() * 2.0) as f32;
            for v in w.iter_mut() {
                *v = a + (b - a) * rng.unif() as f32;
            }
        }
        2 | 5 | 11 => {
            // grid pinned, ties; 5: clamp corners; 11: coarse (.5/.25) grid
            let c = match dist {
                5 => rng.pick(&[-0.5, 0.5]),
                _ => rng.pick(&[-0.5, -0.25, 0.0, 0.25, 0.5, 0.375, -0.125]),
            };
            let (s, z, mn, mx) = pinned(rng, bits, c);
            let levels = ((1u32 << bits) - 1) as f64;
            let q = match dist {
                11 => rng.range(0, 2),
                _ => rng.range(0, 5),
            } as i32;
            let step = 2f64.powi(-q);
            let steps = (levels / step) as u64;
            let _ = z;
            for v in w.iter_mut() {
                let u = rng.below(steps + 1) as f64 * step; // in [0, levels]
                *v = ((u + s * mn) / s) as f32;
            }
            let ep = match dist {
                5 => rng.pick(&[0.2, 0.5, 0.8]),
                _ => rng.pick(&[0.0, 0.0, 0.05, 0.3]),
            };
            fill_pins(rng, &mut w, mn, mx, ep);
        }
        3 => {
            // one-sign errors, continuous
            let (s, z, mn, mx) = pinned(rng, bits, 0.0);
            let sign = if rng.chance(0.5) { 1.0 } else { -1.0 };
            let lo = rng.unif() * 0.5;
            let hi = lo + rng.unif() * (0.5 - lo);
            for v in w.iter_mut() {
                let m = rng.range(tmin as i64, tmax as i64) as f64;
                let e = sign * (lo + (hi - lo) * rng.unif());
                let x = m - e;
                *v = ((x + z) / s) as f32;
            }
            let ep = rng.pick(&[0.0, 0.0, 0.1]);
            fill_pins(rng, &mut w, mn, mx, ep);
        }
        4 => {
            // kernel (or channel for k == 1) sums near multiples of 0.5
            let (s, z, mn, mx) = pinned(rng, bits, 0.0);
            let grp = if k > 1 {
                k
            } else {
                g.min(rng.pick(&[g, 7, 16, 33]))
            };
            let exps: Vec<f64> = (8..=30).map(|e| 2f64.powi(-e)).collect();
            for chunk in w.chunks_mut(grp) {
                let kk = chunk.len();
                let h = rng.range(-(kk as i64), kk as i64) as f64 * 0.5;
                let mut delta = if rng.chance(0.3) {
                    0.0
                } else {
                    rng.pick(&exps) * rng.range(1, 12) as f64
                };
                if rng.chance(0.5) {
                    delta = -delta;
                }
                let target = (h + delta).clamp(-(kk as f64) * 0.5, kk as f64 * 0.5);
                let mut es = vec![0f64; kk];
                // spread target evenly then perturb pairwise
                for e in es.iter_mut() {
                    *e = target / kk as f64;
                }
                for _ in 0..kk {
                    let i = rng.below(kk as u64) as usize;
                    let j = rng.below(kk as u64) as usize;
                    let d = (rng.unif() - 0.5) * rng.pick(&[0.0, 0.25, 0.5, 1.0]);
                    if (es[i] + d).abs() <= 0.5 && (es[j] - d).abs() <= 0.5 {
                        es[i] += d;
                        es[j] -= d;
                    }
                }
                for (v, &e) in chunk.iter_mut().zip(&es) {
                    let m = rng.range(tmin as i64 + 1, tmax as i64 - 1) as f64;
                    let x = m - e;
                    *v = ((x + z) / s) as f32;
                }
            }
            fill_pins(rng, &mut w, mn, mx, 0.0);
        }
        6 => {
            let mag = rng.pick(&[1e-30, 1e-38, 1e-40, 1e-44, 1e-20, 1e-9, 3e-9]);
            for v in w.iter_mut() {
                *v = if rng.chance(0.2) {
                    0.0
                } else {
                    (rng.normal() * mag) as f32
                };
            }
        }
        7 => {
            let mag = if rng.chance(0.1) {
                rng.pick(&[1e38, 1.5e38])
            } else {
                rng.pick(&[1e30, 1e36, 1e37, 3e37, 1e20])
            };
            for v in w.iter_mut() {
                *v = (rng.normal() * mag).clamp(-3.4e38, 3.4e38) as f32;
            }
        }
        8 => {
            let c = rng.pick(&[0.0f32, -0.0, 1.0, -1.0, 0.25, 1e5, -3.0e-5, 1e-30, 123.456]);
            for v in w.iter_mut() {
                *v = c;
            }
            if rng.chance(0.3) {
                // mixed signed zeros
                for v in w.iter_mut() {
                    if rng.chance(0.5) {
                        *v = -*v;
                    }
                }
            }
        }
        9 => {
            let o: f64 = rng.pick(&[1e3, 1e5, -1e4, 4194304.5, -2097152.25, 1e7]);
            let spread = o.abs() * 10f64.powf(-(rng.unif() * 5.0 + 3.0));
            for v in w.iter_mut() {
                *v = (o + spread * rng.normal()) as f32;
            }
        }
        10 => {
            let sigma = 10f64.powf(rng.unif() * 3.0 - 2.0);
            for v in w.iter_mut() {
                *v = if rng.chance(0.7) {
                    0.0
                } else {
                    (sigma * rng.normal()) as f32
                };
            }
        }
        12 => {
            // offset pinned: s*mn near 2^22 (x on 0.5 grid with large magnitudes)
            let levels = ((1u32 << bits) - 1) as f64;
            let off = rng.pick(&[4194304.5f64, 4194303.5, 2097152.25, 8388600.0, 1048576.75]);
            let s = 1.0;
            let mn = off;
            let mx = mn + levels / s;
            for v in w.iter_mut() {
                let u = rng.below((levels * 2.0) as u64 + 1) as f64 * 0.5;
                *v = (mn + u) as f32;
            }
            fill_pins(rng, &mut w, mn, mx, 0.1);
        }
        _ => {
            // 13: mixture of element-wise: normal + grid points + many equal values
            let c = rng.pick(&[0.0, 0.5, -0.5, 0.25]);
            let (s, z, mn, mx) = pinned(rng, bits, c);
            let vals: Vec<f64> = (0..rng.range(1, 6))
                .map(|_| (rng.range(0, 4 * ((1 << bits) - 1)) as f64) * 0.25)
                .collect();
            let _ = z;
            for v in w.iter_mut() {
                let u = if rng.chance(0.7) {
                    rng.pick(&vals)
                } else {
                    rng.unif() * ((1 << bits) - 1) as f64
                };
                *v = ((u + s * mn) / s) as f32;
            }
            fill_pins(rng, &mut w, mn, mx, 0.02);
        }
    }
    w
}

#[derive(Default)]
struct Stats {
    cases: u64,
    channels: u64,
    checks: u64,
    errs: u64,
    fails: u64,
}

fn run_case(
    w: &[f32],
    layout: Layout,
    bits: u32,
    qz: Quantizer,
    mode: Mode,
    st: &mut Stats,
    desc: &str,
) -> bool {
    let r = quantize_ref(w, layout, bits, qz, mode);
    let mut ok = true;
    let mut outs = Vec::new();
    for isa in Isa::ALL {
        let mut codes = vec![0i8; layout.len()];
        let mut scale = vec![0f32; layout.oc];
        let mut zp = vec![0f32; layout.oc];
        let f = quantize_isa(
            w, layout, bits, qz, mode, &mut codes, &mut scale, &mut zp, isa,
        );
        outs.push((format!("{isa:?}"), f, codes, scale, zp));
    }
    {
        let mut codes = vec![0i8; layout.len()];
        let mut scale = vec![0f32; layout.oc];
        let mut zp = vec![0f32; layout.oc];
        let f = quantize_serial(w, layout, bits, qz, mode, &mut codes, &mut scale, &mut zp);
        outs.push(("serial".into(), f, codes, scale, zp));
    }
    st.checks += outs.len() as u64;
    match &r {
        Err(e) => {
            st.errs += 1;
            for (name, f, ..) in &outs {
                let fe: Result<(), SquantError> = f.clone().map(|_| ());
                if fe != Err(e.clone()) {
                    println!("MISMATCH(error) {desc} {name}: ref {e:?} got {fe:?}");
                    ok = false;
                }
            }
        }
        Ok((rc, rp, rf)) => {
            for (name, f, codes, scale, zp) in &outs {
                match f {
                    Err(e) => {
                        println!("MISMATCH(err) {desc} {name}: {e:?}");
                        ok = false;
                    }
                    Ok(f) => {
                        if f != rf {
                            println!("MISMATCH(flips) {desc} {name}: ref {rf:?} got {f:?}");
                            ok = false;
                        }
                        if codes != rc {
                            let i = codes.iter().zip(rc).position(|(a, b)| a != b).unwrap();
                            let o = i / layout.channel_len();
                            println!("MISMATCH(codes) {desc} {name}: first at {i} (channel {o}, kernel {}) got {} want {}", (i % layout.channel_len()) / layout.k, codes[i], rc[i]);
                            ok = false;
                        }
                        for (o, p) in rp.iter().enumerate() {
                            if scale[o].to_bits() != p.scale.to_bits()
                                || zp[o].to_bits() != p.zero_point.to_bits()
                            {
                                println!("MISMATCH(params) {desc} {name}: channel {o}");
                                ok = false;
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
    if !ok {
        st.fails += 1;
    }
    ok
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seed0: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(60);
    let only: Option<usize> = args.get(3).and_then(|s| s.parse().ok());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut st = Stats::default();
    let mut case = 0u64;
    let mut per_k = std::collections::BTreeMap::<usize, u64>::new();
    let mut per_dist = [0u64; NDIST];
    while Instant::now() < deadline {
        let seed = seed0.wrapping_mul(1_000_003).wrapping_add(case);
        case += 1;
        let mut rng = Rng(seed);
        let roll = rng.below(100);
        let k = if roll < 70 {
            rng.pick(&[3usize, 5, 7, 9])
        } else if roll < 85 {
            1
        } else {
            rng.pick(&[2usize, 4, 6, 11, 25])
        };
        let ic = if k == 1 {
            let r = rng.below(10);
            if r < 2 {
                rng.range(65500, 70000) as usize
            } else if r < 5 {
                rng.range(1, 600) as usize
            } else {
                (10f64.powf(rng.unif() * 4.6)) as usize + 1
            }
        } else {
            let r = rng.below(10);
            if r < 4 {
                16 * rng.range(1, 37) as usize
            } else if r < 6 {
                (16 * rng.range(1, 37) as usize) + rng.pick(&[1usize, 15, 7])
            } else if r < 7 {
                rng.range(1, 16) as usize
            } else {
                rng.range(16, 600) as usize
            }
        };
        let (k, ic) = if std::env::var("BOUNDARY").is_ok() {
            rng.pick(&[
                (1usize, 65535usize),
                (1, 65536),
                (1, 65537),
                (9, 7281),
                (9, 7282),
                (3, 21845),
                (3, 21846),
                (7, 9362),
                (7, 9363),
                (5, 13107),
                (5, 13108),
                (9, 16),
                (3, 16),
                (5, 17),
                (7, 31),
                (1, 16),
                (1, 1),
            ])
        } else {
            (k, ic)
        };
        let g = ic * k;
        let max_oc = (300_000 / g).clamp(1, 5);
        let oc = rng.range(1, max_oc as i64) as usize;
        let bits = rng.range(2, 8) as u32;
        let layout = Layout { oc, ic, k };
        let mut w = Vec::with_capacity(oc * g);
        let mut dists = Vec::new();
        for _ in 0..oc {
            let d = only.unwrap_or_else(|| rng.below(NDIST as u64) as usize);
            dists.push(d);
            per_dist[d] += 1;
            w.extend(gen_channel(&mut rng, g, k, bits, d));
        }
        if rng.chance(0.01) {
            let i = rng.below(w.len() as u64) as usize;
            w[i] = rng.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        }
        *per_k.entry(k).or_default() += oc as u64;
        st.cases += 1;
        st.channels += oc as u64;
        let modes: Vec<Mode> = if rng.chance(0.5) {
            Mode::ALL.to_vec()
        } else {
            vec![rng.pick(&[Mode::Full, Mode::C, Mode::K, Mode::Full])]
        };
        for mode in modes {
            for qz in Quantizer::ALL {
                let desc = format!(
                    "seed={seed} oc={oc} ic={ic} k={k} bits={bits} {qz} mode={mode} dists={dists:?}"
                );
                if !run_case(&w, layout, bits, qz, mode, &mut st, &desc) && st.fails > 30 {
                    println!("too many failures");
                    std::process::exit(1);
                }
            }
        }
    }
    println!(
        "cases {} channels {} checks {} ref-errors {} fails {}",
        st.cases, st.channels, st.checks, st.errs, st.fails
    );
    println!("channels per k {per_k:?}");
    println!("channels per dist {per_dist:?}");
}
