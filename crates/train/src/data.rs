//! Training data: JSONL with `{"text"}` (every token trained), `{"prompt","completion"}` (loss on
//! the completion), `{"messages": [{"role","content"}]}` (the model's chat template, loss on the
//! assistant turns), or any fields through `--template "...{field}..."`. BOS as the tokenizer
//! adds it, EOS appended and trained. No padding: each example is its own sequence.

use qlora_io::TokenizerInfo;
use serde_json::Value;
use std::path::Path;

/// One tokenized example: `labels[i]` is the token to predict at position i (`ids[i + 1]`) or
/// `None` where no loss is taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<Option<u32>>,
}

impl Example {
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().filter(|l| l.is_some()).count()
    }
}

#[derive(Debug, Clone, Default)]
pub struct DataStats {
    pub examples: usize,
    pub truncated: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
}

/// Builds an example from tokens and a per-token "is trained" flag (a token is trained when it
/// is predicted, i.e. the label at the position before it).
fn example(ids: Vec<u32>, trained: &[bool]) -> Example {
    let labels = (0..ids.len())
        .map(|i| (i + 1 < ids.len() && trained[i + 1]).then(|| ids[i + 1]))
        .collect();
    Example { ids, labels }
}

/// Why one line of a JSONL data file was refused (the caller names the file and line).
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("unclosed '{{' in --template")]
    UnclosedTemplate,
    #[error("field \"{0}\" (from --template) is missing")]
    TemplateField(String),
    #[error("\"{0}\" is not a string")]
    NotAString(&'static str),
    #[error("tokenizing: {0}")]
    Tokenize(Box<dyn std::error::Error + Send + Sync>),
    #[error(
        "expected \"text\", \"prompt\" + \"completion\", or \"messages\" (or pass --template)"
    )]
    NoFormat,
    #[error("\"messages\" needs a chat template, and the tokenizer has none")]
    NoChatTemplate,
    #[error("\"messages\" is not a list")]
    MessagesNotAList,
    #[error("a message lacks \"{0}\"")]
    MessageLacks(&'static str),
    #[error("{0}")]
    Render(qlora_model::Error),
    #[error("the chat template's tokenization is not prefix-stable at message boundaries; use --template instead")]
    NotPrefixStable,
    #[error("the chat template's generation prompt renders longer than the assistant turn it starts (message {0}); use --template instead")]
    GenerationPromptLonger(usize),
}

fn fill(template: &str, obj: &serde_json::Map<String, Value>) -> Result<String, LineError> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find('}') else {
            return Err(LineError::UnclosedTemplate);
        };
        let field = &rest[i + 1..i + j];
        let v = obj
            .get(field)
            .ok_or_else(|| LineError::TemplateField(field.to_string()))?;
        match v {
            Value::String(s) => out.push_str(s),
            other => out.push_str(&other.to_string()),
        }
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

pub struct Tokenize<'a> {
    pub tok: &'a TokenizerInfo,
    pub eos_id: Option<u32>,
}

impl Tokenize<'_> {
    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, LineError> {
        self.tok
            .tokenizer
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(LineError::Tokenize)
    }

    fn with_eos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        if let Some(e) = self.eos_id {
            if ids.last() != Some(&e) {
                ids.push(e);
            }
        }
        ids
    }

    /// One JSON line → an example.
    /// One parsed line as an example; the error is the reason (the caller adds file and line).
    pub(crate) fn line(&self, v: &Value, template: Option<&str>) -> Result<Example, LineError> {
        let obj = v.as_object().ok_or(LineError::NotAnObject)?;
        if let Some(t) = template {
            let ids = self.with_eos(self.encode(&fill(t, obj)?, true)?);
            let n = ids.len();
            return Ok(example(ids, &vec![true; n]));
        }
        if let Some(text) = obj.get("text") {
            let text = text.as_str().ok_or(LineError::NotAString("text"))?;
            let ids = self.with_eos(self.encode(text, true)?);
            let n = ids.len();
            return Ok(example(ids, &vec![true; n]));
        }
        if let (Some(p), Some(c)) = (obj.get("prompt"), obj.get("completion")) {
            let p = self.encode(p.as_str().ok_or(LineError::NotAString("prompt"))?, true)?;
            let c = self.with_eos(self.encode(
                c.as_str().ok_or(LineError::NotAString("completion"))?,
                false,
            )?);
            let trained: Vec<bool> = p
                .iter()
                .map(|_| false)
                .chain(c.iter().map(|_| true))
                .collect();
            return Ok(example([p, c].concat(), &trained));
        }
        if let Some(m) = obj.get("messages") {
            return self.messages(m);
        }
        Err(LineError::NoFormat)
    }

    /// A conversation with the chat template; loss on the assistant turns. Each assistant turn's
    /// tokens are those between the rendering of the conversation before it (with the generation
    /// prompt) and the rendering through it.
    fn messages(&self, m: &Value) -> Result<Example, LineError> {
        let tmpl = self
            .tok
            .chat_template
            .as_deref()
            .ok_or(LineError::NoChatTemplate)?;
        let msgs: Vec<(String, String)> = m
            .as_array()
            .ok_or(LineError::MessagesNotAList)?
            .iter()
            .map(|x| {
                let role = x["role"].as_str().ok_or(LineError::MessageLacks("role"))?;
                let content = x["content"]
                    .as_str()
                    .ok_or(LineError::MessageLacks("content"))?;
                Ok((role.to_string(), content.to_string()))
            })
            .collect::<Result<_, LineError>>()?;
        let refs: Vec<(&str, &str)> = msgs.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
        let (bos, eos) = (self.tok.bos_token.as_deref(), self.tok.eos_token.as_deref());
        let render = |n: usize, gen: bool| {
            qlora_model::render_messages(tmpl, &refs[..n], gen, bos, eos).map_err(LineError::Render)
        };
        let full = self.encode(&render(refs.len(), false)?, false)?;
        let mut trained = vec![false; full.len()];
        for (i, (role, _)) in refs.iter().enumerate() {
            if *role != "assistant" {
                continue;
            }
            let before = self.encode(&render(i, true)?, false)?;
            let through = self.encode(&render(i + 1, false)?, false)?;
            if full[..before.len().min(full.len())] != before[..]
                || full[..through.len().min(full.len())] != through[..]
            {
                return Err(LineError::NotPrefixStable);
            }
            if before.len() > through.len() {
                return Err(LineError::GenerationPromptLonger(i + 1));
            }
            trained[before.len()..through.len()]
                .iter_mut()
                .for_each(|t| *t = true);
        }
        Ok(example(full, &trained))
    }
}

/// Reads a JSONL file; every malformed line is an error naming the file and line.
pub fn load_jsonl(
    path: &Path,
    tk: &Tokenize,
    template: Option<&str>,
    max_len: usize,
) -> crate::Result<(Vec<Example>, DataStats)> {
    use crate::Error;
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    let at = |n: usize, source: LineError| Error::Line {
        path: path.to_path_buf(),
        line: n + 1,
        source,
    };
    let mut out = Vec::new();
    let mut stats = DataStats::default();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| at(n, e.into()))?;
        let mut ex = tk.line(&v, template).map_err(|e| at(n, e))?;
        if ex.ids.len() > max_len {
            ex.ids.truncate(max_len);
            ex.labels.truncate(max_len);
            if let Some(last) = ex.labels.last_mut() {
                *last = None;
            }
            stats.truncated += 1;
        }
        if ex.trained_tokens() == 0 {
            continue;
        }
        stats.examples += 1;
        stats.tokens += ex.ids.len();
        stats.trained_tokens += ex.trained_tokens();
        out.push(ex);
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no example with a trained token",
            path.display()
        )));
    }
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_the_trained_tokens() {
        let e = example(vec![1, 2, 3, 4], &[false, false, true, true]);
        assert_eq!(e.labels, vec![None, Some(3), Some(4), None]);
        let obj = serde_json::json!({"note": "hi", "n": 3});
        assert_eq!(
            fill("### A note: {note} ({n})", obj.as_object().unwrap()).unwrap(),
            "### A note: hi (3)"
        );
        assert!(matches!(
            fill("{missing}", obj.as_object().unwrap()),
            Err(LineError::TemplateField(f)) if f == "missing"
        ));
    }
}
