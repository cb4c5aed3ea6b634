//! `qlora serve --device cuda`: the serve engine's `Backend` on one `CudaModel`. The base is
//! uploaded once; each served adapter becomes a device adapter set the first time a request
//! names it (and is freed once it is unloaded and its last request is done); every request's
//! KV cache lives in the paged device cache. A step runs all requests, whatever their
//! adapters, in one batched forward: the base's products over every row, each adapter set's
//! over its requests' rows (the engine keeps requests sorted by adapter).

use qlora_cuda::{CudaModel, Seq};
use qlora_model::{Logits, Model};
use qlora_serve::{Backend, BackendError, Handle, StepSeq};
use std::collections::HashMap;
use std::sync::{Arc, Weak};

pub struct CudaBackend {
    model: CudaModel,
    /// The uploaded base (a served model must share its weights).
    base: Model,
    /// Served model id (`Job::key.1`) → its adapter set.
    sets: HashMap<usize, SetEntry>,
    /// Open requests: their device sequence and served model id.
    seqs: Vec<Option<(Seq, usize)>>,
    free: Vec<Handle>,
}

struct SetEntry {
    set: usize,
    /// The served model while the server lists it.
    model: Weak<Model>,
    /// Requests open on it.
    open: usize,
}

impl CudaBackend {
    /// `model`: `base` uploaded with no adapters.
    pub fn new(model: CudaModel, base: Model) -> Self {
        CudaBackend {
            model,
            base,
            sets: HashMap::new(),
            seqs: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Frees the adapter sets of models the server no longer lists once nothing runs on them.
    fn sweep(&mut self) {
        let dead: Vec<usize> = self
            .sets
            .iter()
            .filter(|(_, e)| e.open == 0 && e.model.strong_count() == 0)
            .map(|(&id, _)| id)
            .collect();
        for id in dead {
            if let Some(e) = self.sets.remove(&id) {
                if e.set != 0 {
                    let _ = self.model.remove_adapters(e.set);
                }
            }
        }
    }

    /// The adapter set of served model `id`, uploaded now if it is new.
    fn set_for(&mut self, model: &Arc<Model>, id: usize) -> Result<usize, BackendError> {
        if let Some(e) = self.sets.get(&id) {
            return Ok(e.set);
        }
        if !self.base.shares_base(model) {
            return Err(BackendError::Device("this adapter replaces base weights (modules_to_save, or a trained embedding or head): on the GPU the server runs one uploaded base for every adapter; serve it with --device cpu, or merge it (`qlora merge`) and serve the merged model".into()));
        }
        let set = if model.has_adapters() {
            self.model.add_adapters(model).map_err(|e| {
                BackendError::Device(format!("uploading the adapter to the GPU: {e}").into())
            })?
        } else {
            0
        };
        self.sets.insert(
            id,
            SetEntry {
                set,
                model: Arc::downgrade(model),
                open: 0,
            },
        );
        Ok(set)
    }

    /// One forward of `seqs` (each with its ids); each one's logits row, or the error.
    fn run(&mut self, seqs: &mut [(&mut Seq, &[u32])]) -> Result<Vec<Vec<f32>>, BackendError> {
        let v = self.model.vocab_size();
        let rows = self
            .model
            .forward(seqs, Logits::Last)
            .map_err(|e| BackendError::Device(Box::new(e)))?;
        // Split on the worker threads: at batch 64 over a 32k vocabulary this is 8 MB.
        use rayon::prelude::*;
        Ok(rows.par_chunks(v).map(<[f32]>::to_vec).collect())
    }
}

impl Backend for CudaBackend {
    fn open(&mut self, model: &Arc<Model>, key: (usize, usize)) -> Result<Handle, BackendError> {
        self.sweep();
        let set = self.set_for(model, key.1)?;
        let seq = self
            .model
            .new_seq_with(set)
            .map_err(|e| BackendError::Device(Box::new(e)))?;
        if let Some(e) = self.sets.get_mut(&key.1) {
            e.open += 1;
        }
        let entry = Some((seq, key.1));
        Ok(match self.free.pop() {
            Some(h) => {
                self.seqs[h] = entry;
                h
            }
            None => {
                self.seqs.push(entry);
                self.seqs.len() - 1
            }
        })
    }

    fn forward(&mut self, batch: &[StepSeq<'_>]) -> Vec<Result<Vec<f32>, BackendError>> {
        let mut taken: Vec<(Seq, usize)> = batch
            .iter()
            .map(|b| self.seqs[b.handle].take().expect("an open handle"))
            .collect();
        let mut refs: Vec<(&mut Seq, &[u32])> = taken
            .iter_mut()
            .zip(batch)
            .map(|((s, _), b)| (s, b.ids))
            .collect();
        let rows = match self.run(&mut refs) {
            Ok(rows) if rows.len() == batch.len() => rows.into_iter().map(Ok).collect(),
            // The checks run before any cache changes: run each alone, so that only the
            // request at fault gets the error.
            _ => refs
                .iter_mut()
                .map(|(s, ids)| {
                    self.run(&mut [(&mut **s, *ids)])
                        .map(|mut r| r.pop().unwrap_or_default())
                })
                .collect::<Vec<_>>(),
        };
        drop(refs);
        for (b, s) in batch.iter().zip(taken) {
            self.seqs[b.handle] = Some(s);
        }
        rows.into_iter()
            .zip(batch)
            .map(|(r, b)| r.map(|l| if b.logits { l } else { Vec::new() }))
            .collect()
    }

    fn close(&mut self, handle: Handle) {
        if let Some((mut seq, id)) = self.seqs.get_mut(handle).and_then(|s| s.take()) {
            self.model.free_seq(&mut seq);
            if let Some(e) = self.sets.get_mut(&id) {
                e.open = e.open.saturating_sub(1);
            }
            self.free.push(handle);
        }
    }
}
