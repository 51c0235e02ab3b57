//! The `ai.lambda_llm.Attention` operator: `GroupQueryAttention`'s packed-QKV, interleaved-rotary, shared-buffer case
//! with every query row computed on its own (`lambda_llm_kernels::attention`), so a token's bits do not depend on how
//! many rows its forward had.
//!
//! Inputs: `qkv` f32 `[B, S, (H + 2·KVH)·D]`, `past_key` and `past_value` f32 `[B, KVH, T, D]`, `seqlens_k` i32 `[B]`
//! (each sequence's length after this step, minus one), the rotary caches `cos` and `sin` f32 `[P, D/2]`; attributes
//! `num_heads` (H) and `kv_num_heads` (KVH); outputs `output` f32 `[B, S, H·D]` and `present_key`, `present_value`
//! shaped as the past ones: buffers of T positions per sequence that the new rows are written into. The engine binds
//! each present to its own past's memory, so nothing moves; a present in other memory gets the past positions
//! copied first. Right-padded batches of prompts (GroupQueryAttention allows them) are refused.

use super::custom_op::{dim, run_chunks, run_tasks, Out, SCRATCH_KEEP_BYTES};
use lambda_llm_kernels::attention;
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::{TensorElementType, ValueRef};

pub const OP: &str = "Attention";

pub struct Attention {
    pub threads: usize,
}

impl Operator for Attention {
    type Kernel<'attr> = AttentionKernel;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let f = || OperatorInput::required(TensorElementType::Float32);
        [
            f(),
            f(),
            f(),
            OperatorInput::required(TensorElementType::Int32),
            f(),
            f(),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        (0..3).map(|_| OperatorOutput::required(TensorElementType::Float32))
    }

    fn create_kernel<'attr>(&self, info: &KernelContext<'attr>) -> ort::Result<AttentionKernel> {
        let (heads, kv_heads) = (dim(info, OP, "num_heads")?, dim(info, OP, "kv_num_heads")?);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(error(format!(
                "num_heads={heads} must be a positive multiple of kv_num_heads={kv_heads}"
            )));
        }
        Ok(AttentionKernel {
            heads,
            kv_heads,
            tasks: self.threads.max(1),
        })
    }
}

pub struct AttentionKernel {
    heads: usize,
    kv_heads: usize,
    /// The most tasks on the intra-op pool.
    tasks: usize,
}

/// The calling thread's working memory, reused from call to call (no allocation per decode step).
#[derive(Default)]
struct Scratch {
    /// Rotated queries `[B·S][H·D]` (released after a long prompt).
    rotated: Vec<f32>,
    /// Each sequence's first new position.
    past: Vec<usize>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
    /// A task's scores.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn error(message: String) -> ort::Error {
    ort::Error::new(format!("{OP}: {message}"))
}

fn input<'a>(ctx: &'a ComputeContext, i: usize, what: &str) -> ort::Result<ValueRef<'a>> {
    ctx.input(i)?.ok_or_else(|| error(format!("input {what} is missing")))
}

/// The sizes of one call, checked against each other.
#[derive(Clone, Copy)]
struct Dims {
    /// Sequences, new rows per sequence, heads, key/value heads, head size, positions per sequence in the buffers.
    b: usize,
    s: usize,
    h: usize,
    kvh: usize,
    d: usize,
    cap: usize,
}

impl Dims {
    /// Floats of one sequence in a key or value buffer.
    fn per_seq(&self) -> usize {
        self.kvh * self.cap * self.d
    }

    /// Where position `pos` of key/value head `g` of sequence `seq` starts in a buffer.
    fn at(&self, seq: usize, g: usize, pos: usize) -> usize {
        seq * self.per_seq() + (g * self.cap + pos) * self.d
    }
}

impl Kernel for AttentionKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let qkv = input(ctx, 0, "qkv")?;
        let (qkv_shape, qkv) = qkv.try_extract_tensor::<f32>()?;
        // The past as pointers only: the present outputs may be the very same memory.
        let past_key = input(ctx, 1, "past_key")?;
        let (past_shape, past_k) = past_key.try_extract_tensor::<f32>()?;
        let past_value = input(ctx, 2, "past_value")?;
        let (past_v_shape, past_v) = past_value.try_extract_tensor::<f32>()?;
        let (past_k, past_v) = (past_k.as_ptr(), past_v.as_ptr());
        let seqlens = input(ctx, 3, "seqlens_k")?;
        let (_, seqlens) = seqlens.try_extract_tensor::<i32>()?;
        let cos = input(ctx, 4, "cos_cache")?;
        let (cos_shape, cos) = cos.try_extract_tensor::<f32>()?;
        let sin = input(ctx, 5, "sin_cache")?;
        let (_, sin) = sin.try_extract_tensor::<f32>()?;

        let (h, kvh) = (self.heads, self.kv_heads);
        let (b, cap, d) = match past_shape[..] {
            [b, k, cap, d] if k == kvh as i64 && b >= 0 && cap >= 0 && d > 0 && d % 16 == 0 => {
                (b as usize, cap as usize, d as usize)
            }
            _ => return Err(error(format!("past_key of shape {past_shape:?} for KVH={kvh}"))),
        };
        let s = match qkv_shape[..] {
            [qb, s, w] if qb == b as i64 && s >= 0 && w == ((h + 2 * kvh) * d) as i64 => s as usize,
            _ => {
                return Err(error(format!(
                    "qkv of shape {qkv_shape:?} for {b} sequences, H={h}, KVH={kvh}"
                )))
            }
        };
        let half = d / 2;
        if past_v_shape != past_shape
            || seqlens.len() != b
            || cos_shape.last() != Some(&(half as i64))
            || cos.len() != sin.len()
        {
            return Err(error(format!(
                "past_value {past_v_shape:?}, seqlens_k of {}, cos {cos_shape:?} do not fit past_key {past_shape:?}",
                seqlens.len()
            )));
        }
        let dims = Dims { b, s, h, kvh, d, cap };
        SCRATCH.with_borrow_mut(|Scratch { rotated, past }| {
            // Each sequence's first new position; its last must fit the buffers and the rotary caches.
            let positions = cos.len() / half;
            past.clear();
            for &len in seqlens {
                let total = usize::try_from(len).ok().map(|l| l + 1);
                let first = total.filter(|&t| t >= s && t <= cap.min(positions)).map(|t| t - s);
                past.push(first.ok_or_else(|| {
                    error(format!(
                        "a sequence of {} positions with {s} new does not fit {cap} (rotary cache {positions})",
                        i64::from(len) + 1
                    ))
                })?);
            }

            let shape = past_shape.to_vec();
            let mut out = ctx
                .output(0, vec![b as i64, s as i64, (h * d) as i64])?
                .ok_or_else(|| error("output is missing".into()))?;
            let mut present_k = ctx
                .output(1, shape.clone())?
                .ok_or_else(|| error("present_key is missing".into()))?;
            let mut present_v = ctx
                .output(2, shape)?
                .ok_or_else(|| error("present_value is missing".into()))?;
            let (_, out) = out.try_extract_tensor_mut::<f32>()?;
            let (_, pk) = present_k.try_extract_tensor_mut::<f32>()?;
            let (_, pv) = present_v.try_extract_tensor_mut::<f32>()?;
            for (present, from) in [(&mut *pk, past_k), (&mut *pv, past_v)] {
                // SAFETY: the past holds as many floats as the present (the same shape).
                unsafe { keep_past(present, from, past, dims) };
            }
            if b * s == 0 {
                return Ok(());
            }
            append(qkv, (cos, sin), past, dims, rotated, pk, pv);
            let result = attend_all(ctx, self.tasks, rotated, pk, pv, past, dims, out);
            if rotated.capacity() * 4 > SCRATCH_KEEP_BYTES {
                *rotated = Vec::new();
            }
            result
        })
    }
}

/// Copies each sequence's past positions into `present`, unless it is the past's own memory (nothing moves then).
///
/// # Safety
/// `from` must point to `present.len()` floats.
unsafe fn keep_past(present: &mut [f32], from: *const f32, past: &[usize], dims: Dims) {
    if present.as_ptr() == from {
        return;
    }
    for (seq, &p) in past.iter().enumerate() {
        for g in 0..dims.kvh {
            let at = dims.at(seq, g, 0);
            // SAFETY: inside the past's floats (the caller's promise), which are not `present`'s memory.
            let src = unsafe { std::slice::from_raw_parts(from.add(at), p * dims.d) };
            present[at..at + p * dims.d].copy_from_slice(src);
        }
    }
}

/// The new rows: their queries rotated into `rotated`, their keys rotated and their values copied into the buffers at
/// their positions.
fn append(
    qkv: &[f32],
    (cos, sin): (&[f32], &[f32]),
    past: &[usize],
    dims: Dims,
    rotated: &mut Vec<f32>,
    pk: &mut [f32],
    pv: &mut [f32],
) {
    let Dims { b, s, h, kvh, d, .. } = dims;
    let (half, width) = (d / 2, (h + 2 * kvh) * d);
    rotated.clear();
    rotated.resize(b * s * h * d, 0.0);
    for seq in 0..b {
        for row in 0..s {
            let pos = past[seq] + row;
            let (c, sn) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
            let src = &qkv[(seq * s + row) * width..][..width];
            let q = &mut rotated[(seq * s + row) * h * d..][..h * d];
            q.copy_from_slice(&src[..h * d]);
            for head in q.chunks_exact_mut(d) {
                attention::rotate(head, c, sn);
            }
            for g in 0..kvh {
                let at = dims.at(seq, g, pos);
                pk[at..at + d].copy_from_slice(&src[(h + g) * d..][..d]);
                attention::rotate(&mut pk[at..at + d], c, sn);
                pv[at..at + d].copy_from_slice(&src[(h + kvh + g) * d..][..d]);
            }
        }
    }
}

/// Every (sequence, row, head) on its own, on up to `tasks` tasks, the query heads that share a key/value head together
/// (`attention::attend_group`, which reads the keys and values once for all of them and gives each head its bits
/// alone): for prompts, each (sequence, row, key/value head) taken in turn as each task comes free (later rows have
/// more keys); for decode steps, each task a contiguous run of heads.
#[allow(clippy::too_many_arguments)]
fn attend_all(
    ctx: &ComputeContext,
    tasks: usize,
    rotated: &[f32],
    pk: &[f32],
    pv: &[f32],
    past: &[usize],
    dims: Dims,
    out: &mut [f32],
) -> ort::Result<()> {
    let Dims { b, s, h, kvh, d, .. } = dims;
    let (scale, group) = (1.0 / (d as f32).sqrt(), h / kvh);
    let dst = Out(out.as_mut_ptr());
    // Heads `first..first + count` of one (sequence, row), all of key/value head `first / group`.
    let heads = move |item: usize, count: usize| {
        SCORES.with_borrow_mut(|scores| {
            let (seq, row, head) = (item / (s * h), item / h % s, item % h);
            let n = past[seq] + row + 1;
            let at = dims.at(seq, head / group, 0);
            let qs = &rotated[item * d..][..count * d];
            // SAFETY: `out` holds B·S·H·D floats and each call writes its own heads' D of them.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.get().add(item * d), count * d) };
            attention::attend_group(d, qs, &pk[at..at + n * d], &pv[at..at + n * d], n, scale, scores, o);
        })
    };
    let items = b * s * h;
    if s == 1 {
        // Decode steps: each task a contiguous run of heads, cut where the key/value head changes, so the query heads
        // that read one key/value head mostly share a thread and its cache (ONNX Runtime's profiler: 11 % and 20 %
        // less time in attention than dealing them round-robin, in two runs).
        let tasks = tasks.min(items);
        return run_tasks(ctx, tasks, &|t| {
            let (mut first, last) = (t * items / tasks, (t + 1) * items / tasks);
            while first < last {
                let count = (group - first % group).min(last - first);
                heads(first, count);
                first += count;
            }
        });
    }
    run_chunks(ctx, tasks, b * s * kvh, &|g| heads(g * group, group))
}
