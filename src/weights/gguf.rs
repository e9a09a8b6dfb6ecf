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

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
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
/// Caps on what the header states, past which a file is refused whatever its size: the
/// largest published files hold about a thousand tensors, fifty metadata entries, arrays
/// of a few hundred thousand entries (vocabularies, merges) and strings of a few tens of
/// kilobytes (chat templates).
const MAX_TENSORS: usize = 1 << 20;
const MAX_METADATA: usize = 1 << 16;
const MAX_ARRAY: usize = 1 << 24;
const MAX_STRING: usize = 16 << 20;

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

    /// A count of elements that each take at least `min_bytes`: it cannot exceed what the
    /// rest of the file could hold, which bounds any allocation it drives, nor `cap`.
    fn count(&mut self, what: &str, min_bytes: usize, cap: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let room = (self.data.len() - self.at) / min_bytes.max(1);
        if n > cap as u64 {
            return Err(self.err(&format!(
                "{what} is {n}, more than routelm's limit of {cap}"
            )));
        }
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
        let n = self.count(&format!("{what} length"), 1, MAX_STRING)?;
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
                let n = self.count(&format!("{what} element count"), 1, MAX_ARRAY)?;
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
        // the header and metadata have been copied out (a large vocabulary's strings are
        // megabytes): their pages go back to the system
        #[cfg(unix)]
        {
            let head = tensors.iter().map(|t| t.start).min().unwrap_or(map.len());
            // SAFETY: a read-only map of the file, never written through: dropped pages
            // read back from the file unchanged
            let _ =
                unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, 0, head) };
        }
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
        let n_tensors = c.count("tensor count", 32, MAX_TENSORS)?;
        let n_kv = c.count("metadata count", 13, MAX_METADATA)?;
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

impl Value {
    /// GGUF's value type id.
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.push(*v as u8),
            Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Bool(v) => out.push(*v as u8),
            Value::String(s) => write_string(s, out),
            Value::Array(items) => {
                // an empty array's element type is arbitrary; GGUF arrays are homogeneous
                let inner = items.first().map_or(4, Value::type_id);
                out.extend_from_slice(&inner.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for v in items {
                    v.write(out);
                }
            }
            Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        }
    }
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A tensor to write: its name, row-major shape and stored type (the bytes come later).
#[derive(Debug, Clone)]
pub struct TensorOut {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

/// Data alignment of the files routelm writes (GGUF's default).
const ALIGNMENT: usize = 32;

/// Write a GGUF file (version 3): `metadata` in order, then `tensors`, whose bytes
/// `data(i)` gives one tensor at a time (so a model is never held quantized and whole).
/// Written to a temporary file beside `path` and renamed into place: a failure leaves
/// any earlier file at `path` as it was.
pub fn write(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorOut],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    use std::io::Write;
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_string(key, &mut head);
        head.extend_from_slice(&value.type_id().to_le_bytes());
        value.write(&mut head);
    }
    let pad = |n: usize| n.div_ceil(ALIGNMENT) * ALIGNMENT;
    let mut offset = 0usize;
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        let elements: usize = t.shape.iter().product();
        let size = t.ty.bytes_for(elements).ok_or_else(|| {
            Error::parse(
                path,
                format!(
                    "tensor {}: {elements} values are not whole {} blocks",
                    t.name,
                    t.ty.name()
                ),
            )
        })?;
        write_string(&t.name, &mut head);
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.ty.id().to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = pad(offset + size);
        sizes.push(size);
    }
    head.resize(pad(head.len()), 0);
    let tmp = super::tmp_path(path);
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = std::io::BufWriter::new(file);
    let io = |e| Error::io(&tmp, e);
    let result = (|| {
        w.write_all(&head).map_err(io)?;
        for (i, (t, &size)) in tensors.iter().zip(&sizes).enumerate() {
            let bytes = data(i)?;
            if bytes.len() != size {
                return Err(Error::parse(
                    path,
                    format!("tensor {}: {} bytes, expected {size}", t.name, bytes.len()),
                ));
            }
            w.write_all(&bytes).map_err(io)?;
            w.write_all(&vec![0u8; pad(size) - size]).map_err(io)?;
        }
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    super::rename_durably(&tmp, path)
}
