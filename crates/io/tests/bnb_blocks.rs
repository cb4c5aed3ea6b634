//! bitsandbytes' 4-bit and LLM.int8 formats, byte for byte against bitsandbytes' CPU path
//! (tools/reference/make_bnb_blocks.py): quantize, double-quantize and dequantize.

use half::{bf16, f16};
use qlora_quant::bnb::{self, Quant4};
use serde_json::Value;

struct Fixture(qlora_io::SafetensorsFile);

impl Fixture {
    fn open() -> Fixture {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/bnb/blocks.safetensors");
        Fixture(qlora_io::SafetensorsFile::open(&path).unwrap())
    }
    fn bytes(&self, n: &str) -> Vec<u8> {
        let t = self.0.tensors.iter().find(|t| t.name == n);
        t.unwrap_or_else(|| panic!("fixture lacks {n}"))
            .data
            .as_slice()
            .to_vec()
    }
    fn f32s(&self, n: &str) -> Vec<f32> {
        let b = self.bytes(n);
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    /// A tensor of the given dtype widened to f32 (exact).
    fn widened(&self, n: &str, dtype: &str) -> Vec<f32> {
        let b = self.bytes(n);
        match dtype {
            "f32" => self.f32s(n),
            "bf16" => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            "f16" => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => panic!("dtype {dtype}"),
        }
    }
    fn cases(&self, key: &str) -> Vec<Value> {
        serde_json::from_str(&self.0.metadata[key]).unwrap()
    }
}

/// Rounds f32 values to a dtype's little-endian bytes, as bitsandbytes' output cast does.
fn to_dtype_bytes(v: &[f32], dtype: &str) -> Vec<u8> {
    match dtype {
        "f32" => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        "bf16" => v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect(),
        "f16" => v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect(),
        _ => panic!("dtype {dtype}"),
    }
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn quantize_and_dequantize_4bit_match_bitsandbytes_bytes() {
    let f = Fixture::open();
    let threads: usize = f.0.metadata["torch_threads"].parse().unwrap();
    let cases = f.cases("cases");
    assert!(cases.len() >= 40);
    for c in &cases {
        let name = c["name"].as_str().unwrap();
        let dtype = c["dtype"].as_str().unwrap();
        let bs = c["blocksize"].as_u64().unwrap() as usize;
        let quant = Quant4::parse(c["quant_type"].as_str().unwrap()).unwrap();
        let dq = c["double_quant"].as_bool().unwrap();
        let x = f.widened(&format!("{name}.input"), dtype);
        let (packed, absmax) = bnb::quantize_4bit(&x, bs, quant);
        let want_packed = f.bytes(&format!("{name}.packed"));
        assert_eq!(
            first_diff(&packed, &want_packed),
            None,
            "{c}: packed codes differ"
        );
        let absmax_used = if dq {
            let d = bnb::double_quantize(&absmax, threads);
            let want_offset = f.f32s(&format!("{name}.offset"))[0];
            assert_eq!(d.offset.to_bits(), want_offset.to_bits(), "{c}: offset");
            assert_eq!(
                d.codes,
                f.bytes(&format!("{name}.absmax")),
                "{c}: absmax codes"
            );
            let want_nested = f.f32s(&format!("{name}.nested_absmax"));
            assert_eq!(
                first_diff(
                    &to_dtype_bytes(&d.nested_absmax, "f32"),
                    &to_dtype_bytes(&want_nested, "f32")
                ),
                None,
                "{c}: nested absmax"
            );
            let code: [f32; 256] = f.f32s(&format!("{name}.nested_code")).try_into().unwrap();
            assert_eq!(
                code.map(f32::to_bits),
                bnb::DYNAMIC_MAP_BITS,
                "{c}: nested code"
            );
            bnb::dequantize_absmax(&d.codes, &d.nested_absmax, &code, 256, d.offset)
        } else {
            let want = f.f32s(&format!("{name}.absmax"));
            assert_eq!(
                absmax.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{c}: absmax"
            );
            absmax
        };
        let mut out = vec![0f32; x.len()];
        bnb::dequantize_4bit(&packed, &absmax_used, &quant.code(), bs, 0, &mut out);
        let want = f.bytes(&format!("{name}.dequant"));
        assert_eq!(
            first_diff(&to_dtype_bytes(&out, dtype), &want),
            None,
            "{c}: dequantized values"
        );
        // Any sub-range (odd starts, block-crossing) gives the same values.
        for (s, len) in [(1usize, 7usize), (63, 66), (x.len() / 2 + 1, x.len() / 3)] {
            if s + len <= x.len() {
                let mut part = vec![0f32; len];
                bnb::dequantize_4bit(&packed, &absmax_used, &quant.code(), bs, s, &mut part);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&part), bits(&out[s..s + len]), "{c}: range {s}+{len}");
            }
        }
    }
}

#[test]
fn int8_dequantize_matches_bitsandbytes() {
    let f = Fixture::open();
    for c in f.cases("int8") {
        let name = c["name"].as_str().unwrap();
        let cols = c["shape"][1].as_u64().unwrap() as usize;
        let cb = f.bytes(&format!("{name}.cb"));
        let scb = f.f32s(&format!("{name}.scb"));
        let want = f.f32s(&format!("{name}.dequant"));
        let mut out = vec![0f32; cb.len()];
        for (r, s) in scb.iter().enumerate() {
            bnb::dequantize_int8_row(
                &cb[r * cols..(r + 1) * cols],
                *s,
                &mut out[r * cols..(r + 1) * cols],
            );
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&want), "{c}");
    }
}

#[test]
fn torch_sum_is_a_cascade_not_a_running_sum() {
    // A running f32 sum of 1 followed by 4096 values of 2^-24 stays at 1; torch's cascade adds
    // most tiny values among themselves first. torch 2.15 prints 1.0002431869506836 for
    // `torch.tensor([1.0] + [2**-24] * 4096).sum()`.
    let mut x = vec![1.0f32];
    x.extend(std::iter::repeat_n(2f32.powi(-24), 4096));
    let naive: f32 = x.iter().sum();
    assert_eq!(naive, 1.0);
    assert_eq!(
        bnb::torch_sum_f32(&x, 1),
        "1.0002431869506836".parse::<f32>().unwrap()
    );
}
