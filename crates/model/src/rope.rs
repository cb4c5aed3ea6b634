//! RoPE inverse frequencies, with transformers' `default`, `linear` and `llama3` scaling
//! (`modeling_rope_utils.py`).

use qlora_io::ModelConfig;

/// inv_freq[i] = 1 / theta^(2i/hd), then scaled. [hd/2]
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let hd = cfg.head_dim();
    let theta = cfg.rope_theta();
    let base: Vec<f64> = (0..hd / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / hd as f64))
        .collect();
    let scaled: Vec<f64> = match cfg.rope() {
        Some(s) if s.rope_type.as_deref() == Some("linear") => {
            let f = s.factor.unwrap_or(1.0);
            base.iter().map(|v| v / f).collect()
        }
        Some(s) if s.rope_type.as_deref() == Some("llama3") => {
            let factor = s.factor.unwrap_or(1.0);
            let lo = s.low_freq_factor.unwrap_or(1.0);
            let hi = s.high_freq_factor.unwrap_or(4.0);
            let old = s.original_max_position_embeddings.unwrap_or(8192) as f64;
            let (low_wavelen, high_wavelen) = (old / lo, old / hi);
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        _ => base,
    };
    scaled.into_iter().map(|v| v as f32).collect()
}
