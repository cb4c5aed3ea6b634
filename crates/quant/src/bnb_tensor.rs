//! A whole tensor quantized as bitsandbytes stores it: packed 4-bit codes, absmax and, with
//! double quantization, the 8-bit absmax codes and their nested state.

use crate::bnb::{self, DoubleQuant};
use crate::Quant4;
use rayon::prelude::*;

/// What `--quantize` / `qlora quantize` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeSpec {
    pub quant: Quant4,
    pub double_quant: bool,
    /// Elements per absmax; transformers always uses 64.
    pub blocksize: usize,
}

/// One quantized tensor: what bitsandbytes stores.
pub struct Quantized4 {
    pub packed: Vec<u8>,
    /// f32 absmax per block, as computed (before any double quantization).
    pub absmax: Vec<f32>,
    pub double: Option<DoubleQuant>,
}

impl Quantized4 {
    /// The absmax the dequantization uses: double quantization is lossy, and bitsandbytes
    /// computes with its dequantized values.
    pub fn effective_absmax(&self) -> Vec<f32> {
        match &self.double {
            None => self.absmax.clone(),
            Some(d) => bnb::dequantize_absmax(
                &d.codes,
                &d.nested_absmax,
                &bnb::dynamic_map(),
                bnb::NESTED_BLOCKSIZE,
                d.offset,
            ),
        }
    }
}

/// Quantizes a row-major flattened tensor (widened to f32), in parallel over runs of whole
/// blocks; the result is the same bytes as one sequential `quantize_4bit`.
pub fn quantize_tensor(values: &[f32], spec: QuantizeSpec) -> Quantized4 {
    let bs = spec.blocksize;
    // Runs of whole blocks (even lengths, since blocksizes are even); only the last run may end
    // in a short block or an odd element, exactly where the sequential version has them.
    let run = bs * 256;
    let parts: Vec<(Vec<u8>, Vec<f32>)> = values
        .par_chunks(run)
        .map(|c| bnb::quantize_4bit(c, bs, spec.quant))
        .collect();
    let mut packed = Vec::with_capacity(values.len().div_ceil(2));
    let mut absmax = Vec::with_capacity(values.len().div_ceil(bs));
    for (p, a) in parts {
        packed.extend_from_slice(&p);
        absmax.extend_from_slice(&a);
    }
    let double = spec
        .double_quant
        .then(|| bnb::double_quantize(&absmax, rayon::current_num_threads()));
    Quantized4 {
        packed,
        absmax,
        double,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_runs_equal_one_sequential_pass() {
        let n = 64 * 256 * 3 + 77; // several runs, a short last block, an odd count
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        for quant in [Quant4::Nf4, Quant4::Fp4] {
            let spec = QuantizeSpec {
                quant,
                double_quant: true,
                blocksize: 64,
            };
            let q = quantize_tensor(&v, spec);
            let (p, a) = bnb::quantize_4bit(&v, 64, quant);
            assert_eq!(q.packed, p);
            assert_eq!(q.absmax, a);
        }
    }
}
