//! The `ai.lambda_llm` operators: ONNX Runtime runs the graph, these kernels run its Q4_1 linear layers
//! (`MatMulQ4_1`) and its Q8_0 LM head (`MatMulQ8_0`).
//!
//! `MatMulQ4_1`:
//! Inputs: `x` f32 `[..., K]`, the packed nibbles u8 `[N, K/32, 16]` (model.onnx's, in model.onnx.data) and each
//! block's scale and minimum as f16 bit patterns u16 `[N, K/32, 2]` (in model.fast.onnx.data), both initializers;
//! attributes `K`, `N` and optionally `activation = "swiglu"`; output f32 `[..., N]`, or with SwiGLU `[..., N/2]`:
//! `silu(y[.., c]) · y[.., N/2 + c]`, the gate and up halves of a fused projection. With the attribute `epsilon` it
//! first normalizes its input as `SkipSimplifiedLayerNormalization` does, bit for bit: `x + skip` (optional input 3,
//! f32 shaped as x; that sum is the optional output 1, the residual) scaled to unit root mean square and by `gamma`
//! (input 4, an f32 `[K]` initializer). The converter writes `model.fast.onnx` with this node in place of each
//! `MatMulNBits` + mins `Gemm` pair of `model.onnx`, of the `Split` + `QuickGelu` + `Mul` after the gate/up
//! projection, and of the norm before a projection.
//!
//! `MatMulQ8_0`: `x` f32 `[..., K]`, the weights plus 128 u8 `[N, K/32, 32]` and the scales f32 `[N, K/32]` (the tied
//! embedding's, in model.onnx.data); attributes `K`, `N`; output f32 `[..., N]`, exact. It replaces the 8-bit
//! `MatMulNBits` of the LM head and its top-k rescoring.
//!
//! `Attention`: attention with every query row on its own (`super::attention_op`).

use super::attention_op::Attention;
use lambda_llm_kernels::q4_1::{Isa, Prepared, Q4_1Matrix};
use lambda_llm_kernels::q8_0::Q8_0Matrix;
use lambda_llm_kernels::{norm, swiglu};
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput};
use ort::value::{TensorElementType, TensorValueType, ValueRef};
use ort::AsPointer;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};

pub const DOMAIN: &str = "ai.lambda_llm";
pub const OP: &str = "MatMulQ4_1";
pub const OP_Q8: &str = "MatMulQ8_0";
/// The operator domain to register on a session that loads the fast graph with `threads` intra-op threads.
pub fn domain(isa: Isa, threads: usize) -> ort::Result<OperatorDomain> {
    let threads = threads.max(1);
    OperatorDomain::new(DOMAIN)?
        .add(MatMulQ4_1 { isa, threads })?
        .add(MatMulQ8_0 { isa, threads })?
        .add(Attention { threads })
}

/// Attribute `name` of a node of `op`, as a size.
pub(super) fn dim(info: &KernelContext<'_>, op: &str, name: &str) -> ort::Result<usize> {
    let v: i64 = info
        .get(name)
        .ok_or_else(|| ort::Error::new(format!("{op}: attribute {name} is missing")))?;
    usize::try_from(v).map_err(|_| ort::Error::new(format!("{op}: attribute {name}={v} is negative")))
}

/// Input 0 as `[rows, K]` and output 0 allocated as `[..., width]`, handed to `f(x's shape, x, rows, y)` (not called
/// for 0 rows).
fn with_io(
    ctx: &ComputeContext,
    op: &str,
    k: usize,
    width: usize,
    f: impl FnOnce(&[i64], &[f32], usize, &mut [f32]) -> ort::Result<()>,
) -> ort::Result<()> {
    let x = ctx
        .input(0)?
        .ok_or_else(|| ort::Error::new(format!("{op}: input x is missing")))?;
    let (shape, xs) = x.try_extract_tensor::<f32>()?;
    if shape.last().copied() != Some(k as i64) {
        return Err(ort::Error::new(format!(
            "{op}: input of shape {shape:?}, expected [..., {k}]"
        )));
    }
    let rows = xs.len() / k;
    let mut out_shape = shape.to_vec();
    *out_shape.last_mut().expect("checked above") = width as i64;
    let mut y = ctx
        .output(0, out_shape)?
        .ok_or_else(|| ort::Error::new(format!("{op}: output is missing")))?;
    let (_, ys) = y.try_extract_tensor_mut::<f32>()?;
    if rows == 0 {
        return Ok(());
    }
    f(shape, xs, rows, ys)
}

struct MatMulQ8_0 {
    isa: Isa,
    threads: usize,
}

impl Operator for MatMulQ8_0 {
    type Kernel<'attr> = Q8Kernel<'attr>;

    fn name(&self) -> &str {
        OP_Q8
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Uint8),
            OperatorInput::required(TensorElementType::Float32),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, info: &KernelContext<'attr>) -> ort::Result<Q8Kernel<'attr>> {
        let (k, n) = (dim(info, OP_Q8, "K")?, dim(info, OP_Q8, "N")?);
        let u: ValueRef<'attr, TensorValueType<u8>> = info.constant_input(1)?;
        let d: ValueRef<'attr, TensorValueType<f32>> = info.constant_input(2)?;
        // SAFETY: as for MatMulQ4_1, initializers outlive the kernel.
        let (u, d): (&'attr [u8], &'attr [f32]) =
            unsafe { (stable(u.extract_tensor().1), stable(d.extract_tensor().1)) };
        let matrix = Q8_0Matrix::new(k, n, u, d).map_err(|e| ort::Error::new(format!("{OP_Q8}: {e}")))?;
        Ok(Q8Kernel {
            matrix,
            isa: self.isa,
            tasks: self.threads,
        })
    }
}

pub struct Q8Kernel<'w> {
    matrix: Q8_0Matrix<'w>,
    isa: Isa,
    tasks: usize,
}

impl Kernel for Q8Kernel<'_> {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let (k, n) = (self.matrix.k, self.matrix.n);
        with_io(ctx, OP_Q8, k, n, |_, xs, _, ys| {
            let (matrix, isa, out) = (&self.matrix, self.isa, Out(ys.as_mut_ptr()));
            let tasks = self.tasks.min(n);
            let task = move |i: usize| {
                // SAFETY: `ys` holds rows × N floats and each task owns its columns.
                unsafe { matrix.columns(isa, xs, out.get(), i * n / tasks..(i + 1) * n / tasks) }
            };
            run_tasks(ctx, tasks, &task)
        })
    }
}

/// `task(0..tasks)`, inline for one task, else on the intra-op pool.
pub(super) fn run_tasks(ctx: &ComputeContext, tasks: usize, task: &(dyn Fn(usize) + Sync)) -> ort::Result<()> {
    if tasks == 1 {
        task(0);
        return Ok(());
    }
    parallel_for(ctx, tasks, task)
}

/// `work(0..chunks)` on up to `threads` tasks of the intra-op pool (inline for one), each task taking the next chunk
/// as it comes free, so a task that starts late (a woken worker) takes fewer. A chunk's result must not depend on
/// which task runs it. Not for the matrix products: there each thread streams its columns' weights best in one piece
/// (chunks of 64 columns made decode 18 % slower, 123 against 150 tokens/s, each chunk restarting a stream).
pub(super) fn run_chunks(
    ctx: &ComputeContext,
    threads: usize,
    chunks: usize,
    work: &(dyn Fn(usize) + Sync),
) -> ort::Result<()> {
    let tasks = threads.min(chunks);
    if tasks <= 1 {
        (0..chunks).for_each(work);
        return Ok(());
    }
    let next = AtomicUsize::new(0);
    let task = |_: usize| loop {
        let chunk = next.fetch_add(1, Ordering::Relaxed);
        if chunk >= chunks {
            break;
        }
        work(chunk);
    };
    parallel_for(ctx, tasks, &task)
}

struct MatMulQ4_1 {
    isa: Isa,
    threads: usize,
}

impl Operator for MatMulQ4_1 {
    type Kernel<'attr> = Q4Kernel<'attr>;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Uint8),
            OperatorInput::required(TensorElementType::Uint16),
            OperatorInput::optional(TensorElementType::Float32),
            OperatorInput::optional(TensorElementType::Float32),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [
            OperatorOutput::required(TensorElementType::Float32),
            OperatorOutput::optional(TensorElementType::Float32),
        ]
    }

    fn create_kernel<'attr>(&self, info: &KernelContext<'attr>) -> ort::Result<Q4Kernel<'attr>> {
        let (k, n) = (dim(info, OP, "K")?, dim(info, OP, "N")?);
        let swiglu = match info.get::<String>("activation").as_deref() {
            None | Some("") => false,
            Some("swiglu") if n % 2 == 0 => true,
            Some(other) => {
                return Err(ort::Error::new(format!(
                    "{OP}: activation '{other}' with N={n} is not supported"
                )))
            }
        };
        let q: ValueRef<'attr, TensorValueType<u8>> = info.constant_input(1)?;
        let dm: ValueRef<'attr, TensorValueType<u16>> = info.constant_input(2)?;
        // SAFETY: constant inputs are the session's initializers; they stay in place for as long as the session, which
        // outlives its kernels (the slices are tied to 'attr, the kernel's lifetime).
        let (q, dm): (&'attr [u8], &'attr [u16]) =
            unsafe { (stable(q.extract_tensor().1), stable(dm.extract_tensor().1)) };
        let matrix = Q4_1Matrix::new(k, n, q, dm).map_err(|e| ort::Error::new(format!("{OP}: {e}")))?;
        if matrix.settle(self.isa) {
            page_out(q);
            page_out(dm);
        }
        let norm = match info.get::<f32>("epsilon") {
            None if info.inputs()?.len() > 3 => {
                return Err(ort::Error::new(format!(
                    "{OP}: a skip or gamma input without the attribute epsilon"
                )))
            }
            None => None,
            Some(epsilon) if epsilon.is_finite() && epsilon >= 0.0 => {
                let gamma: ValueRef<'attr, TensorValueType<f32>> = info.constant_input(4)?;
                // SAFETY: as above.
                let gamma: &'attr [f32] = unsafe { stable(gamma.extract_tensor().1) };
                if gamma.len() != k {
                    return Err(ort::Error::new(format!(
                        "{OP}: gamma of {} values for K={k}",
                        gamma.len()
                    )));
                }
                Some(Norm {
                    gamma,
                    epsilon,
                    sum_output: info.outputs()?.len() > 1,
                })
            }
            Some(epsilon) => return Err(ort::Error::new(format!("{OP}: epsilon {epsilon} is not a size"))),
        };
        Ok(Q4Kernel {
            matrix,
            isa: self.isa,
            tasks: self.threads,
            swiglu,
            norm,
        })
    }
}

/// Asks the kernel to reclaim the whole pages of `s` now (`MADV_PAGEOUT`), for weights the kernels read from a layout
/// of their own: pages mapped from the model's file are dropped and read again if ever touched; anonymous pages stay
/// unless there is swap. Nothing is lost either way, and a refusal (an older kernel) only keeps the pages.
fn page_out<T>(s: &[T]) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a query with no side effect.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
        let (start, end) = (s.as_ptr() as usize, s.as_ptr() as usize + std::mem::size_of_val(s));
        let (first, last) = (start.next_multiple_of(page), end / page * page);
        if first < last {
            // SAFETY: advice on pages inside the slice; PAGEOUT keeps their contents.
            unsafe { libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_PAGEOUT) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = s;
}

/// Extends a borrow of initializer memory to the kernel's lifetime.
///
/// # Safety
/// The memory must outlive `'a`.
unsafe fn stable<'a, T>(s: &[T]) -> &'a [T] {
    unsafe { std::slice::from_raw_parts(s.as_ptr(), s.len()) }
}

pub struct Q4Kernel<'w> {
    matrix: Q4_1Matrix<'w>,
    isa: Isa,
    /// One task per thread: equal column ranges, so no thread waits on a straggler's extra task.
    tasks: usize,
    /// Output `silu(gate) · up` of the two halves of the columns instead of the product itself.
    swiglu: bool,
    /// RMS-normalize the input first (`epsilon` set).
    norm: Option<Norm<'w>>,
}

/// The normalization a `MatMulQ4_1` applies to its input (with the residual `skip`, input 3, added first when given,
/// that sum being output 1 when asked): ONNX Runtime's `SkipSimplifiedLayerNormalization`, bit for bit.
struct Norm<'w> {
    gamma: &'w [f32],
    epsilon: f32,
    /// The node has output 1.
    sum_output: bool,
}

/// Working memory of the calling thread, shared by every kernel it runs (ORT runs a session's nodes one at a time).
#[derive(Default)]
struct Scratch {
    prepared: Prepared,
    /// With SwiGLU: the product before the activation, `[rows][N]`.
    gate_up: Vec<f32>,
    /// With a normalization: the normalized input, `[rows][K]`.
    normed: Vec<f32>,
}

/// Rows from which the normalization and the rearrangement of a `MatMulQ4_1`'s input run on every thread; below, the
/// calling thread does them alone, as for a decode step's one row.
const PARALLEL_ROWS: usize = 4;

/// Scratch kept between calls; a long prompt's larger buffers are released after it.
pub(super) const SCRATCH_KEEP_BYTES: usize = 4 << 20;

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// An output pointer shared by the pool's tasks, each writing its own part (columns, rows, or attention items).
#[derive(Clone, Copy)]
pub(super) struct Out(pub(super) *mut f32);
// SAFETY: tasks write disjoint parts.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

impl Kernel for Q4Kernel<'_> {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let (k, n) = (self.matrix.k, self.matrix.n);
        let width = if self.swiglu { n / 2 } else { n };
        with_io(ctx, OP, k, width, |shape, xs, rows, ys| {
            SCRATCH.with_borrow_mut(|scratch| {
                let result = self.run(ctx, shape, xs, rows, ys, scratch);
                for v in [&mut scratch.gate_up, &mut scratch.normed] {
                    if v.capacity() * 4 > SCRATCH_KEEP_BYTES {
                        *v = Vec::new();
                    }
                }
                scratch.prepared.trim(SCRATCH_KEEP_BYTES);
                result
            })
        })
    }
}

impl Q4Kernel<'_> {
    /// The normalization (if any) and the kernel's rearrangement of the input, one task per thread from
    /// `PARALLEL_ROWS` rows (each its own rows), then the product, each task its own columns.
    fn run(
        &self,
        ctx: &ComputeContext,
        shape: &[i64],
        xs: &[f32],
        rows: usize,
        ys: &mut [f32],
        scratch: &mut Scratch,
    ) -> ort::Result<()> {
        let (k, n) = (self.matrix.k, self.matrix.n);
        // The norm's residual (input 3) and the sum it outputs (output 1), when the node has them.
        let skip = match &self.norm {
            Some(_) => ctx.input(3)?,
            None => None,
        };
        let skip = match &skip {
            Some(v) => {
                let (_, s) = v.try_extract_tensor::<f32>()?;
                if s.len() != xs.len() {
                    return Err(ort::Error::new(format!(
                        "{OP}: skip of {} values for an input of {}",
                        s.len(),
                        xs.len()
                    )));
                }
                Some(s)
            }
            None => None,
        };
        let mut sum = match &self.norm {
            Some(norm) if norm.sum_output => ctx.output(1, shape.to_vec())?,
            _ => None,
        };
        let sum = match &mut sum {
            Some(v) => Some(Out(v.try_extract_tensor_mut::<f32>()?.1.as_mut_ptr())),
            None => None,
        };
        if self.norm.is_some() {
            scratch.normed.resize(xs.len(), 0.0);
        }
        let normed = Out(scratch.normed.as_mut_ptr());
        let filled = self.matrix.prepare_begin(self.isa, rows, &mut scratch.prepared);
        let (matrix, isa, norm) = (&self.matrix, self.isa, self.norm.as_ref());
        let prepare_rows = |r0: usize, r1: usize| {
            let x = match norm {
                None => &xs[r0 * k..r1 * k],
                Some(norm) => {
                    let len = (r1 - r0) * k;
                    // SAFETY: `normed` and the sum output hold rows × K floats; each task owns its rows.
                    let (out, sum) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(normed.get().add(r0 * k), len),
                            sum.map(|s| std::slice::from_raw_parts_mut(s.get().add(r0 * k), len)),
                        )
                    };
                    let skip = skip.map(|s| &s[r0 * k..r1 * k]);
                    norm::rms_norm(&xs[r0 * k..r1 * k], skip, norm.gamma, norm.epsilon, sum, out);
                    &*out
                }
            };
            // SAFETY: `filled` is this call's, sized for `rows` rows; each task fills its own.
            unsafe { matrix.fill_rows(isa, x, r0, filled) };
        };
        let tasks = if rows >= PARALLEL_ROWS { self.tasks.min(rows) } else { 1 };
        run_tasks(ctx, tasks, &|i| prepare_rows(i * rows / tasks, (i + 1) * rows / tasks))?;
        let width = ys.len() / rows;
        if self.swiglu {
            scratch.gate_up.resize(rows * n, 0.0);
        }
        let (out, gate_up) = (Out(ys.as_mut_ptr()), Out(scratch.gate_up.as_mut_ptr()));
        let (prepared, swiglu) = (&scratch.prepared, self.swiglu);
        // Tasks split the output columns evenly; with SwiGLU a task computes its gate and its up columns.
        let tasks = self.tasks.min(width);
        let task = move |i: usize| {
            let cols = i * width / tasks..(i + 1) * width / tasks;
            if !swiglu {
                // SAFETY: `ys` holds rows × N floats and each task owns its columns.
                unsafe { matrix.columns(isa, prepared, out.get(), cols) };
                return;
            }
            let half = width;
            // SAFETY: `gate_up` holds rows × N floats, `ys` rows × N/2; each task owns its columns of both.
            unsafe {
                matrix.columns(isa, prepared, gate_up.get(), cols.clone());
                matrix.columns(isa, prepared, gate_up.get(), half + cols.start..half + cols.end);
                for r in 0..rows {
                    let row = gate_up.get().add(r * n);
                    let gate = std::slice::from_raw_parts(row.add(cols.start), cols.len());
                    let up = std::slice::from_raw_parts(row.add(half + cols.start), cols.len());
                    let y = std::slice::from_raw_parts_mut(out.get().add(r * half + cols.start), cols.len());
                    swiglu::silu_mul(gate, up, y);
                }
            }
        };
        run_tasks(ctx, tasks, &task)
    }
}

/// Runs `task(0..total)` on the session's intra-op pool (ORT's `KernelContext_ParallelFor`), with no allocation.
fn parallel_for(ctx: &ComputeContext, total: usize, task: &(dyn Fn(usize) + Sync)) -> ort::Result<()> {
    unsafe extern "C" fn call(data: *mut c_void, i: usize) {
        // SAFETY: `data` is the `&dyn Fn` passed below, alive for the whole call.
        let task = unsafe { &*data.cast::<&(dyn Fn(usize) + Sync)>() };
        task(i)
    }
    let api = ort::api();
    // SAFETY: a live kernel context; the callback and its data outlive the (blocking) call.
    let status = unsafe {
        (api.KernelContext_ParallelFor)(
            ctx.ptr(),
            call,
            total,
            0,
            (&task as *const &(dyn Fn(usize) + Sync)).cast_mut().cast(),
        )
    };
    // SAFETY: the status comes straight from the call above.
    unsafe { ort::Error::result_from_status(status) }
}
