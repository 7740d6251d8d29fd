//! Attention as one op: rotary embedding, grouped-query heads, the scaled and masked
//! softmax and both products, with a backward that recomputes the probabilities. The
//! decoders use it causal and rotated; the Stable Diffusion UNet plain, for its self- and
//! cross-attention (queries and keys of different lengths).
//!
//! Composed from candle ops, training keeps every layer's head-split and rotated copies of
//! q, k and v, the repeated keys and values, and the `(b, h, t, t)` scores and
//! probabilities until the step ends: for SmolLM2 at batch 4 × 256 tokens about 33 MB a
//! layer, a third of all activation memory. This op keeps only its three inputs (the
//! projections' outputs, which exist anyway) and recomputes `Q·Kᵀ` on the way back, as
//! flash attention does: one more `t × t × d` product per head, a few per cent of a layer.

use super::{fresh_rows, par_rows, rows_of, softmax_in_place, vmath, AttnMask, MASKED};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Rotary tables read once per forward pass rather than once per layer: `(t, half)`
/// row-major for positions `0..t` shared by every sequence of a batch, or `(b, 1, t, half)`
/// with a row per token where packed sequences restart their positions.
#[derive(Clone)]
pub struct RopeTables {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    /// Rows: `t`, or `b·t` for per-token tables.
    pub(super) t: usize,
    pub(super) half: usize,
}

impl RopeTables {
    /// From `(t, half)` or `(b, 1, t, half)` cos and sin tensors.
    pub fn new(cos: &Tensor, sin: &Tensor) -> Result<Self> {
        let half = *cos.dims().last().unwrap_or(&0);
        let per_token = matches!(cos.dims(), [_, 1, _, _]);
        if !(cos.rank() == 2 || per_token) || sin.dims() != cos.dims() || half == 0 {
            candle_core::bail!("rope tables: cos {:?} and sin {:?}", cos.dims(), sin.dims());
        }
        let t = cos.elem_count() / half;
        let host = |x: &Tensor| -> Result<Arc<Vec<f32>>> {
            Ok(Arc::new(
                x.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?,
            ))
        };
        Ok(Self {
            cos: host(cos)?,
            sin: host(sin)?,
            t,
            half,
        })
    }

    /// Rotates the head row of token row `row` (`bi·t + i` of a `(b·t, ·)` input) from
    /// `x` into `o`; `sign = -1` rotates back, which is also the rotation's backward.
    pub(super) fn rotate(&self, row: usize, sign: f32, x: &[f32], o: &mut [f32]) {
        let (h, p) = (self.half, row % self.t);
        let (c, s) = (&self.cos[p * h..][..h], &self.sin[p * h..][..h]);
        let (x1, x2) = x.split_at(h);
        let (o1, o2) = o.split_at_mut(h);
        for i in 0..h {
            let sn = sign * s[i];
            o1[i] = x1[i] * c[i] - x2[i] * sn;
            o2[i] = x2[i] * c[i] + x1[i] * sn;
        }
    }
}

/// The attention's geometry: batch, query positions `t`, key positions `tk`, query heads,
/// key/value heads, head size.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub b: usize,
    pub t: usize,
    pub tk: usize,
    pub q: usize,
    pub kv: usize,
    pub dim: usize,
}

/// `softmax(rope(q)·rope(k)ᵀ · scale + mask) · v` for `(b·t, heads·dim)` queries and
/// `(b·tk, heads·dim)` keys and values, as one op; the rotation and the mask (`(b, t, tk)`
/// rows shared by all heads) are optional, and the rotation needs `tk == t` (its tables
/// cover `t` positions, or every one of the `b·t` tokens). Query head `h`
/// reads key/value head `h / (q / kv)`, as transformers' `repeat_kv` arranges it. The
/// result is `(b·t, q·dim)`, ready for the output projection.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: Heads,
    scale: f64,
    rope: Option<&RopeTables>,
    mask: Option<&AttnMask>,
) -> Result<Tensor> {
    Attention::new(heads, scale, rope, mask, false).apply_checked(q, k, v)
}

/// [`multi_head_attention`] under a mask that hides every later key from each query (a
/// decoder's causal mask, with its padding): the op goes through each head's queries in
/// blocks and multiplies each block by the keys up to its last row only, skipping the
/// masked upper triangle (at 256 tokens, blocks of 64 rows do 5/8 of the products).
/// The mask must be causal; nothing checks that it is.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: Heads,
    scale: f64,
    rope: Option<&RopeTables>,
    mask: &AttnMask,
) -> Result<Tensor> {
    Attention::new(heads, scale, rope, Some(mask), true).apply_checked(q, k, v)
}

/// [`multi_head_attention`] over packed rows: each of `segments`, `(first row, rows)` of
/// the `b·t` token rows, is a sequence that attends only within itself, causally (and to
/// the last `window` positions when given), from position 0 of `rope` (tables over
/// positions `0..t`). Rows in no segment (padding) come out zero, with zero gradients. The
/// products cover each sequence's `n × n` block, not the row's `t × t`, and no `t × t`
/// mask is built: a row of ten short examples costs a tenth of the attention of one long
/// one.
#[allow(clippy::too_many_arguments)]
pub fn packed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: Heads,
    scale: f64,
    rope: Option<&RopeTables>,
    window: Option<usize>,
    segments: Arc<Vec<(usize, usize)>>,
) -> Result<Tensor> {
    let Heads { t, tk, dim, .. } = heads;
    let mut end = 0;
    let fits = tk == t
        && rope.is_none_or(|r| dim == 2 * r.half && r.t == t)
        && segments.iter().all(|&(r0, n)| {
            // Each inside one batch row, in order, none overlapping.
            let inside = n > 0 && r0 >= end && r0 % t + n <= t;
            end = r0 + n;
            inside
        });
    Attention {
        heads,
        scale: scale as f32,
        rope: rope.cloned(),
        mask: None,
        segments: Some(Packed { segments, window }),
        causal: false,
    }
    .apply(q, k, v, fits)
}

/// Packed rows' sequences and the window they attend over.
struct Packed {
    segments: Arc<Vec<(usize, usize)>>,
    window: Option<usize>,
}

struct Attention {
    heads: Heads,
    scale: f32,
    rope: Option<RopeTables>,
    mask: Option<AttnMask>,
    /// Packed rows ([`packed_attention`]): the sequences, each computed on its own.
    segments: Option<Packed>,
    /// The mask hides every key after its query: query blocks stop at their last row.
    causal: bool,
}

impl Attention {
    /// Unpacked attention: a padded batch, causal or not.
    fn new(
        heads: Heads,
        scale: f64,
        rope: Option<&RopeTables>,
        mask: Option<&AttnMask>,
        causal: bool,
    ) -> Self {
        Attention {
            heads,
            scale: scale as f32,
            rope: rope.cloned(),
            mask: mask.cloned(),
            segments: None,
            causal,
        }
    }

    /// [`Attention::apply`] after checking that the tables and the mask fit the heads (a
    /// rotation needs `tk == t`, and so does a causal mask); what does not fit is an error
    /// naming the shapes.
    fn apply_checked(self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let Heads { b, t, tk, dim, .. } = self.heads;
        let fits = self
            .rope
            .as_ref()
            .is_none_or(|r| dim == 2 * r.half && (r.t == t || r.t == b * t) && tk == t)
            && self
                .mask
                .as_ref()
                .is_none_or(|m| m.t == t && m.rows.len() == b * t * tk)
            && (!self.causal || (tk == t && self.mask.is_some()));
        self.apply(q, k, v, fits)
    }
}

/// Row `(bi, head, i)` of a `(b, heads, t, dim)` buffer, from row `bi·t + i` of a
/// `(b·t, heads·dim)` one: `((bi, head), i)`.
fn source_row(row: usize, heads: usize, t: usize) -> (usize, usize) {
    let (bh, i) = (row / t, row % t);
    let (bi, h) = (bh / heads, bh % heads);
    (bi * t + i, h)
}

/// `(b·len, n·dim)` projection rows into `(b, n, len, dim)` head rows, rotated when asked.
fn split_heads(x: &[f32], g: Heads, n: usize, len: usize, rope: Option<&RopeTables>) -> Vec<f32> {
    let d = g.dim;
    fresh_rows(x.len(), d, |first, chunk| {
        let mut rotated = vec![0f32; if rope.is_some() { d } else { 0 }];
        for (j, o) in chunk.chunks_mut(d).enumerate() {
            let (src, h) = source_row(first + j, n, len);
            let xr = &x[src * n * d + h * d..][..d];
            let xr = match rope {
                Some(r) => {
                    r.rotate(src, 1.0, xr, &mut rotated);
                    &rotated[..]
                }
                None => xr,
            };
            o.write_copy_of_slice(xr);
        }
    })
}

/// The inverse of [`split_heads`]: `(b, n, len, dim)` back to `(b·len, n·dim)` rows,
/// rotated back (the rotation's backward) when asked.
fn merge_heads(x: &[f32], g: Heads, n: usize, len: usize, unrope: Option<&RopeTables>) -> Vec<f32> {
    let d = g.dim;
    fresh_rows(x.len(), n * d, |first, chunk| {
        let mut rotated = vec![0f32; if unrope.is_some() { d } else { 0 }];
        for (j, o) in chunk.chunks_mut(n * d).enumerate() {
            let row = first + j;
            let (bi, i) = (row / len, row % len);
            for (h, oh) in o.chunks_mut(d).enumerate() {
                let xr = &x[((bi * n + h) * len + i) * d..][..d];
                let xr = match unrope {
                    Some(r) => {
                        r.rotate(row, -1.0, xr, &mut rotated);
                        &rotated[..]
                    }
                    None => xr,
                };
                oh.write_copy_of_slice(xr);
            }
        }
    })
}

/// `a · b` over `bsz` batches (by the BLAS when there is one): `a` is `(bsz, m, k)`, or stored as
/// `(bsz, k, m)` when `ta`; `b` is `(bsz, k, n)`, or stored as `(bsz, n, k)` when `tb`.
fn bmm(
    a: &CpuStorage,
    ta: bool,
    b: &CpuStorage,
    tb: bool,
    (bsz, m, n, k): (usize, usize, usize, usize),
) -> Result<Vec<f32>> {
    let la = if ta {
        Layout::contiguous((bsz, k, m)).transpose(1, 2)?
    } else {
        Layout::contiguous((bsz, m, k))
    };
    let lb = if tb {
        Layout::contiguous((bsz, n, k)).transpose(1, 2)?
    } else {
        Layout::contiguous((bsz, k, n))
    };
    match super::matmul::matmul(a, b, (bsz, m, n, k), &la, &lb)? {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("attention: expected f32"),
    }
}

/// Past this many bytes of probabilities, the op goes through its queries in blocks
/// (an SD 1.5 UNet's self-attention at 512 px has 512 MiB of them in its 64×64 layers
/// and 32 MiB in its 32×32 ones): no buffer that large is mapped, cleared by the kernel
/// and unmapped again, forward and back, for every layer, and the heads can go to the
/// threads whole. Decoders at their training lengths (SmolLM2, batch 4 of 256: 9 MiB)
/// stay on the whole-tensor path.
const BLOCKED_BYTES: usize = 16 << 20;

/// Scores per block (4 MiB of them): the block's rows are this over `tk`. Each block
/// packs its head's keys and values for gemm again: at 4,096 keys, gemm's packing took
/// 19% of the op's time with blocks of 64 rows (1 MiB), 13% with 256.
const BLOCK_SCORES: usize = 1 << 20;

/// Query rows per block of a causal op: each block multiplies only the keys up to its
/// last row, so smaller blocks skip more of the masked triangle (at 256 tokens, 64 rows
/// do 5/8 of the whole products) but make smaller products.
const CAUSAL_ROWS: usize = 64;

/// `c = a·b`, or `c += a·b` with `acc`, for row-major slices: `a` is `(m, k)`, or stored
/// `(k, m)` when `ta`; `b` is `(k, n)`, or stored `(n, k)` when `tb`; `c` is `(m, n)`.
/// On the calling thread alone when `serial`.
#[allow(clippy::too_many_arguments)]
fn product(
    serial: bool,
    c: &mut [f32],
    acc: bool,
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    let la = if ta {
        Layout::contiguous((k, m)).transpose(0, 1)?
    } else {
        Layout::contiguous((m, k))
    };
    let lb = if tb {
        Layout::contiguous((n, k)).transpose(0, 1)?
    } else {
        Layout::contiguous((k, n))
    };
    let threads = if serial {
        1
    } else {
        candle_core::utils::get_num_threads()
    };
    super::matmul::matmul_into_on(threads, c, acc, a, &la, b, &lb, (m, n, k))
}

/// The recomputable middle of the op: rotated, head-split `Q` and `K`, head-split `V`, and
/// the probabilities `P` as `(b, q, t, tk)`.
struct Forward {
    q: CpuStorage,
    k: CpuStorage,
    v: CpuStorage,
    p: CpuStorage,
}

impl Attention {
    /// Applies the op to `(b·t, q·dim)` queries and `(b·tk, kv·dim)` keys and values, if
    /// their shapes fit its geometry and `fits` (what the caller checked of the rest).
    fn apply(self, q: &Tensor, k: &Tensor, v: &Tensor, fits: bool) -> Result<Tensor> {
        let g = self.heads;
        let ok = fits
            && g.kv > 0
            && g.q.is_multiple_of(g.kv)
            && q.dims() == [g.b * g.t, g.q * g.dim]
            && k.dims() == [g.b * g.tk, g.kv * g.dim]
            && v.dims() == [g.b * g.tk, g.kv * g.dim];
        if !ok {
            candle_core::bail!(
                "attention: {g:?} with q {:?}, k {:?}, v {:?}, rope over {:?} positions, {} packed sequences",
                q.dims(),
                k.dims(),
                v.dims(),
                self.rope.as_ref().map(|r| r.t),
                self.segments.as_ref().map_or(0, |p| p.segments.len())
            );
        }
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, self)
    }

    /// The op for one packed sequence of `n` rows: a batch of one, at positions `0..n`.
    fn segment(&self, n: usize) -> Attention {
        Attention {
            heads: Heads {
                b: 1,
                t: n,
                tk: n,
                ..self.heads
            },
            scale: self.scale,
            rope: self.rope.clone(),
            mask: None,
            segments: None,
            causal: true,
        }
    }

    /// The causal (windowed) mask of a packed sequence of `n` rows.
    fn segment_mask(window: Option<usize>, n: usize) -> Vec<f32> {
        let mut m = vec![MASKED; n * n];
        for (i, row) in m.chunks_mut(n).enumerate() {
            let first = window.map_or(0, |w| (i + 1).saturating_sub(w));
            row[first..=i].fill(0.0);
        }
        m
    }

    fn mask_rows(&self) -> Option<&[f32]> {
        self.mask.as_ref().map(|m| m.rows.as_slice())
    }

    /// `(b·t, q·dim)` queries and `(b·tk, kv·dim)` keys and values as `(b, heads, len,
    /// dim)` head rows, queries and keys rotated when the op has a rotation.
    fn split_qkv(&self, q: &[f32], k: &[f32], v: &[f32]) -> [Vec<f32>; 3] {
        let (g, rope) = (self.heads, self.rope.as_ref());
        [
            split_heads(q, g, g.q, g.t, rope),
            split_heads(k, g, g.kv, g.tk, rope),
            split_heads(v, g, g.kv, g.tk, None),
        ]
    }

    /// The softmax's backward in place over `(rows, tk)` rows: `dP` in `ds` becomes
    /// `dS = P ⊙ (dP − Σ dP⊙P) · scale`.
    fn softmax_grad_rows(&self, ds: &mut [f32], p: &[f32], width: usize) {
        par_rows(ds, width, |first, chunk| {
            self.softmax_grad_chunk(chunk, &p[first * width..][..chunk.len()], width)
        });
    }

    /// [`Self::softmax_grad_rows`] on the calling thread, over rows of `width` keys.
    fn softmax_grad_chunk(&self, ds: &mut [f32], p: &[f32], width: usize) {
        for (d, pr) in ds.chunks_mut(width).zip(p.chunks(width)) {
            vmath::softmax_grad_row(d, pr, self.scale);
        }
    }

    /// `mask`: `(b, t, tk)` additive rows, when the op has one.
    fn probabilities(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
    ) -> Result<Forward> {
        let g = self.heads;
        let (t, tk, rep) = (g.t, g.tk, g.q / g.kv);
        let [q, k, v] = self.split_qkv(q, k, v).map(CpuStorage::F32);
        // The `rep` query heads that share a key head are adjacent in `(b, q, t, dim)`, so
        // `(b·kv, rep·t, dim) · (b·kv, tk, dim)ᵀ` scores them all without repeating keys.
        let mut p = bmm(&q, false, &k, true, (g.b * g.kv, rep * t, tk, g.dim))?;
        self.softmax_rows(&mut p, 0, mask, tk);
        Ok(Forward {
            q,
            k,
            v,
            p: CpuStorage::F32(p),
        })
    }

    /// Scores into probabilities in place: `p` holds rows `first..` of the `(b, q, t, tk)`
    /// scores (their first `width` keys), each scaled, masked and put through the softmax.
    fn softmax_rows(&self, p: &mut [f32], first: usize, mask: Option<&[f32]>, width: usize) {
        par_rows(p, width, |at, chunk| {
            self.softmax_chunk(chunk, first + at, mask, width)
        });
    }

    /// [`Self::softmax_rows`] on the calling thread.
    fn softmax_chunk(&self, p: &mut [f32], first: usize, mask: Option<&[f32]>, width: usize) {
        let g = self.heads;
        let (t, tk) = (g.t, g.tk);
        for (j, s) in p.chunks_mut(width).enumerate() {
            let row = first + j;
            let (bi, i) = (row / (g.q * t), row % t);
            // The same arithmetic as the unfused path's masked softmax.
            match mask {
                Some(m) => {
                    let m = &m[(bi * t + i) * tk..][..width];
                    for (s, &mv) in s.iter_mut().zip(m) {
                        *s = *s * self.scale + mv;
                    }
                }
                None => s.iter_mut().for_each(|s| *s *= self.scale),
            }
            softmax_in_place(s);
        }
    }

    /// Query rows per block when the op goes through its queries in blocks, which it does
    /// when the whole `(b, q, t, tk)` probability tensor would pass [`BLOCKED_BYTES`].
    /// Causal ops always go in blocks, of [`CAUSAL_ROWS`] while the whole would fit.
    fn block_rows(&self) -> Option<usize> {
        let g = self.heads;
        let whole = g.b * g.q * g.t * g.tk * std::mem::size_of::<f32>();
        if whole > BLOCKED_BYTES {
            Some((BLOCK_SCORES / g.tk.max(1)).max(16))
        } else {
            self.causal.then_some(CAUSAL_ROWS)
        }
    }

    /// The query blocks of one key head's `rep·t` stacked query rows, blocks of `r`:
    /// `(first row, rows, keys)`. Causal blocks stay within one query head and stop at
    /// their last row's key; the keys after it are masked for every row of the block.
    fn blocks(&self, r: usize) -> Vec<(usize, usize, usize)> {
        let g = self.heads;
        let (t, r) = (g.t.max(1), r.max(1));
        let rows = g.t * (g.q / g.kv);
        if !self.causal {
            return (0..rows)
                .step_by(r)
                .map(|r0| (r0, r.min(rows - r0), g.tk))
                .collect();
        }
        (0..rows)
            .step_by(t)
            .flat_map(|h0| {
                (0..g.t).step_by(r).map(move |i0| {
                    let n = r.min(g.t - i0);
                    (h0 + i0, n, (i0 + n).min(g.tk))
                })
            })
            .collect()
    }

    /// The output rows `(b·t, q·dim)`.
    fn forward_rows(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let g = self.heads;
        let (t, rep) = (g.t, g.q / g.kv);
        if let Some(r) = self.block_rows() {
            return self.forward_blocked(q, k, v, mask, r);
        }
        let f = self.probabilities(q, k, v, mask)?;
        let o = bmm(&f.p, false, &f.v, false, (g.b * g.kv, rep * t, g.dim, g.tk))?;
        Ok(merge_heads(&o, g, g.q, t, None))
    }

    /// [`Self::forward_rows`] a block of `r` query rows at a time: per key head and
    /// block, `S = Q·Kᵀ`, the softmax, `O = P·V`, through one reused `(r, tk)` buffer per
    /// task. The key heads are spread over the pool, each one's products on its own
    /// thread, when there are at least as many as threads (SD 1.5: 8); otherwise each
    /// product is.
    fn forward_blocked(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
        r: usize,
    ) -> Result<Vec<f32>> {
        let g = self.heads;
        let (tk, d, rows) = (g.tk, g.dim, g.t * (g.q / g.kv));
        let [q, k, v] = self.split_qkv(q, k, v);
        let serial = self.per_head_tasks();
        let blocks = self.blocks(r);
        let mut o = vec![0f32; q.len()];
        o.par_chunks_mut(rows * d).enumerate().try_for_each_init(
            || vec![0f32; r.min(rows) * tk],
            |p, (bh, oh)| -> Result<()> {
                for &(r0, n, lim) in &blocks {
                    let (kh, vh) = (&k[bh * tk * d..][..lim * d], &v[bh * tk * d..][..lim * d]);
                    let first = bh * rows + r0;
                    let p = &mut p[..n * lim];
                    let qb = &q[first * d..][..n * d];
                    product(serial, p, false, qb, false, kh, true, (n, lim, d))?;
                    self.softmax_block(serial, p, first, mask, lim);
                    let ob = &mut oh[r0 * d..][..n * d];
                    product(serial, ob, false, p, false, vh, false, (n, d, lim))?;
                }
                Ok(())
            },
        )?;
        Ok(merge_heads(&o, g, g.q, g.t, None))
    }

    /// Whether the blocked paths give each key head to one thread (see
    /// [`Self::forward_blocked`]).
    fn per_head_tasks(&self) -> bool {
        self.heads.b * self.heads.kv >= candle_core::utils::get_num_threads()
    }

    fn softmax_block(
        &self,
        serial: bool,
        p: &mut [f32],
        first: usize,
        mask: Option<&[f32]>,
        width: usize,
    ) {
        if serial {
            self.softmax_chunk(p, first, mask, width)
        } else {
            self.softmax_rows(p, first, mask, width)
        }
    }

    /// The gradients of q, k and v rows from the output rows' gradient `grad`, the
    /// probabilities recomputed.
    fn backward_rows(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        grad: &[f32],
        mask: Option<&[f32]>,
    ) -> Result<[Vec<f32>; 3]> {
        let g = self.heads;
        let (t, tk, rep, bsz) = (g.t, g.tk, g.q / g.kv, g.b * g.kv);
        if let Some(r) = self.block_rows() {
            return self.backward_blocked(q, k, v, grad, mask, r);
        }
        let f = self.probabilities(q, k, v, mask)?;
        let dout = CpuStorage::F32(split_heads(grad, g, g.q, t, None));
        // dV = Pᵀ·dO: the sum over the `rep` query heads of a key head falls out of the
        // product, since they are stacked along its inner dimension.
        let dv = bmm(&f.p, true, &dout, false, (bsz, tk, g.dim, rep * t))?;
        // dS = P ⊙ (dP − Σ dP⊙P) · scale, with dP = dO·Vᵀ, written over dP.
        let mut ds = bmm(&dout, false, &f.v, true, (bsz, rep * t, tk, g.dim))?;
        self.softmax_grad_rows(&mut ds, f.p.as_slice::<f32>()?, tk);
        let ds = CpuStorage::F32(ds);
        let dq = bmm(&ds, false, &f.k, false, (bsz, rep * t, g.dim, tk))?;
        let dk = bmm(&ds, true, &f.q, false, (bsz, tk, g.dim, rep * t))?;
        let rope = self.rope.as_ref();
        Ok([
            merge_heads(&dq, g, g.q, t, rope),
            merge_heads(&dk, g, g.kv, tk, rope),
            merge_heads(&dv, g, g.kv, tk, None),
        ])
    }

    /// [`Self::backward_rows`] a block of `r` query rows at a time, the probabilities
    /// recomputed per block: `dQ` per block, `dK` and `dV` summed over the blocks; the key
    /// heads spread over the pool as in [`Self::forward_blocked`].
    fn backward_blocked(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        grad: &[f32],
        mask: Option<&[f32]>,
        r: usize,
    ) -> Result<[Vec<f32>; 3]> {
        let g = self.heads;
        let (tk, d, rows) = (g.tk, g.dim, g.t * (g.q / g.kv));
        let rope = self.rope.as_ref();
        let [q, k, v] = self.split_qkv(q, k, v);
        let dout = split_heads(grad, g, g.q, g.t, None);
        let serial = self.per_head_tasks();
        let blocks = self.blocks(r);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        let heads = dq
            .par_chunks_mut(rows * d)
            .zip(dk.par_chunks_mut(tk * d))
            .zip(dv.par_chunks_mut(tk * d))
            .enumerate();
        heads.try_for_each_init(
            || (vec![0f32; r.min(rows) * tk], vec![0f32; r.min(rows) * tk]),
            |(p, ds), (bh, ((dqh, dkh), dvh))| -> Result<()> {
                for &(r0, n, lim) in &blocks {
                    let (kh, vh) = (&k[bh * tk * d..][..lim * d], &v[bh * tk * d..][..lim * d]);
                    let (dkl, dvl) = (&mut dkh[..lim * d], &mut dvh[..lim * d]);
                    let first = bh * rows + r0;
                    let (p, ds) = (&mut p[..n * lim], &mut ds[..n * lim]);
                    let (qb, db) = (&q[first * d..][..n * d], &dout[first * d..][..n * d]);
                    product(serial, p, false, qb, false, kh, true, (n, lim, d))?;
                    self.softmax_block(serial, p, first, mask, lim);
                    // dV += Pᵀ·dO; dS = P ⊙ (dP − Σ dP⊙P) · scale with dP = dO·Vᵀ.
                    product(serial, dvl, true, p, true, db, false, (lim, d, n))?;
                    product(serial, ds, false, db, false, vh, true, (n, lim, d))?;
                    if serial {
                        self.softmax_grad_chunk(ds, p, lim);
                    } else {
                        self.softmax_grad_rows(ds, p, lim);
                    }
                    let dqb = &mut dqh[r0 * d..][..n * d];
                    product(serial, dqb, false, ds, false, kh, false, (n, d, lim))?;
                    product(serial, dkl, true, ds, true, qb, false, (lim, d, n))?;
                }
                Ok(())
            },
        )?;
        Ok([
            merge_heads(&dq, g, g.q, g.t, rope),
            merge_heads(&dk, g, g.kv, tk, rope),
            merge_heads(&dv, g, g.kv, tk, None),
        ])
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        lq: &Layout,
        ks: &CpuStorage,
        lk: &Layout,
        vs: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.heads;
        let (q, k, v) = (rows_of(qs, lq)?, rows_of(ks, lk)?, rows_of(vs, lv)?);
        let out = match &self.segments {
            None => self.forward_rows(q, k, v, self.mask_rows())?,
            Some(p) => {
                let (qw, kw) = (g.q * g.dim, g.kv * g.dim);
                let mut out = vec![0f32; g.b * g.t * qw];
                for &(r0, n) in p.segments.iter() {
                    let o = self.segment(n).forward_rows(
                        &q[r0 * qw..][..n * qw],
                        &k[r0 * kw..][..n * kw],
                        &v[r0 * kw..][..n * kw],
                        Some(&Self::segment_mask(p.window, n)),
                    )?;
                    out[r0 * qw..][..n * qw].copy_from_slice(&o);
                }
                out
            }
        };
        Ok((CpuStorage::F32(out), Shape::from((g.b * g.t, g.q * g.dim))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.heads;
        let dev = q.device();
        // Read where candle keeps them (q, k and v are this op's contiguous inputs): four
        // copies of a layer's activations a step were a tenth of an encoder's attention.
        let held = [
            q.contiguous()?,
            k.contiguous()?,
            v.contiguous()?,
            grad.contiguous()?,
        ];
        let guards = held.each_ref().map(|t| t.storage_and_layout());
        let [q, k, v, grad] = guards.each_ref().map(|(s, l)| match &**s {
            candle_core::Storage::Cpu(c) => rows_of(c, l),
            _ => candle_core::bail!("attention: backward off the CPU"),
        });
        let (q, k, v, grad) = (q?, k?, v?, grad?);
        let [dq, dk, dv] = match &self.segments {
            None => self.backward_rows(q, k, v, grad, self.mask_rows())?,
            Some(p) => {
                let (qw, kw) = (g.q * g.dim, g.kv * g.dim);
                let (mut dq, mut dk, mut dv) = (
                    vec![0f32; q.len()],
                    vec![0f32; k.len()],
                    vec![0f32; v.len()],
                );
                for &(r0, n) in p.segments.iter() {
                    let [sq, sk, sv] = self.segment(n).backward_rows(
                        &q[r0 * qw..][..n * qw],
                        &k[r0 * kw..][..n * kw],
                        &v[r0 * kw..][..n * kw],
                        &grad[r0 * qw..][..n * qw],
                        Some(&Self::segment_mask(p.window, n)),
                    )?;
                    dq[r0 * qw..][..n * qw].copy_from_slice(&sq);
                    dk[r0 * kw..][..n * kw].copy_from_slice(&sk);
                    dv[r0 * kw..][..n * kw].copy_from_slice(&sv);
                }
                [dq, dk, dv]
            }
        };
        Ok((
            Some(Tensor::from_vec(dq, (g.b * g.t, g.q * g.dim), dev)?),
            Some(Tensor::from_vec(dk, (g.b * g.tk, g.kv * g.dim), dev)?),
            Some(Tensor::from_vec(dv, (g.b * g.tk, g.kv * g.dim), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{agree, fd_error, rand_vec};
    use super::super::{masked_softmax, rope};
    use super::*;
    use candle_core::Device;

    /// Two sequences of 5, 4 query heads over 2 key heads of 4. The second sequence's
    /// first two keys are hidden from its later rows, as left padding hides them; rows that
    /// see nothing at all are left out, since their gradient is not defined in f32 (a
    /// nudge vanishes into the -1e30 mask, while the analytic gradient does not).
    fn setup() -> Result<(Heads, RopeTables, Tensor, Tensor, AttnMask)> {
        let dev = Device::Cpu;
        let g = Heads {
            b: 2,
            t: 5,
            tk: 5,
            q: 4,
            kv: 2,
            dim: 4,
        };
        let ang = (Tensor::from_vec(rand_vec(g.t * 2, 31), (g.t, 2), &dev)? * 3.0)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let mut m = vec![0f32; g.b * g.t * g.t];
        for bi in 0..g.b {
            for i in 0..g.t {
                for j in 0..g.t {
                    if j > i || (bi == 1 && j < 2 && i >= 2) {
                        m[(bi * g.t + i) * g.t + j] = -1e30;
                    }
                }
            }
        }
        let mask = AttnMask::new(m, g.b, g.t, g.t, &dev)?;
        Ok((g, RopeTables::new(&cos, &sin)?, cos, sin, mask))
    }

    /// What the model did before this op: head split, rope, repeated keys, the masked
    /// softmax and two matmuls.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g: Heads,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
    ) -> Result<Tensor> {
        let rep = g.q / g.kv;
        let heads = |x: &Tensor, n: usize| -> Result<Tensor> {
            x.reshape((g.b, g.t, n, g.dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let repeat = |x: Tensor| -> Result<Tensor> {
            x.unsqueeze(2)?
                .broadcast_as((g.b, g.kv, rep, g.t, g.dim))?
                .reshape((g.b, g.q, g.t, g.dim))
        };
        let q = rope(&heads(q, g.q)?, cos, sin)?;
        let k = repeat(rope(&heads(k, g.kv)?, cos, sin)?)?;
        let v = repeat(heads(v, g.kv)?)?;
        let p = masked_softmax(&q.matmul(&k.t()?)?, 0.5, mask)?;
        p.matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((g.b * g.t, g.q * g.dim))
    }

    type F<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;
    /// An input's name, the fused and composed functions of it, its values and shape.
    type Case<'a> = (&'a str, F<'a>, F<'a>, Vec<f32>, [usize; 2]);

    /// Through each input in turn: the fused and composed forms agree on the output and
    /// on that input's gradient, and the fused gradient passes finite differences.
    fn check_each_input(cases: [Case; 3]) -> Result<()> {
        for (name, f, s, x, shape) in cases {
            let a = agree(f, s, x.clone(), &shape)?;
            assert!(a < 1e-5, "{name}: fused and composed differ by {a}");
            let fd = fd_error(f, x, &shape)?;
            assert!(fd < 2e-3, "{name}: finite differences off by {fd}");
        }
        Ok(())
    }

    #[test]
    fn causal_rotated_attention_matches_the_composed_ops_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (g, tables, cos, sin, mask) = setup()?;
        let n = g.b * g.t;
        let (qd, kd) = (g.q * g.dim, g.kv * g.dim);
        let q = Tensor::from_vec(rand_vec(n * qd, 32), (n, qd), &dev)?;
        let k = Tensor::from_vec(rand_vec(n * kd, 33), (n, kd), &dev)?;
        let v = Tensor::from_vec(rand_vec(n * kd, 34), (n, kd), &dev)?;
        let fused = |q: &Tensor, k: &Tensor, v: &Tensor| {
            multi_head_attention(q, k, v, g, 0.5, Some(&tables), Some(&mask))
        };
        let slow = |q: &Tensor, k: &Tensor, v: &Tensor| composed(q, k, v, g, &cos, &sin, &mask);
        let (fq, sq) = (|x: &Tensor| fused(x, &k, &v), |x: &Tensor| slow(x, &k, &v));
        let (fk, sk) = (|x: &Tensor| fused(&q, x, &v), |x: &Tensor| slow(&q, x, &v));
        let (fv, sv) = (|x: &Tensor| fused(&q, &k, x), |x: &Tensor| slow(&q, &k, x));
        check_each_input([
            ("q", &fq, &sq, rand_vec(n * qd, 32), [n, qd]),
            ("k", &fk, &sk, rand_vec(n * kd, 33), [n, kd]),
            ("v", &fv, &sv, rand_vec(n * kd, 34), [n, kd]),
        ])
    }

    /// Going through the queries in blocks (as the op does past `BLOCKED_BYTES`, an SD UNet
    /// at 512 px) gives the whole-tensor values and gradients: rotated, masked, grouped
    /// heads (blocks that split a head's rows) and cross-attention with more queries than
    /// keys, blocks of 1, 3 and more rows than there are.
    #[test]
    fn blocked_queries_match_the_whole_tensor_forward_and_backward() -> Result<()> {
        let (g, tables, _, _, mask) = setup()?;
        let causal = Attention {
            heads: g,
            scale: 0.5,
            rope: Some(tables),
            mask: Some(mask),
            segments: None,
            causal: false,
        };
        let cross = Attention {
            heads: Heads {
                b: 2,
                t: 7,
                tk: 3,
                q: 2,
                kv: 2,
                dim: 4,
            },
            scale: 0.7,
            rope: None,
            mask: None,
            segments: None,
            causal: false,
        };
        // One key head (two query heads share it): fewer heads than threads, so each
        // product, not each head, is spread over the pool (with two threads or more).
        let one_head = Attention {
            heads: Heads {
                b: 1,
                t: 6,
                tk: 5,
                q: 2,
                kv: 1,
                dim: 3,
            },
            scale: 0.6,
            rope: None,
            mask: None,
            segments: None,
            causal: false,
        };
        let cases = [
            ("causal", &causal),
            ("cross", &cross),
            ("one head", &one_head),
        ];
        for (case, op) in cases {
            let g = op.heads;
            assert!(op.block_rows().is_none(), "small enough to go whole");
            let q = rand_vec(g.b * g.t * g.q * g.dim, 61);
            let k = rand_vec(g.b * g.tk * g.kv * g.dim, 62);
            let v = rand_vec(g.b * g.tk * g.kv * g.dim, 63);
            let dout = rand_vec(q.len(), 64);
            let mask = op.mask_rows();
            let whole = op.forward_rows(&q, &k, &v, mask)?;
            let whole_grads = op.backward_rows(&q, &k, &v, &dout, mask)?;
            for r in [1, 3, 100] {
                let worst = |a: &[f32], b: &[f32]| {
                    a.iter().zip(b).fold(0f32, |w, (x, y)| w.max((x - y).abs()))
                };
                let o = op.forward_blocked(&q, &k, &v, mask, r)?;
                assert!(worst(&o, &whole) < 1e-6, "{case}, {r} rows: output");
                let grads = op.backward_blocked(&q, &k, &v, &dout, mask, r)?;
                for (name, (a, b)) in ["dq", "dk", "dv"]
                    .iter()
                    .zip(grads.iter().zip(&whole_grads))
                {
                    assert!(
                        worst(a, b) < 1e-5,
                        "{case}, {r} rows: {name} off by {}",
                        worst(a, b)
                    );
                }
            }
        }
        Ok(())
    }

    /// A causal op (the decoders') goes through each head's queries in blocks that stop at
    /// their last row's key: the values and gradients of the whole product with the
    /// masked triangle in it, for blocks of 1 row (each row its own keys), 2, 3 (blocks
    /// that do not divide a head's 5 rows) and more rows than a head has.
    #[test]
    fn causal_blocks_skip_the_masked_keys_and_match_the_whole() -> Result<()> {
        let (g, tables, _, _, mask) = setup()?;
        let op = |causal| Attention {
            heads: g,
            scale: 0.5,
            rope: Some(tables.clone()),
            mask: Some(mask.clone()),
            segments: None,
            causal,
        };
        let (whole, causal) = (op(false), op(true));
        assert_eq!(causal.block_rows(), Some(CAUSAL_ROWS));
        assert_eq!(causal.blocks(2)[..3], [(0, 2, 2), (2, 2, 4), (4, 1, 5)]);
        let q = rand_vec(g.b * g.t * g.q * g.dim, 71);
        let k = rand_vec(g.b * g.t * g.kv * g.dim, 72);
        let v = rand_vec(k.len(), 73);
        let dout = rand_vec(q.len(), 74);
        let m = whole.mask_rows();
        let want = whole.forward_rows(&q, &k, &v, m)?;
        let want_grads = whole.backward_rows(&q, &k, &v, &dout, m)?;
        let worst =
            |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |w, (x, y)| w.max((x - y).abs()));
        for r in [1, 2, 3, 100, CAUSAL_ROWS] {
            let o = causal.forward_blocked(&q, &k, &v, m, r)?;
            assert!(worst(&o, &want) < 1e-6, "{r} rows: output");
            let grads = causal.backward_blocked(&q, &k, &v, &dout, m, r)?;
            for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(grads.iter().zip(&want_grads)) {
                assert!(
                    worst(a, b) < 1e-5,
                    "{r} rows: {name} off by {}",
                    worst(a, b)
                );
            }
        }
        let o = causal.forward_rows(&q, &k, &v, m)?;
        assert!(worst(&o, &want) < 1e-6, "through forward_rows");
        Ok(())
    }

    #[test]
    fn cross_attention_matches_the_composed_ops_and_finite_differences() -> Result<()> {
        // The UNet's shape: no rotation, no mask, 6 queries against 3 keys, 2 heads.
        let dev = Device::Cpu;
        let g = Heads {
            b: 2,
            t: 6,
            tk: 3,
            q: 2,
            kv: 2,
            dim: 4,
        };
        let (qd, kd) = (g.q * g.dim, g.kv * g.dim);
        let (nq, nk) = (g.b * g.t, g.b * g.tk);
        let scale = 0.5;
        let q = Tensor::from_vec(rand_vec(nq * qd, 51), (nq, qd), &dev)?;
        let k = Tensor::from_vec(rand_vec(nk * kd, 52), (nk, kd), &dev)?;
        let v = Tensor::from_vec(rand_vec(nk * kd, 53), (nk, kd), &dev)?;
        let fused = |q: &Tensor, k: &Tensor, v: &Tensor| {
            multi_head_attention(q, k, v, g, scale, None, None)
        };
        let slow = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
            let heads = |x: &Tensor, len: usize| -> Result<Tensor> {
                x.reshape((g.b, len, g.q, g.dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (heads(q, g.t)?, heads(k, g.tk)?, heads(v, g.tk)?);
            super::super::softmax_last(&(q.matmul(&k.t()?)? * scale)?)?
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((nq, qd))
        };
        let (fq, sq) = (|x: &Tensor| fused(x, &k, &v), |x: &Tensor| slow(x, &k, &v));
        let (fk, sk) = (|x: &Tensor| fused(&q, x, &v), |x: &Tensor| slow(&q, x, &v));
        let (fv, sv) = (|x: &Tensor| fused(&q, &k, x), |x: &Tensor| slow(&q, &k, x));
        check_each_input([
            ("q", &fq, &sq, rand_vec(nq * qd, 51), [nq, qd]),
            ("k", &fk, &sk, rand_vec(nk * kd, 52), [nk, kd]),
            ("v", &fv, &sv, rand_vec(nk * kd, 53), [nk, kd]),
        ])
    }

    /// Packed rows: sequences computed one at a time from position 0 equal the whole-row
    /// op under the block-diagonal causal mask (windowed or not) with per-token positions,
    /// in the output and in each input's gradient; and the packed op passes finite
    /// differences.
    #[test]
    fn packed_sequences_match_the_block_diagonal_whole_row_op() -> Result<()> {
        let dev = Device::Cpu;
        // setup()'s geometry: two rows of 5, 4 query heads over 2 key heads of 4.
        let (g, ..) = setup()?;
        // Row 0: sequences of 2 and 3; row 1: 4 and 1.
        let segments = Arc::new(vec![(0, 2), (2, 3), (5, 4), (9, 1)]);
        let (mut pos, mut id) = (vec![0u32; 10], vec![0usize; 10]);
        for (k, &(r0, n)) in segments.iter().enumerate() {
            for i in 0..n {
                pos[r0 + i] = i as u32;
                id[r0 + i] = k;
            }
        }
        let inv = Tensor::new(&[[1.0f32, 0.3]], &dev)?;
        let tables = |p: &[u32], shape: &[usize]| -> Result<RopeTables> {
            let a = Tensor::new(p, &dev)?
                .to_dtype(candle_core::DType::F32)?
                .reshape((p.len(), 1))?
                .broadcast_mul(&inv)?
                .reshape(shape)?;
            RopeTables::new(&a.cos()?, &a.sin()?)
        };
        let per_token = tables(&pos, &[2, 1, 5, 2])?;
        let shared = tables(&[0, 1, 2, 3, 4], &[5, 2])?;
        let (q, k, v) = (
            Tensor::from_vec(rand_vec(10 * 16, 1), (10, 16), &dev)?,
            Tensor::from_vec(rand_vec(10 * 8, 2), (10, 8), &dev)?,
            Tensor::from_vec(rand_vec(10 * 8, 3), (10, 8), &dev)?,
        );
        for window in [None, Some(2)] {
            let mut m = vec![MASKED; 2 * 5 * 5];
            for (row, i, j) in (0..10).flat_map(|r| (0..=r % 5).map(move |j| (r, r % 5, j))) {
                if id[row] == id[row - i + j] && window.is_none_or(|w| i - j < w) {
                    m[row * 5 + j] = 0.0;
                }
            }
            let mask = AttnMask::new(m, 2, 5, 5, &dev)?;
            let packed = |q: &Tensor, k: &Tensor, v: &Tensor| {
                packed_attention(q, k, v, g, 0.5, Some(&shared), window, segments.clone())
            };
            let whole = |q: &Tensor, k: &Tensor, v: &Tensor| {
                multi_head_attention(q, k, v, g, 0.5, Some(&per_token), Some(&mask))
            };
            let (pq, wq) = (
                |x: &Tensor| packed(x, &k, &v),
                |x: &Tensor| whole(x, &k, &v),
            );
            let (pk, wk) = (
                |x: &Tensor| packed(&q, x, &v),
                |x: &Tensor| whole(&q, x, &v),
            );
            let (pv, wv) = (
                |x: &Tensor| packed(&q, &k, x),
                |x: &Tensor| whole(&q, &k, x),
            );
            check_each_input([
                ("q", &pq, &wq, rand_vec(10 * 16, 1), [10, 16]),
                ("k", &pk, &wk, rand_vec(10 * 8, 2), [10, 8]),
                ("v", &pv, &wv, rand_vec(10 * 8, 3), [10, 8]),
            ])?;
        }
        // Overlapping sequences, or one that crosses into the next row, are refused.
        for bad in [vec![(0, 3), (2, 2)], vec![(3, 4)]] {
            assert!(
                packed_attention(&q, &k, &v, g, 0.5, Some(&shared), None, Arc::new(bad)).is_err()
            );
        }
        Ok(())
    }

    #[test]
    fn attention_refuses_shapes_that_do_not_fit() -> Result<()> {
        let dev = Device::Cpu;
        let (g, tables, _, _, mask) = setup()?;
        let n = g.b * g.t;
        let q = Tensor::zeros((n, g.q * g.dim), candle_core::DType::F32, &dev)?;
        let kv = Tensor::zeros((n, g.kv * g.dim), candle_core::DType::F32, &dev)?;
        let three_heads = Heads { kv: 3, ..g };
        assert!(
            multi_head_attention(&q, &kv, &kv, three_heads, 0.5, Some(&tables), Some(&mask))
                .is_err()
        );
        assert!(multi_head_attention(&q, &q, &kv, g, 0.5, Some(&tables), Some(&mask)).is_err());
        // A rotation needs keys at the queries' positions.
        let cross = Heads { tk: 3, ..g };
        let kv3 = Tensor::zeros((g.b * 3, g.kv * g.dim), candle_core::DType::F32, &dev)?;
        assert!(multi_head_attention(&q, &kv3, &kv3, cross, 0.5, Some(&tables), None).is_err());
        assert!(multi_head_attention(&q, &kv3, &kv3, cross, 0.5, None, None).is_ok());
        assert!(multi_head_attention(&q, &kv, &kv, g, 0.5, Some(&tables), Some(&mask)).is_ok());
        Ok(())
    }
}
