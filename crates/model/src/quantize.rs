//! Quantizing a model's linear layers the way transformers + bitsandbytes do
//! (`BitsAndBytesConfig(load_in_4bit=True, ...)`): every decoder linear becomes 4-bit;
//! embeddings, norms and `lm_head` stay as they are.

pub use qlora_quant::{quantize_tensor, QuantizeSpec, Quantized4};

/// Whether an HF tensor name is a decoder linear's weight that 4-bit loading quantizes.
pub fn is_quantized_linear(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return false;
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return false;
    };
    layer.parse::<usize>().is_ok()
        && rest
            .strip_suffix(".weight")
            .is_some_and(|l| qlora_io::LAYER_LINEARS.contains(&l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_decoder_linears_are_quantized() {
        assert!(is_quantized_linear(
            "model.layers.0.self_attn.q_proj.weight"
        ));
        assert!(is_quantized_linear("model.layers.31.mlp.down_proj.weight"));
        assert!(!is_quantized_linear("lm_head.weight"));
        assert!(!is_quantized_linear("model.embed_tokens.weight"));
        assert!(!is_quantized_linear(
            "model.layers.0.input_layernorm.weight"
        ));
        assert!(!is_quantized_linear("model.layers.0.self_attn.q_proj.bias"));
    }
}
