//! Descriptors held while a sharded checkpoint is quantized: those of the
//! input shards (all open from the start) and a few more, not one more per
//! shard already read (a checkpoint of many shards then fails with "Too
//! many open files" under a limit the shards alone fit in). In a test
//! binary of its own: other tests' files would blur the count.

#![cfg(target_os = "linux")]

use squant_core::{Mode, Quantizer};
use squant_io::{quantize_sharded, Options};

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn descriptors_do_not_grow_with_the_shards_read() {
    let dir = std::env::temp_dir().join(format!("squant-io-fds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let src = dir.join("ckpt");
    std::fs::create_dir_all(&src).unwrap();
    let n = 48;
    let mut map = serde_json::Map::new();
    for s in 0..n {
        let file = format!("model-{:05}-of-{n:05}.safetensors", s + 1);
        let name = format!("l{s}.weight");
        let values: Vec<u8> = (0..8 * 16)
            .flat_map(|i| ((i * 7 + s) as f32 / 50.0 - 1.0).to_le_bytes())
            .collect();
        let header = format!(
            "{{\"{name}\":{{\"dtype\":\"F32\",\"shape\":[8,16],\"data_offsets\":[0,{}]}}}}",
            values.len()
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&values);
        std::fs::write(src.join(&file), bytes).unwrap();
        map.insert(name, file.into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(src.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let opts = Options {
        bits: 4,
        mode: Mode::Full,
        quantizer: Quantizer::Asymmetric,
        include: vec![],
        skip: vec![],
        pool: None,
    };
    let before = open_descriptors();
    let mut most = 0;
    quantize_sharded(&src, &dir.join("q"), &opts, true, &mut |_, _, _| {
        most = most.max(open_descriptors());
        Ok(())
    })
    .unwrap();
    // The shards' own descriptors, and a handful for the reader and the
    // writer (the files being written, their direct-I/O descriptors).
    assert!(
        most <= before + n + 12,
        "{} descriptors open while quantizing {n} shards ({before} before)",
        most
    );
    std::fs::remove_dir_all(dir).unwrap();
}
