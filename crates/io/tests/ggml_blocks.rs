//! Every GGUF block type against gguf-py's dequantization (tools/reference/make_ggml_blocks.py).

use qlora_quant::{dequantize_ggml, GgmlType};

#[test]
fn dequantize_matches_gguf_py() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/ggml_blocks.safetensors");
    let f = qlora_io::SafetensorsFile::open(&path).unwrap();
    let get = |n: &str| {
        f.tensors
            .iter()
            .find(|t| t.name == n)
            .unwrap()
            .data
            .as_slice()
            .to_vec()
    };
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];
    for t in types {
        let bytes = get(&format!("{}.bytes", t.name()));
        let want: Vec<f32> = get(&format!("{}.values", t.name()))
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut got = vec![0f32; want.len()];
        dequantize_ggml(t, &bytes, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // gguf-py computes in numpy f32 with the same formulas; allow one rounding of the
            // product order (d·scale·q vs d·(scale·q)).
            assert!(
                (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
                "{}: element {i}: {g} vs {w}",
                t.name()
            );
        }
    }
}
