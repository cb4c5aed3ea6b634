//! The OpenAI-compatible endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//! plus `/health` and `/metrics`. Every error is OpenAI's JSON shape
//! (`{"error": {"message", "type", "param", "code"}}`) with a 4xx/5xx status.

use crate::engine::{self, EngineConfig, Event, Job};
use crate::{App, Registry, ServeConfig};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream;
use qlora_model::Model;
use qlora_model::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::TrySendError;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Starts the engine thread; the shared state for the router and the thread's handle.
pub(crate) fn start(cfg: ServeConfig) -> std::io::Result<(Arc<App>, std::thread::JoinHandle<()>)> {
    let ServeConfig {
        models,
        tokenizer,
        stop_ids,
        limits,
        loader,
        backend,
    } = cfg;
    let context = models
        .first()
        .map_or(0, |m| m.model.config.max_position_embeddings);
    let base_name = models.first().map_or_else(String::new, |m| m.name.clone());
    let mut registry = Registry {
        entries: Vec::new(),
        next_id: 0,
    };
    for m in models {
        registry.add(m.name, m.parent, Arc::new(m.model));
    }
    let metrics = Arc::new(crate::Metrics::default());
    let (tx, rx) = std::sync::mpsc::sync_channel(limits.max_queue);
    let engine_cfg = EngineConfig {
        max_concurrent: limits.max_concurrent.max(1),
        prefill_chunk: limits.prefill_chunk.max(1),
    };
    let tok = tokenizer.tokenizer.clone();
    let m = metrics.clone();
    let handle = std::thread::Builder::new()
        .name("qlora-engine".into())
        .spawn(move || engine::run(backend, tok, stop_ids, rx, engine_cfg, m))?;
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok((
        Arc::new(App {
            registry: std::sync::RwLock::new(registry),
            loader,
            base_name,
            tokenizer,
            limits,
            context,
            jobs: tx,
            metrics,
            created,
        }),
        handle,
    ))
}

pub fn router(app: Arc<App>) -> Router {
    let limit = app.limits.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

/// An error in OpenAI's shape.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param,
            code: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        (self.status, Json(body)).into_response()
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let reg = app.models();
    let data: Vec<Value> = reg
        .entries
        .iter()
        .map(|e| {
            json!({
                "id": e.name,
                "object": "model",
                "created": app.created,
                "owned_by": "qlora",
                "root": e.parent.as_ref().unwrap_or(&e.name),
                "parent": e.parent,
                "max_model_len": app.context,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

#[derive(Deserialize)]
struct LoadRequest {
    lora_name: String,
    lora_path: String,
}

#[derive(Deserialize)]
struct UnloadRequest {
    lora_name: String,
}

fn runtime_off() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message:
            "loading adapters at run time is off; start the server with --allow-runtime-adapters"
                .into(),
        param: None,
        code: Some("not_found"),
    }
}

/// vLLM's `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`: the adapter gets the same
/// fit checks as at start-up; its requests batch with the base's.
async fn load_adapter(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        if app.loader.is_none() {
            return Err(runtime_off());
        }
        let req: LoadRequest = parse(body)?;
        if req.lora_name.is_empty() || req.lora_name.len() > 256 {
            return Err(ApiError::bad(
                "lora_name: 1 to 256 bytes",
                Some("lora_name"),
            ));
        }
        let taken = |app: &App, name: &str| app.models().entries.iter().any(|e| e.name == name);
        let conflict = |name: &str| ApiError {
            status: StatusCode::CONFLICT,
            kind: "invalid_request_error",
            message: format!("a model named \"{name}\" is already served; unload it first"),
            param: Some("lora_name"),
            code: None,
        };
        if taken(&app, &req.lora_name) {
            return Err(conflict(&req.lora_name));
        }
        let app2 = app.clone();
        let path = std::path::PathBuf::from(&req.lora_path);
        let model =
            tokio::task::spawn_blocking(move || (app2.loader.as_ref().expect("checked"))(&path))
                .await
                .map_err(|e| ApiError::bad(format!("loading the adapter failed: {e}"), None))?
                .map_err(|e| ApiError::bad(e.to_string(), Some("lora_path")))?;
        let mut reg = app.models_mut();
        if reg.entries.iter().any(|e| e.name == req.lora_name) {
            return Err(conflict(&req.lora_name));
        }
        reg.add(
            req.lora_name.clone(),
            Some(app.base_name.clone()),
            Arc::new(model),
        );
        Ok(Json(json!({"status": "loaded", "lora_name": req.lora_name})).into_response())
    }
    .await;
    respond(&app, "/v1/load_lora_adapter", r)
}

/// vLLM's `POST /v1/unload_lora_adapter {"lora_name"}`: new requests can no longer name it;
/// those already running finish with it.
async fn unload_adapter(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = (|| {
        if app.loader.is_none() {
            return Err(runtime_off());
        }
        let req: UnloadRequest = parse(body)?;
        if req.lora_name == app.base_name {
            return Err(ApiError::bad(
                "the base model cannot be unloaded",
                Some("lora_name"),
            ));
        }
        let mut reg = app.models_mut();
        let Some(i) = reg.entries.iter().position(|e| e.name == req.lora_name) else {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                message: format!("no adapter named \"{}\" is served", req.lora_name),
                param: Some("lora_name"),
                code: Some("model_not_found"),
            });
        };
        reg.entries.remove(i);
        Ok(Json(json!({"status": "unloaded", "lora_name": req.lora_name})).into_response())
    })();
    respond(&app, "/v1/unload_lora_adapter", r)
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: "no such endpoint: the server answers /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics".into(),
        param: None,
        code: Some("not_found"),
    }
}

/// A string or a list of strings (`stop`, `prompt`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A completion prompt: text, one text in a list, or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

/// A message's content: text, or a list of parts of which the text ones are used.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields both endpoints share.
#[derive(Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    /// Extensions (vLLM's names).
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    ignore_eos: Option<bool>,
    #[serde(default)]
    min_tokens: Option<u64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    echo: Option<bool>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(flatten)]
    common: Common,
}

fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| ApiError {
        status: r.status(),
        kind: "invalid_request_error",
        message: if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than the server's limit (--max-body-bytes)".into()
        } else {
            format!("could not read the request body: {}", r.body_text())
        },
        param: None,
        code: None,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad(
            format!("the request body is not a valid request: {e}"),
            None,
        )
    })
}

async fn chat(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let t0 = Instant::now();
    let r = chat_inner(&app, body, t0).await;
    respond(&app, "/v1/chat/completions", r)
}

async fn completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let t0 = Instant::now();
    let r = completion_inner(&app, body, t0).await;
    respond(&app, "/v1/completions", r)
}

fn respond(app: &App, endpoint: &str, r: Result<Response, ApiError>) -> Response {
    let resp = r.unwrap_or_else(|e| e.into_response());
    app.metrics.request(endpoint, resp.status().as_u16());
    resp
}

async fn chat_inner(
    app: &Arc<App>,
    body: Result<Bytes, BytesRejection>,
    t0: Instant,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(body)?;
    let model = find_model(app, &req.common.model)?;
    let template = app.tokenizer.chat_template.as_deref().ok_or_else(|| {
        ApiError::bad(
            "the model has no chat template (tokenizer_config.json chat_template or GGUF tokenizer.chat_template); use /v1/completions",
            Some("messages"),
        )
    })?;
    if req.messages.is_empty() {
        return Err(ApiError::bad(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let mut texts = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        let text = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::bad(
                            format!("messages[{i}]: content part of type \"{}\" is not supported (text only)", p.kind),
                            Some("messages"),
                        ));
                    }
                    t.push_str(p.text.as_deref().unwrap_or(""));
                }
                t
            }
        };
        texts.push((m.role.as_str(), text));
    }
    let msgs: Vec<(&str, &str)> = texts.iter().map(|(r, t)| (*r, t.as_str())).collect();
    let tok = &app.tokenizer;
    let rendered = qlora_model::render_messages(
        template,
        &msgs,
        true,
        tok.bos_token.as_deref(),
        tok.eos_token.as_deref(),
    )
    .map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
    // The template writes BOS itself where the model wants it (as transformers does).
    let prompt = encode(app, &rendered, false)?;
    generate(app, model, prompt, &req.common, true, t0)
}

async fn completion_inner(
    app: &Arc<App>,
    body: Result<Bytes, BytesRejection>,
    t0: Instant,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(body)?;
    let model = find_model(app, &req.common.model)?;
    if req.common.echo == Some(true) {
        return Err(ApiError::bad("echo is not supported", Some("echo")));
    }
    let prompt = match req.prompt {
        Prompt::Text(t) => encode(app, &t, true)?,
        Prompt::Texts(v) if v.len() == 1 => encode(app, &v[0], true)?,
        Prompt::Texts(_) => {
            return Err(ApiError::bad(
                "prompt: one prompt per request (a list of one string, a string or token ids)",
                Some("prompt"),
            ))
        }
        Prompt::Tokens(ids) => ids,
    };
    generate(app, model, prompt, &req.common, false, t0)
}

/// The served model a request names.
struct Picked {
    model: Arc<Model>,
    /// See `engine::Job::key`.
    key: (usize, usize),
    name: String,
}

fn find_model(app: &App, name: &str) -> Result<Picked, ApiError> {
    let reg = app.models();
    if let Some(e) = reg.entries.iter().find(|e| e.name == name) {
        return Ok(Picked {
            model: e.model.clone(),
            key: e.key,
            name: e.name.clone(),
        });
    }
    let known: Vec<&str> = reg.entries.iter().map(|e| e.name.as_str()).collect();
    Err(ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: format!(
            "The model `{name}` does not exist. This server has: {}",
            known.join(", ")
        ),
        param: Some("model"),
        code: Some("model_not_found"),
    })
}

fn encode(app: &App, text: &str, special: bool) -> Result<Vec<u32>, ApiError> {
    let enc = app
        .tokenizer
        .tokenizer
        .encode(text, special)
        .map_err(|e| ApiError::bad(format!("tokenizing the prompt: {e}"), None))?;
    Ok(enc.get_ids().to_vec())
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Checks the request's options, queues it, and answers (streamed or whole).
fn generate(
    app: &Arc<App>,
    model: Picked,
    prompt: Vec<u32>,
    c: &Common,
    chat: bool,
    t0: Instant,
) -> Result<Response, ApiError> {
    let lim = &app.limits;
    // Checked here, so that no request can fail the batch it would run in.
    let v = model.model.vocab_size();
    if let Some(bad) = prompt.iter().find(|&&i| i as usize >= v) {
        return Err(ApiError::bad(
            format!("prompt: token id {bad} is outside the model's vocabulary (0..{v})"),
            Some("prompt"),
        ));
    }
    if prompt.is_empty() {
        return Err(ApiError::bad(
            "the prompt is empty after tokenization",
            Some("prompt"),
        ));
    }
    if prompt.len() > lim.max_prompt_tokens {
        return Err(ApiError::bad(
            format!(
                "the prompt has {} tokens; this server takes at most {} (--max-prompt-tokens)",
                prompt.len(),
                lim.max_prompt_tokens
            ),
            Some(if chat { "messages" } else { "prompt" }),
        ));
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("only n = 1 is supported", Some("n")));
    }
    for (v, name) in [
        (c.presence_penalty, "presence_penalty"),
        (c.frequency_penalty, "frequency_penalty"),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad(
                format!("{name} is not supported (use repetition_penalty)"),
                Some(if name == "presence_penalty" {
                    "presence_penalty"
                } else {
                    "frequency_penalty"
                }),
            ));
        }
    }
    if c.logprobs
        .as_ref()
        .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
    {
        return Err(ApiError::bad(
            "logprobs are not supported",
            Some("logprobs"),
        ));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "temperature must be in [0, 2]",
            Some("temperature"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p must be in (0, 1]", Some("top_p")));
    }
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(_) => {
            return Err(ApiError::bad(
                "top_k must be -1, 0 (off) or positive",
                Some("top_k"),
            ))
        }
    };
    let repetition_penalty = c.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
        return Err(ApiError::bad(
            "repetition_penalty must be > 0",
            Some("repetition_penalty"),
        ));
    }
    let room = app.context.saturating_sub(prompt.len());
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        None => lim.max_tokens.min(room),
        Some(0) => {
            return Err(ApiError::bad(
                "max_tokens must be at least 1",
                Some("max_tokens"),
            ))
        }
        Some(n) if n as usize > lim.max_tokens => {
            return Err(ApiError::bad(
                format!(
                    "max_tokens {n} is above this server's limit of {} (--max-tokens)",
                    lim.max_tokens
                ),
                Some("max_tokens"),
            ))
        }
        Some(n) => n as usize,
    };
    if max_tokens == 0 || prompt.len() + max_tokens > app.context {
        return Err(ApiError::bad(
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the prompt, {} for the completion). Please reduce the prompt or max_tokens.",
                app.context,
                prompt.len() + max_tokens.max(1),
                prompt.len(),
                max_tokens.max(1)
            ),
            Some("max_tokens"),
        ));
    }
    let min_tokens = c.min_tokens.unwrap_or(0);
    if min_tokens as usize > max_tokens {
        return Err(ApiError::bad(
            format!("min_tokens {min_tokens} is above max_tokens {max_tokens}"),
            Some("min_tokens"),
        ));
    }
    let stop = match &c.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    };
    if stop.len() > 4 || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::bad(
            "stop: up to 4 non-empty strings of at most 256 bytes",
            Some("stop"),
        ));
    }
    let seed = c.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ NEXT_ID.load(Ordering::Relaxed).wrapping_mul(0x9E37_79B9)
    });
    let (tx, rx) = unbounded_channel();
    let prompt_tokens = prompt.len();
    let Picked { model, key, name } = model;
    let job = Job {
        model,
        key,
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
        },
        stop,
        ignore_eos: c.ignore_eos.unwrap_or(false),
        min_tokens: min_tokens as usize,
        events: tx,
        enqueued: t0,
    };
    app.metrics.queued.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = app.jobs.try_send(job) {
        app.metrics.queued.fetch_sub(1, Ordering::Relaxed);
        return Err(match e {
            TrySendError::Full(_) => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                kind: "rate_limit_error",
                message: format!(
                    "the server has {} requests waiting, its limit (--max-queue); retry later",
                    lim.max_queue
                ),
                param: None,
                code: Some("queue_full"),
            },
            TrySendError::Disconnected(_) => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                message: "the server is shutting down".into(),
                param: None,
                code: None,
            },
        });
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let ctx = Reply {
        id: format!("{}-{id:x}", if chat { "chatcmpl" } else { "cmpl" }),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: name,
        chat,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        prompt_tokens,
        t0,
        metrics: app.metrics.clone(),
    };
    if c.stream == Some(true) {
        Ok(stream_reply(ctx, rx).into_response())
    } else {
        Ok(Deferred { ctx, rx }.into_response())
    }
}

struct Reply {
    id: String,
    created: u64,
    model: String,
    chat: bool,
    include_usage: bool,
    prompt_tokens: usize,
    t0: Instant,
    metrics: Arc<crate::Metrics>,
}

impl Reply {
    fn usage(&self, completion: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    /// A streamed chunk with a text delta or the finish reason.
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        let choice = if self.chat {
            let mut delta = json!({});
            if role {
                delta["role"] = json!("assistant");
                delta["content"] = json!("");
            }
            if let Some(t) = text {
                delta["content"] = json!(t);
            }
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
        };
        let mut v = json!({
            "id": self.id,
            "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }
}

/// The whole answer once generation ends (non-streaming).
struct Deferred {
    ctx: Reply,
    rx: UnboundedReceiver<Event>,
}

impl IntoResponse for Deferred {
    fn into_response(self) -> Response {
        // Wrapped in a body that waits: a handler must return a Response, and waiting here
        // keeps the receiver owned by the response, so a client that goes away drops it.
        let Deferred { ctx, mut rx } = self;
        let body = stream::once(async move {
            let mut text = String::new();
            loop {
                match rx.recv().await {
                    Some(Event::Text(t)) => text.push_str(&t),
                    Some(Event::Done {
                        finish_reason,
                        completion_tokens,
                        ..
                    }) => {
                        let choice = if ctx.chat {
                            json!({"index": 0, "message": {"role": "assistant", "content": text},
                                   "logprobs": null, "finish_reason": finish_reason})
                        } else {
                            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason})
                        };
                        let v = json!({
                            "id": ctx.id,
                            "object": if ctx.chat { "chat.completion" } else { "text_completion" },
                            "created": ctx.created,
                            "model": ctx.model,
                            "choices": [choice],
                            "usage": ctx.usage(completion_tokens),
                        });
                        ctx.metrics.e2e.observe(ctx.t0.elapsed().as_secs_f64());
                        return Ok::<_, Infallible>(Bytes::from(v.to_string()));
                    }
                    Some(Event::Error(e)) => {
                        let v = json!({"error": {"message": format!("generation failed: {e}"),
                                       "type": "server_error", "param": null, "code": null}});
                        return Ok(Bytes::from(v.to_string()));
                    }
                    None => {
                        let v = json!({"error": {"message": "the engine stopped", "type": "server_error",
                                       "param": null, "code": null}});
                        return Ok(Bytes::from(v.to_string()));
                    }
                }
            }
        });
        (
            [(header::CONTENT_TYPE, "application/json")],
            axum::body::Body::from_stream(body),
        )
            .into_response()
    }
}

/// Server-sent events: OpenAI's chunks, then `data: [DONE]`.
fn stream_reply(
    ctx: Reply,
    rx: UnboundedReceiver<Event>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    struct St {
        ctx: Reply,
        rx: UnboundedReceiver<Event>,
        out: VecDeque<String>,
        started: bool,
        done: bool,
    }
    let st = St {
        ctx,
        rx,
        out: VecDeque::new(),
        started: false,
        done: false,
    };
    let s = stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.out.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), st));
            }
            if st.done {
                return None;
            }
            if !st.started && st.ctx.chat {
                st.started = true;
                st.out.push_back(st.ctx.chunk(None, true, None).to_string());
                continue;
            }
            st.started = true;
            match st.rx.recv().await {
                Some(Event::Text(t)) => st
                    .out
                    .push_back(st.ctx.chunk(Some(&t), false, None).to_string()),
                Some(Event::Done {
                    finish_reason,
                    completion_tokens,
                    ..
                }) => {
                    st.out
                        .push_back(st.ctx.chunk(None, false, Some(finish_reason)).to_string());
                    if st.ctx.include_usage {
                        let mut u = st.ctx.chunk(None, false, None);
                        u["choices"] = json!([]);
                        u["usage"] = st.ctx.usage(completion_tokens);
                        st.out.push_back(u.to_string());
                    }
                    st.out.push_back("[DONE]".into());
                    st.ctx
                        .metrics
                        .e2e
                        .observe(st.ctx.t0.elapsed().as_secs_f64());
                    st.done = true;
                }
                Some(Event::Error(e)) => {
                    let v = json!({"error": {"message": format!("generation failed: {e}"),
                                   "type": "server_error", "param": null, "code": null}});
                    st.out.push_back(v.to_string());
                    st.done = true;
                }
                None => st.done = true,
            }
        }
    });
    Sse::new(s)
}
