//! Checkpoint reading: memory-mapped safetensors, single file or sharded through
//! `model.safetensors.index.json`, with dtype conversion and name bookkeeping.
//!
//! Only safetensors is ever loaded. Pickle checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) are
//! refused with an error, because unpickling runs arbitrary code.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use crate::error::{read_json, Error, Result};

/// Maps a safetensors dtype to a tch kind.
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

/// Maps a tch kind to a safetensors dtype.
pub fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

const PICKLE_EXTENSIONS: &[&str] = &["bin", "pt", "pth", "ckpt", "pkl"];

/// Refuses files that are pickles (by extension or by magic bytes: zip or pickle protocol 2+).
fn refuse_pickle(path: &Path, head: &[u8]) -> Result<()> {
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        if PICKLE_EXTENSIONS.contains(&ext) {
            return Err(Error::PickleRefused { path: path.to_path_buf(), reason: format!("`.{ext}` file") });
        }
    }
    if head.starts_with(b"PK\x03\x04") {
        return Err(Error::PickleRefused { path: path.to_path_buf(), reason: "zip archive (torch.save format)".into() });
    }
    if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        return Err(Error::PickleRefused { path: path.to_path_buf(), reason: "pickle stream".into() });
    }
    Ok(())
}

/// One memory-mapped safetensors file with its parsed, validated header.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    /// name -> (dtype, shape, byte range within the file)
    entries: BTreeMap<String, (Dtype, Vec<i64>, std::ops::Range<usize>)>,
}

impl SafetensorsFile {
    /// Maps and validates `path`: a truncated file or a corrupt header is an error naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file changed underneath is the caller's problem, as with
        // every mmap-based loader (safetensors, candle, transformers).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        refuse_pickle(path, &mmap[..mmap.len().min(8)])?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| Error::Safetensors { path: path.to_path_buf(), reason: e.to_string() })?;
        let base = mmap.as_ptr() as usize;
        let mut entries = BTreeMap::new();
        for (name, view) in st.tensors() {
            let start = view.data().as_ptr() as usize - base;
            let shape = view.shape().iter().map(|&d| d as i64).collect();
            entries.insert(name, (view.dtype(), shape, start..start + view.data().len()));
        }
        drop(st);
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap, entries })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in this file, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.entries.get(name).map(|(_, s, _)| s.as_slice())
    }

    /// Raw dtype of `name`, if present.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.entries.get(name).map(|(d, _, _)| *d)
    }

    /// The raw little-endian bytes of `name`, borrowed from the map.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.entries.get(name).map(|(_, _, r)| &self.mmap[r.clone()])
    }

    /// Copies `name` into a tensor of its stored dtype on the CPU.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let (dtype, shape, range) =
            self.entries.get(name).ok_or_else(|| Error::MissingTensors { path: self.path.clone(), names: vec![name.to_string()] })?;
        let kind = kind_of(*dtype).ok_or_else(|| Error::Dtype {
            name: name.to_string(),
            expected: "bool, int, f16, bf16, f32 or f64".into(),
            got: format!("{dtype:?}"),
            path: Some(self.path.clone()),
        })?;
        Ok(Tensor::f_from_data_size(&self.mmap[range.clone()], shape, kind)?)
    }
}

/// All tensors of a checkpoint: one file, or the shards of a `model.safetensors.index.json`.
pub struct WeightSource {
    root: PathBuf,
    files: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
}

impl WeightSource {
    /// Opens a model directory or a single `.safetensors` file.
    ///
    /// Lookup order in a directory: `model.safetensors.index.json`, `model.safetensors`, every
    /// `*.safetensors`. A directory holding only pickle checkpoints gives [`Error::PickleRefused`].
    pub fn open(path: &Path) -> Result<Self> {
        let files: Vec<PathBuf> = if path.is_file() {
            vec![path.to_path_buf()]
        } else {
            let index = path.join("model.safetensors.index.json");
            if index.is_file() {
                #[derive(serde::Deserialize)]
                struct Index {
                    weight_map: BTreeMap<String, String>,
                }
                let idx: Index = read_json(&index)?;
                let shard_names: BTreeSet<&String> = idx.weight_map.values().collect();
                shard_names.into_iter().map(|s| path.join(s)).collect()
            } else if path.join("model.safetensors").is_file() {
                vec![path.join("model.safetensors")]
            } else {
                let mut found = Vec::new();
                let mut pickles = Vec::new();
                let entries = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
                for entry in entries {
                    let p = entry.map_err(|e| Error::io(path, e))?.path();
                    match p.extension().and_then(|e| e.to_str()) {
                        Some("safetensors") => found.push(p),
                        Some(ext) if PICKLE_EXTENSIONS.contains(&ext) => pickles.push(p),
                        _ => {}
                    }
                }
                found.sort();
                if found.is_empty() {
                    if let Some(p) = pickles.first() {
                        return Err(Error::PickleRefused { path: p.clone(), reason: "the directory has no safetensors file".into() });
                    }
                    return Err(Error::io(path.join("model.safetensors"), std::io::Error::from(std::io::ErrorKind::NotFound)));
                }
                found
            }
        };
        let files = files.iter().map(|f| SafetensorsFile::open(f)).collect::<Result<Vec<_>>>()?;
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.names() {
                index.insert(name.to_string(), i);
            }
        }
        Ok(WeightSource { root: path.to_path_buf(), files, index })
    }

    /// The directory or file this was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Whether `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The file holding `name` and its shape.
    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.index.get(name).and_then(|&i| self.files[i].shape(name))
    }

    /// The file that holds `name`.
    pub fn file_of(&self, name: &str) -> Option<&SafetensorsFile> {
        self.index.get(name).map(|&i| &self.files[i])
    }

    /// Loads `name` converted to `kind` on `device`.
    pub fn get(&self, name: &str, kind: Kind, device: Device) -> Result<Tensor> {
        let file = self.file_of(name).ok_or_else(|| Error::MissingTensors { path: self.root.clone(), names: vec![name.to_string()] })?;
        let t = file.tensor(name)?;
        Ok(t.f_to_device(device)?.f_to_kind(kind)?)
    }
}

/// Loads a model's tensors by name while recording what was asked for, so that a load can end
/// with one error listing every missing, misshapen and unexpected tensor.
pub struct Loader<'a> {
    src: &'a WeightSource,
    /// Prefix in front of the backbone names (`model.`, `model.language_model.`, ...).
    prefix: String,
    kind: Kind,
    device: Device,
    used: BTreeSet<String>,
    missing: Vec<String>,
    shape_errors: Vec<Error>,
}

impl<'a> Loader<'a> {
    /// A loader converting to `kind` on `device`. The backbone prefix is detected from where
    /// `embed_tokens.weight` lives.
    pub fn new(src: &'a WeightSource, kind: Kind, device: Device) -> Self {
        let prefix = ["model.", "model.language_model.", "language_model.model.", "model.model.", ""]
            .into_iter()
            .find(|p| src.contains(&format!("{p}embed_tokens.weight")))
            .unwrap_or("model.")
            .to_string();
        Loader { src, prefix, kind, device, used: BTreeSet::new(), missing: Vec::new(), shape_errors: Vec::new() }
    }

    /// The resolved name of a backbone tensor (`layers.0.mlp.up_proj.weight` -> `model.layers...`).
    pub fn backbone_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Whether a backbone tensor exists.
    pub fn has(&self, name: &str) -> bool {
        self.src.contains(&self.backbone_name(name))
    }

    /// A backbone tensor of shape `shape`; errors are collected and reported by [`Loader::finish`].
    /// Returns an empty placeholder tensor on error so loading can go on collecting.
    pub fn backbone(&mut self, name: &str, shape: &[i64]) -> Tensor {
        let full = self.backbone_name(name);
        self.exact(&full, shape)
    }

    /// Like [`Loader::backbone`] but keeps the stored dtype when it is f32 (mixed-dtype
    /// checkpoints keep a few tensors in f32 on purpose).
    pub fn backbone_keep_f32(&mut self, name: &str, shape: &[i64]) -> Tensor {
        let full = self.backbone_name(name);
        let stored_f32 = self.src.file_of(&full).and_then(|f| f.dtype(&full)) == Some(Dtype::F32);
        let kind = if stored_f32 { Kind::Float } else { self.kind };
        self.load(&full, shape, kind)
    }

    /// A tensor by its full checkpoint name.
    pub fn exact(&mut self, name: &str, shape: &[i64]) -> Tensor {
        self.load(name, shape, self.kind)
    }

    fn load(&mut self, name: &str, shape: &[i64], kind: Kind) -> Tensor {
        self.used.insert(name.to_string());
        let placeholder = || Tensor::zeros([0], (kind, Device::Cpu));
        match self.src.shape(name) {
            None => {
                self.missing.push(name.to_string());
                placeholder()
            }
            Some(got) if got != shape => {
                self.shape_errors.push(Error::Shape {
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    got: got.to_vec(),
                    path: self.src.file_of(name).map(|f| f.path().to_path_buf()),
                });
                placeholder()
            }
            Some(_) => match self.src.get(name, kind, self.device) {
                Ok(t) => t,
                Err(e) => {
                    self.shape_errors.push(e);
                    placeholder()
                }
            },
        }
    }

    /// Ends the load: an error if anything was missing or misshapen, or if the checkpoint holds
    /// tensors nobody asked for (other than those under `ignore_prefixes`, e.g. `mtp.`).
    pub fn finish(self, ignore_prefixes: &[&str]) -> Result<()> {
        if let Some(e) = self.shape_errors.into_iter().next() {
            return Err(e);
        }
        if !self.missing.is_empty() {
            return Err(Error::MissingTensors { path: self.src.root().to_path_buf(), names: self.missing });
        }
        let unexpected: Vec<String> = self
            .src
            .names()
            .into_iter()
            .filter(|n| !self.used.contains(*n))
            .filter(|n| !ignore_prefixes.iter().any(|p| n.starts_with(p)))
            .map(str::to_string)
            .collect();
        if !unexpected.is_empty() {
            return Err(Error::UnexpectedTensors { path: self.src.root().to_path_buf(), names: unexpected });
        }
        Ok(())
    }
}

/// Writes named tensors to a safetensors file atomically (temp file + rename in the same directory).
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<()> {
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.f_contiguous()?.f_to_device(Device::Cpu)?;
        let dtype = dtype_of(t.kind()).ok_or_else(|| Error::Dtype {
            name: name.clone(),
            expected: "a safetensors dtype".into(),
            got: format!("{:?}", t.kind()),
            path: Some(path.to_path_buf()),
        })?;
        let numel = t.numel();
        let nbytes = numel * t.kind().elt_size_in_bytes();
        let mut data = vec![0u8; nbytes];
        if nbytes > 0 {
            // SAFETY: `t` is contiguous on the CPU and holds exactly `nbytes` bytes.
            unsafe { std::ptr::copy_nonoverlapping(t.data_ptr() as *const u8, data.as_mut_ptr(), nbytes) };
        }
        let shape = t.size().iter().map(|&d| d as usize).collect();
        bufs.push((name.clone(), dtype, shape, data));
    }
    let views = bufs
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Safetensors { path: path.to_path_buf(), reason: e.to_string() })
        })
        .collect::<Result<Vec<_>>>()?;
    crate::util::fs::write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(views, metadata, tmp)
            .map_err(|e| Error::Safetensors { path: tmp.to_path_buf(), reason: e.to_string() })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_dtype_conversion() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        let a = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]).to_kind(Kind::BFloat16);
        save_safetensors(&p, &[("model.embed_tokens.weight".into(), a.shallow_clone())], None).unwrap();
        let src = WeightSource::open(dir.path()).unwrap();
        let b = src.get("model.embed_tokens.weight", Kind::Float, Device::Cpu).unwrap();
        assert_eq!(b.kind(), Kind::Float);
        assert!(b.equal(&a.to_kind(Kind::Float)));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644, "readable by servers, not owner-only");
    }

    #[test]
    fn truncated_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        save_safetensors(&p, &[("w".into(), Tensor::ones([64, 64], (Kind::Float, Device::Cpu)))], None).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
        let e = WeightSource::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("model.safetensors") && e.contains("invalid safetensors"), "{e}");
    }

    #[test]
    fn pickle_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pytorch_model.bin"), b"PK\x03\x04whatever").unwrap();
        let e = WeightSource::open(dir.path()).err().unwrap();
        assert!(matches!(e, Error::PickleRefused { .. }), "{e}");
        assert!(e.to_string().contains("pytorch_model.bin"));
        // A pickle hiding behind a .safetensors name is caught by its magic bytes.
        let p = dir.path().join("x.safetensors");
        std::fs::write(&p, b"\x80\x02}q\x00.").unwrap();
        assert!(matches!(WeightSource::open(&p), Err(Error::PickleRefused { .. })));
    }

    #[test]
    fn loader_reports_missing_shape_and_unexpected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        let t = |s: &[i64]| Tensor::zeros(s, (Kind::Float, Device::Cpu));
        save_safetensors(
            &p,
            &[
                ("model.embed_tokens.weight".into(), t(&[4, 2])),
                ("model.norm.weight".into(), t(&[3])),
                ("model.extra".into(), t(&[1])),
                ("mtp.fc.weight".into(), t(&[1])),
            ],
            None,
        )
        .unwrap();
        let src = WeightSource::open(&p).unwrap();
        let mut l = Loader::new(&src, Kind::Float, Device::Cpu);
        let _ = l.backbone("embed_tokens.weight", &[4, 2]);
        let _ = l.backbone("norm.weight", &[2]);
        let e = l.finish(&["mtp."]).unwrap_err().to_string();
        assert!(e.contains("model.norm.weight") && e.contains("[3]") && e.contains("[2]"), "{e}");

        let mut l = Loader::new(&src, Kind::Float, Device::Cpu);
        let _ = l.backbone("embed_tokens.weight", &[4, 2]);
        let _ = l.backbone("norm.weight", &[3]);
        let _ = l.backbone("layers.0.x", &[3]);
        let e = l.finish(&["mtp."]).unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("model.layers.0.x"), "{e}");

        let mut l = Loader::new(&src, Kind::Float, Device::Cpu);
        let _ = l.backbone("embed_tokens.weight", &[4, 2]);
        let _ = l.backbone("norm.weight", &[3]);
        let e = l.finish(&["mtp."]).unwrap_err().to_string();
        assert!(e.contains("unexpected") && e.contains("model.extra") && !e.contains("mtp"), "{e}");
    }
}
