//! ggml's tensor element types (the stored forms of GGUF files): block sizes and exact
//! dequantization to f32. Each block type stores `block` elements in `bytes` bytes: f16
//! scales (and minimums) with packed integer quants. The arithmetic follows ggml's
//! reference dequantization step by step (each product and difference rounded to f32 in
//! the same order), so the results are bit-for-bit those of gguf-py's `dequantize`.

use half::f16;

/// A ggml element type, by its GGUF type id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

/// Elements of a K-quant super-block.
const QK_K: usize = 256;

impl GgmlType {
    /// The type of a GGUF type id; `None` for ids routelm does not read.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// The type's GGUF id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::BF16 => 30,
        }
    }

    /// ggml's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }

    /// `(elements, bytes)` of one block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2K => (QK_K, 84),
            Self::Q3K => (QK_K, 110),
            Self::Q4K => (QK_K, 144),
            Self::Q5K => (QK_K, 176),
            Self::Q6K => (QK_K, 210),
        }
    }

    /// Bytes of `n` elements; `None` when `n` is not a whole number of blocks or the size
    /// overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (block, bytes) = self.block();
        if !n.is_multiple_of(block) {
            return None;
        }
        (n / block).checked_mul(bytes)
    }
}

/// The little-endian f16 at byte `at` of `b`, as f32.
#[inline]
pub(crate) fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantize `data` (whole blocks of `ty`) into `out`, one value per element; `out.len()`
/// must be the element count of `data`.
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let (block, bytes) = ty.block();
    for (b, o) in data.chunks_exact(bytes).zip(out.chunks_exact_mut(block)) {
        match ty {
            GgmlType::F32 => o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            GgmlType::F16 => o[0] = half(b, 0),
            GgmlType::BF16 => {
                o[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
            }
            GgmlType::Q4_0 => q4_0(b, o),
            GgmlType::Q4_1 => q4_1(b, o),
            GgmlType::Q5_0 => q5(b, o, false),
            GgmlType::Q5_1 => q5(b, o, true),
            GgmlType::Q8_0 => {
                let d = half(b, 0);
                for (v, &q) in o.iter_mut().zip(&b[2..34]) {
                    *v = q as i8 as f32 * d;
                }
            }
            GgmlType::Q2K => q2_k(b, o),
            GgmlType::Q3K => q3_k(b, o),
            GgmlType::Q4K => q45_k(b, o, false),
            GgmlType::Q5K => q45_k(b, o, true),
            GgmlType::Q6K => q6_k(b, o),
        }
    }
}

/// Low nibbles are elements 0..16, high nibbles 16..32; `d · (q − 8)`.
fn q4_0(b: &[u8], o: &mut [f32]) {
    let d = half(b, 0);
    for (i, &q) in b[2..18].iter().enumerate() {
        o[i] = d * ((q & 0x0F) as i32 - 8) as f32;
        o[i + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// `d · q + m`.
fn q4_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    for (i, &q) in b[4..20].iter().enumerate() {
        o[i] = d * (q & 0x0F) as f32 + m;
        o[i + 16] = d * (q >> 4) as f32 + m;
    }
}

/// Q5_0 (`d · (q − 16)`) and Q5_1 (`d · q + m`): a nibble plus a fifth bit from `qh`.
fn q5(b: &[u8], o: &mut [f32], with_min: bool) {
    let d = half(b, 0);
    let (m, at) = if with_min { (half(b, 2), 4) } else { (0.0, 2) };
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let qs = &b[at + 4..at + 20];
    for i in 0..32 {
        let low = if i < 16 {
            qs[i] & 0x0F
        } else {
            qs[i - 16] >> 4
        };
        let q = (low | ((((qh >> i) & 1) as u8) << 4)) as i32;
        o[i] = if with_min {
            d * q as f32 + m
        } else {
            d * (q - 16) as f32
        };
    }
}

/// Q2_K: 16 groups of 16, 2-bit quants; group scale `d · (sc & 15)`, minimum
/// `dmin · (sc >> 4)`.
fn q2_k(b: &[u8], o: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (half(b, 80), half(b, 82));
    for (e, v) in o.iter_mut().enumerate() {
        let (h, s, j) = (e / 128, (e / 32) % 4, e % 32);
        let q = ((qs[h * 32 + j] >> (2 * s)) & 3) as f32;
        let sc = scales[e / 16];
        let dl = d * (sc & 0x0F) as f32;
        let ml = dmin * (sc >> 4) as f32;
        *v = dl * q - ml;
    }
}

/// Q3_K: 2-bit quants plus a high bit from `hmask` (an unset bit subtracts 4); 16
/// six-bit signed group scales packed in 12 bytes.
fn q3_k(b: &[u8], o: &mut [f32]) {
    let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = half(b, 108);
    let mut scales = [0f32; 16];
    for (k, s) in scales.iter_mut().enumerate() {
        let low = (sc[k % 8] >> (4 * (k / 8))) & 0x0F;
        let high = (sc[8 + k % 4] >> (2 * (k / 4))) & 0x03;
        *s = (((low | (high << 4)) as i8) - 32) as f32;
    }
    for (e, v) in o.iter_mut().enumerate() {
        let (h, s, j) = (e / 128, (e / 32) % 4, e % 32);
        let low = ((qs[h * 32 + j] >> (2 * s)) & 3) as i8;
        let bit = (hmask[j] >> (e / 32)) & 1;
        let q = (low - if bit == 0 { 4 } else { 0 }) as f32;
        *v = (d * scales[e / 16]) * q;
    }
}

/// The 8 six-bit scales and minimums of a Q4_K/Q5_K super-block, packed in 12 bytes.
#[inline(always)]
pub(crate) fn scale_min_k4(sc: &[u8]) -> ([u8; 8], [u8; 8]) {
    // four bytes at a time: byte j of `a`, `b`, `c` is sc[j], sc[j + 4], sc[j + 8]
    let word = |at: usize| u32::from_le_bytes([sc[at], sc[at + 1], sc[at + 2], sc[at + 3]]);
    let (a, b, c) = (word(0), word(4), word(8));
    let low = |x: u32| x.to_le_bytes();
    let s = [
        low(a & 0x3F3F_3F3F),
        low((c & 0x0F0F_0F0F) | ((a >> 2) & 0x3030_3030)),
    ];
    let m = [
        low(b & 0x3F3F_3F3F),
        low(((c >> 4) & 0x0F0F_0F0F) | ((b >> 2) & 0x3030_3030)),
    ];
    let join = |h: [[u8; 4]; 2]| {
        [
            h[0][0], h[0][1], h[0][2], h[0][3], h[1][0], h[1][1], h[1][2], h[1][3],
        ]
    };
    (join(s), join(m))
}

/// A Q4_K or Q5_K super-block's fields.
pub(crate) struct K45Block<'a> {
    pub d: f32,
    pub dmin: f32,
    /// The eight sub-blocks' 6-bit scales and minimums.
    pub scales: [u8; 8],
    pub mins: [u8; 8],
    /// Q5_K's fifth bits: bit `j` of byte `i` for value `i` of sub-block `j` (empty for
    /// Q4_K).
    pub qh: &'a [u8],
    /// The low four bits: sub-block `j` is the low (even `j`) or high nibbles of
    /// `qs[32 (j / 2)..]`.
    pub qs: &'a [u8],
}

impl<'a> K45Block<'a> {
    /// The fields of super-block `b` (176 bytes for Q5_K, `five`; 144 for Q4_K).
    #[inline(always)]
    pub(crate) fn new(b: &'a [u8], five: bool) -> Self {
        let (scales, mins) = scale_min_k4(&b[4..16]);
        let (qh, qs) = match five {
            true => (&b[16..48], &b[48..176]),
            false => (&b[0..0], &b[16..144]),
        };
        Self {
            d: half(b, 0),
            dmin: half(b, 2),
            scales,
            mins,
            qh,
            qs,
        }
    }

    /// Code `i` (0..32) of sub-block `j` (0..8): its nibble, with its fifth bit for Q5_K.
    #[inline(always)]
    pub(crate) fn code(&self, j: usize, i: usize) -> u8 {
        let q = (self.qs[32 * (j / 2) + i] >> (4 * (j % 2))) & 0x0F;
        match self.qh.is_empty() {
            true => q,
            false => q | (((self.qh[i] >> j) & 1) << 4),
        }
    }
}

/// Q4_K and Q5_K: 8 sub-blocks of 32, `(d · sc) · q − dmin · m`; Q5_K adds a fifth bit
/// from `qh`.
fn q45_k(b: &[u8], o: &mut [f32], five: bool) {
    let k = K45Block::new(b, five);
    for (e, v) in o.iter_mut().enumerate() {
        let (sb, j) = (e / 32, e % 32);
        let dl = k.d * k.scales[sb] as f32;
        let ml = k.dmin * k.mins[sb] as f32;
        *v = dl * k.code(sb, j) as f32 - ml;
    }
}

/// Q6_K: 4 low bits from `ql`, 2 high bits from `qh`, minus 32; 16 signed 8-bit group
/// scales.
fn q6_k(b: &[u8], o: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half(b, 208);
    for (e, v) in o.iter_mut().enumerate() {
        let h = e / 128;
        let (half_, jl) = ((e % 128) / 64, e % 64);
        let low = (ql[h * 64 + jl] >> (4 * half_)) & 0x0F;
        let (s, j) = ((e % 128) / 32, e % 32);
        let high = (qh[h * 32 + j] >> (2 * s)) & 0x03;
        let q = ((low | (high << 4)) as i8 - 32) as f32;
        *v = (d * scales[e / 16] as i8 as f32) * q;
    }
}
