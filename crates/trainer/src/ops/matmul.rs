//! The CPU's f32 matrix products: by gemm (the crate candle's matmul runs on, called as
//! candle calls it but into memory that is not zero-filled first), or by a BLAS library
//! that `LORAFORGE_BLAS` names.
//!
//! Most of a CPU training step is matrix products. Measured side by side at a step's
//! shapes (`scripts/bench-gemm.sh`, BENCHMARKS.md), candle's gemm 0.19 with its AVX-512
//! kernels ran as fast as OpenBLAS 0.3.34 on an Intel Xeon with AVX-512, so gemm is the
//! default; a BLAS is for CPUs where gemm's kernels fall behind. It is not a build
//! dependency: it is opened with `dlopen` at first use, so `cargo build` needs nothing
//! installed.
//!
//! OpenBLAS picks its kernels by the CPU's features at load (`DYNAMIC_ARCH`); on a CPU
//! newer than the library (Debian 12's OpenBLAS 0.3.21 on that Xeon picked its SSE3
//! "Prescott" kernels, about 10× slower than gemm) the library is refused unless
//! `OPENBLAS_CORETYPE` names the kernels to use.
//!
//! The library runs single-threaded and each product is split over rayon's pool, the one
//! gemm and our fused ops run on. OpenBLAS's own thread pool is faster for one product
//! alone, but its threads spin between products and took the cores from everything else:
//! a training step ran at 0.82× gemm's speed that way.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::ffi::{c_char, CStr};
use std::sync::OnceLock;

/// OpenBLAS's names for kernel sets built on AVX2 and FMA (or AVX-512).
const FMA_CORES: &[&str] = &[
    "haswell",
    "zen",
    "skylakex",
    "cooperlake",
    "sapphirerapids",
    "excavator",
];

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

type Sgemm = unsafe extern "C" fn(
    order: i32,
    ta: i32,
    tb: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
);

/// Why a library named by `LORAFORGE_BLAS` (or given to [`Blas::open`]) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BlasError {
    #[error("BLAS library {name} cannot be opened")]
    Load {
        name: String,
        #[source]
        source: libloading::Error,
    },
    #[error("BLAS library {0} has no cblas_sgemm (nor a prefixed one, as scipy_cblas_sgemm)")]
    NoSgemm(String),
    #[error(
        "BLAS library {name} chose its {core} kernels, which leave this CPU's AVX2/FMA unused \
         (it predates the CPU): install a newer OpenBLAS (pip install scipy-openblas32) or \
         set OPENBLAS_CORETYPE (e.g. SkylakeX, Haswell)"
    )]
    WrongKernels { name: String, core: String },
    #[error(
        "BLAS library {0} is built with 64-bit integers (USE64BITINT), whose cblas_sgemm \
         takes other arguments than the 32-bit one loraforge calls: use a 32-bit-integer \
         build (libopenblas.so.0, scipy-openblas32)"
    )]
    Ilp64(String),
}

/// An opened CBLAS library.
pub struct Blas {
    sgemm: Sgemm,
    about: String,
    // Last: the function pointers above point into it.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.about)
    }
}

impl Blas {
    /// Opens `name` (a path, or a file name the dynamic loader searches for), finds its
    /// `cblas_sgemm` (plain, or with the `scipy_` prefix of the scipy-openblas wheels),
    /// and sets it to one thread.
    pub fn open(name: &str) -> std::result::Result<Blas, BlasError> {
        // SAFETY: loading runs the library's initialisers; a BLAS's only set up its
        // thread and memory pools.
        let lib = unsafe { libloading::Library::new(name) }.map_err(|source| BlasError::Load {
            name: name.to_string(),
            source,
        })?;
        let prefixes = ["", "scipy_"];
        // SAFETY: cblas_sgemm has this signature in every CBLAS with 32-bit integers
        // (OpenBLAS's and BLIS's default builds; the scipy_openblas32 wheel).
        let (prefix, sgemm) = prefixes
            .iter()
            .find_map(|p| {
                let sym = format!("{p}cblas_sgemm\0");
                unsafe { lib.get::<Sgemm>(sym.as_bytes()) }
                    .ok()
                    .map(|s| (*p, *s))
            })
            .ok_or_else(|| BlasError::NoSgemm(name.to_string()))?;
        // SAFETY (all three): the threading and identification entry points of OpenBLAS
        // and BLIS, with the signatures their headers give.
        unsafe {
            if let Ok(set) = lib.get::<unsafe extern "C" fn(i32)>(
                format!("{prefix}openblas_set_num_threads\0").as_bytes(),
            ) {
                set(1);
            }
            if let Ok(set) = lib.get::<unsafe extern "C" fn(i64)>(b"bli_thread_set_num_threads\0") {
                set(1);
            }
        }
        let text = |sym: String| -> Option<String> {
            // SAFETY: each returns a static NUL-terminated string.
            unsafe {
                let f = lib
                    .get::<unsafe extern "C" fn() -> *const c_char>(sym.as_bytes())
                    .ok()?;
                let p = f();
                (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().trim().to_string())
            }
        };
        let core = text(format!("{prefix}openblas_get_corename\0"));
        if let Some(core) = &core {
            let c = core.to_ascii_lowercase();
            if cpu_has_fma() && !FMA_CORES.iter().any(|k| c.contains(k)) {
                return Err(BlasError::WrongKernels {
                    name: name.to_string(),
                    core: core.clone(),
                });
            }
        }
        let config = text(format!("{prefix}openblas_get_config\0"));
        if config.as_deref().is_some_and(|c| c.contains("USE64BITINT")) {
            return Err(BlasError::Ilp64(name.to_string()));
        }
        let about = match (config, core) {
            (Some(config), Some(core)) => format!("{config}, {core} kernels ({name})"),
            _ => match text("bli_info_get_version_str\0".into()) {
                Some(v) => format!("BLIS {v} ({name})"),
                None => name.to_string(),
            },
        };
        Ok(Blas {
            sgemm,
            about,
            _lib: lib,
        })
    }

    /// The library, its version and the kernels it chose, as it reports them.
    pub fn about(&self) -> &str {
        &self.about
    }

    /// `c = a·b` over `bsz` batches, `c` row-major `(bsz, m, n)`; split over rayon's
    /// pool by output rows (or columns, when the rows are few).
    fn gemm(&self, a: &[f32], va: View, b: &[f32], vb: View, (bsz, m, n, k): Dims) -> Vec<f32> {
        let mut c = vec![0f32; bsz * m * n];
        if m == 0 || n == 0 {
            return c;
        }
        let threads = candle_core::utils::get_num_threads().max(1);
        // Below this a product is over before a second thread has started.
        let small = (m * n * k) < (1 << 18);
        let parts = if small || bsz >= threads { 1 } else { threads };
        let by_rows = m >= n || m >= 64 * parts;
        let (span, rows_per) = if by_rows {
            (m, m.div_ceil(parts))
        } else {
            (n, n.div_ceil(parts))
        };
        let per_batch = span.div_ceil(rows_per);
        // `c` points at the part's batch (split by rows: at its first row).
        let call = |bi: usize, lo: usize, hi: usize, c: *mut f32| {
            let (a0, b0) = (va.offset + bi * va.batch, vb.offset + bi * vb.batch);
            // The part's corner in a, b and c, and its size.
            let (a_off, b_off, c_off, pm, pn) = if by_rows {
                (a0 + lo * va.row_step(), b0, 0, hi - lo, n)
            } else {
                (a0, b0 + lo * vb.col_step(), lo, m, hi - lo)
            };
            // SAFETY: the views were checked against the storages' lengths; `c` has room
            // for the part's rows of `n` (or, split by columns, its batch's `m` rows).
            unsafe {
                (self.sgemm)(
                    ROW_MAJOR,
                    va.trans(),
                    vb.trans(),
                    pm as i32,
                    pn as i32,
                    k as i32,
                    1.0,
                    a.as_ptr().add(a_off),
                    va.ld as i32,
                    b.as_ptr().add(b_off),
                    vb.ld as i32,
                    0.0,
                    c.add(c_off),
                    n as i32,
                )
            }
        };
        if parts == 1 {
            c.par_chunks_mut(m * n)
                .enumerate()
                .for_each(|(bi, cb)| call(bi, 0, span, cb.as_mut_ptr()));
        } else if by_rows {
            c.par_chunks_mut(m * n).enumerate().for_each(|(bi, cb)| {
                cb.par_chunks_mut(rows_per * n)
                    .enumerate()
                    .for_each(|(p, part)| {
                        let lo = p * rows_per;
                        call(bi, lo, (lo + rows_per).min(m), part.as_mut_ptr())
                    })
            });
        } else {
            // Columns of one batch interleave in memory: each part writes its own
            // columns through a shared pointer; no two parts write the same element.
            let out = SendPtr(c.as_mut_ptr());
            let out = &out;
            (0..bsz * per_batch).into_par_iter().for_each(|i| {
                let (bi, p) = (i / per_batch, i % per_batch);
                let lo = p * rows_per;
                // SAFETY: within the buffer: batch `bi` of `bsz`.
                let cb = unsafe { out.0.add(bi * m * n) };
                call(bi, lo, (lo + rows_per).min(n), cb)
            });
        }
        c
    }
}

struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint columns of one buffer to rayon's threads.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

type Dims = (usize, usize, usize, usize);

/// One operand as BLAS takes it: row-major `(rows, cols)`, or its transpose stored
/// row-major, with a leading dimension and a stride between batches.
#[derive(Clone, Copy, Debug)]
struct View {
    transposed: bool,
    ld: usize,
    batch: usize,
    offset: usize,
}

impl View {
    /// How `layout` (whose last two dims are `(rows, cols)`, and whose leading dims hold
    /// `bsz` batches) maps onto BLAS's arguments, if it does.
    fn of(layout: &Layout, rows: usize, cols: usize, bsz: usize, len: usize) -> Option<View> {
        let (dims, stride) = (layout.dims(), layout.stride());
        let r = dims.len();
        if r < 2 || dims[r - 2] != rows || dims[r - 1] != cols {
            return None;
        }
        if rows == 0 || cols == 0 || bsz == 0 {
            return None;
        }
        let (sr, sc) = (stride[r - 2], stride[r - 1]);
        let (transposed, ld) = if sc == 1 || cols == 1 {
            (false, if rows > 1 { sr } else { cols })
        } else if sr == 1 || rows == 1 {
            (true, if cols > 1 { sc } else { rows })
        } else {
            return None;
        };
        let minor = if transposed { rows } else { cols };
        if ld < minor.max(1) {
            return None;
        }
        // The batch dims must collapse into one stride.
        let lead: Vec<(usize, usize)> = dims[..r - 2]
            .iter()
            .zip(&stride[..r - 2])
            .filter(|(d, _)| **d > 1)
            .map(|(d, s)| (*d, *s))
            .collect();
        if lead.iter().map(|(d, _)| d).product::<usize>() != bsz {
            return None;
        }
        if lead.windows(2).any(|w| w[0].1 != w[1].1 * w[1].0) {
            return None;
        }
        let batch = lead.last().map_or(0, |(_, s)| *s);
        let offset = layout.start_offset();
        // The last element any product reads must lie inside the storage.
        let major = if transposed { cols } else { rows };
        let last = offset + (bsz - 1) * batch + (major - 1) * ld + minor - 1;
        if last >= len {
            return None;
        }
        let fits = |v: usize| i32::try_from(v).is_ok();
        (fits(ld) && fits(rows) && fits(cols)).then_some(View {
            transposed,
            ld,
            batch,
            offset,
        })
    }

    fn trans(&self) -> i32 {
        if self.transposed {
            TRANS
        } else {
            NO_TRANS
        }
    }

    /// Elements from one row of the operand to the next.
    fn row_step(&self) -> usize {
        if self.transposed {
            1
        } else {
            self.ld
        }
    }

    /// Elements from one column of the operand to the next.
    fn col_step(&self) -> usize {
        if self.transposed {
            self.ld
        } else {
            1
        }
    }
}

fn cpu_has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What `LORAFORGE_BLAS` came to: the library, or why the one it names cannot be used.
fn config() -> &'static std::result::Result<Option<Blas>, BlasError> {
    static CONFIG: OnceLock<std::result::Result<Option<Blas>, BlasError>> = OnceLock::new();
    CONFIG.get_or_init(|| match std::env::var("LORAFORGE_BLAS") {
        Ok(v) if !v.is_empty() && !matches!(v.as_str(), "off" | "none" | "0" | "gemm") => {
            Blas::open(&v).map(Some)
        }
        _ => Ok(None),
    })
}

/// The BLAS this process uses (see the module doc); `None` means candle's gemm.
pub fn blas() -> Option<&'static Blas> {
    config().as_ref().ok().and_then(Option::as_ref)
}

/// Why the library `LORAFORGE_BLAS` names cannot be used, if it cannot: the CLI and the
/// server call this at start, so that a wrong setting stops them with its reason rather
/// than training on another engine than the one asked for.
pub fn check() -> std::result::Result<(), &'static BlasError> {
    config().as_ref().map(|_| ())
}

/// What does the CPU's matrix products, in a line for logs.
pub fn describe() -> String {
    match config() {
        Ok(Some(b)) => format!("BLAS: {}", b.about()),
        Ok(None) => "candle's gemm".to_string(),
        Err(e) => format!("candle's gemm ({e})"),
    }
}

/// `a · b` exactly as candle's `CpuStorage::matmul` takes its arguments (`a` is
/// `(bsz, m, k)`, `b` `(bsz, k, n)`, both as their layouts say), by `blas` when it is
/// given, the operands are f32 and the layouts are ones BLAS takes; by candle's gemm
/// otherwise.
pub fn matmul_with(
    blas: Option<&Blas>,
    a: &CpuStorage,
    b: &CpuStorage,
    dims: Dims,
    la: &Layout,
    lb: &Layout,
) -> Result<CpuStorage> {
    let (bsz, m, n, k) = dims;
    if let (CpuStorage::F32(av), CpuStorage::F32(bv)) = (a, b) {
        let views = (
            View::of(la, m, k, bsz, av.len()),
            View::of(lb, k, n, bsz, bv.len()),
        );
        if let (Some(va), Some(vb), true) = (views.0, views.1, k > 0) {
            return Ok(CpuStorage::F32(match blas {
                Some(blas) => blas.gemm(av, va, bv, vb, dims),
                None => gemm_uninit(av, va, bv, vb, dims),
            }));
        }
    }
    a.matmul(b, dims, la, lb)
}

/// `c = a·b` by gemm, as candle's matmul calls it (same kernels: the same bits on the
/// layouts the tests cover), but into memory nothing has written: candle zero-fills its
/// output first, a pass over every product's result that gemm, told not to read its
/// destination, never needs. Where candle splits each of a batch's products over rayon's
/// pool in turn, a batch of many goes to the threads a product at a time.
fn gemm_uninit(a: &[f32], va: View, b: &[f32], vb: View, (bsz, m, n, k): Dims) -> Vec<f32> {
    let len = bsz * m * n;
    // A right operand shared by every batch, and a left one whose batches lie row after
    // row with no gaps: one product of `bsz·m` rows, as candle folds them.
    let (bsz, m) = if bsz > 1 && vb.batch == 0 && !va.transposed && va.ld == k && va.batch == m * k
    {
        (1, bsz * m)
    } else {
        (bsz, m)
    };
    // gemm's matrix-vector path (one row or one column) takes its destination as a slice,
    // which must not cover unwritten memory: zero-filling one row or column costs nothing.
    let zeroed = m == 1 || n == 1;
    let mut c: Vec<f32> = if zeroed {
        vec![0f32; len]
    } else {
        Vec::with_capacity(len)
    };
    let threads = candle_core::utils::get_num_threads();
    let out = SendPtr(c.as_mut_ptr());
    let out = &out;
    // SAFETY: `View::of` checked that every element the product reads lies inside `a` and
    // `b`; `c` has room for each batch's `m·n` values, which gemm writes without reading
    // them (`read_dst` false), each batch its own.
    let product = |bi: usize, threads: usize| unsafe {
        gemm_call(
            out.0.add(bi * m * n),
            false,
            a,
            va,
            b,
            vb,
            bi,
            (m, n, k),
            threads,
        )
    };
    // Many products (attention's, one per sequence and head: a MiniLM layer has 192 of
    // 128×128×32) go to the threads whole, each on one: split over the pool, each small
    // product waited on every thread in turn, and the layer's attention ran at a third of
    // gemm's speed. gemm's result does not depend on how it is split.
    if threads > 1 && (bsz % threads == 0 || bsz >= 4 * threads) {
        (0..bsz).into_par_iter().for_each(|bi| product(bi, 1));
    } else {
        (0..bsz).for_each(|bi| product(bi, threads));
    }
    if !zeroed {
        // SAFETY: every one of the `len` values was written above.
        unsafe { c.set_len(len) };
    }
    c
}

/// `c += a·b` for `(m, k)` and `(k, n)` operands as their layouts say (no batches) and a
/// row-major `(m, n)` `c`, by gemm whatever the BLAS setting: an op's backward adds a
/// thin product (LoRA's `dxa·A`) to a gradient in one pass, with no temporary.
pub fn matmul_acc(
    c: &mut [f32],
    a: &[f32],
    la: &Layout,
    b: &[f32],
    lb: &Layout,
    dims: (usize, usize, usize),
) -> Result<()> {
    matmul_into(c, true, a, la, b, lb, dims)
}

/// `c = a·b`, or `c += a·b` with `accumulate`, as [`matmul_acc`] takes its operands: the
/// products of an op that works through its operands a block at a time, into buffers it
/// reuses.
pub fn matmul_into(
    c: &mut [f32],
    accumulate: bool,
    a: &[f32],
    la: &Layout,
    b: &[f32],
    lb: &Layout,
    dims: (usize, usize, usize),
) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    matmul_into_on(threads, c, accumulate, a, la, b, lb, dims)
}

/// [`matmul_into`] over `threads` of rayon's pool; 1 keeps it on the calling thread, for
/// an op that spreads independent products over the pool itself (attention's heads),
/// where splitting each small product again would only add a wait on every one.
#[allow(clippy::too_many_arguments)]
pub fn matmul_into_on(
    threads: usize,
    c: &mut [f32],
    accumulate: bool,
    a: &[f32],
    la: &Layout,
    b: &[f32],
    lb: &Layout,
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    if c.len() != m * n {
        candle_core::bail!("matmul_into: {} values for a ({m}, {n}) product", c.len());
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return Ok(());
    }
    let (Some(va), Some(vb)) = (
        View::of(la, m, k, 1, a.len()),
        View::of(lb, k, n, 1, b.len()),
    ) else {
        candle_core::bail!("matmul_into: layouts {:?} and {:?} do not fit", la, lb)
    };
    if !accumulate && (m == 1 || n == 1) {
        // gemm's vector path scales what `c` holds by zero rather than ignoring it: a
        // reused buffer's NaN or infinity would survive.
        c.fill(0.0);
    }
    // SAFETY: the views were checked against `a` and `b`, and `c` holds `m·n` values.
    unsafe {
        gemm_call(
            c.as_mut_ptr(),
            accumulate,
            a,
            va,
            b,
            vb,
            0,
            (m, n, k),
            threads,
        )
    };
    Ok(())
}

/// One gemm call for batch `bi`: `c = a·b`, or `c += a·b` with `accumulate`, `c` row-major
/// `(m, n)`, on rayon's pool when `threads` is more than one.
///
/// # Safety
/// `va` and `vb` must have been made by `View::of` for `a` and `b` (and the batch exist);
/// `c` must point at `m·n` writable values.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_call(
    c: *mut f32,
    accumulate: bool,
    a: &[f32],
    va: View,
    b: &[f32],
    vb: View,
    bi: usize,
    (m, n, k): (usize, usize, usize),
    threads: usize,
) {
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // gemm computes dst = alpha·dst + beta·(lhs·rhs), reading dst only when asked to.
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        n as isize,
        accumulate,
        a.as_ptr().add(va.offset + bi * va.batch),
        va.col_step() as isize,
        va.row_step() as isize,
        b.as_ptr().add(vb.offset + bi * vb.batch),
        vb.col_step() as isize,
        vb.row_step() as isize,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        par,
    );
}

/// [`matmul_with`] by this process's BLAS, if any.
pub fn matmul(
    a: &CpuStorage,
    b: &CpuStorage,
    dims: Dims,
    la: &Layout,
    lb: &Layout,
) -> Result<CpuStorage> {
    matmul_with(blas(), a, b, dims, la, lb)
}

/// `a · b` for tensors `(…, m, k)` and `(…, k, n)` with the same leading dims, through
/// [`matmul`] on the CPU; candle's matmul elsewhere. No gradient flows through it: it is
/// for the products inside the backward passes of our own ops.
pub fn mm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !a.device().is_cpu() || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return a.matmul(b);
    }
    a.apply_op2_no_bwd(b, &Matmul)
}

struct Matmul;

impl CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        "blas-matmul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (da, db) = (la.dims(), lb.dims());
        let r = da.len();
        if r < 2 || db.len() != r || da[..r - 2] != db[..r - 2] || da[r - 1] != db[r - 2] {
            candle_core::bail!("matmul: shapes {da:?} and {db:?} do not multiply");
        }
        let (m, k, n) = (da[r - 2], da[r - 1], db[r - 1]);
        let bsz = da[..r - 2].iter().product();
        let mut out = da[..r - 2].to_vec();
        out.extend([m, n]);
        Ok((matmul(a, b, (bsz, m, n, k), la, lb)?, Shape::from(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Storage};

    fn storage(t: &Tensor) -> CpuStorage {
        let (s, _) = t.storage_and_layout();
        match &*s {
            Storage::Cpu(s) => s.clone(),
            _ => unreachable!(),
        }
    }

    /// Every layout the ops hand over (plain, transposed on either side, batched with a
    /// broadcast operand, offset views).
    fn cases() -> Vec<(Tensor, Tensor)> {
        let dev = Device::Cpu;
        let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, &dev).unwrap();
        vec![
            (r(&[300, 96]), r(&[96, 70])),
            (r(&[300, 96]), r(&[70, 96]).t().unwrap()),
            (r(&[96, 300]).t().unwrap(), r(&[96, 70])),
            (r(&[5, 40]), r(&[40, 900])),
            // Large enough to be split, and split by columns (few rows).
            (r(&[5, 96]), r(&[96, 900])),
            (r(&[5, 96]), r(&[900, 96]).t().unwrap()),
            (r(&[96, 5]).t().unwrap(), r(&[96, 900])),
            // Split by rows, with a transposed left operand.
            (r(&[96, 700]).t().unwrap(), r(&[96, 64])),
            (r(&[3, 2, 33, 17]), r(&[3, 2, 17, 65])),
            (
                r(&[3, 2, 33, 17]),
                r(&[3, 2, 65, 17]).transpose(2, 3).unwrap(),
            ),
            (r(&[1, 1, 8]), r(&[1, 8, 1])),
            (r(&[4, 50]).narrow(1, 10, 30).unwrap(), r(&[30, 20])),
            (r(&[64, 1]), r(&[1, 64])),
            // A broadcast right operand, batches of the left row after row.
            (
                r(&[3, 20, 17]),
                r(&[17, 9])
                    .unsqueeze(0)
                    .unwrap()
                    .broadcast_as((3, 17, 9))
                    .unwrap(),
            ),
        ]
    }

    fn dims_of(a: &Tensor, b: &Tensor) -> (usize, usize, usize, usize) {
        let (da, db) = (a.dims(), b.dims());
        let rk = da.len();
        (
            da[..rk - 2].iter().product(),
            da[rk - 2],
            db[rk - 1],
            da[rk - 1],
        )
    }

    /// Without a BLAS the products are gemm's, as candle's matmul computes them, to the
    /// bit: only the zero-filling of the output is gone.
    #[test]
    fn gemm_into_fresh_memory_is_candles_matmul_to_the_bit() {
        for (a, b) in cases() {
            let want = a.matmul(&b).unwrap();
            let got = matmul_with(
                None,
                &storage(&a),
                &storage(&b),
                dims_of(&a, &b),
                a.layout(),
                b.layout(),
            )
            .unwrap();
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(
                got.as_slice::<f32>().unwrap(),
                want.as_slice(),
                "{:?}·{:?}",
                a.dims(),
                b.dims()
            );
            if blas().is_none() {
                let via_mm = mm(&a, &b)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert_eq!(via_mm, want);
            }
        }
    }

    /// Every layout the ops hand over (plain, transposed on either side, batched with a
    /// broadcast operand, offset views), against candle's gemm: 1e-6 of the result's
    /// norm (the two sum in different orders), or skipped when no BLAS is found here.
    #[test]
    fn blas_products_match_candles_gemm_on_every_layout_the_ops_use() {
        let Some(blas) = blas() else {
            eprintln!("skipped: no BLAS library ({})", describe());
            assert!(
                std::env::var("LORAFORGE_REQUIRE_BLAS").as_deref() != Ok("1"),
                "LORAFORGE_REQUIRE_BLAS=1 but {}",
                describe()
            );
            return;
        };
        for (a, b) in cases() {
            let want = a.matmul(&b).unwrap();
            let (la, lb) = (a.layout().clone(), b.layout().clone());
            let (da, db) = (a.dims(), b.dims());
            let dims = dims_of(&a, &b);
            assert!(
                View::of(
                    &la,
                    dims.1,
                    dims.3,
                    dims.0,
                    storage(&a).as_slice::<f32>().unwrap().len()
                )
                .is_some(),
                "{da:?} {:?}",
                la.stride()
            );
            let got = matmul_with(Some(blas), &storage(&a), &storage(&b), dims, &la, &lb).unwrap();
            let got = Tensor::from_vec(
                got.as_slice::<f32>().unwrap().to_vec(),
                want.shape(),
                want.device(),
            )
            .unwrap();
            // Relative to |a|·|b|, the scale rounding works at: the product itself can be
            // near zero (a single dot product of random numbers often is), and then two
            // summation orders differ by far more than 1e-6 of it.
            let scale = a.abs().unwrap().matmul(&b.abs().unwrap()).unwrap();
            let err = (got - &want).unwrap().sqr().unwrap().sum_all().unwrap();
            let norm = scale.sqr().unwrap().sum_all().unwrap();
            let rel = (err.to_scalar::<f32>().unwrap() / norm.to_scalar::<f32>().unwrap()).sqrt();
            assert!(rel < 1e-6, "{da:?}·{db:?}: relative error {rel:e}");
        }
    }

    #[test]
    fn layouts_blas_cannot_take_are_left_to_gemm() {
        let dev = Device::Cpu;
        // Neither rows nor columns contiguous: a strided slice of both.
        let t = Tensor::zeros((8, 8), DType::F32, &dev).unwrap();
        let l = t.layout().clone();
        let strided = Layout::new(Shape::from((4, 4)), vec![16, 2], 0);
        assert!(View::of(&strided, 4, 4, 1, 64).is_none());
        // Reading past the storage's end.
        assert!(View::of(&l, 8, 8, 1, 63).is_none());
        assert!(View::of(&l, 8, 8, 1, 64).is_some());
    }
}
