//! criterion benches of the core: one ResNet-style 3x3 layer and one 1x1
//! layer, fast path against the scalar reference and nearest rounding.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use squant_core::{quantize, quantize_ref, Layout, Mode, Quantizer};

/// Deterministic He-scaled pseudo-normal weights (sum of uniforms).
fn weights(n: usize, fan_in: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let std = (2.0 / fan_in as f32).sqrt();
    (0..n)
        .map(|_| {
            let mut acc = 0.0f32;
            for _ in 0..4 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                acc += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            (acc - 2.0) * std * 1.732
        })
        .collect()
}

fn bench_layer(c: &mut Criterion, name: &str, layout: Layout) {
    let w = weights(layout.len(), layout.channel_len(), 7);
    let mut codes = vec![0i8; layout.len()];
    let mut scale = vec![0f32; layout.oc];
    let mut zp = vec![0f32; layout.oc];
    let mut group = c.benchmark_group(name);
    for mode in [Mode::E, Mode::Full] {
        group.bench_function(format!("fast/{mode}"), |b| {
            b.iter(|| {
                quantize(
                    black_box(&w),
                    layout,
                    4,
                    Quantizer::Asymmetric,
                    mode,
                    &mut codes,
                    &mut scale,
                    &mut zp,
                )
                .ok()
            })
        });
    }
    group.sample_size(10);
    group.bench_function("reference/squant", |b| {
        b.iter(|| quantize_ref(black_box(&w), layout, 4, Quantizer::Asymmetric, Mode::Full).ok())
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_layer(
        c,
        "conv3x3_256x256",
        Layout {
            oc: 256,
            ic: 256,
            k: 9,
        },
    );
    bench_layer(
        c,
        "conv1x1_1024x256",
        Layout {
            oc: 1024,
            ic: 256,
            k: 1,
        },
    );
}

criterion_group!(core, benches);
criterion_main!(core);
