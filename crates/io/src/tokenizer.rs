//! Tokenizers: `tokenizer.json` (+ `tokenizer_config.json`) from HF directories, or one built
//! from a GGUF file's `tokenizer.ggml.*` metadata as a tokenizer.json document (so `convert` can
//! write it out unchanged).

use crate::{Error, GgufFile, GgufValue, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::Tokenizer;

/// A tokenizer plus what generation needs to know about it.
pub struct TokenizerInfo {
    pub tokenizer: Tokenizer,
    /// The tokenizer.json document it was built from.
    pub json: String,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Whether encoding adds BOS (tokenizer_config's `add_bos_token`, or GGUF's flag).
    pub add_bos: bool,
}

fn tok_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Reads `dir/tokenizer.json` and, when present, `tokenizer_config.json` and `chat_template.jinja`.
pub fn load_tokenizer_json(dir: &Path) -> Result<Option<TokenizerInfo>> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Ok(None);
    }
    let json = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let tokenizer = json
        .parse::<Tokenizer>()
        .map_err(|e| tok_err(&path, e.to_string()))?;
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg: Value = if cfg_path.exists() {
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Json {
            path: cfg_path.clone(),
            reason: e.to_string(),
        })?
    } else {
        Value::Null
    };
    // A token in tokenizer_config.json is a string or an AddedToken object with "content".
    let token = |key: &str| match &cfg[key] {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|v| v.as_str()).map(String::from),
        _ => None,
    };
    let mut chat_template = match &cfg["chat_template"] {
        Value::String(s) => Some(s.clone()),
        // A list of named templates: take "default".
        Value::Array(a) => a
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(String::from),
        _ => None,
    };
    let jinja = dir.join("chat_template.jinja");
    if chat_template.is_none() && jinja.exists() {
        chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
    }
    let bos_token = token("bos_token");
    // BOS is added when the post-processor adds it; tokenizer_config's flag is informational.
    let add_bos = match &bos_token {
        Some(b) => tokenizer
            .encode("a", true)
            .ok()
            .and_then(|e| e.get_tokens().first().cloned())
            .is_some_and(|t| &t == b),
        None => false,
    };
    Ok(Some(TokenizerInfo {
        tokenizer,
        json,
        chat_template,
        bos_token,
        eos_token: token("eos_token"),
        add_bos,
    }))
}

/// Llama-3's pre-tokenizer split regex (llama.cpp pre type "llama-bpe").
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.model` "gpt2" or "llama").
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<Option<TokenizerInfo>> {
    let path = g.path.as_path();
    let Some(model) = g.get("tokenizer.ggml.model").and_then(|v| v.as_str()) else {
        return Ok(None);
    };
    let strings = |key: &str| -> Result<Vec<String>> {
        let arr = g
            .get(key)
            .and_then(|v| v.as_array())
            .ok_or_else(|| tok_err(path, format!("{key} is missing")))?;
        arr.iter()
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .ok_or_else(|| tok_err(path, format!("{key} holds a non-string")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        Some(GgufValue::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().map(|x| x as i64).unwrap_or(1))
            .collect(),
        _ => vec![1; tokens.len()],
    };
    let id = |key: &str| g.get(key).and_then(|v| v.as_u64()).map(|v| v as u32);
    let bos = id("tokenizer.ggml.bos_token_id");
    let eos = id("tokenizer.ggml.eos_token_id");
    let name_of = |i: Option<u32>| i.and_then(|i| tokens.get(i as usize).cloned());
    let default_add_bos = model == "llama";
    let add_bos = g
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.as_bool())
        .unwrap_or(default_add_bos);
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // Control (3) and user-defined (4) tokens are matched in raw text, as HF does.
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            matches!(types.get(*i), Some(3) | Some(4))
                || (model == "llama" && types.get(*i) == Some(&2))
        })
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types.get(i) != Some(&4)})
        })
        .collect();
    let bos_processor = |fallback: Value| match (add_bos, name_of(bos)) {
        (true, Some(b)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.clone(): {"id": b, "ids": [bos], "tokens": [b]}}
        }),
        _ => fallback,
    };
    let doc = match model {
        "gpt2" => {
            let merges = strings("tokenizer.ggml.merges")?;
            let merges: Vec<Value> = merges
                .iter()
                .map(|m| {
                    let (a, b) = m.split_once(' ').unwrap_or((m, ""));
                    json!([a, b])
                })
                .collect();
            let pre = g.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
            // Llama 3 takes a pre-token that is itself in the vocabulary whole (llama.cpp's
            // `ignore_merges` for the llama3 pre type; `ignore_merges: true` in Meta's tokenizer.json).
            let ignore_merges = matches!(pre, "llama3" | "llama-bpe" | "llama-v3");
            let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
            let pre_tokenizer = match pre {
                "default" | "gpt2" | "gpt-2" => byte_level,
                "smollm" => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level]}),
                "llama3" | "llama-bpe" | "llama-v3" => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
                other => {
                    return Err(tok_err(
                        path,
                        format!("pre-tokenizer type \"{other}\" is not supported yet (qlora knows default, gpt2, smollm, llama-bpe); use the model's Hugging Face directory with its tokenizer.json"),
                    ))
                }
            };
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": null, "pre_tokenizer": pre_tokenizer,
                "post_processor": bos_processor(json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})),
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}
            })
        }
        "llama" => {
            let scores: Vec<f64> = match g.get("tokenizer.ggml.scores") {
                Some(GgufValue::Array(a)) => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
                _ => return Err(tok_err(path, "tokenizer.ggml.scores is missing")),
            };
            let merges = spm_merges(path, &tokens, &scores)?;
            let unk = name_of(id("tokenizer.ggml.unknown_token_id")).unwrap_or_else(|| "<unk>".into());
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "\u{2581}"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
                "pre_tokenizer": null,
                "post_processor": bos_processor(Value::Null),
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                          "ignore_merges": false, "vocab": vocab, "merges": merges}
            })
        }
        other => {
            return Err(tok_err(
                path,
                format!("tokenizer model \"{other}\" is not supported; qlora builds \"gpt2\" (byte-level BPE) and \"llama\" (SentencePiece) tokenizers"),
            ))
        }
    };
    let json = serde_json::to_string(&doc).map_err(|e| tok_err(path, e.to_string()))?;
    let tokenizer = json
        .parse::<Tokenizer>()
        .map_err(|e| tok_err(path, e.to_string()))?;
    Ok(Some(TokenizerInfo {
        tokenizer,
        json,
        chat_template: g
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(String::from),
        bos_token: name_of(bos),
        eos_token: name_of(eos),
        add_bos,
    }))
}

/// Longest vocabulary piece a SentencePiece GGUF may hold (real pieces are a few dozen bytes).
const MAX_PIECE_BYTES: usize = 1 << 16;

/// Merges of a SentencePiece BPE vocabulary, derived from piece scores the way transformers'
/// `SentencePieceExtractor` does: every split of a piece into two vocabulary pieces, pieces in
/// descending score order (stable), splits ordered by (id(left), id(right)), a piece's id being
/// its last occurrence. Each split is looked up by a polynomial hash (mod 2⁶¹ − 1, a random
/// base per process) of its two halves, computed from the piece's prefix hashes in O(1), so
/// the work is linear in the vocabulary's bytes instead of quadratic in a piece's length.
fn spm_merges(path: &Path, tokens: &[String], scores: &[f64]) -> Result<Vec<Value>> {
    if let Some((i, t)) = tokens
        .iter()
        .enumerate()
        .find(|(_, t)| t.len() > MAX_PIECE_BYTES)
    {
        return Err(tok_err(
            path,
            format!(
                "tokenizer.ggml.tokens[{i}] is {} bytes long; SentencePiece pieces are a few dozen (limit {MAX_PIECE_BYTES}): the file is damaged",
                t.len()
            ),
        ));
    }
    const P: u64 = (1 << 61) - 1;
    let mul = |a: u64, b: u64| ((a as u128 * b as u128) % P as u128) as u64;
    let base = {
        use std::hash::BuildHasher;
        std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64) % (P - 512) + 256
    };
    let hash = |b: &[u8]| {
        b.iter()
            .fold(0u64, |h, &c| (mul(h, base) + c as u64 + 1) % P)
    };
    // (byte length, hash) → token ids with that hash, ascending.
    let mut index: HashMap<(usize, u64), Vec<usize>> = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        index
            .entry((t.len(), hash(t.as_bytes())))
            .or_default()
            .push(i);
    }
    let id_of = |s: &str, h: u64| -> Option<usize> {
        index
            .get(&(s.len(), h))?
            .iter()
            .rev()
            .copied()
            .find(|&i| tokens[i] == s)
    };
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by(|&a, &b| {
        let (sa, sb) = (
            scores.get(a).copied().unwrap_or(0.0),
            scores.get(b).copied().unwrap_or(0.0),
        );
        sb.partial_cmp(&sa).unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut merges = Vec::new();
    let (mut pre, mut pow) = (Vec::new(), Vec::new());
    for &p in &order {
        let piece = &tokens[p];
        let b = piece.as_bytes();
        pre.clear();
        pow.clear();
        pre.push(0u64);
        pow.push(1u64);
        for &c in b {
            let h = *pre.last().expect("non-empty");
            pre.push((mul(h, base) + c as u64 + 1) % P);
            let w = *pow.last().expect("non-empty");
            pow.push(mul(w, base));
        }
        let n = b.len();
        let mut local: Vec<(usize, usize, &str, &str)> = Vec::new();
        for (i, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(i);
            let hl = pre[i];
            let hr = (pre[n] + P - mul(pre[i], pow[n - i])) % P;
            if let (Some(li), Some(ri)) = (id_of(l, hl), id_of(r, hr)) {
                local.push((li, ri, l, r));
            }
        }
        local.sort();
        merges.extend(local.into_iter().map(|(_, _, l, r)| json!([l, r])));
    }
    Ok(merges)
}

/// llama.cpp's token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;
const TOKEN_BYTE: i32 = 6;

/// llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer` (the inverse of the
/// table in `tokenizer_from_gguf`).
fn pre_type(pre: &Value) -> Option<&'static str> {
    let is_byte_level = |v: &Value| v["type"] == "ByteLevel";
    match pre["type"].as_str()? {
        "ByteLevel" if pre["use_regex"] != false => Some("gpt-2"),
        "Sequence" => {
            let p = pre["pretokenizers"].as_array()?;
            match p.as_slice() {
                [d, b]
                    if d["type"] == "Digits"
                        && d["individual_digits"] == true
                        && is_byte_level(b) =>
                {
                    Some("smollm")
                }
                [s, b]
                    if s["type"] == "Split"
                        && s["pattern"]["Regex"] == LLAMA3_REGEX
                        && is_byte_level(b) =>
                {
                    Some("llama-bpe")
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// The `tokenizer.*` GGUF metadata llama.cpp needs for a tokenizer read from tokenizer.json
/// (byte-level BPE: `tokenizer.ggml.model` "gpt2"; SentencePiece-style BPE with byte fallback:
/// "llama", scores from the merge ranks), padded with unused `[PADi]` tokens to `vocab_size`
/// (the embedding's rows), as `convert_hf_to_gguf.py` writes them. `path` names the tokenizer
/// in errors.
pub fn gguf_tokenizer_metadata(
    info: &TokenizerInfo,
    vocab_size: usize,
    path: &Path,
) -> Result<Vec<(String, GgufValue)>> {
    let doc: Value = serde_json::from_str(&info.json).map_err(|e| Error::Json {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let m = &doc["model"];
    if m["type"] != "BPE" {
        return Err(tok_err(
            path,
            format!(
                "tokenizer model {} cannot be written to GGUF yet (qlora writes BPE tokenizers)",
                m["type"]
            ),
        ));
    }
    let vocab = m["vocab"]
        .as_object()
        .ok_or_else(|| tok_err(path, "model.vocab is not an object"))?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![TOKEN_NORMAL; vocab_size];
    let mut put = |t: &str, id: u64, ty: Option<i32>| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            tok_err(
                path,
                format!("token {t:?} has id {id}, outside the model's vocabulary of {vocab_size}"),
            )
        })?;
        *slot = Some(t.to_string());
        if let Some(ty) = ty {
            types[id as usize] = ty;
        }
        Ok(())
    };
    for (t, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| tok_err(path, format!("token {t:?} has a non-integer id")))?;
        put(t, id, None)?;
    }
    for a in doc["added_tokens"].as_array().into_iter().flatten() {
        let (Some(t), Some(id)) = (a["content"].as_str(), a["id"].as_u64()) else {
            continue;
        };
        let ty = if a["special"] == true {
            TOKEN_CONTROL
        } else {
            TOKEN_USER_DEFINED
        };
        put(t, id, Some(ty))?;
    }
    let merges: Vec<String> = m["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            Value::Array(p) if p.len() == 2 && p.iter().all(|x| x.is_string()) => Ok(format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            _ => Err(tok_err(path, format!("model.merges holds {v}, not a pair"))),
        })
        .collect::<Result<_>>()?;
    let spm = m["byte_fallback"] == true;
    let id_of = |name: &Option<String>| {
        name.as_deref()
            .and_then(|n| info.tokenizer.token_to_id(n))
            .map(GgufValue::U32)
    };
    let mut out: Vec<(String, GgufValue)> = Vec::new();
    let mut scores = Vec::new();
    if spm {
        // SentencePiece's merges take the highest-scoring pair first; HF's BPE takes the
        // lowest-ranked merge first. A piece's score is minus the rank of the merge making it.
        let mut rank: HashMap<String, usize> = HashMap::new();
        for (k, mg) in merges.iter().enumerate() {
            let piece = mg.replacen(' ', "", 1);
            rank.entry(piece).or_insert(k);
        }
        let unk = m["unk_token"].as_str();
        for (i, t) in tokens.iter().enumerate() {
            let Some(t) = t else {
                scores.push(GgufValue::F32(-1e9));
                continue;
            };
            let is_byte = t.len() == 6 && t.starts_with("<0x") && t.ends_with('>');
            if Some(t.as_str()) == unk {
                types[i] = TOKEN_UNKNOWN;
            } else if is_byte {
                types[i] = TOKEN_BYTE;
            }
            scores.push(GgufValue::F32(
                rank.get(t).map_or(0.0, |&k| -(k as f32) - 1.0),
            ));
        }
        out.push((
            "tokenizer.ggml.model".into(),
            GgufValue::String("llama".into()),
        ));
        out.push((
            "tokenizer.ggml.pre".into(),
            GgufValue::String("default".into()),
        ));
    } else {
        let pre = pre_type(&doc["pre_tokenizer"]).ok_or_else(|| {
            tok_err(
                path,
                format!(
                    "its pre-tokenizer {} is not one llama.cpp names (qlora knows gpt-2, smollm, llama-bpe); llama.cpp would split text differently",
                    doc["pre_tokenizer"]
                ),
            )
        })?;
        out.push((
            "tokenizer.ggml.model".into(),
            GgufValue::String("gpt2".into()),
        ));
        out.push(("tokenizer.ggml.pre".into(), GgufValue::String(pre.into())));
    }
    let tokens: Vec<GgufValue> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            GgufValue::String(t.unwrap_or_else(|| {
                types[i] = TOKEN_UNUSED;
                format!("[PAD{i}]")
            }))
        })
        .collect();
    out.push(("tokenizer.ggml.tokens".into(), GgufValue::Array(tokens)));
    if spm {
        out.push(("tokenizer.ggml.scores".into(), GgufValue::Array(scores)));
    }
    out.push((
        "tokenizer.ggml.token_type".into(),
        GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
    ));
    if !spm {
        out.push((
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(merges.into_iter().map(GgufValue::String).collect()),
        ));
    }
    if let Some(b) = id_of(&info.bos_token) {
        out.push(("tokenizer.ggml.bos_token_id".into(), b));
    }
    if let Some(e) = id_of(&info.eos_token) {
        out.push(("tokenizer.ggml.eos_token_id".into(), e));
    }
    if spm {
        if let Some(u) = m["unk_token"]
            .as_str()
            .and_then(|u| info.tokenizer.token_to_id(u))
        {
            out.push(("tokenizer.ggml.unknown_token_id".into(), GgufValue::U32(u)));
        }
    }
    out.push((
        "tokenizer.ggml.add_bos_token".into(),
        GgufValue::Bool(info.add_bos),
    ));
    out.push((
        "tokenizer.ggml.add_eos_token".into(),
        GgufValue::Bool(false),
    ));
    if let Some(t) = &info.chat_template {
        out.push((
            "tokenizer.chat_template".into(),
            GgufValue::String(t.clone()),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The merges as transformers' extractor defines them, by brute force.
    fn merges_by_brute_force(tokens: &[String], scores: &[f64]) -> Vec<Value> {
        let ids: HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap());
        let mut merges = Vec::new();
        for &p in &order {
            let piece = &tokens[p];
            let mut local = Vec::new();
            for (i, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(i);
                if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                    local.push((li, ri, l, r));
                }
            }
            local.sort();
            merges.extend(local.into_iter().map(|(_, _, l, r)| json!([l, r])));
        }
        merges
    }

    #[test]
    fn hashed_merges_equal_the_brute_force_ones() {
        let words = [
            "a", "b", "ab", "ba", "abab", "▁", "▁a", "▁ab", "é", "aé", "éa", "ab", "b",
        ];
        let tokens: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        let scores: Vec<f64> = (0..tokens.len()).map(|i| -((i * 7 % 5) as f64)).collect();
        let p = Path::new("t.gguf");
        assert_eq!(
            spm_merges(p, &tokens, &scores).unwrap(),
            merges_by_brute_force(&tokens, &scores)
        );
    }

    #[test]
    fn long_pieces_cost_linear_time_and_oversized_ones_are_refused() {
        // Ten 60 KB pieces: by brute force, 10 × 60,000 splits × ~60 KB hashed each.
        let mut tokens: Vec<String> = (1..50).map(|k| "a".repeat(k)).collect();
        tokens.extend((0..10).map(|i| format!("{}{i}", "a".repeat(60_000))));
        let scores = vec![0.0; tokens.len()];
        let t0 = std::time::Instant::now();
        let m = spm_merges(Path::new("t.gguf"), &tokens, &scores).unwrap();
        assert!(t0.elapsed().as_secs() < 20, "{:?}", t0.elapsed());
        // "aa…a" (k) splits into two shorter runs: k − 1 merges each for k = 2..49.
        assert_eq!(m.len(), (2..50).map(|k| k - 1).sum::<usize>());
        tokens.push("b".repeat(MAX_PIECE_BYTES + 1));
        let scores = vec![0.0; tokens.len()];
        let e = spm_merges(Path::new("t.gguf"), &tokens, &scores)
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.gguf") && e.contains("65537 bytes"), "{e}");
    }
}
