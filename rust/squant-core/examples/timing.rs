//! Quick timing of the fast path on one layer: `cargo run --release --example timing`.
use squant_core::case::Isa;
use squant_core::{quantize_isa, Layout, Mode, Quantizer};
use std::time::Instant;

fn main() {
    // Usage: timing [MODE] [OCxICxK]
    let shape: Vec<usize> = std::env::args()
        .nth(2)
        .map(|v| v.split('x').filter_map(|d| d.parse().ok()).collect())
        .unwrap_or_else(|| vec![256, 256, 9]);
    let layout = match shape[..] {
        [oc, ic, k] => Layout { oc, ic, k },
        _ => Layout {
            oc: 256,
            ic: 256,
            k: 9,
        },
    };
    let mut s = 12345u64;
    let w: Vec<f32> = (0..layout.len())
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect();
    let mut codes = vec![0i8; layout.len()];
    let mut scale = vec![0f32; layout.oc];
    let mut zp = vec![0f32; layout.oc];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let isa = match std::env::var("ISA").as_deref() {
        Ok("avx2") => Isa::Avx2,
        Ok("baseline") => Isa::Baseline,
        _ => Isa::Best,
    };
    let only: Option<Mode> = std::env::args().nth(1).and_then(|m| m.parse().ok());
    let reps = std::env::var("REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(if only.is_some() { 1 } else { 10 });
    for mode in Mode::ALL
        .into_iter()
        .filter(|m| only.is_none_or(|o| o == *m))
    {
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            pool.install(|| {
                quantize_isa(
                    &w,
                    layout,
                    4,
                    Quantizer::Asymmetric,
                    mode,
                    &mut codes,
                    &mut scale,
                    &mut zp,
                    isa,
                )
            })
            .unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{mode}: {:.2} ms, {:.2} ns/elem",
            best * 1e3,
            best * 1e9 / layout.len() as f64
        );
    }
}
