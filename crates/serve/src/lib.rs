//! qlora-serve: an OpenAI-compatible HTTP server for one base model and any number of adapters
//! on it, chosen per request by the `model` field (as vLLM, LoRAX, TGI and mistral.rs do).
//!
//! HTTP (axum on tokio) runs on its own threads; generation runs on one engine thread
//! (`engine`), which batches every admitted request at token granularity. Handlers look the
//! request's model up in the registry, hand the request (with its `Arc<Model>`) over through a
//! bounded queue and read its tokens back from a channel per request; a client that goes away
//! closes that channel, and the engine drops the request and its cache at its next step.

mod api;
mod engine;
mod metrics;

pub use api::router;
pub use engine::{Backend, BackendError, CpuBackend, Handle, StepSeq};
pub use metrics::Metrics;

use qlora_io::TokenizerInfo;
use qlora_model::Model;
use std::net::SocketAddr;
use std::sync::Arc;

/// One model the server answers for: the base or an adapter on it.
pub struct Served {
    /// The name requests use in `model`.
    pub name: String,
    /// For an adapter: the base's name (`/v1/models` lists it as `parent`).
    pub parent: Option<String>,
    pub model: Model,
}

/// Limits and sizes; every one has a flag in `qlora serve`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Requests generated at once (the running batch).
    pub max_concurrent: usize,
    /// Requests waiting for a slot; beyond it, 429.
    pub max_queue: usize,
    /// Prompt tokens a request may have.
    pub max_prompt_tokens: usize,
    /// `max_tokens` a request may ask for (and the default when it asks for none).
    pub max_tokens: usize,
    /// Request body bytes; beyond it, 413.
    pub max_body_bytes: usize,
    /// Prompt tokens prefilled per engine step.
    pub prefill_chunk: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_concurrent: 8,
            max_queue: 64,
            max_prompt_tokens: 4096,
            max_tokens: 1024,
            max_body_bytes: 1 << 20,
            prefill_chunk: 256,
        }
    }
}

/// Builds an adapter's model from its directory at run time (`POST /v1/load_lora_adapter`):
/// the same checks as at start-up; the error's message is the client's.
pub type AdapterLoader = Box<
    dyn Fn(&std::path::Path) -> Result<Model, Box<dyn std::error::Error + Send + Sync>>
        + Send
        + Sync,
>;

/// What the server needs to run.
pub struct ServeConfig {
    /// The base first, then its adapters.
    pub models: Vec<Served>,
    pub tokenizer: TokenizerInfo,
    /// Token ids that end a completion (EOS).
    pub stop_ids: Vec<u32>,
    pub limits: Limits,
    /// With a loader, the opt-in endpoints that load and unload adapters while serving.
    pub loader: Option<AdapterLoader>,
    /// Where generation runs: `CpuBackend`, or a device's (the CLI's CUDA backend).
    pub backend: Box<dyn Backend>,
}

/// Binds `addr`, calls `on_listen` with the bound address (port 0 picks one), and serves until
/// SIGTERM or Ctrl-C; then calls `on_shutdown`, stops accepting, lets running streams finish,
/// and returns. The library prints nothing: the caller says what it wants in the callbacks.
pub fn serve(
    cfg: ServeConfig,
    addr: SocketAddr,
    on_listen: impl FnOnce(SocketAddr),
    on_shutdown: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (app, engine) = api::start(cfg)?;
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        on_listen(listener.local_addr()?);
        axum::serve(listener, router(app))
            .with_graceful_shutdown(shutdown_signal(on_shutdown))
            .await
    });
    // The router (and with it the queue's sender) is gone: the engine finishes what runs.
    let _ = engine.join();
    result
}

async fn shutdown_signal(on_shutdown: impl FnOnce()) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    on_shutdown();
}

/// A served model in the registry.
pub(crate) struct Entry {
    pub name: String,
    pub parent: Option<String>,
    pub model: Arc<Model>,
    /// (base group, id): see `engine::Job::key`.
    pub key: (usize, usize),
}

/// The served models, in listing order, and the next id.
pub(crate) struct Registry {
    pub entries: Vec<Entry>,
    pub next_id: usize,
}

impl Registry {
    /// Adds a model; it batches with the first entry that shares its base.
    pub fn add(&mut self, name: String, parent: Option<String>, model: Arc<Model>) {
        let id = self.next_id;
        self.next_id += 1;
        let group = self
            .entries
            .iter()
            .find(|e| e.model.shares_base(&model))
            .map_or(id, |e| e.key.0);
        self.entries.push(Entry {
            name,
            parent,
            model,
            key: (group, id),
        });
    }
}

impl App {
    /// The served models (a poisoned lock still holds a consistent list: every change to it
    /// is one push or one remove).
    pub(crate) fn models(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn models_mut(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Shared by the handlers.
pub struct App {
    pub(crate) registry: std::sync::RwLock<Registry>,
    pub(crate) loader: Option<AdapterLoader>,
    pub(crate) base_name: String,
    pub(crate) tokenizer: TokenizerInfo,
    pub(crate) limits: Limits,
    pub(crate) context: usize,
    pub(crate) jobs: std::sync::mpsc::SyncSender<engine::Job>,
    pub metrics: Arc<Metrics>,
    pub(crate) created: u64,
}
