//! End-to-end: safetensors in (written by the safetensors crate), squant-rs
//! out, loaded back equal to the core's quantization of the whole tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use squant_core::{Layout, Mode, Quantizer};
use squant_io::format::Kind;
use squant_io::{quantize_file, quantize_sharded, IoError, Options, SquantFile};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("squant-io-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0
                - 1.0
        })
        .collect()
}

fn bytes_of(d: Dtype, v: &[f32]) -> Vec<u8> {
    match d {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        Dtype::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        Dtype::F64 => v.iter().flat_map(|x| (*x as f64).to_le_bytes()).collect(),
        _ => unreachable!(),
    }
}

/// name -> (dtype, shape, bytes)
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn write_st(path: &Path, tensors: &Tensors) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn sample() -> Tensors {
    let mut t = Vec::new();
    for (i, (d, shape)) in [
        (Dtype::F32, vec![6, 5, 3, 3]),
        (Dtype::F16, vec![7, 9]),
        (Dtype::BF16, vec![5, 3, 1]),
        (Dtype::F64, vec![3, 11]),
    ]
    .into_iter()
    .enumerate()
    {
        let n: usize = shape.iter().product();
        t.push((
            format!("l{i}.weight"),
            d,
            shape,
            bytes_of(d, &values(n, i as u32)),
        ));
    }
    t.push((
        "l0.bias".into(),
        Dtype::F32,
        vec![6],
        bytes_of(Dtype::F32, &values(6, 9)),
    ));
    t.push(("empty.weight".into(), Dtype::F32, vec![0, 4], vec![]));
    t.push((
        "steps".into(),
        Dtype::I64,
        vec![],
        7i64.to_le_bytes().to_vec(),
    ));
    t
}

fn opts(bits: u32) -> Options {
    Options {
        bits,
        mode: Mode::Full,
        quantizer: Quantizer::Asymmetric,
        include: vec![],
        skip: vec![],
        pool: None,
    }
}

fn load_all(path: &Path) -> HashMap<String, Vec<u8>> {
    let f = SquantFile::open(path).unwrap();
    f.tensors
        .iter()
        .map(|t| {
            let mut out = vec![0u8; t.nbytes()];
            f.load_into(t, Some(&mut out), true).unwrap();
            (t.name.clone(), out)
        })
        .collect()
}

#[test]
fn quantize_and_load_equal_the_core() {
    let dir = tmpdir("rt");
    let (src, dst) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    let tensors = sample();
    write_st(&src, &tensors);
    for (quantizer, bits) in Quantizer::ALL
        .into_iter()
        .flat_map(|q| [2, 3, 4, 8].map(|b| (q, b)))
    {
        let o = Options {
            quantizer,
            ..opts(bits)
        };
        let report = quantize_file(&src, &dst, &o, &mut |_, _, _| Ok(())).unwrap();
        assert_eq!(SquantFile::open(&dst).unwrap().quantizer, quantizer);
        assert_eq!(report.layers.len(), 4);
        assert_eq!(report.size_after, std::fs::metadata(&dst).unwrap().len());
        let loaded = load_all(&dst);
        assert_eq!(loaded.len(), tensors.len());
        for (name, d, shape, bytes) in &tensors {
            let got = &loaded[name];
            if name.ends_with(".weight") && !shape.contains(&0) {
                let isz = d.bitsize() / 8;
                let mut w = vec![0f32; bytes.len() / isz];
                squant_io::dtype::to_f32(*d, bytes, &mut w);
                let layout = Layout::from_shape(shape).unwrap();
                let mut q = vec![0i8; w.len()];
                let (mut s, mut z) = (vec![0f32; layout.oc], vec![0f32; layout.oc]);
                squant_core::quantize(
                    &w,
                    layout,
                    bits,
                    quantizer,
                    Mode::Full,
                    &mut q,
                    &mut s,
                    &mut z,
                )
                .unwrap();
                let mut want = vec![0f32; w.len()];
                squant_core::dequantize(&q, layout, &s, &z, &mut want).unwrap();
                let mut want_bytes = vec![0u8; got.len()];
                for (o, v) in want_bytes.chunks_exact_mut(isz).zip(&want) {
                    squant_io::dtype::store_f32(*d, *v, o);
                }
                assert_eq!(got, &want_bytes, "{name} at {bits} bits, {quantizer}");
            } else {
                assert_eq!(got, bytes, "{name}");
            }
        }
    }
    // Same input, same options (the loop's last): byte-identical output.
    let again = dir.join("again.safetensors");
    let last = Options {
        quantizer: Quantizer::Symmetric,
        ..opts(8)
    };
    quantize_file(&src, &again, &last, &mut |_, _, _| Ok(())).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&dst).unwrap());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_data_byte_flip_is_detected() {
    let dir = tmpdir("flip");
    let (src, dst) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    write_st(&src, &sample());
    quantize_file(&src, &dst, &opts(4), &mut |_, _, _| Ok(())).unwrap();
    let good = std::fs::read(&dst).unwrap();
    let start = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let bad = dir.join("bad.safetensors");
    for pos in start..good.len() {
        let mut b = good.clone();
        b[pos] ^= 0x10;
        std::fs::write(&bad, &b).unwrap();
        let f = SquantFile::open(&bad).unwrap();
        let err = f.verify().unwrap_err();
        assert!(matches!(err, IoError::Format(_)), "byte {pos}: {err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn errors_leave_no_output() {
    let dir = tmpdir("err");
    let (src, dst) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    let mut t = sample();
    let mut w = values(54, 1);
    w[20] = f32::NAN;
    t[0].3 = bytes_of(
        Dtype::F32,
        &w.iter().cycle().take(270).copied().collect::<Vec<_>>(),
    );
    write_st(&src, &t);
    let err = quantize_file(&src, &dst, &opts(4), &mut |_, _, _| Ok(())).unwrap_err();
    assert!(err.to_string().starts_with("l0.weight: "), "{err}");
    assert!(err.to_string().contains("output channel 0"), "{err}");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["in.safetensors"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sharded_round_trip_matches_unsharded() {
    let dir = tmpdir("shard");
    let shards = dir.join("ckpt");
    std::fs::create_dir(&shards).unwrap();
    let t = sample();
    let (a, b) = t.split_at(3);
    write_st(
        &shards.join("model-00001-of-00002.safetensors"),
        &a.to_vec(),
    );
    write_st(
        &shards.join("model-00002-of-00002.safetensors"),
        &b.to_vec(),
    );
    let mut map = serde_json::Map::new();
    for (name, ..) in a {
        map.insert(name.clone(), "model-00001-of-00002.safetensors".into());
    }
    for (name, ..) in b {
        map.insert(name.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        shards.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let out = dir.join("q");
    let r = quantize_sharded(&shards, &out, &opts(4), true, &mut |_, _, _| Ok(())).unwrap();
    assert_eq!(r.shards, 2);
    assert_eq!(r.report.layers.len(), 4);
    let whole = dir.join("whole.safetensors");
    write_st(&whole, &t);
    let single = dir.join("single.safetensors");
    quantize_file(&whole, &single, &opts(4), &mut |_, _, _| Ok(())).unwrap();
    let want = load_all(&single);
    let mut got = HashMap::new();
    for f in squant_io::sharded::open_quantized(&out).unwrap() {
        for t in &f.tensors {
            let mut o = vec![0u8; t.nbytes()];
            f.load_into(t, Some(&mut o), true).unwrap();
            assert!(matches!(t.kind, Kind::Plain { .. } | Kind::Quantized(_)));
            got.insert(t.name.clone(), o);
        }
    }
    assert_eq!(got, want);
    // A corrupt shard is named, and no output directory appears.
    std::fs::write(shards.join("model-00002-of-00002.safetensors"), b"garbage").unwrap();
    let out2 = dir.join("q2");
    let err = quantize_sharded(&shards, &out2, &opts(4), true, &mut |_, _, _| Ok(())).unwrap_err();
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
    assert!(!out2.exists());
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

/// A weight of more than one block (16 M elements), many tasks and many
/// load pieces, with an odd channel length (channels share packed bytes):
/// the file equals the core's quantization of the whole tensor, does not
/// depend on the thread count (bytes and report), loads and verifies, and
/// a flipped byte far into the codes is found.
#[test]
fn multi_block_weight_is_exact_and_thread_independent() {
    let dir = tmpdir("big");
    let src = dir.join("in.safetensors");
    let shape = vec![4100usize, 4097];
    let n: usize = shape.iter().product();
    let w: Vec<f32> = values(n, 77)
        .into_iter()
        .map(|x| half::bf16::from_f32(x).to_f32())
        .collect();
    write_st(
        &src,
        &vec![(
            "big.weight".to_string(),
            Dtype::BF16,
            shape.clone(),
            bytes_of(Dtype::BF16, &w),
        )],
    );
    let mut outs = Vec::new();
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let o = Options {
            pool: Some(std::sync::Arc::new(pool)),
            ..opts(4)
        };
        let dst = dir.join(format!("out{threads}.safetensors"));
        let r = quantize_file(&src, &dst, &o, &mut |_, _, _| Ok(())).unwrap();
        outs.push((std::fs::read(&dst).unwrap(), r.layers[0].clone(), dst));
    }
    assert_eq!(outs[0].0, outs[1].0, "bytes depend on the thread count");
    let (a, b) = (&outs[0].1, &outs[1].1);
    assert_eq!(
        (a.rel_error, a.k_flips, a.c_flips),
        (b.rel_error, b.k_flips, b.c_flips)
    );
    let layout = Layout::from_shape(&shape).unwrap();
    let mut q = vec![0i8; n];
    let (mut s, mut z) = (vec![0f32; layout.oc], vec![0f32; layout.oc]);
    let flips = squant_core::quantize(
        &w,
        layout,
        4,
        Quantizer::Asymmetric,
        Mode::Full,
        &mut q,
        &mut s,
        &mut z,
    )
    .unwrap();
    assert_eq!((a.k_flips, a.c_flips), (flips.k, flips.c));
    let mut want = vec![0f32; n];
    squant_core::dequantize(&q, layout, &s, &z, &mut want).unwrap();
    let want_bytes = bytes_of(Dtype::BF16, &want);
    let dst = &outs[0].2;
    assert_eq!(load_all(dst)["big.weight"], want_bytes);
    SquantFile::open(dst).unwrap().verify().unwrap();
    // A byte of the second block's codes: the combined checksum misses it.
    let mut bytes = std::fs::read(dst).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x10;
    std::fs::write(dst, &bytes).unwrap();
    let err = SquantFile::open(dst).unwrap().verify().unwrap_err();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A weight whose smallest block (4 channels of 2.5 M elements, 20 MB) is
/// far above the usual 8 MiB: read alone (no read-ahead), between a plain
/// tensor and a small weight; the result equals the core's quantization.
#[test]
fn huge_channels_are_exact() {
    let dir = tmpdir("huge");
    let src = dir.join("in.safetensors");
    let shape = vec![6usize, 2_500_000];
    let n: usize = shape.iter().product();
    let w: Vec<f32> = values(n, 5)
        .into_iter()
        .map(|x| half::bf16::from_f32(x).to_f32())
        .collect();
    let small = values(64 * 48, 9);
    write_st(
        &src,
        &vec![
            (
                "a.bias".to_string(),
                Dtype::BF16,
                vec![300],
                bytes_of(Dtype::BF16, &values(300, 3)),
            ),
            (
                "huge.weight".to_string(),
                Dtype::BF16,
                shape.clone(),
                bytes_of(Dtype::BF16, &w),
            ),
            (
                "z.weight".to_string(),
                Dtype::F32,
                vec![64, 48],
                bytes_of(Dtype::F32, &small),
            ),
        ],
    );
    let dst = dir.join("out.safetensors");
    quantize_file(&src, &dst, &opts(4), &mut |_, _, _| Ok(())).unwrap();
    let layout = Layout::from_shape(&shape).unwrap();
    let mut q = vec![0i8; n];
    let (mut s, mut z) = (vec![0f32; layout.oc], vec![0f32; layout.oc]);
    squant_core::quantize(
        &w,
        layout,
        4,
        Quantizer::Asymmetric,
        Mode::Full,
        &mut q,
        &mut s,
        &mut z,
    )
    .unwrap();
    let mut want = vec![0f32; n];
    squant_core::dequantize(&q, layout, &s, &z, &mut want).unwrap();
    let got = load_all(&dst);
    assert_eq!(got["huge.weight"], bytes_of(Dtype::BF16, &want));
    assert_eq!(got["a.bias"], bytes_of(Dtype::BF16, &values(300, 3)));
    SquantFile::open(&dst).unwrap().verify().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// A progress callback that stops the work on its last call (the signal
/// check of a Ctrl-C that arrives after the last tensor) leaves no output:
/// an existing file at the output path keeps its content, as for an error
/// at any other call.
#[test]
fn an_error_from_the_last_progress_call_leaves_no_output() {
    let dir = tmpdir("lastprog");
    let (src, dst) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    write_st(&src, &sample());
    std::fs::write(&dst, b"old output").unwrap();
    let mut calls = Vec::new();
    let err = quantize_file(&src, &dst, &opts(4), &mut |done, total, name| {
        calls.push(name.to_string());
        if name.is_empty() && done == total {
            return Err(IoError::InvalidArgument("interrupted".to_string()));
        }
        Ok(())
    })
    .unwrap_err();
    assert!(err.to_string().contains("interrupted"), "{err}");
    assert_eq!(calls.last().map(String::as_str), Some(""));
    assert!(
        std::fs::read(&dst).unwrap() == b"old output",
        "the output file was replaced"
    );
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["in.safetensors", "out.safetensors"]);
    std::fs::remove_dir_all(dir).unwrap();
}
