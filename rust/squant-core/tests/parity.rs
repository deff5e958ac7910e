//! The fast path against the scalar reference, and docs/algorithm.md section 4's
//! invariants, on many generated tensors.

use proptest::prelude::*;
use squant_core::case::Isa;
use squant_core::{
    qparams, quantize, quantize_isa, quantize_ref, quantize_serial, Flips, Layout, Mode, Quantizer,
};

/// Small deterministic generator (no dev-dependency on rand).
struct Lcg(u64);
impl Lcg {
    fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn uniform(&mut self) -> f32 {
        self.next_u32() as f32 / (1u64 << 31) as f32
    }
    fn normal(&mut self) -> f32 {
        (0..6).map(|_| self.uniform()).sum::<f32>() - 3.0
    }
}

#[derive(Clone, Copy, Debug)]
enum Dist {
    Normal,
    Heavy,
    Outliers,
    Pruned,
    Grid,
    Skewed,
    Tiny,
    Constant,
}

fn make(n: usize, g: usize, dist: Dist, rng: &mut Lcg) -> Vec<f32> {
    let mut w: Vec<f32> = (0..n)
        .map(|_| match dist {
            Dist::Normal => rng.normal() * 0.05,
            Dist::Heavy => {
                let u = rng.uniform().max(1e-4);
                rng.normal() / u.sqrt()
            }
            Dist::Outliers => {
                if rng.next_u32().is_multiple_of(97) {
                    rng.normal() * 3.0
                } else {
                    rng.normal() * 0.1
                }
            }
            Dist::Pruned => {
                if rng.next_u32().is_multiple_of(3) {
                    rng.normal()
                } else {
                    0.0
                }
            }
            Dist::Grid => (rng.next_u32() % 31) as f32 / 4.0 - 3.75,
            // x = 2 w sits 0.15-0.35 below an integer: every error is about
            // +0.25, so 3x3 kernel sums reach 2-3 and steps need three ranks.
            Dist::Skewed => ((rng.next_u32() % 13) as f32 - 6.35 + 0.2 * rng.uniform()) / 2.0,
            Dist::Tiny => rng.normal() * 1e-6,
            Dist::Constant => 0.25,
        })
        .collect();
    if let Dist::Grid | Dist::Skewed = dist {
        // Pin every channel's range to [-3.75, 3.75]: at 4 bits s = 2 and
        // z = 0, so x = 2 w lands on half steps (exact .5 errors), and at
        // every width many priorities are equal.
        for c in w.chunks_mut(g) {
            c[0] = -3.75;
            if c.len() > 1 {
                c[1] = 3.75;
            }
        }
    }
    w
}

fn check(w: &[f32], layout: Layout, bits: u32, qz: Quantizer, mode: Mode) {
    let (rc, rp, rf) = quantize_ref(w, layout, bits, qz, mode).expect("reference");
    // Every build of the fast path (AVX-512, AVX2, baseline on x86-64).
    for isa in Isa::ALL {
        let mut codes = vec![0i8; layout.len()];
        let mut scale = vec![0f32; layout.oc];
        let mut zp = vec![0f32; layout.oc];
        let f = quantize_isa(
            w, layout, bits, qz, mode, &mut codes, &mut scale, &mut zp, isa,
        )
        .expect("fast");
        assert_eq!(
            codes, rc,
            "codes differ: {layout:?} bits {bits} {qz} {mode} {isa:?}"
        );
        assert_eq!(
            f, rf,
            "flip counts differ: {layout:?} bits {bits} {qz} {mode} {isa:?}"
        );
        for (o, p) in rp.iter().enumerate() {
            assert_eq!(scale[o].to_bits(), p.scale.to_bits());
            assert_eq!(zp[o].to_bits(), p.zero_point.to_bits());
        }
    }
    // The calling-thread variant.
    let mut codes = vec![0i8; layout.len()];
    let mut scale = vec![0f32; layout.oc];
    let mut zp = vec![0f32; layout.oc];
    let f = quantize_serial(w, layout, bits, qz, mode, &mut codes, &mut scale, &mut zp)
        .expect("serial");
    assert_eq!(
        (codes, f),
        (rc, rf),
        "serial differs: {layout:?} bits {bits} {qz} {mode}"
    );
}

const SHAPES: &[(usize, usize, usize)] = &[
    (8, 16, 9),
    (4, 1, 9),
    (16, 64, 1),
    (3, 5, 3),
    (2, 7, 27),
    (1, 1, 1),
    (1, 3, 49),
    (5, 200, 1),
    (6, 33, 25),
    (2, 4, 100),
    // Lane blocks of 16 kernels, with and without a tail.
    (4, 48, 9),
    (3, 37, 9),
    (3, 64, 3),
    (2, 21, 3),
    (2, 300, 1),
    (3, 40, 7),
    (2, 33, 5),
];

#[test]
fn fast_matches_reference_everywhere() {
    let mut rng = Lcg(42);
    for &(oc, ic, k) in SHAPES {
        let layout = Layout { oc, ic, k };
        for dist in [
            Dist::Normal,
            Dist::Heavy,
            Dist::Outliers,
            Dist::Pruned,
            Dist::Grid,
            Dist::Skewed,
            Dist::Tiny,
            Dist::Constant,
        ] {
            let w = make(layout.len(), layout.channel_len(), dist, &mut rng);
            for bits in 2..=8 {
                for qz in Quantizer::ALL {
                    for mode in Mode::ALL {
                        check(&w, layout, bits, qz, mode);
                    }
                }
            }
        }
    }
}

#[test]
fn grid_inputs_really_tie() {
    // The grid distribution must create equal priorities and .5 errors, or
    // the parity test above would not exercise tie-breaking.
    let mut rng = Lcg(1);
    let layout = Layout {
        oc: 4,
        ic: 16,
        k: 9,
    };
    let w = make(layout.len(), layout.channel_len(), Dist::Grid, &mut rng);
    let p = qparams::params_of(&w[..layout.channel_len()], 4, Quantizer::Asymmetric, 0).unwrap();
    let halves = w[..layout.channel_len()]
        .iter()
        .filter(|&&v| {
            let x = p.scale * v - p.zero_point;
            (qparams::rne(x) - x).abs() == 0.5
        })
        .count();
    assert!(
        halves > layout.channel_len() / 4,
        "only {halves} exact .5 errors"
    );
}

#[test]
fn thread_count_does_not_change_results() {
    let mut rng = Lcg(9);
    let layout = Layout {
        oc: 64,
        ic: 32,
        k: 9,
    };
    let w = make(layout.len(), layout.channel_len(), Dist::Normal, &mut rng);
    let run = |n: usize, qz: Quantizer| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap();
        let mut codes = vec![0i8; layout.len()];
        let mut scale = vec![0f32; layout.oc];
        let mut zp = vec![0f32; layout.oc];
        let f = pool
            .install(|| {
                quantize(
                    &w,
                    layout,
                    4,
                    qz,
                    Mode::Full,
                    &mut codes,
                    &mut scale,
                    &mut zp,
                )
            })
            .unwrap();
        (codes, scale, zp, f)
    };
    for qz in Quantizer::ALL {
        let one = run(1, qz);
        assert_eq!(one, run(2, qz));
        assert_eq!(one, run(3, qz));
    }
}

#[test]
fn errors_name_the_first_bad_channel() {
    let layout = Layout {
        oc: 64,
        ic: 8,
        k: 9,
    };
    let mut w = vec![0.1f32; layout.len()];
    w[50 * 72 + 3] = f32::NAN;
    w[10 * 72 + 5] = f32::INFINITY;
    let mut codes = vec![0i8; layout.len()];
    let (mut s, mut z) = (vec![0f32; 64], vec![0f32; 64]);
    let err = quantize(
        &w,
        layout,
        4,
        Quantizer::Asymmetric,
        Mode::Full,
        &mut codes,
        &mut s,
        &mut z,
    )
    .unwrap_err();
    assert_eq!(
        err,
        squant_core::SquantError::NonFinite {
            channel: 10,
            index: 5
        }
    );
    assert!(quantize(
        &w[1..],
        layout,
        4,
        Quantizer::Asymmetric,
        Mode::Full,
        &mut codes,
        &mut s,
        &mut z
    )
    .is_err());
    assert!(quantize(
        &[],
        Layout { oc: 0, ic: 1, k: 1 },
        4,
        Quantizer::Asymmetric,
        Mode::Full,
        &mut [],
        &mut [],
        &mut []
    )
    .is_err());
    assert!(quantize(
        &w,
        layout,
        9,
        Quantizer::Asymmetric,
        Mode::Full,
        &mut codes,
        &mut s,
        &mut z
    )
    .is_err());
}

/// Errors `codes - x` per element of a channel, before clamping could bind.
fn errors(w: &[f32], codes: &[i8], bits: u32, qz: Quantizer) -> Vec<f32> {
    let p = qparams::params_of(w, bits, qz, 0).unwrap();
    w.iter()
        .zip(codes)
        .map(|(&v, &q)| {
            let prod = p.scale * v;
            q as f32 - (prod - p.zero_point)
        })
        .collect()
}

fn run(w: &[f32], layout: Layout, bits: u32, qz: Quantizer, mode: Mode) -> (Vec<i8>, Flips) {
    let mut codes = vec![0i8; layout.len()];
    let mut s = vec![0f32; layout.oc];
    let mut z = vec![0f32; layout.oc];
    let f = quantize(w, layout, bits, qz, mode, &mut codes, &mut s, &mut z).unwrap();
    (codes, f)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// docs/algorithm.md section 4 invariants, on channels whose extremes sit well inside
    /// the code range (so enough candidates exist: the channel extremes are
    /// pinned to the quantizer's end points and never need to flip).
    #[test]
    fn case_invariants(
        oc in 1usize..4, ic in 1usize..24, k in prop::sample::select(vec![1usize, 3, 9, 25]),
        bits in 3u32..=8, seed in any::<u64>(), qz in prop::sample::select(Quantizer::ALL.to_vec())
    ) {
        let layout = Layout { oc, ic, k };
        let g = layout.channel_len();
        let mut rng = Lcg(seed);
        let w = make(layout.len(), g, Dist::Normal, &mut rng);
        let (qe, _) = run(&w, layout, bits, qz, Mode::E);
        let (qk, _) = run(&w, layout, bits, qz, Mode::K);
        let (qf, _) = run(&w, layout, bits, qz, Mode::Full);
        let (qc, _) = run(&w, layout, bits, qz, Mode::C);
        let (tmin, tmax) = qparams::code_range(bits, qz);
        for o in 0..oc {
            let span = o * g..(o + 1) * g;
            let wc = &w[span.clone()];
            for q in [&qe, &qk, &qf, &qc] {
                prop_assert!(q[span.clone()].iter().all(|&v| (tmin..=tmax).contains(&(v as f32))));
                let err = errors(wc, &q[span.clone()], bits, qz);
                prop_assert!(err.iter().all(|e| e.abs() < 1.0 + 1e-4));
            }
            // Interior elements only: away from the clamped extremes. The
            // symmetric quantizer never clamps (|x| <= tmax); its elements
            // at the bounds are the channel's largest magnitudes, which sit
            // on the bound with (almost) no error.
            let e0 = errors(wc, &qe[span.clone()], bits, qz);
            let interior = |q: &[i8]| {
                q.iter().zip(&e0).all(|(&v, e)| {
                    let v = v as f32;
                    (v > tmin && v < tmax) || (qz == Quantizer::Symmetric && e.abs() < 1e-3)
                })
            };
            if k > 1 && interior(&qe[span.clone()]) {
                let err = errors(wc, &qk[span.clone()], bits, qz);
                for kern in err.chunks(k) {
                    prop_assert!(kern.iter().sum::<f32>().abs() <= 0.5 + 1e-4);
                }
                // At most one change per kernel between K and K+C.
                for (a, b) in qk[span.clone()].chunks(k).zip(qf[span.clone()].chunks(k)) {
                    let diff: Vec<i32> = a.iter().zip(b).map(|(&x, &y)| (x as i32 - y as i32).abs()).collect();
                    prop_assert!(diff.iter().sum::<i32>() <= 1);
                }
            }
            if interior(&qe[span.clone()]) {
                for q in [&qf, &qc] {
                    let err = errors(wc, &q[span.clone()], bits, qz);
                    prop_assert!(err.iter().sum::<f32>().abs() <= 0.5 + 1e-3);
                }
            }
        }
    }

    /// Arbitrary finite inputs: the fast path equals the reference.
    #[test]
    fn parity_on_arbitrary_values(
        ic in 1usize..40, k in prop::sample::select(vec![1usize, 2, 3, 9]),
        bits in 2u32..=8, mode in prop::sample::select(Mode::ALL.to_vec()),
        qz in prop::sample::select(Quantizer::ALL.to_vec()),
        vals in prop::collection::vec(-1e3f32..1e3f32, 1..300)
    ) {
        let g = ic * k;
        let oc = vals.len().div_ceil(g);
        let w: Vec<f32> = (0..oc * g).map(|i| vals[i % vals.len()]).collect();
        check(&w, Layout { oc, ic, k }, bits, qz, mode);
    }
}
