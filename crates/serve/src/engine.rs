//! The scheduler: one thread that runs continuous batching. Each step,
//! every admitted request contributes its next ids (a prefill chunk of at most
//! `prefill_chunk` tokens, or its last sampled token) to one batched forward of the
//! `Backend` (on the CPU `Model::forward_batch` per base; on a GPU the device model's: the
//! base's products over all rows at once, each adapter's over its requests' rows), then
//! samples and streams. A request joins between steps and leaves when it finishes, when its
//! client goes away (its event channel closes) or on an error; a long prompt is prefilled a
//! chunk a step beside the running streams. Each request keeps its own KV cache (in the
//! backend) and sampler.

use crate::metrics::Metrics;
use qlora_model::{BatchSeq, KvCache, Logits, Model, Sampler, SamplingParams, TextStream};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

/// One admitted request.
pub struct Job {
    /// The served model (the base, or a clone of it carrying an adapter).
    pub model: Arc<Model>,
    /// (base group, model id): requests are batched per base group and kept in this order,
    /// so each adapter's rows are contiguous.
    pub key: (usize, usize),
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Strings that end the completion (not included in it).
    pub stop: Vec<String>,
    /// vLLM's `ignore_eos`: the end-of-sequence tokens are ordinary tokens.
    pub ignore_eos: bool,
    /// vLLM's `min_tokens`: the end-of-sequence tokens are masked until this many are out.
    pub min_tokens: usize,
    pub events: UnboundedSender<Event>,
    pub enqueued: Instant,
}

/// What the engine sends back for a request.
#[derive(Debug)]
pub enum Event {
    /// The next piece of text.
    Text(String),
    /// The end: "stop" (EOS or a stop string) or "length" (max_tokens).
    Done {
        finish_reason: &'static str,
        completion_tokens: usize,
    },
    Error(String),
}

/// A request's decoding state (its KV cache) in a `Backend`.
pub type Handle = usize;

/// One request's part of a batched step.
pub struct StepSeq<'a> {
    pub handle: Handle,
    pub model: &'a Arc<Model>,
    /// `Job::key`: requests come sorted by it, so each adapter's rows are contiguous.
    pub key: (usize, usize),
    pub ids: &'a [u32],
    /// Whether the last token's logits are wanted.
    pub logits: bool,
}

/// Why a backend could not open or run one request; its message goes to that request's client.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The model's forward refused the request (a CPU backend).
    #[error(transparent)]
    Model(#[from] qlora_model::Error),
    /// A device backend's failure; its message names the device and what to do.
    #[error("{0}")]
    Device(Box<dyn std::error::Error + Send + Sync>),
    /// Fewer results than sequences came back (a backend bug, reported, not a panic).
    #[error("the backend returned no result")]
    NoResult,
}

/// Where the batched forward runs; the engine thread owns it and calls nothing else.
pub trait Backend: Send {
    /// Opens a request's state for `model` (`key`: `Job::key`). An error goes to that request.
    fn open(&mut self, model: &Arc<Model>, key: (usize, usize)) -> Result<Handle, BackendError>;
    /// Runs each sequence's ids at its next positions, batched; one result per sequence: the
    /// last token's logits when it asked (else empty), or the error that concerns it alone.
    fn forward(&mut self, batch: &[StepSeq<'_>]) -> Vec<Result<Vec<f32>, BackendError>>;
    /// Frees a request's state.
    fn close(&mut self, handle: Handle);
}

/// The CPU: one `Model::forward_batch` per run of requests on one base, a `KvCache` each.
#[derive(Default)]
pub struct CpuBackend {
    caches: Vec<Option<KvCache>>,
    free: Vec<Handle>,
}

impl Backend for CpuBackend {
    fn open(&mut self, model: &Arc<Model>, _key: (usize, usize)) -> Result<Handle, BackendError> {
        let cache = Some(KvCache::new(model));
        Ok(match self.free.pop() {
            Some(h) => {
                self.caches[h] = cache;
                h
            }
            None => {
                self.caches.push(cache);
                self.caches.len() - 1
            }
        })
    }

    fn forward(&mut self, batch: &[StepSeq<'_>]) -> Vec<Result<Vec<f32>, BackendError>> {
        let mut results = Vec::with_capacity(batch.len());
        let mut i = 0;
        while i < batch.len() {
            let base = batch[i].key.0;
            let j = i + batch[i..].iter().take_while(|s| s.key.0 == base).count();
            let mut caches: Vec<KvCache> = batch[i..j]
                .iter()
                .map(|s| self.caches[s.handle].take().expect("an open handle"))
                .collect();
            let mut seqs: Vec<BatchSeq> = batch[i..j]
                .iter()
                .zip(caches.iter_mut())
                .map(|(s, cache)| BatchSeq {
                    model: s.model,
                    ids: s.ids,
                    cache,
                    logits: s.logits.then_some(Logits::Last),
                })
                .collect();
            match Model::forward_batch(&mut seqs) {
                Ok(v) => results.extend(v.into_iter().map(Ok)),
                // The checks run before any cache changes: run each alone, so that only the
                // request at fault gets the error.
                Err(_) => {
                    for b in seqs.iter_mut() {
                        let one = BatchSeq {
                            model: b.model,
                            ids: b.ids,
                            cache: &mut *b.cache,
                            logits: b.logits,
                        };
                        results.push(
                            Model::forward_batch(&mut [one])
                                .map(|mut v| v.pop().unwrap_or_default())
                                .map_err(BackendError::from),
                        );
                    }
                }
            }
            drop(seqs);
            for (s, c) in batch[i..j].iter().zip(caches) {
                self.caches[s.handle] = Some(c);
            }
            i = j;
        }
        results
    }

    fn close(&mut self, handle: Handle) {
        if self.caches.get_mut(handle).and_then(|c| c.take()).is_some() {
            self.free.push(handle);
        }
    }
}

pub struct EngineConfig {
    pub max_concurrent: usize,
    pub prefill_chunk: usize,
}

/// Runs until every sender of `jobs` is gone and the running requests are done.
pub fn run(
    mut backend: Box<dyn Backend>,
    tokenizer: Tokenizer,
    stop_ids: Vec<u32>,
    jobs: Receiver<Job>,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
) {
    let mut active: Vec<Seq> = Vec::new();
    let mut open = true;
    loop {
        while open && active.len() < cfg.max_concurrent {
            let job = if active.is_empty() {
                match jobs.recv() {
                    Ok(j) => j,
                    Err(_) => {
                        open = false;
                        break;
                    }
                }
            } else {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            metrics.queued.fetch_sub(1, Ordering::Relaxed);
            metrics
                .queue_time
                .observe(job.enqueued.elapsed().as_secs_f64());
            let key = job.key;
            let handle = match backend.open(&job.model, key) {
                Ok(h) => h,
                Err(e) => {
                    metrics.errors.fetch_add(1, Ordering::Relaxed);
                    let _ = job.events.send(Event::Error(e.to_string()));
                    continue;
                }
            };
            let seq = Seq::new(&tokenizer, job, handle, cfg.prefill_chunk);
            // Kept sorted by (base, adapter), so each adapter's rows are contiguous.
            let at = active.partition_point(|s| s.key <= key);
            active.insert(at, seq);
        }
        active.retain(|s| {
            let gone = s.job.events.is_closed();
            if gone {
                metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                backend.close(s.handle);
            }
            !gone
        });
        metrics
            .running
            .store(active.len() as u64, Ordering::Relaxed);
        if active.is_empty() {
            if !open {
                return;
            }
            continue;
        }
        metrics.batch_size.observe(active.len() as f64);
        step(
            backend.as_mut(),
            &mut active,
            &stop_ids,
            cfg.prefill_chunk,
            &metrics,
        );
        metrics
            .running
            .store(active.len() as u64, Ordering::Relaxed);
    }
}

/// One engine step: every running request's next ids (a prefill chunk or its last token)
/// through the backend's batched forward, then each samples and streams. Finished requests
/// leave `active` and close their state.
fn step(
    backend: &mut dyn Backend,
    active: &mut Vec<Seq>,
    stop_ids: &[u32],
    chunk: usize,
    m: &Metrics,
) {
    let batch: Vec<StepSeq> = active
        .iter()
        .map(|s| StepSeq {
            handle: s.handle,
            model: &s.model,
            key: s.key,
            ids: &s.next,
            logits: s.wants_logits(),
        })
        .collect();
    let t0 = Instant::now();
    let mut results = backend.forward(&batch);
    let t1 = Instant::now();
    drop(batch);
    results.resize_with(active.len(), || Err(BackendError::NoResult));
    // Every stream that samples this step does so at once, on the worker threads: a token over
    // a 32k vocabulary costs about 0.5 ms on the host, which one thread paid per stream and
    // step (64 streams: ~30 ms a step, more than the GPU's forward).
    use rayon::prelude::*;
    let sampled: Vec<Option<u32>> = active
        .par_iter_mut()
        .zip(results.par_iter_mut())
        .map(|(s, r)| match r {
            Ok(logits) if s.wants_logits() && !logits.is_empty() => {
                Some(s.sample(logits, stop_ids))
            }
            _ => None,
        })
        .collect();
    let t2 = Instant::now();
    let mut k = 0;
    active.retain_mut(|s| {
        let r = std::mem::replace(&mut results[k], Ok(Vec::new()));
        let id = sampled[k];
        k += 1;
        let more = match r {
            Ok(_) => s.after(id, chunk, stop_ids, m).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match more {
            Ok(true) => true,
            Ok(false) => {
                backend.close(s.handle);
                false
            }
            Err(e) => {
                m.errors.fetch_add(1, Ordering::Relaxed);
                let _ = s.job.events.send(Event::Error(e));
                backend.close(s.handle);
                false
            }
        }
    });
    let ns = |a: Instant, b: Instant| (b - a).as_nanos() as u64;
    m.steps.fetch_add(1, Ordering::Relaxed);
    m.forward_ns.fetch_add(ns(t0, t1), Ordering::Relaxed);
    m.sample_ns.fetch_add(ns(t1, t2), Ordering::Relaxed);
    m.emit_ns
        .fetch_add(ns(t2, Instant::now()), Ordering::Relaxed);
}

/// One running request.
struct Seq<'a> {
    model: Arc<Model>,
    /// (base group, model index): the batching order.
    key: (usize, usize),
    /// Its state in the backend.
    handle: Handle,
    stream: TextStream<'a>,
    sampler: Sampler,
    job: Job,
    /// Prompt tokens prefilled so far (after this step's `next`, once it has run).
    prefilled: usize,
    /// The ids this step runs.
    next: Vec<u32>,
    /// The prompt and the output so far (the repetition penalty's window).
    seen: Vec<u32>,
    /// Text decoded but not yet sent: it may be the start of a stop string.
    pending: String,
    last_token: Instant,
    first_token: bool,
}

impl<'a> Seq<'a> {
    fn new(tokenizer: &'a Tokenizer, job: Job, handle: Handle, chunk: usize) -> Self {
        let first = job.prompt[..job.prompt.len().min(chunk.max(1))].to_vec();
        Seq {
            model: job.model.clone(),
            key: job.key,
            handle,
            stream: TextStream::new(tokenizer),
            sampler: Sampler::new(job.sampling.clone()),
            seen: job.prompt.clone(),
            prefilled: 0,
            next: first,
            job,
            pending: String::new(),
            last_token: Instant::now(),
            first_token: true,
        }
    }

    /// Whether this step's ids end the prompt or are a generated token (then it samples).
    fn wants_logits(&self) -> bool {
        self.prefilled + self.next.len() >= self.job.prompt.len()
    }

    /// The next token from this step's logits (when `wants_logits`): the stop ids masked
    /// while `min_tokens` is not reached, then the request's sampler.
    fn sample(&mut self, logits: &mut [f32], stop_ids: &[u32]) -> u32 {
        if !self.job.ignore_eos && self.stream.tokens().len() < self.job.min_tokens {
            for &e in stop_ids {
                if let Some(x) = logits.get_mut(e as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        self.sampler.sample(logits, &self.seen)
    }

    /// After the step's forward (and `sample`, whose token `id` is when the step ended the
    /// prompt or was a generated token): the next prefill chunk, or the token streamed. False
    /// when the request is over.
    fn after(
        &mut self,
        id: Option<u32>,
        chunk: usize,
        stop_ids: &[u32],
        m: &Metrics,
    ) -> qlora_model::Result<bool> {
        let n = self.job.prompt.len();
        if self.prefilled < n {
            m.prompt_tokens
                .fetch_add(self.next.len() as u64, Ordering::Relaxed);
            self.prefilled += self.next.len();
            if self.prefilled < n {
                let end = (self.prefilled + chunk.max(1)).min(n);
                self.next = self.job.prompt[self.prefilled..end].to_vec();
                return Ok(true);
            }
        }
        let Some(id) = id else {
            return Err(qlora_model::Error::Invalid(
                "the backend returned no logits for a step that samples".into(),
            ));
        };
        let now = Instant::now();
        if self.first_token {
            m.ttft.observe(self.job.enqueued.elapsed().as_secs_f64());
            self.first_token = false;
        } else {
            m.token_time
                .observe(now.duration_since(self.last_token).as_secs_f64());
        }
        self.last_token = now;
        if !self.job.ignore_eos && stop_ids.contains(&id) {
            return Ok(self.finish("stop", false));
        }
        self.seen.push(id);
        m.generation_tokens.fetch_add(1, Ordering::Relaxed);
        if let Some(piece) = self.stream.push(id)? {
            self.pending.push_str(&piece);
        }
        let at_limit = self.stream.tokens().len() >= self.job.max_tokens;
        if at_limit {
            if let Some(piece) = self.stream.finish()? {
                self.pending.push_str(&piece);
            }
        }
        if let Some(cut) = first_stop(&self.pending, &self.job.stop) {
            self.pending.truncate(cut);
            return Ok(self.finish("stop", true));
        }
        if at_limit {
            return Ok(self.finish("length", true));
        }
        // Send what cannot be the start of a stop string.
        let keep = held_back(&self.pending, &self.job.stop);
        if self.pending.len() > keep {
            let rest = self.pending.split_off(self.pending.len() - keep);
            let text = std::mem::replace(&mut self.pending, rest);
            let _ = self.job.events.send(Event::Text(text));
        }
        self.next = vec![id];
        Ok(true)
    }

    /// Sends the rest of the text (when `flush`) and the end; always false.
    fn finish(&mut self, reason: &'static str, flush: bool) -> bool {
        if flush && !self.pending.is_empty() {
            let _ = self
                .job
                .events
                .send(Event::Text(std::mem::take(&mut self.pending)));
        }
        let _ = self.job.events.send(Event::Done {
            finish_reason: reason,
            completion_tokens: self.stream.tokens().len(),
        });
        false
    }
}

/// Byte offset of the earliest stop string in `text`.
fn first_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// The length of the longest suffix of `text` that is a proper prefix of a stop string (held
/// back until the next piece says whether the stop string follows).
fn held_back(text: &str, stop: &[String]) -> usize {
    let mut keep = 0;
    for s in stop {
        for (k, _) in s.char_indices().skip(1) {
            if k > keep && text.ends_with(&s[..k]) {
                keep = k;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_and_their_prefixes_held_back() {
        let stop = vec!["\n\nUser:".to_string(), "END".to_string()];
        assert_eq!(first_stop("abc END x", &stop), Some(4));
        assert_eq!(first_stop("a\n\nUser: b", &stop), Some(1));
        assert_eq!(first_stop("nothing", &stop), None);
        assert_eq!(held_back("text\n\nUs", &stop), 4);
        assert_eq!(held_back("text E", &stop), 1);
        assert_eq!(held_back("text EN", &stop), 2);
        assert_eq!(held_back("text", &stop), 0);
        assert_eq!(held_back("ünï", &["ïx".to_string()]), 2);
    }
}
