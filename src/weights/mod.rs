//! Weight files: memory-mapped safetensors in, atomically written safetensors out, and the
//! model folder (`config.json` + `model.safetensors`). Errors name the file and the tensor.

pub mod gguf;
pub mod names;
pub mod quant;
pub mod quantize;

use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::error::{Error, Result};

pub type Params = BTreeMap<String, Tensor>;

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I64 => DType::I64,
        _ => return None,
    })
}

/// Read every tensor of a safetensors file, converting floating-point tensors to `dtype`
/// when given. The header is read through a memory map; each tensor's bytes are read from
/// the file straight into the tensor's own buffer (f32) or one temporary (other dtypes),
/// so the process never holds the file's pages and a copy of them at once: peak memory is
/// the weights plus one tensor, not twice the file.
pub fn load_safetensors(path: &Path, dtype: Option<DType>, device: &Device) -> Result<Params> {
    Ok(load_safetensors_except(path, dtype, device, &|_, _| false)?.0)
}

/// A tensor [`load_safetensors_except`] left in the file: its dtype, shape and the byte
/// range of its values in the file.
#[derive(Debug, Clone)]
pub struct LeftInFile {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub len: usize,
}

/// [`load_safetensors`], except the tensors `leave(name, info)` picks, which are not
/// read but returned as byte ranges (for kernels that read them in place).
pub fn load_safetensors_except(
    path: &Path,
    dtype: Option<DType>,
    device: &Device,
    leave: &dyn Fn(&str, &safetensors::tensor::TensorInfo) -> bool,
) -> Result<(Params, Vec<LeftInFile>)> {
    use std::os::unix::fs::FileExt;
    let (file, header, meta) = read_header(path)?;
    let data_start = 8 + header as u64;
    let mut out = BTreeMap::new();
    let mut left = Vec::new();
    let mut infos: Vec<_> = meta.tensors().into_iter().collect();
    // in file order: sequential reads
    infos.sort_by_key(|(_, info)| info.data_offsets.0);
    for (name, info) in infos {
        if leave(&name, info) {
            let (start, end) = info.data_offsets;
            left.push(LeftInFile {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start as usize + start,
                len: end - start,
            });
            continue;
        }
        let dt = st_dtype(info.dtype).ok_or_else(|| {
            Error::parse(
                path,
                format!("tensor {name}: unsupported dtype {:?}", info.dtype),
            )
        })?;
        let (start, end) = info.data_offsets;
        let at = data_start + start as u64;
        let read = |buf: &mut [u8]| {
            file.read_exact_at(buf, at)
                .map_err(|e| Error::parse(path, format!("tensor {name}: {e}")))
        };
        let t = if dt == DType::F32 && cfg!(target_endian = "little") {
            let mut v = vec![0f32; (end - start) / 4];
            // SAFETY: the bytes of an initialised f32 buffer (any bit pattern is an f32,
            // u8 has no alignment); safetensors stores little-endian, as this target is
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 4) };
            read(bytes)?;
            Tensor::from_vec(v, info.shape.as_slice(), &Device::Cpu)
        } else {
            let mut buf = vec![0u8; end - start];
            read(&mut buf)?;
            Tensor::from_raw_buffer(&buf, dt, &info.shape, &Device::Cpu)
        }
        .map_err(|e| Error::parse(path, format!("tensor {name}: {e}")))?;
        let t = match dtype {
            Some(want) if dt.is_float() && dt != want => t.to_dtype(want)?,
            _ => t,
        };
        out.insert(name, t.to_device(device)?);
    }
    Ok((out, left))
}

/// A safetensors file, open, with its header's length and its checked metadata (every
/// tensor's range inside the file). The header is read through a memory map, dropped
/// before returning, so no tensor data is touched.
pub fn read_header(path: &Path) -> Result<(std::fs::File, usize, safetensors::tensor::Metadata)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and dropped before this function returns; a file
    // truncated underneath us is the same hazard every mmap reader accepts.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (header, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
        let why = explain_bad_header(&mmap).unwrap_or_else(|| e.to_string());
        Error::parse(path, format!("not a valid safetensors file ({why})"))
    })?;
    drop(mmap);
    Ok((file, header, meta))
}

/// What is wrong with a safetensors file whose header the crate refused with a general
/// message ("invalid shape, data type, or offset", "file not fully covered"): the first
/// tensor whose shape and dtype do not fill its byte range, or whose range runs past the
/// file, or the gap between the tensors' data and the file's length. `None` when the
/// header itself cannot be read (the crate's message says it better then).
fn explain_bad_header(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(n).ok()?)?;
    if end > bytes.len() && n <= 100_000_000 {
        return Some(format!(
            "the header says it takes {n} bytes, but only {} follow its length (the file is cut short?)",
            bytes.len() - 8
        ));
    }
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..end)?).ok()?;
    let data = bytes.len() - end;
    let mut last = 0u64;
    for (name, t) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let dtype = t.get("dtype")?.as_str()?;
        // the crate's own dtype table (names and widths, sub-byte ones included)
        let Ok(dt) = serde_json::from_value::<safetensors::Dtype>(dtype.into()) else {
            return Some(format!("tensor {name}: unknown dtype {dtype}"));
        };
        let shape: Vec<u64> = t
            .get("shape")?
            .as_array()?
            .iter()
            .map(|d| d.as_u64())
            .collect::<Option<_>>()?;
        let offsets = t.get("data_offsets")?.as_array()?;
        let (start, stop) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
        let held = stop.checked_sub(start);
        let bits = shape
            .iter()
            .try_fold(dt.bitsize() as u128, |a, &d| a.checked_mul(d as u128));
        // whole bytes only: a sub-byte dtype must fill its last byte
        let needed = bits.filter(|b| b % 8 == 0).map(|b| b / 8);
        if needed.is_none() || held.map(u128::from) != needed {
            let needed = match bits {
                None => "more than 2^125".to_string(),
                Some(b) if b % 8 != 0 => format!("{b} bits, not a whole number of"),
                Some(b) => (b / 8).to_string(),
            };
            return Some(format!(
                "tensor {name}: shape {shape:?} of {dtype} takes {needed} bytes, but its data_offsets [{start}, {stop}] hold {}",
                held.map_or("none (the end is before the start)".to_string(), |h| h.to_string())
            ));
        }
        if stop > data as u64 {
            return Some(format!(
                "tensor {name}: its data ends at byte {stop} of the data section, which holds only {data} bytes (the file is cut short?)"
            ));
        }
        last = last.max(stop);
    }
    (last != data as u64).then(|| {
        format!("the tensors' data ends at byte {last} of the data section, but the file holds {data} bytes after the header")
    })
}

/// Write tensors to `path` atomically: a temporary file in the same folder, then a rename,
/// so a crash never leaves a half-written file under the final name.
pub fn save_safetensors(path: &Path, tensors: &Params) -> Result<()> {
    let tmp = tmp_path(path);
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, &tmp).map_err(|e| Error::Checkpoint {
        path: path.into(),
        msg: e.to_string(),
    })?;
    sync_file(&tmp)?;
    rename_durably(&tmp, path)
}

/// Write a text file atomically (temporary file, flushed to disk, then a rename).
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, contents).map_err(|e| Error::io(&tmp, e))?;
    sync_file(&tmp)?;
    rename_durably(&tmp, path)
}

/// Flush a file's data to the disk (so a rename after it never exposes an empty file
/// after a power loss).
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Flush a folder's entries (a rename into it) to the disk. Where folders cannot be
/// opened for that (not Unix), the rename stays as durable as the file system makes it.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(dir, e))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Rename `from` to `to`, then flush the folder holding `to`.
pub fn rename_durably(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| Error::io(to, e))?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Read `DIR/config.json` (routelm's own resolved format).
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let cfg = crate::config::parse_resolved(&text).map_err(|e| Error::parse(&path, e))?;
    let problems = cfg.problems();
    if !problems.is_empty() {
        return Err(Error::Config {
            origin: path.display().to_string(),
            problems,
        });
    }
    Ok(cfg)
}

/// Save a model folder (`config.json` + `model.safetensors`), each file atomically.
pub fn save_model_dir(dir: &Path, cfg: &ModelConfig, params: &Params) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = serde_json::to_string_pretty(cfg).map_err(|e| Error::parse(dir, e))?;
    write_atomic(&dir.join("config.json"), json.as_bytes())?;
    save_safetensors(&dir.join("model.safetensors"), params)
}
