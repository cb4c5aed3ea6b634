//! Opening a model: a Hugging Face directory (config.json, single or sharded safetensors,
//! tokenizer files) or a `.gguf` file, as one `ModelSource` of HF-named tensors.

use crate::{
    load_tokenizer_json, tokenizer_from_gguf, Error, GgufFile, ModelConfig, RawTensor, Result,
    SafetensorsFile, TokenizerInfo,
};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Tensors by HF name, each remembering the file it came from (for error messages).
#[derive(Default)]
pub struct TensorStore {
    tensors: HashMap<String, (RawTensor, PathBuf)>,
    order: Vec<String>,
}

impl TensorStore {
    /// Adds a tensor read from `file`; a name seen before (in this file or another) is an
    /// error, never "the last one wins".
    pub fn add_new(&mut self, t: RawTensor, file: &Path) -> Result<()> {
        if let Some((_, first)) = self.tensors.get(&t.name) {
            return Err(Error::Tensor {
                path: file.into(),
                tensor: t.name.clone(),
                reason: if first == file {
                    "appears twice in this file; the checkpoint is corrupt".into()
                } else {
                    format!(
                        "is also in {}; a tensor must be in one file only",
                        first.display()
                    )
                },
            });
        }
        self.insert(t, file);
        Ok(())
    }

    /// Puts a tensor in place, replacing one of the same name (adapters' replacements).
    pub fn insert(&mut self, t: RawTensor, file: &Path) {
        if !self.tensors.contains_key(&t.name) {
            self.order.push(t.name.clone());
        }
        self.tensors.insert(t.name.clone(), (t, file.into()));
    }
    pub fn get(&self, name: &str) -> Option<&RawTensor> {
        self.tensors.get(name).map(|(t, _)| t)
    }
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors.get(name).map(|(_, p)| p.as_path())
    }
    pub fn remove(&mut self, name: &str) -> Option<RawTensor> {
        self.tensors.remove(name).map(|(t, _)| t)
    }
    /// Names in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.order
            .iter()
            .filter(|n| self.tensors.contains_key(*n))
            .map(|s| s.as_str())
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

/// Everything read from a model path.
pub struct ModelSource {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub tensors: TensorStore,
    pub tokenizer: Option<TokenizerInfo>,
}

impl ModelSource {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory; check the --model path",
                ),
            ));
        }
        if path.is_dir() {
            Self::open_dir(path)
        } else if path.extension().is_some_and(|e| e == "gguf") || starts_with_gguf_magic(path) {
            Self::open_gguf(path)
        } else {
            Err(Error::NotAModel { path: path.into() })
        }
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let g = GgufFile::open(path)?;
        let config = g.config()?;
        let mut tensors = TensorStore::default();
        for t in g.hf_tensors(&config)? {
            tensors.add_new(t, path)?;
        }
        let tokenizer = tokenizer_from_gguf(&g)?;
        Ok(ModelSource {
            path: path.into(),
            config,
            tensors,
            tokenizer,
        })
    }

    fn open_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            return Err(Error::NotAModel { path: dir.into() });
        }
        let config = ModelConfig::load(&cfg_path)?;
        let mut tensors = TensorStore::default();
        let (files, index) = weight_files(dir)?;
        for file in files {
            let st = SafetensorsFile::open(&file)?;
            for t in st.tensors {
                // A sharded checkpoint's index says where each tensor is: believe it or fail.
                if let Some((index_path, map)) = &index {
                    let named = map.get(&t.name).map(|f| dir.join(f));
                    if named.as_deref() != Some(file.as_path()) {
                        return Err(Error::Tensor {
                            path: file.clone(),
                            tensor: t.name.clone(),
                            reason: match named {
                                Some(n) => {
                                    format!("{} puts it in {}", index_path.display(), n.display())
                                }
                                None => format!("is not in {}'s weight_map", index_path.display()),
                            },
                        });
                    }
                }
                tensors.add_new(t, &file)?;
            }
        }
        let tokenizer = load_tokenizer_json(dir)?;
        Ok(ModelSource {
            path: dir.into(),
            config,
            tensors,
            tokenizer,
        })
    }
}

fn starts_with_gguf_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// What `model.safetensors.index.json` says: its path, and each tensor's file name.
type Index = (PathBuf, HashMap<String, String>);

/// The safetensors files of a directory: those named by `model.safetensors.index.json` (with
/// that index), or `model.safetensors`.
fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<Index>)> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: index.clone(),
            reason: e.to_string(),
        })?;
        let Some(map) = v["weight_map"].as_object() else {
            return Err(Error::Json {
                path: index,
                reason: "no \"weight_map\" object".into(),
            });
        };
        let mut files = BTreeMap::new();
        let mut where_is = HashMap::new();
        for (tensor, f) in map {
            let Some(f) = f.as_str() else {
                return Err(Error::Json {
                    path: index.clone(),
                    reason: format!("weight_map entry for \"{tensor}\" is not a file name"),
                });
            };
            let p = dir.join(f);
            if !p.exists() {
                return Err(Error::io(
                    &p,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("shard named by {} for tensor \"{tensor}\" is missing; download every shard", index.display()),
                    ),
                ));
            }
            files.insert(f.to_string(), p);
            where_is.insert(tensor.clone(), f.to_string());
        }
        return Ok((files.into_values().collect(), Some((index, where_is))));
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok((vec![single], None));
    }
    let hint = if dir.join("pytorch_model.bin").exists() {
        "; only pytorch_model.bin is present: re-save the model with safe_serialization=True"
    } else {
        ""
    };
    Err(Error::io(
        &single,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no model.safetensors or model.safetensors.index.json{hint}"),
        ),
    ))
}
