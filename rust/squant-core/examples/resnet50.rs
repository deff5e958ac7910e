//! The issue-2 workload in Rust alone: the 54 Conv/Linear weights of a
//! ResNet-50 (He-normal random values), quantized at 4 bits in every mode,
//! on 1 and 2 threads. `cargo run --release -p squant-core --example resnet50 [REPS]`
//! (`ISA=avx2` or `ISA=baseline` times a lower build of the fast path;
//! `FRESH=1` gives every run new output buffers, page faults included).
use squant_core::case::Isa;
use squant_core::{quantize_isa, Layout, Mode, Quantizer};
use std::time::Instant;

/// (OC, IC, K) of the 54 weights, in model order.
fn shapes() -> Vec<(usize, usize, usize)> {
    let mut v = vec![(64, 3, 49)];
    let mut inp = 64;
    for (width, blocks) in [(64usize, 3usize), (128, 4), (256, 6), (512, 3)] {
        for b in 0..blocks {
            v.push((width, inp, 1));
            v.push((width, width, 9));
            v.push((width * 4, width, 1));
            if b == 0 {
                v.push((width * 4, inp, 1));
            }
            inp = width * 4;
        }
    }
    v.push((1000, 2048, 1));
    v
}

type Outputs = Vec<(Vec<i8>, Vec<f32>, Vec<f32>)>;

/// Zeroed outputs for every layer (`vec![0; n]`: calloc, pages untouched).
fn fresh_outputs(layers: &[(Layout, Vec<f32>)]) -> Outputs {
    layers
        .iter()
        .map(|(l, _)| (vec![0; l.len()], vec![0.0; l.oc], vec![0.0; l.oc]))
        .collect()
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let mut s = 0x2545F4914F6CDD1Du64;
    let mut uniform = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f64 + 0.5) / (1u64 << 24) as f64
    };
    let layers: Vec<(Layout, Vec<f32>)> = shapes()
        .into_iter()
        .map(|(oc, ic, k)| {
            let std = (2.0 / (ic * k) as f64).sqrt();
            let w = (0..oc * ic * k)
                .map(|_| {
                    let (a, b) = (uniform(), uniform());
                    ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos() * std) as f32
                })
                .collect();
            (Layout { oc, ic, k }, w)
        })
        .collect();
    let isa = match std::env::var("ISA").as_deref() {
        Ok("avx2") => Isa::Avx2,
        Ok("baseline") => Isa::Baseline,
        _ => Isa::Best,
    };
    let n: usize = layers.iter().map(|(l, _)| l.len()).sum();
    println!(
        "{} layers, {:.2} M parameters, build {isa:?}",
        layers.len(),
        n as f64 / 1e6
    );
    let fresh = std::env::var_os("FRESH").is_some();
    let mut out = fresh_outputs(&layers);
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        for mode in Mode::ALL {
            let mut best = f64::MAX;
            let mut flips = (0, 0);
            for _ in 0..reps {
                let t = Instant::now();
                if fresh {
                    // New (untouched) output buffers, as a caller that keeps
                    // every result gets.
                    out = fresh_outputs(&layers);
                }
                pool.install(|| {
                    for ((l, w), (q, sc, zp)) in layers.iter().zip(out.iter_mut()) {
                        let f = quantize_isa(w, *l, 4, Quantizer::Asymmetric, mode, q, sc, zp, isa)
                            .expect("quantize");
                        flips = (f.k, f.c);
                    }
                });
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "threads {threads} {mode:>9}: {:7.2} ms  {:.2} ns/elem  (last layer flips k={} c={})",
                best * 1e3,
                best * 1e9 / n as f64,
                flips.0,
                flips.1
            );
        }
    }
}
