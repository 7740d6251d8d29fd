//! A frozen weight as it is kept in memory: dense in the compute precision, or packed (a
//! GGUF quant type, or f16/bf16 kept for storage) and expanded to the compute precision
//! only while a product needs it.
//!
//! QLoRA's point is that the base need not exist in full precision: a packed matrix is
//! expanded one layer at a time, used, and dropped, so a step holds one layer's dense
//! weight beside the packed model. The expansion is candle's own dequantization, the
//! same that loading a GGUF as f32 runs, so a packed base computes the same products as
//! its dequantized twin, bit for bit. (candle's quantized matmul is not used: it rounds
//! the activations to 8 bits first and has no backward.)

use crate::device::{ggml_bytes, ggml_name};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Rows expanded by one task: with parts this large, expanding a matrix spreads over the
/// cores (candle's own dequantization runs on one).
const PART_ELEMS: usize = 1 << 20;

/// A frozen `(out, in)` weight (or any frozen table read by rows, as an embedding).
#[derive(Clone, Debug)]
pub enum Frozen {
    /// In the compute precision.
    Dense(Tensor),
    /// Packed, in row parts of equal height (the last may be shorter); `dtype` is the
    /// precision it expands to.
    Packed(Packed),
}

#[derive(Clone, Debug)]
pub struct Packed {
    parts: Arc<Vec<QTensor>>,
    rows_per_part: usize,
    dims: (usize, usize),
    dtype: DType,
}

impl From<Tensor> for Frozen {
    fn from(t: Tensor) -> Self {
        Frozen::Dense(t)
    }
}

impl Frozen {
    /// Packs a dense `(rows, cols)` matrix as `kind`. A K-quant needs rows of a multiple
    /// of 256 values; narrower rows fall back to the 32-value type of the same width
    /// (`q4_k` → `q4_0`, ...).
    pub fn pack(t: &Tensor, kind: GgmlDType) -> Result<Frozen> {
        let (_, cols) = t.dims2()?;
        let kind = if cols % kind.block_size() == 0 {
            kind
        } else {
            match kind {
                GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K => GgmlDType::Q4_0,
                GgmlDType::Q5K => GgmlDType::Q5_0,
                GgmlDType::Q6K | GgmlDType::Q8K => GgmlDType::Q8_0,
                k => k,
            }
        };
        if cols % kind.block_size() != 0 {
            // Not even 32 wide: keep it dense; it is small.
            return Ok(Frozen::Dense(t.to_dtype(DType::F32)?));
        }
        let q = QTensor::quantize(&t.to_dtype(DType::F32)?, kind)?;
        Self::from_qtensor(q, &t.device().clone())
    }

    /// Wraps a 2-D packed tensor (as read from a GGUF file), split into row parts.
    pub fn from_qtensor(q: QTensor, device: &Device) -> Result<Frozen> {
        let (rows, cols) = q.shape().dims2()?;
        let rows_per_part = (PART_ELEMS / cols.max(1)).clamp(1, rows.max(1));
        if rows <= rows_per_part {
            return Ok(Frozen::Packed(Packed {
                parts: Arc::new(vec![q]),
                rows_per_part: rows.max(1),
                dims: (rows, cols),
                dtype: DType::F32,
            }));
        }
        let kind = q.dtype();
        let row_bytes = ggml_bytes(kind, cols as u64) as usize;
        let data = q.data()?;
        let parts = data
            .chunks(rows_per_part * row_bytes)
            .map(|chunk| {
                let storage = QStorage::from_data(std::borrow::Cow::Borrowed(chunk), device, kind)?;
                QTensor::new(storage, (chunk.len() / row_bytes, cols))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Frozen::Packed(Packed {
            parts: Arc::new(parts),
            rows_per_part,
            dims: (rows, cols),
            dtype: DType::F32,
        }))
    }

    /// `(rows, cols)` for a matrix; a dense tensor's own dims otherwise.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Frozen::Dense(t) => t.dims().to_vec(),
            Frozen::Packed(p) => vec![p.dims.0, p.dims.1],
        }
    }

    pub fn dim(&self, i: usize) -> Result<usize> {
        match self {
            Frozen::Dense(t) => t.dim(i),
            Frozen::Packed(p) => match i {
                0 => Ok(p.dims.0),
                1 => Ok(p.dims.1),
                _ => candle_core::bail!("a packed weight has two dimensions, not {}", i + 1),
            },
        }
    }

    pub fn dims2(&self) -> Result<(usize, usize)> {
        Ok((self.dim(0)?, self.dim(1)?))
    }

    pub fn device(&self) -> Device {
        match self {
            Frozen::Dense(t) => t.device().clone(),
            Frozen::Packed(p) => p.parts[0].device(),
        }
    }

    /// The precision products see.
    pub fn dtype(&self) -> DType {
        match self {
            Frozen::Dense(t) => t.dtype(),
            Frozen::Packed(p) => p.dtype,
        }
    }

    /// How it is stored: `f32`, `bf16`, `q4_k`, ...
    pub fn storage_name(&self) -> &'static str {
        match self {
            Frozen::Dense(t) => crate::device::dtype_name(t.dtype()),
            Frozen::Packed(p) => ggml_name(p.parts[0].dtype()),
        }
    }

    /// Bytes held in memory.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Frozen::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Frozen::Packed(p) => p.parts.iter().map(|q| q.storage_size_in_bytes()).sum(),
        }
    }

    /// The same weight, expanding to `dtype`. A packed f16/bf16 weight that expands to
    /// its own precision is kept dense: packing it saves nothing.
    pub fn with_dtype(&self, dtype: DType) -> Result<Frozen> {
        match self {
            Frozen::Dense(t) => Ok(Frozen::Dense(t.to_dtype(dtype)?)),
            Frozen::Packed(p) => {
                let same = matches!(
                    (p.parts[0].dtype(), dtype),
                    (GgmlDType::F16, DType::F16) | (GgmlDType::BF16, DType::BF16)
                );
                if same {
                    return Ok(Frozen::Dense(self.dense()?));
                }
                Ok(Frozen::Packed(Packed { dtype, ..p.clone() }))
            }
        }
    }

    /// The whole matrix in the compute precision: the tensor itself when dense, else a
    /// fresh expansion (dropped by the caller after its product).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Frozen::Dense(t) => Ok(t.clone()),
            Frozen::Packed(p) => {
                let dev = p.parts[0].device();
                let parts = p
                    .parts
                    .par_iter()
                    .map(|q| q.dequantize(&dev))
                    .collect::<Result<Vec<_>>>()?;
                let t = if parts.len() == 1 {
                    parts.into_iter().next().expect("one part")
                } else {
                    Tensor::cat(&parts, 0)?
                };
                t.to_dtype(p.dtype)
            }
        }
    }

    /// Rows `ids` of the table, `(n, cols)` in the compute precision (an embedding
    /// lookup: no gradient flows into a frozen table).
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Frozen::Dense(t) => t.index_select(ids, 0),
            Frozen::Packed(p) => {
                let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                let dev = p.parts[0].device();
                // Each part expands the rows that fall in it; `order` puts them back.
                let mut by_part: Vec<Vec<(usize, u32)>> = vec![Vec::new(); p.parts.len()];
                for (pos, &id) in ids.iter().enumerate() {
                    let part = id as usize / p.rows_per_part;
                    if part >= p.parts.len() {
                        candle_core::bail!("row {id} of a table of {} rows", p.dims.0);
                    }
                    by_part[part].push((pos, id % p.rows_per_part as u32));
                }
                let mut pieces = Vec::new();
                let mut order = vec![0u32; ids.len()];
                let mut next = 0u32;
                for (q, rows) in p.parts.iter().zip(&by_part) {
                    if rows.is_empty() {
                        continue;
                    }
                    let local: Vec<u32> = rows.iter().map(|(_, r)| *r).collect();
                    let local = Tensor::from_vec(local, rows.len(), &dev)?;
                    pieces.push(q.embedding(&local)?);
                    for (pos, _) in rows {
                        order[*pos] = next;
                        next += 1;
                    }
                }
                let all = Tensor::cat(&pieces, 0)?;
                let order = Tensor::from_vec(order, ids.len(), &dev)?;
                all.index_select(&order, 0)?.to_dtype(p.dtype)
            }
        }
    }

    /// Row ranges that cover the matrix in order, each about `elems` values (at least one
    /// row; a packed matrix's ranges follow its parts, so each expands whole parts only).
    pub fn row_blocks(&self, elems: usize) -> Result<Vec<std::ops::Range<usize>>> {
        let (rows, cols) = self.dims2()?;
        let step = match self {
            Frozen::Dense(_) => (elems / cols.max(1)).max(1),
            Frozen::Packed(p) => {
                let per_part = p.rows_per_part * cols;
                (elems / per_part.max(1)).max(1) * p.rows_per_part
            }
        };
        Ok((0..rows)
            .step_by(step)
            .map(|r| r..(r + step).min(rows))
            .collect())
    }

    /// Rows `range` in the compute precision: a view when dense, else an expansion of
    /// the parts they lie in (on the cores in parallel).
    pub fn expand_rows(&self, range: std::ops::Range<usize>) -> Result<Tensor> {
        match self {
            Frozen::Dense(t) => t.narrow(0, range.start, range.len()),
            Frozen::Packed(p) => {
                let dev = p.parts[0].device();
                let first = range.start / p.rows_per_part;
                let last = (range.end - 1) / p.rows_per_part;
                let parts = p.parts[first..=last]
                    .par_iter()
                    .map(|q| q.dequantize(&dev))
                    .collect::<Result<Vec<_>>>()?;
                let t = Tensor::cat(&parts, 0)?;
                t.narrow(0, range.start - first * p.rows_per_part, range.len())?
                    .to_dtype(p.dtype)
            }
        }
    }

    /// Rows permuted: row `i` of the result is row `perm[i]` of `self` (llama.cpp's Q/K
    /// interleave undone). A packed matrix moves whole packed rows, bytes unchanged.
    pub fn permute_rows(&self, perm: &[usize]) -> Result<Frozen> {
        match self {
            Frozen::Dense(t) => {
                let idx: Vec<u32> = perm.iter().map(|&i| i as u32).collect();
                let idx = Tensor::from_vec(idx, perm.len(), t.device())?;
                Ok(Frozen::Dense(t.index_select(&idx, 0)?))
            }
            Frozen::Packed(p) => {
                let (rows, cols) = p.dims;
                if perm.len() != rows {
                    candle_core::bail!("a permutation of {} rows for {rows}", perm.len());
                }
                let kind = p.parts[0].dtype();
                let row_bytes = ggml_bytes(kind, cols as u64) as usize;
                let datas = p
                    .parts
                    .iter()
                    .map(|q| q.data().map(|d| d.into_owned()))
                    .collect::<Result<Vec<_>>>()?;
                let mut out = Vec::with_capacity(rows * row_bytes);
                for &r in perm {
                    let d = &datas[r / p.rows_per_part];
                    let at = (r % p.rows_per_part) * row_bytes;
                    out.extend_from_slice(&d[at..at + row_bytes]);
                }
                let dev = p.parts[0].device();
                let storage = QStorage::from_data(std::borrow::Cow::Owned(out), &dev, kind)?;
                let f = Self::from_qtensor(QTensor::new(storage, (rows, cols))?, &dev)?;
                f.with_dtype(p.dtype)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize) -> Result<Tensor> {
        Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)
    }

    #[test]
    fn packed_expands_to_what_candle_dequantizes_whole() -> Result<()> {
        // Rows of 4096 give parts of 256 rows: 3 parts, the last one short.
        let w = matrix(600, 4096)?;
        let q = QTensor::quantize(&w, GgmlDType::Q4_0)?;
        let whole = q.dequantize(&Device::Cpu)?;
        let f = Frozen::from_qtensor(q, &Device::Cpu)?;
        let Frozen::Packed(p) = &f else {
            panic!("expected packed")
        };
        assert_eq!(p.parts.len(), 3);
        let d = f.dense()?;
        assert_eq!(d.dims(), &[600, 4096]);
        assert_eq!(
            (d - &whole)?.abs()?.max_all()?.to_scalar::<f32>()?,
            0.0,
            "bit for bit"
        );
        // Rows across parts, repeated and out of order.
        let ids = Tensor::new(&[599u32, 0, 256, 255, 599, 3], &Device::Cpu)?;
        let r = f.rows(&ids)?;
        let want = whole.index_select(&ids, 0)?;
        assert_eq!((r - want)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        assert!(f.rows(&Tensor::new(&[600u32], &Device::Cpu)?).is_err());
        Ok(())
    }

    #[test]
    fn products_over_a_packed_weight_equal_those_over_its_expansion() -> Result<()> {
        use crate::ops::{frozen_linear, lora_linear};
        let dev = Device::Cpu;
        let packed = Frozen::pack(&matrix(48, 64)?, GgmlDType::Q4_1)?;
        let dense = Frozen::Dense(packed.dense()?);
        let x = candle_core::Var::from_tensor(&matrix(5, 64)?)?;
        let b = candle_core::Var::from_tensor(&matrix(48, 4)?)?;
        let a = matrix(4, 64)?;
        let run = |w: &Frozen| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
            let xa = x.as_tensor().matmul(&a.t()?)?;
            let y = (frozen_linear(x.as_tensor(), w)?
                + lora_linear(x.as_tensor(), w, None, &xa, b.as_tensor(), 2.0)?)?;
            let g = y.sqr()?.sum_all()?.backward()?;
            let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            Ok((
                flat(&y)?,
                flat(g.get(x.as_tensor()).expect("dx"))?,
                flat(g.get(b.as_tensor()).expect("dB"))?,
            ))
        };
        assert_eq!(run(&packed)?, run(&dense)?, "bit for bit");
        let _ = dev;
        Ok(())
    }

    #[test]
    fn permuting_packed_rows_moves_whole_rows() -> Result<()> {
        let w = matrix(300, 4096)?;
        let f = Frozen::pack(&w, GgmlDType::Q8_0)?;
        let whole = f.dense()?;
        let perm: Vec<usize> = (0..300).rev().collect();
        let g = f.permute_rows(&perm)?;
        let idx = Tensor::from_vec(
            perm.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            300,
            &Device::Cpu,
        )?;
        let want = whole.index_select(&idx, 0)?;
        assert_eq!(
            (g.dense()? - want)?.abs()?.max_all()?.to_scalar::<f32>()?,
            0.0
        );
        assert_eq!(g.storage_name(), "q8_0");
        Ok(())
    }

    #[test]
    fn k_quants_fall_back_on_narrow_rows_and_half_precision_stays_dense() -> Result<()> {
        let f = Frozen::pack(&matrix(8, 64)?, GgmlDType::Q4K)?;
        assert_eq!(f.storage_name(), "q4_0");
        assert_eq!(f.storage_bytes(), 8 * 2 * 18);
        let f = Frozen::pack(&matrix(8, 256)?, GgmlDType::Q4K)?;
        assert_eq!(f.storage_name(), "q4_k");
        let h = Frozen::pack(&matrix(4, 64)?, GgmlDType::BF16)?;
        assert_eq!(h.storage_name(), "bf16");
        assert!(matches!(h.with_dtype(DType::BF16)?, Frozen::Dense(_)));
        assert!(matches!(h.with_dtype(DType::F32)?, Frozen::Packed(_)));
        Ok(())
    }
}
