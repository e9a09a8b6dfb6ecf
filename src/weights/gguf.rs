//! GGUF files (llama.cpp's single-file format): a header of typed metadata and tensor
//! descriptions, then the tensors' data, aligned. The reader memory-maps the file and
//! checks every count, length, offset and size it reads against the file before it drives
//! an allocation or a read, so a truncated or lying file is an error that names the file
//! and the field, never a panic or a huge allocation.
//!
//! Layout (version 2 and 3): magic `GGUF`, u32 version, u64 tensor count, u64 metadata
//! count; each metadata entry a string key, a u32 value type and the value; each tensor a
//! string name, u32 dimension count, u64 dimensions (innermost first), u32 element type and
//! u64 offset into the data section, which starts at the next multiple of
//! `general.alignment` (default 32) after the header. Little-endian throughout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::quant::{dequantize_into, GgmlType};
use crate::error::{Error, Result};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// An integer value of any width, when it is one and fits.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A floating-point (or integer) value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's description.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions outermost first (the reverse of the file's order), as a row-major shape.
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Byte range of its data in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    map: std::sync::Arc<memmap2::Mmap>,
}

/// Largest dimension count ggml writes.
const MAX_DIMS: u32 = 8;
/// Array nesting routelm follows (GGUF files use one level).
const MAX_DEPTH: usize = 4;

/// A cursor over the header that checks every read against the file.
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn err(&self, what: &str) -> Error {
        Error::parse(
            self.path,
            format!("GGUF header at byte {}: {what}", self.at),
        )
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                self.err(&format!(
                    "{what} needs {n} bytes, the file ends {} bytes on",
                    self.data.len() - self.at.min(self.data.len())
                ))
            })?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let b = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that each element of which takes at least `min_bytes`: it cannot exceed
    /// what the rest of the file could hold, which bounds any allocation it drives.
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let room = (self.data.len() - self.at) / min_bytes.max(1);
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= room)
            .ok_or_else(|| {
                self.err(&format!(
                    "{what} is {n}, more than the {room} the rest of the file can hold"
                ))
            })
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(&format!("{what} length"), 1)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(&format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, depth: usize, what: &str) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(&format!("{what}: bool byte {b}"))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.err(&format!("{what}: arrays nested too deep")));
                }
                let inner = self.u32(&format!("{what} element type"))?;
                let n = self.count(&format!("{what} element count"), 1)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1, what)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(self.err(&format!("{what}: unknown value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Open and check a GGUF file: header, metadata, tensor descriptions, and that every
    /// tensor's data lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: a read-only map; a file truncated underneath us is the hazard every
        // mmap reader accepts (the sizes were checked against the length at open)
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (version, metadata, tensors) = Self::parse(&map, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            map: std::sync::Arc::new(map),
        })
    }

    fn parse(data: &[u8], path: &Path) -> Result<(u32, BTreeMap<String, Value>, Vec<TensorInfo>)> {
        let mut c = Cursor { data, at: 0, path };
        if c.take(4, "magic").ok() != Some(b"GGUF".as_slice()) {
            return Err(Error::parse(path, "not a GGUF file (no GGUF magic)"));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::parse(
                path,
                format!("GGUF version {version} is not supported (2 and 3 are)"),
            ));
        }
        // a tensor description takes at least 8 + 4 + 8 + 4 + 8 bytes, a metadata entry 8 + 4 + 1
        let n_tensors = c.count("tensor count", 32)?;
        let n_kv = c.count("metadata count", 13)?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key {i}"))?;
            let ty = c.u32(&format!("type of {key}"))?;
            let v = c.value(ty, 0, &key)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two() && *a <= 1 << 20)
                .ok_or_else(|| Error::parse(path, "general.alignment must be a power of two"))?
                as usize,
        };
        let mut raw = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor {i} name"))?;
            let n_dims = c.u32(&format!("{name} dimension count"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(c.err(&format!("{name} has {n_dims} dimensions (1 to {MAX_DIMS})")));
            }
            let mut shape = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = c.u64(&format!("{name} dimension"))?;
                shape.push(
                    usize::try_from(d).map_err(|_| c.err(&format!("{name}: dimension {d}")))?,
                );
            }
            shape.reverse();
            let type_id = c.u32(&format!("{name} type"))?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| {
                Error::parse(
                    path,
                    format!("tensor {name}: element type {type_id} is not supported"),
                )
            })?;
            let offset = c.u64(&format!("{name} offset"))?;
            raw.push((name, shape, ty, offset));
        }
        let data_start = c.at.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, shape, ty, offset) in raw {
            let bad = |msg: String| Error::parse(path, format!("tensor {name}: {msg}"));
            let elements = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
            let len = ty.bytes_for(elements).ok_or_else(|| {
                bad(format!(
                    "{elements} elements are not whole {} blocks of {}",
                    ty.name(),
                    ty.block().0
                ))
            })?;
            let start = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(data_start))
                .filter(|s| s.checked_add(len).is_some_and(|e| e <= data.len()))
                .ok_or_else(|| {
                    bad(format!(
                        "data at offset {offset} ({len} bytes) lies past the end of the file ({} bytes)",
                        data.len()
                    ))
                })?;
            tensors.push(TensorInfo {
                name,
                shape,
                ty,
                start,
                len,
            });
        }
        Ok((version, metadata, tensors))
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's stored bytes, in place in the mapped file.
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.start..t.start + t.len]
    }

    /// A tensor's stored bytes as the kernels hold them: in place in the mapped file.
    pub fn stored(&self, t: &TensorInfo) -> crate::nn::qmatmul::QBytes {
        crate::nn::qmatmul::QBytes::Mapped {
            map: self.map.clone(),
            start: t.start,
            len: t.len,
        }
    }

    /// A tensor dequantized to f32 (row-major, `t.shape`).
    pub fn dequantize(&self, t: &TensorInfo) -> Vec<f32> {
        let mut out = vec![0f32; t.elements()];
        dequantize_into(t.ty, self.bytes(t), &mut out);
        out
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}
