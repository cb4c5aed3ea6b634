//! Generation: chat-template rendering (minijinja, as transformers' `apply_chat_template`),
//! prefill, then token-by-token decode with streaming text and timings.

use crate::sampling::{Sampler, SamplingParams};
use crate::{CpuDecoder, Decoder, Error, Logits, Model, Result};
use std::time::Instant;
use tokenizers::Tokenizer;

/// Template instructions one render may run: real chat templates need a few thousand per
/// message; this is far beyond any conversation and still stops a runaway loop in about a second.
const TEMPLATE_FUEL: u64 = 50_000_000;

/// Renders one user message with the model's chat template and the generation prompt.
pub fn render_chat(
    template: &str,
    user: &str,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<String> {
    render_messages(template, &[("user", user)], true, bos, eos)
}

/// Renders a conversation ((role, content) pairs) with the model's chat template, as
/// transformers' `apply_chat_template(..., tokenize=False)`.
pub fn render_messages(
    template: &str,
    messages: &[(&str, &str)],
    add_generation_prompt: bool,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    // A template that loops without end (or nearly so) stops with an error, not a hang.
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| Error::Template(e.to_string()))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| Error::Template(e.to_string()))?;
    let msgs: Vec<minijinja::Value> = messages
        .iter()
        .map(|(role, content)| minijinja::context! { role => *role, content => *content })
        .collect();
    tmpl.render(minijinja::context! {
        messages => msgs,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos.unwrap_or(""),
        eos_token => eos.unwrap_or(""),
    })
    .map_err(|e| Error::Template(e.to_string()))
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end generation.
    pub stop: Vec<u32>,
}

/// What a generation produced, with timings for the stderr line and benchmarks.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub prompt_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub stopped_at_eos: bool,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_s.max(1e-9)
    }
    /// Decode rate over the tokens after the first (the first comes from the prefill logits).
    pub fn decode_tok_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_s.max(1e-9)
    }
}

/// Generated ids turned into text as they arrive: each `push` returns the new piece, holding
/// back an incomplete UTF-8 sequence (a byte-fallback token mid-character) until its remaining
/// bytes come, as a streaming client needs.
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    out: Vec<u32>,
    printed: String,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> Self {
        TextStream {
            tokenizer,
            out: Vec::new(),
            printed: String::new(),
        }
    }

    /// The ids so far.
    pub fn tokens(&self) -> &[u32] {
        &self.out
    }

    /// Adds a generated id; the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.out.push(id);
        let text = self.decode()?;
        // Hold back an incomplete UTF-8 sequence until its remaining bytes arrive.
        if !text.ends_with('\u{FFFD}')
            && text.len() > self.printed.len()
            && text.starts_with(&self.printed)
        {
            let piece = text[self.printed.len()..].to_string();
            self.printed = text;
            return Ok(Some(piece));
        }
        Ok(None)
    }

    /// The held-back rest at the end of generation, if any.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = self.decode()?;
        if text.len() > self.printed.len() && text.starts_with(&self.printed) {
            let piece = text[self.printed.len()..].to_string();
            self.printed = text;
            return Ok(Some(piece));
        }
        Ok(None)
    }

    /// The ids and the whole text.
    pub fn into_parts(self) -> (Vec<u32>, String) {
        let text = self
            .tokenizer
            .decode(&self.out, true)
            .unwrap_or(self.printed);
        (self.out, text)
    }

    fn decode(&self) -> Result<String> {
        self.tokenizer
            .decode(&self.out, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

impl Model {
    /// Generates from prompt ids on the CPU, calling `on_text` with each newly decoded piece.
    pub fn generate(
        &self,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        generate_with(
            &mut CpuDecoder::new(self),
            tokenizer,
            prompt,
            params,
            on_text,
        )
    }
}

/// Generates from prompt ids on any device, calling `on_text` with each newly decoded piece
/// of text. The decoder's sequence is reset first.
pub fn generate_with(
    dec: &mut dyn Decoder,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    {
        if prompt.is_empty() {
            return Err(Error::Invalid(
                "the prompt is empty after tokenization".into(),
            ));
        }
        dec.reset();
        let mut sampler = Sampler::new(params.sampling.clone());
        let t0 = Instant::now();
        let mut logits = dec.step(prompt, Logits::Last)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut seen = prompt.to_vec();
        let mut stream = TextStream::new(tokenizer);
        let mut stopped_at_eos = false;
        while stream.tokens().len() < params.max_new_tokens {
            let id = sampler.sample(&logits, &seen);
            if params.stop.contains(&id) {
                stopped_at_eos = true;
                break;
            }
            seen.push(id);
            if let Some(piece) = stream.push(id)? {
                on_text(&piece);
            }
            if stream.tokens().len() == params.max_new_tokens {
                break;
            }
            logits = dec.step(&[id], Logits::Last)?;
        }
        if let Some(piece) = stream.finish()? {
            on_text(&piece);
        }
        let (out, text) = stream.into_parts();
        Ok(Generation {
            tokens: out,
            text,
            prompt_tokens: prompt.len(),
            prefill_s,
            decode_s: t1.elapsed().as_secs_f64(),
            stopped_at_eos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_that_never_ends_is_an_error() {
        let t = "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}";
        let t0 = std::time::Instant::now();
        let e = render_chat(t, "hi", None, None).unwrap_err().to_string();
        assert!(e.contains("chat template"), "{e}");
        assert!(t0.elapsed().as_secs() < 30);
        assert!(render_chat("{{ messages[0].content }}", "hi", None, None).unwrap() == "hi");
    }
}
