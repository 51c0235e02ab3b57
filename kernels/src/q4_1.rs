//! Exact Q4_1 matrix product `y = x · Wᵀ` with `W = d·q + m` per 32-block, computed in fp32 straight from the packed nibbles.
//!
//! Layouts: `q` is `[N][K/32][16]` bytes (`MatMulNBits`'), element `2i` of a block in the low nibble of byte `i`,
//! `2i + 1` in the high one; `dm` is `[N][K/32][2]` IEEE half-precision bit patterns, the block's scale `d` then its
//! minimum `m` (GGUF keeps both as f16, so nothing is rounded). The result is `Σ_b d·Σ_j q·x + Σ_b m·Σ_j x`, the sum the
//! reference forms from the dequantized weights, without an int8 rounding of the activations (unlike
//! `accuracy_level` 4 and llama.cpp's Q8_1 dot products). On AVX2 (`Isa::Avx2`) it reads the weights from a layout of
//! its own, one column per 32-bit lane (`q4_1/lanes.rs`), formed once per matrix (`Q4_1Matrix::settle`, else on its
//! first product there).
//!
//! `Isa::Avx512Bf16`, an explicit option, is not exact: it rounds the activations to bfloat16 for the `d·q` products
//! (the minimums' term keeps them exact) and sums 32 products per instruction (`q4_1/bf16.rs`). `Isa::Avx2Int8`, an
//! explicit option for AVX2, rounds them to 8-bit integers per block, as llama.cpp does, and sums 32 integer products
//! per instruction (`q4_1/int8.rs`).

use std::ops::Range;

pub const BLOCK: usize = 32;
/// Prefetch distances (bytes of nibbles, halves of scales) measured best of 1, 2 and 4 KiB on the bench machine.
const PREFETCH_Q: usize = 2048;
const PREFETCH_DM: usize = 256;

/// One quantized weight matrix, borrowed from the session's initializers, and the AVX2 body's layout of it, formed once
/// (`settle`, else on its first product there).
#[derive(Clone, Debug)]
pub struct Q4_1Matrix<'w> {
    pub k: usize,
    pub n: usize,
    q: &'w [u8],
    dm: &'w [u16],
    #[cfg(target_arch = "x86_64")]
    lanes: std::sync::Arc<std::sync::OnceLock<lanes::Lanes>>,
}

/// Per-call activations rearranged for the kernel, reused between calls.
#[derive(Default)]
pub struct Prepared {
    rows: usize,
    /// AVX-512: per row, per group of 4 blocks, 8 vectors of 16 lanes (see `arrange`); AVX2: per row, per block its 32
    /// activations over their weights' powers of two, then their sum (`lanes::arrange`); portable: a copy of x.
    xs: Aligned<f32>,
    /// AVX-512 BF16: per row, per group of 4 blocks, 4 vectors of 32 bfloat16 lanes (see `bf16::arrange`). AVX2 int8:
    /// per row, per group of 2 blocks, 64 bytes of rounded activations, two to a `u16` (see `int8::arrange`), their
    /// scales in `xs`.
    xh: Aligned<u16>,
    /// Per row, the sum of x over each block; AVX-512 pads each row to whole vectors of 16 blocks with zeros (AVX2 int8:
    /// of 8; AVX2 keeps its sums in `xs`), and AVX-512 BF16 follows each such vector with the sums of the bfloat16
    /// activations of the same 16 blocks.
    sums: Aligned<f32>,
}

/// A buffer of f32 or u16 that starts on a 64-byte boundary (a cache line, an AVX-512 register), so that no vector
/// load of a row straddles two lines (rows are whole vectors): 120 layers × 30 rows, 2 threads: 39.3–39.5 against
/// 38.5–38.8 ms with a plain `Vec`.
struct Aligned<T> {
    lines: Vec<Line>,
    len: usize,
    kind: std::marker::PhantomData<T>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl<T> Default for Aligned<T> {
    fn default() -> Self {
        Self {
            lines: Vec::new(),
            len: 0,
            kind: std::marker::PhantomData,
        }
    }
}

impl<T: Copy> Aligned<T> {
    /// `len` values: those kept keep their value, new ones are zeros (all-zero bytes, for f32 and u16 alike).
    fn resize(&mut self, len: usize) {
        self.lines.resize((len * size_of::<T>()).div_ceil(64), Line([0; 64]));
        self.len = len;
    }

    fn as_ptr(&self) -> *const T {
        self.lines.as_ptr().cast()
    }

    fn as_mut_ptr(&mut self) -> *mut T {
        self.lines.as_mut_ptr().cast()
    }

    fn as_slice(&self) -> &[T] {
        // SAFETY: the lines hold `len` initialized values of T (plain bytes for f32 and u16).
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    fn capacity_bytes(&self) -> usize {
        self.lines.capacity() * 64
    }
}

/// Where [`Q4_1Matrix::fill_rows`] writes a call's rows: pointers into the buffers of the `Prepared` that
/// [`Q4_1Matrix::prepare_begin`] sized, shared by the threads that fill disjoint rows.
#[derive(Clone, Copy, Debug)]
pub struct PreparedRows {
    xs: *mut f32,
    xh: *mut u16,
    sums: *mut f32,
}

// SAFETY: the fills write disjoint rows (`fill_rows`' contract).
unsafe impl Send for PreparedRows {}
unsafe impl Sync for PreparedRows {}

/// Which instructions run the product; chosen once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 in f32: each nibble looked up as a float.
    Avx512,
    /// AVX-512 with its BF16 dot product: the activations rounded to bfloat16 (2⁻⁸ relative), 32 products per
    /// instruction; faster, not exact (see `bf16`). Only on request: `detect` never picks it.
    Avx512Bf16,
    /// AVX2 with FMA and F16C, for x86-64 CPUs without AVX-512: the exact f32 body on 256-bit registers, on its own
    /// layout of the weights (`lanes`).
    Avx2,
    /// AVX2 with the activations rounded to 8-bit integers per block of 32 (llama.cpp's rounding of them), 32 integer
    /// products per instruction; faster, not exact (see `int8`). Only on request: `detect` never picks it.
    Avx2Int8,
    Portable,
}

impl Isa {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Isa::Avx512;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
        Isa::Portable
    }

    /// Every exact ISA this CPU runs, the portable code first (an AVX-512 CPU runs AVX2 too).
    pub fn available() -> Vec<Self> {
        let mut isas = vec![Isa::Portable];
        if matches!(Self::detect(), Isa::Avx2 | Isa::Avx512) {
            isas.push(Isa::Avx2);
        }
        if Self::detect() == Isa::Avx512 {
            isas.push(Isa::Avx512);
        }
        isas
    }

    /// `Avx512Bf16` where the CPU has AVX-512 and its BF16 dot product, else `None`.
    pub fn detect_bf16() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if Self::detect() == Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512bf16") {
            return Some(Isa::Avx512Bf16);
        }
        None
    }

    /// `Avx2Int8` where the CPU has AVX2, FMA and F16C (every CPU `detect` gives `Avx2` or `Avx512`), else `None`.
    pub fn detect_int8() -> Option<Self> {
        matches!(Self::detect(), Isa::Avx2 | Isa::Avx512).then_some(Isa::Avx2Int8)
    }
}

impl Prepared {
    /// Releases buffers grown past `bytes` (by a long prompt), so they are not held for the process's life.
    pub fn trim(&mut self, bytes: usize) {
        if self.xs.capacity_bytes() > bytes {
            self.xs = Aligned::default();
        }
        if self.xh.capacity_bytes() > bytes {
            self.xh = Aligned::default();
        }
        if self.sums.capacity_bytes() > bytes {
            self.sums = Aligned::default();
        }
    }
}

impl<'w> Q4_1Matrix<'w> {
    /// Checks every length against `k` and `n`.
    pub fn new(k: usize, n: usize, q: &'w [u8], dm: &'w [u16]) -> Result<Self, String> {
        check_shape(k, n, &[("weights", q.len(), 16), ("scales and mins", dm.len(), 2)])?;
        Ok(Self {
            k,
            n,
            q,
            dm,
            #[cfg(target_arch = "x86_64")]
            lanes: Default::default(),
        })
    }

    fn blocks(&self) -> usize {
        self.k / BLOCK
    }

    fn groups(&self) -> usize {
        self.blocks().div_ceil(4)
    }

    /// Forms now, rather than on the first product, what `isa` reads instead of the packed weights (AVX2: its lanes),
    /// and says whether `isa` reads the packed weights no more (so their pages may be let go).
    pub fn settle(&self, isa: Isa) -> bool {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                self.lanes();
                true
            }
            _ => false,
        }
    }

    /// The AVX2 body's layout of this matrix, formed on first use.
    #[cfg(target_arch = "x86_64")]
    fn lanes(&self) -> &lanes::Lanes {
        self.lanes.get_or_init(|| lanes::Lanes::new(self))
    }

    /// Column `c`'s packed nibbles and its (scale, minimum) halves, from its first block.
    fn column(&self, c: usize) -> (*const u8, *const u16) {
        let nb = self.blocks();
        (self.q[c * nb * 16..].as_ptr(), self.dm[c * nb * 2..].as_ptr())
    }

    /// Vectors of 16 block minimums per column.
    fn min_vectors(&self) -> usize {
        self.blocks().div_ceil(16)
    }

    /// Rearranges `rows` rows of `x` (`[rows][K]`) for `columns`.
    pub fn prepare(&self, isa: Isa, x: &[f32], rows: usize, p: &mut Prepared) {
        debug_assert_eq!(x.len(), rows * self.k);
        let out = self.prepare_begin(isa, rows, p);
        // SAFETY: `out` is this call's, and one caller fills every row.
        unsafe { self.fill_rows(isa, x, 0, out) };
    }

    /// Sizes `p` for `rows` rows on `isa` and returns where [`Self::fill_rows`] writes them, so that several threads
    /// can each fill their own rows. What `p` holds from before is overwritten, not cleared first.
    pub fn prepare_begin(&self, isa: Isa, rows: usize, p: &mut Prepared) -> PreparedRows {
        let (ng, nh) = (self.groups(), self.min_vectors());
        p.rows = rows;
        let (xs, xh, sums) = match isa {
            Isa::Portable => (rows * self.k, 0, rows * self.blocks()),
            Isa::Avx512 => {
                // `fill_rows` runs AVX-512 for it: refuse the ISA where the instructions are missing.
                assert!(Isa::detect() == Isa::Avx512, "Isa::Avx512 on a CPU without AVX-512");
                (rows * ng * 128, 0, rows * nh * 16)
            }
            Isa::Avx512Bf16 => {
                // A caller may name this ISA on any CPU: refuse it where the instructions are missing.
                assert!(
                    Isa::detect_bf16().is_some(),
                    "Isa::Avx512Bf16 on a CPU without AVX-512 BF16"
                );
                (0, rows * ng * 128, rows * nh * 32)
            }
            Isa::Avx2 => {
                assert!(
                    matches!(Isa::detect(), Isa::Avx2 | Isa::Avx512),
                    "Isa::Avx2 on a CPU without AVX2, FMA and F16C"
                );
                (rows * self.blocks() * lanes::PER_BLOCK, 0, 0)
            }
            Isa::Avx2Int8 => {
                assert!(
                    Isa::detect_int8().is_some(),
                    "Isa::Avx2Int8 on a CPU without AVX2, FMA and F16C"
                );
                let (xh, xs, sums) = int8::row_sizes(self.blocks());
                (rows * xs, rows * xh, rows * sums)
            }
        };
        p.xs.resize(xs);
        p.xh.resize(xh);
        p.sums.resize(sums);
        PreparedRows {
            xs: p.xs.as_mut_ptr(),
            xh: p.xh.as_mut_ptr(),
            sums: p.sums.as_mut_ptr(),
        }
    }

    /// Rearranges the whole rows of `x` as rows `first..` of the call `out` was made for (every value of those rows
    /// is written).
    ///
    /// # Safety
    /// `out` must come from [`Self::prepare_begin`] on this matrix with the same `isa`, for at least
    /// `first + x.len() / K` rows; its `Prepared` must not be used otherwise until every fill is done, and no two fills
    /// may write the same row.
    pub unsafe fn fill_rows(&self, isa: Isa, x: &[f32], first: usize, out: PreparedRows) {
        let (k, nb, ng, nh) = (self.k, self.blocks(), self.groups(), self.min_vectors());
        debug_assert_eq!(x.len() % k, 0);
        for (i, xr) in x.chunks_exact(k).enumerate() {
            let r = first + i;
            // SAFETY (all three arms): the caller owns row r of the buffers `prepare_begin` sized.
            match isa {
                Isa::Portable => {
                    let (xs, sums) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(out.xs.add(r * k), k),
                            std::slice::from_raw_parts_mut(out.sums.add(r * nb), nb),
                        )
                    };
                    xs.copy_from_slice(xr);
                    block_sums(xr, sums);
                }
                Isa::Avx512 => {
                    // Row r, group g, shift t (nibble t of each 32-bit lane), lane l: the lane holds bytes
                    // 4(l%4)..+4 of block 4g + l/4, and nibble t of it is element 8(l%4) + t of that block.
                    let (xs, sums) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(out.xs.add(r * ng * 128), ng * 128),
                            std::slice::from_raw_parts_mut(out.sums.add(r * nh * 16), nh * 16),
                        )
                    };
                    // The padding to whole vectors of 16 blocks: zeros.
                    sums[nb..].fill(0.0);
                    block_sums(xr, sums);
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `prepare_begin` checked that the CPU has the instructions.
                    unsafe {
                        avx512::arrange(xr, nb, xs)
                    };
                    #[cfg(not(target_arch = "x86_64"))]
                    arrange(xr, nb, xs);
                }
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Bf16 => {
                    let (xh, sums) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(out.xh.add(r * ng * 128), ng * 128),
                            std::slice::from_raw_parts_mut(out.sums.add(r * nh * 32), nh * 32),
                        )
                    };
                    // SAFETY: `prepare_begin` checked that the CPU has the instructions.
                    unsafe { bf16::arrange(xr, nb, xh, sums) };
                }
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => {
                    let xs = unsafe {
                        std::slice::from_raw_parts_mut(out.xs.add(r * nb * lanes::PER_BLOCK), nb * lanes::PER_BLOCK)
                    };
                    lanes::arrange(xr, nb, xs);
                }
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Int8 => {
                    let (xh, xs, h) = int8::row_sizes(nb);
                    let (xb, scales, sums) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(out.xh.add(r * xh).cast::<u8>(), 2 * xh),
                            std::slice::from_raw_parts_mut(out.xs.add(r * xs), xs),
                            std::slice::from_raw_parts_mut(out.sums.add(r * h), h),
                        )
                    };
                    // SAFETY: `prepare_begin` checked that the CPU has the instructions.
                    unsafe { int8::arrange(xr, nb, xb, scales, sums) };
                }
                #[cfg(not(target_arch = "x86_64"))]
                Isa::Avx512Bf16 | Isa::Avx2 | Isa::Avx2Int8 => {
                    unreachable!("AVX-512 and AVX2 are detected on x86-64 only")
                }
            }
        }
    }

    /// Writes `y[r][c]` for every prepared row and every column in `cols` (`y` is `[rows][N]`).
    ///
    /// # Safety
    /// `isa` must be one `Isa::detect`, `Isa::detect_bf16` or `Isa::detect_int8` returned, `p` must come from `prepare` on this matrix's
    /// shape with the same `isa`, `y` must point to `rows × N` floats, and no other thread may touch these columns
    /// meanwhile.
    pub unsafe fn columns(&self, isa: Isa, p: &Prepared, y: *mut f32, cols: Range<usize>) {
        debug_assert!(cols.end <= self.n);
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::columns::<avx512::Exact>(self, p, y, cols) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => unsafe { avx512::columns::<bf16::Bf16>(self, p, y, cols) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { lanes::columns(self, self.lanes(), p, y, cols) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Int8 => unsafe { int8::columns(self, p, y, cols) },
            _ => unsafe { self.columns_portable(p, y, cols) },
        }
    }

    unsafe fn columns_portable(&self, p: &Prepared, y: *mut f32, cols: Range<usize>) {
        let (k, n, nb) = (self.k, self.n, self.blocks());
        for r in 0..p.rows {
            let xr = &p.xs.as_slice()[r * k..(r + 1) * k];
            for c in cols.clone() {
                let mut acc = 0f32;
                for b in 0..nb {
                    let bytes = &self.q[(c * nb + b) * 16..(c * nb + b + 1) * 16];
                    let xb = &xr[b * BLOCK..(b + 1) * BLOCK];
                    let dot: f32 = bytes
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| (v & 15) as f32 * xb[2 * i] + (v >> 4) as f32 * xb[2 * i + 1])
                        .sum();
                    let (d, m) = (
                        f16_to_f32(self.dm[(c * nb + b) * 2]),
                        f16_to_f32(self.dm[(c * nb + b) * 2 + 1]),
                    );
                    acc += d * dot + m * p.sums.as_slice()[r * nb + b];
                }
                unsafe { *y.add(r * n + c) = acc };
            }
        }
    }
}

/// Checks `K` (a positive multiple of 32) and `N`, and that each `(what, length, values per block)` holds `N × K/32`
/// blocks.
pub fn check_shape(k: usize, n: usize, parts: &[(&str, usize, usize)]) -> Result<(), String> {
    if k == 0 || n == 0 || !k.is_multiple_of(BLOCK) {
        return Err(format!(
            "K={k} must be a positive multiple of {BLOCK} and N={n} positive"
        ));
    }
    for &(what, got, per_block) in parts {
        let expected = n * (k / BLOCK) * per_block;
        if got != expected {
            return Err(format!("{what}: {got} values, expected {expected} for K={k}, N={n}"));
        }
    }
    Ok(())
}

/// The sum of each block of a row, into the first `K/32` of `sums`.
fn block_sums(xr: &[f32], sums: &mut [f32]) {
    for (s, xb) in sums.iter_mut().zip(xr.chunks_exact(BLOCK)) {
        *s = xb.iter().sum::<f32>();
    }
}

/// `(first column, width)` for steps of `step` columns over `cols`, then single columns for the rest.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the AVX2 drivers use it
pub(crate) fn column_steps(cols: Range<usize>, step: usize) -> impl Iterator<Item = (usize, usize)> {
    let whole = cols.start + (cols.end - cols.start) / step * step;
    (cols.start..whole)
        .step_by(step)
        .map(move |c| (c, step))
        .chain((whole..cols.end).map(|c| (c, 1)))
}

/// `(first row, count)` for tiles of at most `max` rows covering `rows`.
pub fn row_tiles(rows: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows).step_by(max).map(move |r| (r, (rows - r).min(max)))
}

/// One row of x in the kernel's order: group g of 4 blocks, shift t (nibble t of each 32-bit lane of the 64 bytes), lane
/// l: the lane holds bytes 4(l%4)..+4 of block 4g + l/4, and nibble t of it is element 8(l%4) + t of that block. Each
/// value is multiplied by `NIBBLE_SCALE[t]`, the inverse of the power of two its weight carries (see `scaled`). A tail
/// group of 1 or 2 blocks fills 4 vectors (`scaled_tail`) and zeros.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))] // there the AVX-512 arm runs `avx512::arrange`; tests compare
fn arrange(xr: &[f32], nb: usize, out: &mut [f32]) {
    for (g, group) in out.chunks_exact_mut(128).enumerate() {
        arrange_group(xr, nb, g, group);
    }
}

/// Group `g` of `arrange`: 128 values.
fn arrange_group(xr: &[f32], nb: usize, g: usize, group: &mut [f32]) {
    let at = |b: usize, e: usize, scale: f32| if b < nb { xr[b * BLOCK + e] * scale } else { 0.0 };
    if nb - 4 * g <= 2 {
        // A tail group (`scaled_tail`): vector t, lane l holds nibble 2t + l/8 of 32-bit lane l%8, at `TAIL_SCALE`.
        for t in 0..4 {
            for l in 0..16 {
                let (lane, nibble) = (l % 8, 2 * t + l / 8);
                let scale = TAIL_SCALE[t][l / 8];
                group[t * 16 + l] = at(4 * g + lane / 4, 8 * (lane % 4) + nibble, scale);
            }
        }
        group[64..].fill(0.0);
        return;
    }
    for t in 0..8 {
        for l in 0..16 {
            group[t * 16 + l] = at(4 * g + l / 4, 8 * (l % 4) + t, NIBBLE_SCALE[t]);
        }
    }
}

/// `scaled` reads nibble t where it lies in its 32-bit lane (bits 4t.., t ≤ 4) or 12 bits lower (t ≥ 5), so its weight
/// is `16^s·q·d` with `s = t` or `t − 3`; the activation it meets is multiplied by `16^−s`, which is exact, so every
/// product `q·d·x` is the very float it was (unless |x| < 2⁻¹¹⁰, where `16^−s·x` would be subnormal).
const NIBBLE_SCALE: [f32; 8] = [
    1.0,
    1.0 / 16.0,
    1.0 / 256.0,
    1.0 / 4096.0,
    1.0 / 65536.0,
    1.0 / 256.0,
    1.0 / 4096.0,
    1.0 / 65536.0,
];

/// A tail group's `NIBBLE_SCALE`: vector t, lanes 0–7 then 8–15 (`scaled_tail`: s = 0, 1 | 2, 3 | 1, 2 | 3, 4).
const TAIL_SCALE: [[f32; 2]; 4] = [
    [1.0, 1.0 / 16.0],
    [1.0 / 256.0, 1.0 / 4096.0],
    [1.0 / 16.0, 1.0 / 256.0],
    [1.0 / 4096.0, 1.0 / 65536.0],
];

/// An IEEE half-precision bit pattern as f32 (exact; the weights hold no infinities or NaNs, but they convert too).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let frac = (h & 0x3FF) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: normalize the fraction.
            let shift = frac.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | (((frac << shift) & 0x3FF) << 13)
        }
        (31, _) => sign | 0x7F80_0000 | (frac << 13),
        _ => sign | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod bf16;
#[cfg(target_arch = "x86_64")]
mod int8;
#[cfg(target_arch = "x86_64")]
mod lanes;

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::reduce as reduce8;

#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::reduce;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512 drivers (`columns`, `panels`), shared by both bodies through `Body`, and the exact f32 body
    //! (`Exact`): 4 blocks (64 bytes of nibbles) per step, nibble t of every 32-bit lane turned into `16^s·q·d` with
    //! one `vpternlogd` and one FMA (one shift per step for the top three nibbles; the activations carry `16^−s`), up
    //! to 4 rows sharing one dequantization; from 9 rows (`PANEL_ROWS`), each column is dequantized once per call into
    //! a panel that every row reads, with the same FMAs in the same order. The BF16 body is `bf16::Bf16`.
    use super::{arrange_group, row_tiles, Prepared, Q4_1Matrix, NIBBLE_SCALE, PREFETCH_DM, PREFETCH_Q};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// A kernel body, run by the shared drivers [`columns`] and `panels`: tiles of up to 4 rows sharing each group's
    /// vectors, and, from `PANEL_ROWS` rows, each column's vectors formed once into a panel that passes of up to
    /// `PANEL_PASS` rows over 4 columns read. Both must run each row's operations in the same order, so a row's result
    /// does not depend on the rows beside it (a sequence gets the same bits alone, in a batch, or after a prefix-cache
    /// hit).
    pub(super) trait Body {
        /// Rows from which a call forms panels.
        const PANEL_ROWS: usize;
        /// Rows per pass over a panel (of `PANEL_COLS` columns).
        const PANEL_PASS: usize;
        /// Panel vectors per column.
        fn per_col(w: &Q4_1Matrix) -> usize;
        /// Rows `r0..r0 + R`, every column in `cols`.
        unsafe fn tile<const R: usize>(w: &Q4_1Matrix, p: &Prepared, r0: usize, y: *mut f32, cols: Range<usize>);
        /// Column `c`'s vectors, exactly as `tile` forms them, into `dst` (`per_col` vectors).
        unsafe fn dequantize(w: &Q4_1Matrix, c: usize, dst: &mut [__m512]);
        /// Rows `r0..r0 + R` against the `C` columns from `c0` in `panel`, in `tile`'s order.
        unsafe fn pass<const R: usize, const C: usize>(
            w: &Q4_1Matrix,
            p: &Prepared,
            panel: &[__m512],
            r0: usize,
            y: *mut f32,
            c0: usize,
        );
    }

    /// The exact f32 body of this module.
    pub(super) struct Exact;

    impl Body for Exact {
        /// 8 rows (a batch of 8 streams) run faster as two tiles of 4: 120 layers on 2 threads, 12.4 against 12.9 ms
        /// in panels; 9 rows faster in panels, 13.9 against 15.1–15.4.
        const PANEL_ROWS: usize = 9;
        const PANEL_PASS: usize = 4;

        fn per_col(w: &Q4_1Matrix) -> usize {
            w.groups() * 8 + w.min_vectors()
        }

        /// Up to 4 rows sharing each group's dequantization: per row 8 FMAs per 128 weights in two chains, then the
        /// minimums' term `Σ_b m_b·Σx_b` 16 blocks per FMA.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
        unsafe fn tile<const R: usize>(w: &Q4_1Matrix, p: &Prepared, r0: usize, y: *mut f32, cols: Range<usize>) {
            let nb = w.blocks();
            let (ng, nh) = (w.groups(), w.min_vectors());
            let stride = ng * 128;
            let xs = unsafe { p.xs.as_ptr().add(r0 * stride) };
            let sums = unsafe { p.sums.as_ptr().add(r0 * nh * 16) };
            for c in cols {
                let (qrow, dmrow) = w.column(c);
                let mut acc = [[_mm512_setzero_ps(); 2]; R];
                let wide = full_groups(nb);
                for g in 0..wide {
                    let (v, dv) = unsafe { group(qrow, dmrow, g, nb - 4 * g) };
                    unsafe { add_group(&mut acc, &scaled(v, dv, R > 1), xs.add(g * 128), stride) };
                }
                if wide < ng {
                    let (v, dv) = unsafe { tail_group(qrow, dmrow, wide, nb - 4 * wide) };
                    unsafe { add_group(&mut acc, &scaled_tail(v, dv, R > 1), xs.add(wide * 128), stride) };
                }
                let sum: [__m512; R] = std::array::from_fn(|r| _mm512_add_ps(acc[r][0], acc[r][1]));
                let mut minus = [_mm512_setzero_ps(); R];
                for h in 0..nh {
                    let mv = unsafe { block_scales(dmrow, nb, h).1 };
                    for (r, m) in minus.iter_mut().enumerate() {
                        *m = _mm512_fmadd_ps(mv, unsafe { _mm512_loadu_ps(sums.add(r * nh * 16 + h * 16)) }, *m);
                    }
                }
                for r in 0..R {
                    unsafe { put(w, y, r0 + r, c, sum[r], minus[r]) };
                }
            }
        }

        /// Column `c`'s weight vectors and minimum vectors, exactly as `tile` forms them, into `dst`.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
        unsafe fn dequantize(w: &Q4_1Matrix, c: usize, dst: &mut [__m512]) {
            let nb = w.blocks();
            let (qrow, dmrow) = w.column(c);
            let (weights, mins) = dst.split_at_mut(w.groups() * 8);
            let wide = full_groups(nb);
            for (g, out) in weights.chunks_exact_mut(8).enumerate() {
                if g < wide {
                    let (v, dv) = unsafe { group(qrow, dmrow, g, nb - 4 * g) };
                    out.copy_from_slice(&scaled(v, dv, true));
                } else {
                    let (v, dv) = unsafe { tail_group(qrow, dmrow, g, nb - 4 * g) };
                    out[..4].copy_from_slice(&scaled_tail(v, dv, true));
                    out[4..].fill(_mm512_setzero_ps());
                }
            }
            for (h, out) in mins.iter_mut().enumerate() {
                *out = unsafe { block_scales(dmrow, nb, h).1 };
            }
        }

        /// Rows `r0..r0 + R` against the `C` columns from `c0` in `panel`: per (row, column), `tile`'s chains.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
        #[allow(clippy::needless_range_loop)] // columns outside rows: each weight vector is loaded once per row pass
        unsafe fn pass<const R: usize, const C: usize>(
            w: &Q4_1Matrix,
            p: &Prepared,
            panel: &[__m512],
            r0: usize,
            y: *mut f32,
            c0: usize,
        ) {
            let (ng, nh) = (w.groups(), w.min_vectors());
            let stride = ng * 128;
            let per_col = ng * 8 + nh;
            let xs = unsafe { p.xs.as_ptr().add(r0 * stride) };
            let sums = unsafe { p.sums.as_ptr().add(r0 * nh * 16) };
            let col = |c: usize| unsafe { panel.as_ptr().add(c * per_col) };
            let wide = full_groups(w.blocks());
            // The tile's two chains (even and odd t) are independent until they are added, so each runs over the whole
            // column in turn: one accumulator per (row, column) at a time. Vector v of a chain is vector 2v + chain of
            // the column, a tail group's 4 included.
            let vectors = 4 * wide + if wide < ng { 2 } else { 0 };
            let mut chains = [[[_mm512_setzero_ps(); C]; R]; 2];
            for (chain, acc) in chains.iter_mut().enumerate() {
                for v in 0..vectors {
                    let i = 2 * v + chain;
                    let x: [__m512; R] =
                        std::array::from_fn(|r| unsafe { _mm512_loadu_ps(xs.add(r * stride + 16 * i)) });
                    for c in 0..C {
                        let wt = unsafe { *col(c).add(i) };
                        for r in 0..R {
                            acc[r][c] = _mm512_fmadd_ps(wt, x[r], acc[r][c]);
                        }
                    }
                }
            }
            let mut minus = [[_mm512_setzero_ps(); C]; R];
            for h in 0..nh {
                let s: [__m512; R] =
                    std::array::from_fn(|r| unsafe { _mm512_loadu_ps(sums.add(r * nh * 16 + h * 16)) });
                for c in 0..C {
                    let mv = unsafe { *col(c).add(ng * 8 + h) };
                    for r in 0..R {
                        minus[r][c] = _mm512_fmadd_ps(mv, s[r], minus[r][c]);
                    }
                }
            }
            let total =
                |r: usize, c: usize| _mm512_add_ps(_mm512_add_ps(chains[0][r][c], chains[1][r][c]), minus[r][c]);
            if C == 4 {
                // Output (r, c) is vector 4c + r; rows past R are zeros and not stored.
                let v: [__m512; 16] = std::array::from_fn(|i| {
                    if i % 4 < R {
                        total(i % 4, i / 4)
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                let lanes = reduce16(v);
                for r in 0..R {
                    unsafe { put4(w, y, r0 + r, c0, lanes, r) };
                }
            } else {
                for r in 0..R {
                    for c in 0..C {
                        unsafe { *y.add((r0 + r) * w.n + c0 + c) = reduce(total(r, c)) };
                    }
                }
            }
        }
    }

    /// A group's weight vectors `q` times each row's activations for it (row r at `xg + r·stride`), vector t into the
    /// row's chain t % 2: the tile's step, for a full group (8 vectors) and a tail group (4) alike.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn add_group<const R: usize, const T: usize>(
        acc: &mut [[__m512; 2]; R],
        q: &[__m512; T],
        xg: *const f32,
        stride: usize,
    ) {
        for (r, chains) in acc.iter_mut().enumerate() {
            let xr = unsafe { xg.add(r * stride) };
            for (t, q) in q.iter().enumerate() {
                chains[t % 2] = _mm512_fmadd_ps(*q, unsafe { _mm512_loadu_ps(xr.add(16 * t)) }, chains[t % 2]);
            }
        }
    }

    /// `super::arrange`, the same values: a group of 4 whole blocks is x's 128 values as a 16 × 8 matrix (row l =
    /// values 8l..8l + 8) transposed, so that vector t holds column t, times `NIBBLE_SCALE[t]`. The transpose takes
    /// three rounds of 8 two-vector permutes, each moving one bit of the row index from the vector number to the lane
    /// (`TRANSPOSE`), instead of 128 scalar moves (a decode step's 120 inputs, block sums included: 55 → 33 µs on one
    /// thread, on the calling thread while the others wait).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn arrange(xr: &[f32], nb: usize, out: &mut [f32]) {
        let idx = |i: usize| unsafe { _mm512_loadu_si512(TRANSPOSE[i].as_ptr().cast()) };
        let (i1, i2, i3) = ([idx(0), idx(1)], [idx(2), idx(3)], [idx(4), idx(5)]);
        for (g, group) in out.chunks_exact_mut(128).enumerate() {
            if nb - 4 * g < 4 {
                arrange_group(xr, nb, g, group);
                continue;
            }
            // SAFETY: blocks 4g..4g + 4 are inside the row, and the group holds 128 floats.
            let (xg, dst) = (unsafe { xr.as_ptr().add(g * 128) }, group.as_mut_ptr());
            // v[j]: rows 2j and 2j + 1, j = 4·j2 + 2·j1 + j0.
            let v: [__m512; 8] = std::array::from_fn(|j| unsafe { _mm512_loadu_ps(xg.add(16 * j)) });
            // w[4·t2 + 2·j1 + j0]: the values with column bit t2, from v[j2 = 0] and v[j2 = 1].
            let w: [__m512; 8] = std::array::from_fn(|n| {
                let (t2, j) = (n >> 2, n & 3);
                _mm512_permutex2var_ps(v[j], i1[t2], v[4 + j])
            });
            // x[4·t2 + 2·t1 + j0]: column bits t2 t1, from w[j1 = 0] and w[j1 = 1].
            let x: [__m512; 8] = std::array::from_fn(|n| {
                let (t2, t1, j0) = (n >> 2, (n >> 1) & 1, n & 1);
                _mm512_permutex2var_ps(w[4 * t2 + j0], i2[t1], w[4 * t2 + 2 + j0])
            });
            for (t, &scale) in NIBBLE_SCALE.iter().enumerate() {
                let (pair, t0) = (t & !1, t & 1);
                let column = _mm512_permutex2var_ps(x[pair], i3[t0], x[pair + 1]);
                unsafe { _mm512_storeu_ps(dst.add(16 * t), _mm512_mul_ps(column, _mm512_set1_ps(scale))) };
            }
        }
    }

    /// The permutes of `arrange`'s transpose: for each round, the index vector of each value of the bit it fixes.
    /// Value (row l = 2j + h, column t) sits at lane 8h + t of v[j] (j = 4·j2 + 2·j1 + j0, t = 4·t2 + 2·t1 + t0),
    /// lane 8·j2 + 4h + 2·t1 + t0 of w[t2, j1, j0], lane 8·j2 + 4·j1 + 2h + t0 of x[t2, t1, j0] and lane l of
    /// column t; an index is 16·(the second vector) + the lane there.
    const TRANSPOSE: [[i32; 16]; 6] = {
        let mut idx = [[0i32; 16]; 6];
        let mut bit = 0;
        while bit < 2 {
            let mut q = 0;
            while q < 16 {
                let (a, b, c, d) = ((q >> 3) & 1, (q >> 2) & 1, (q >> 1) & 1, q & 1);
                // Round 1 (column bit t2 = bit): lane q = (j2, h, t1, t0) from lane 8h + 4·t2 + 2·t1 + t0 of v[j2].
                idx[bit][q] = (16 * a + 8 * b + 4 * bit + 2 * c + d) as i32;
                // Round 2 (t1 = bit): lane q = (j2, j1, h, t0) from lane 8·j2 + 4h + 2·t1 + t0 of w[j1].
                idx[2 + bit][q] = (16 * b + 8 * a + 4 * c + 2 * bit + d) as i32;
                // Round 3 (t0 = bit): lane q = (j2, j1, j0, h) from lane 8·j2 + 4·j1 + 2h + t0 of x[j0].
                idx[4 + bit][q] = (16 * c + 8 * a + 4 * b + 2 * d + bit) as i32;
                q += 1;
            }
            bit += 1;
        }
        idx
    };

    /// Every column in `cols` for every prepared row, on body `B`.
    pub(super) unsafe fn columns<B: Body>(w: &Q4_1Matrix, p: &Prepared, y: *mut f32, cols: Range<usize>) {
        if p.rows >= B::PANEL_ROWS {
            return unsafe { panels::<B>(w, p, y, cols) };
        }
        for (r, rows) in row_tiles(p.rows, 4) {
            unsafe {
                match rows {
                    1 => B::tile::<1>(w, p, r, y, cols.clone()),
                    2 => B::tile::<2>(w, p, r, y, cols.clone()),
                    3 => B::tile::<3>(w, p, r, y, cols.clone()),
                    _ => B::tile::<4>(w, p, r, y, cols.clone()),
                }
            }
        }
    }

    /// Columns per panel and rows per pass over it.
    const PANEL_COLS: usize = 4;

    thread_local! {
        /// The formed vectors of `PANEL_COLS` columns (`Body::dequantize`'s).
        static PANEL: std::cell::RefCell<Vec<__m512>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// Many rows: each block of `PANEL_COLS` columns is formed once into a panel (the very vectors `tile` makes), then
    /// every row runs `tile`'s operations, in `tile`'s order, against it, so a row's bits match `tile`'s.
    unsafe fn panels<B: Body>(w: &Q4_1Matrix, p: &Prepared, y: *mut f32, cols: Range<usize>) {
        let per_col = B::per_col(w);
        PANEL.with_borrow_mut(|panel| {
            panel.resize(PANEL_COLS * per_col, unsafe { std::mem::zeroed() });
            let mut c = cols.start;
            while c < cols.end {
                let width = (cols.end - c).min(PANEL_COLS);
                for (i, dst) in panel.chunks_exact_mut(per_col).take(width).enumerate() {
                    unsafe { B::dequantize(w, c + i, dst) };
                }
                for (r, rows) in row_tiles(p.rows, B::PANEL_PASS) {
                    let one = |i: usize| &panel[i * per_col..];
                    unsafe {
                        match (rows, width) {
                            (4, 4) => B::pass::<4, 4>(w, p, panel, r, y, c),
                            (3, 4) => B::pass::<3, 4>(w, p, panel, r, y, c),
                            (2, 4) => B::pass::<2, 4>(w, p, panel, r, y, c),
                            (1, 4) => B::pass::<1, 4>(w, p, panel, r, y, c),
                            (4, _) => (0..width).for_each(|i| B::pass::<4, 1>(w, p, one(i), r, y, c + i)),
                            (3, _) => (0..width).for_each(|i| B::pass::<3, 1>(w, p, one(i), r, y, c + i)),
                            (2, _) => (0..width).for_each(|i| B::pass::<2, 1>(w, p, one(i), r, y, c + i)),
                            _ => (0..width).for_each(|i| B::pass::<1, 1>(w, p, one(i), r, y, c + i)),
                        }
                    }
                }
                c += width;
            }
        });
    }

    /// Group `g` of a column (`left` blocks from it to the column's end): its 4 blocks of nibbles (64 bytes) and each
    /// lane's scale (lane l: block 4g + l/4), zeros past the last block; it also fetches a few columns ahead, as the
    /// weights stream from memory once per call.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub(super) unsafe fn group(qrow: *const u8, dmrow: *const u16, g: usize, left: usize) -> (__m512i, __m512) {
        _mm_prefetch::<_MM_HINT_T0>(qrow.wrapping_add(g * 64 + PREFETCH_Q).cast());
        _mm_prefetch::<_MM_HINT_T0>(dmrow.wrapping_add(g * 8 + PREFETCH_DM).cast());
        let (v, dm) = unsafe {
            if left >= 4 {
                (
                    _mm512_loadu_si512(qrow.add(g * 64).cast()),
                    _mm_loadu_si128(dmrow.add(g * 8).cast()),
                )
            } else {
                let bytes = (1u64 << (16 * left)) - 1;
                let halves = (1u8 << (2 * left)) - 1;
                (
                    _mm512_maskz_loadu_epi8(bytes, qrow.add(g * 64).cast()),
                    _mm_maskz_loadu_epi16(halves, dmrow.add(g * 8).cast()),
                )
            }
        };
        // The 8 halves d0 m0 d1 m1 … as floats; each block's d spread over its 4 lanes.
        let dm = _mm512_castps256_ps512(_mm256_cvtph_ps(dm));
        let d = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6), dm);
        (v, d)
    }

    /// `y[row][col]` (`y` is `[rows][N]`): the lanes of a row and column's weight terms plus its minimums' term, summed.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn put(w: &Q4_1Matrix, y: *mut f32, row: usize, col: usize, sum: __m512, minus: __m512) {
        unsafe { *y.add(row * w.n + col) = reduce(_mm512_add_ps(sum, minus)) };
    }

    /// The sum of the 16 lanes in a fixed tree: lanes i and i + 8, then i and i + 4 of those, i and i + 2, 0 and 1
    /// (`reduce16` pairs them alike, so a row's bits do not depend on which of the two sums it).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn reduce(v: __m512) -> f32 {
        let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let a = _mm256_add_ps(_mm512_castps512_ps256(v), high);
        let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
        _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)))
    }

    /// 16 vectors reduced at once, in `reduce`'s tree: lane 4q + j of the result is `reduce(v[4j + q])`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn reduce16(v: [__m512; 16]) -> __m512 {
        // Lanes i and i + 8 of each vector: two vectors' halves side by side.
        let u: [__m512; 8] = std::array::from_fn(|p| {
            let (a, b) = (v[2 * p], v[2 * p + 1]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b))
        });
        // i and i + 4: quarters 4p .. 4p + 4 of v, one per quarter.
        let w: [__m512; 4] = std::array::from_fn(|p| {
            let (a, b) = (u[2 * p], u[2 * p + 1]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b))
        });
        // i and i + 2, within each quarter.
        let z: [__m512; 2] = std::array::from_fn(|p| {
            let (a, b) = (w[2 * p], w[2 * p + 1]);
            _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b))
        });
        // 0 and 1.
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(z[0], z[1]),
            _mm512_shuffle_ps::<0xDD>(z[0], z[1]),
        )
    }

    /// Quarter `q` of `lanes` (`reduce16`'s) into `y[row][col..col + 4]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn put4(w: &Q4_1Matrix, y: *mut f32, row: usize, col: usize, lanes: __m512, q: usize) {
        let quarter = match q {
            0 => _mm512_extractf32x4_ps::<0>(lanes),
            1 => _mm512_extractf32x4_ps::<1>(lanes),
            2 => _mm512_extractf32x4_ps::<2>(lanes),
            _ => _mm512_extractf32x4_ps::<3>(lanes),
        };
        unsafe { _mm_storeu_ps(y.add(row * w.n + col), quarter) };
    }

    /// The scales and the minimums of blocks `16h..16h + 16` of a column (`nb` blocks), zeros past the last.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub(super) unsafe fn block_scales(dmrow: *const u16, nb: usize, h: usize) -> (__m512, __m512) {
        let left = nb - 16 * h;
        let v = unsafe {
            if left >= 16 {
                _mm512_loadu_si512(dmrow.add(32 * h).cast())
            } else {
                _mm512_maskz_loadu_epi16(((1u64 << (2 * left)) - 1) as u32, dmrow.add(32 * h).cast())
            }
        };
        let lo = _mm512_cvtph_ps(_mm512_castsi512_si256(v));
        let hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(v));
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        (
            _mm512_permutex2var_ps(lo, even, hi),
            _mm512_permutex2var_ps(lo, odd, hi),
        )
    }

    /// The 8 vectors of `16^s·q·d` of a group (`NIBBLE_SCALE`): nibble t of every 32-bit lane of `v`, masked where it
    /// lies (t ≤ 4) or 12 bits lower (t ≥ 5, one shift for the three), times d exactly (`masked_times`; `convert` picks
    /// its form). One shift per group instead of seven.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn scaled(v: __m512i, d: __m512, convert: bool) -> [__m512; 8] {
        let offset = _mm512_mul_ps(d, _mm512_set1_ps(-8_388_608.0));
        let high = _mm512_srli_epi32::<12>(v);
        std::array::from_fn(|t| {
            let (x, s) = if t <= 4 { (v, t) } else { (high, t - 3) };
            masked_times(x, _mm512_set1_epi32(0x0F << (4 * s)), d, offset, convert)
        })
    }

    /// The nibble `mask` selects in each 32-bit lane of `x` (bits 4s..4s + 4, so `16^s·q`), times `d`, exactly (4 by 11
    /// significant bits, 16^s ≤ 2^16), in one of two forms with the same result:
    /// - `convert`: the masked integer converted to float, times d (one FMA-unit operation; the convert and the mask
    ///   run beside the FMAs). From 2 rows and for panels: 120 layers on one thread, 4 rows 12.6 → 11.9 ms, 30 rows
    ///   71.0 → 70.4 ms.
    /// - else `fma(2^23 + 16^s·q, d, −2^23·d)` with `offset = −2^23·d`, the masked bits merged into 2^23's by one
    ///   `vpternlogd`. One row: 5.60 ms against 5.83 for the other form.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn masked_times(x: __m512i, mask: __m512i, d: __m512, offset: __m512, convert: bool) -> __m512 {
        if convert {
            return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(x, mask)), d);
        }
        let magic = _mm512_set1_epi32(0x4B00_0000);
        _mm512_fmadd_ps(
            _mm512_castsi512_ps(_mm512_ternarylogic_epi32::<0xEA>(x, mask, magic)),
            d,
            offset,
        )
    }

    /// Groups of 8 vectors: all but a tail group of 1 or 2 blocks, which packs its 64 weights in 4 vectors instead of
    /// 8 half zeros (`scaled_tail`; K = 576, the model's usual K, ends in one: a tenth of those layers' FMAs).
    #[inline]
    fn full_groups(nb: usize) -> usize {
        if nb % 4 == 1 || nb % 4 == 2 {
            nb / 4
        } else {
            nb.div_ceil(4)
        }
    }

    /// `group` for a tail group of `left` ≤ 2 blocks: its nibbles (32 bytes) in both 256-bit halves, and each lane's
    /// scale (lane l: block (l % 8) / 4).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn tail_group(qrow: *const u8, dmrow: *const u16, g: usize, left: usize) -> (__m512i, __m512) {
        debug_assert!((1..=2).contains(&left));
        let (v, dm) = unsafe {
            (
                _mm256_maskz_loadu_epi8(((1u64 << (16 * left)) - 1) as u32, qrow.add(g * 64).cast()),
                _mm_maskz_loadu_epi16((1u8 << (2 * left)) - 1, dmrow.add(g * 8).cast()),
            )
        };
        let dm = _mm512_castps128_ps512(_mm_cvtph_ps(dm));
        let d = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2), dm);
        (_mm512_broadcast_i64x4(v), d)
    }

    /// The 4 vectors of a tail group (`tail_group`), `scaled`'s arithmetic: vector t holds nibbles 2t (lanes 0–7) and
    /// 2t + 1 (lanes 8–15) of the group's 8 32-bit lanes, masked where they lie (t < 2) or 12 bits lower (t ≥ 2), so
    /// at `16^s` with s = the nibble (t < 2) or the nibble − 3 (`arrange`'s `TAIL_SCALE`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn scaled_tail(v: __m512i, d: __m512, convert: bool) -> [__m512; 4] {
        let offset = _mm512_mul_ps(d, _mm512_set1_ps(-8_388_608.0));
        let high = _mm512_srli_epi32::<12>(v);
        std::array::from_fn(|t| {
            let (x, s) = if t < 2 { (v, 2 * t) } else { (high, 2 * t - 3) };
            let (lo, hi) = (0x0F << (4 * s), 0x0F << (4 * (s + 1)));
            let mask = _mm512_setr_epi32(lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi);
            masked_times(x, mask, d, offset, convert)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// x rounded to bfloat16 (nearest, ties to even; finite x) and back, as `vcvtne2ps2bf16` does.
    fn bf16(x: f32) -> f32 {
        let u = x.to_bits();
        f32::from_bits(u.wrapping_add(0x7FFF + ((u >> 16) & 1)) & 0xFFFF_0000)
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn f(&mut self) -> f32 {
            (self.next() % 20001) as f32 / 10000.0 - 1.0
        }
    }

    /// x rounded to 8-bit integers per block of 32 as `int8::arrange` does (`s = max|x| / 127`, `round(x · (1/s))`),
    /// and back (times s, in f64).
    fn int8(xb: &[f32]) -> Vec<f64> {
        let s = xb.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
        let inverse = if s > 0.0 { 1.0 / s } else { 0.0 };
        xb.iter()
            .map(|&x| (x * inverse).round_ties_even() as f64 * s as f64)
            .collect()
    }

    /// The reference in f64: `Σ d·q·x' + m·x` with `x' = x` (exact kernels) or x as the ISA rounds it (bfloat16, or
    /// 8-bit integers per block); also `Σ |d·(128 + q)·x'|`, the size of what the BF16 kernel sums before it subtracts
    /// its offset.
    fn reference(k: usize, n: usize, q: &[u8], dm: &[u16], x: &[f32], rows: usize, isa: Isa) -> Vec<(f64, f64)> {
        let nb = k / BLOCK;
        let rounded = matches!(isa, Isa::Avx512Bf16 | Isa::Avx2Int8);
        let mut y = vec![(0f64, 0f64); rows * n];
        for r in 0..rows {
            let xr = &x[r * k..(r + 1) * k];
            let x8: Vec<f64> = xr.chunks_exact(BLOCK).flat_map(int8).collect();
            for c in 0..n {
                let (mut s, mut size) = (0f64, 0f64);
                for b in 0..nb {
                    for i in 0..16 {
                        let v = q[(c * nb + b) * 16 + i];
                        let (d, m) = (f16_to_f32(dm[(c * nb + b) * 2]), f16_to_f32(dm[(c * nb + b) * 2 + 1]));
                        for (e, nib) in [(2 * i, v & 15), (2 * i + 1, v >> 4)] {
                            let xv = xr[b * BLOCK + e];
                            let xd = match isa {
                                Isa::Avx512Bf16 => bf16(xv) as f64,
                                Isa::Avx2Int8 => x8[b * BLOCK + e],
                                _ => xv as f64,
                            };
                            if rounded {
                                // The int8 body's minimums meet the rounded activations, the BF16 body's the exact.
                                let xm = if isa == Isa::Avx2Int8 { xd } else { xv as f64 };
                                s += (d * nib as f32) as f64 * xd + m as f64 * xm;
                            } else {
                                s += (d * nib as f32 + m) as f64 * xv as f64;
                            }
                            size += (d as f64 * (128 + nib as u32) as f64 * xd).abs();
                        }
                    }
                }
                y[r * n + c] = (s, size);
            }
        }
        y
    }

    fn check(isa: Isa, k: usize, n: usize, rows: usize, cols: &[Range<usize>]) {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (k * 31 + n * 7 + rows) as u64);
        let nb = k / BLOCK;
        let q: Vec<u8> = (0..n * nb * 16).map(|_| rng.next() as u8).collect();
        // d in [2^-10, 2^-4), m in (-2^-1, -2^-5]: normal halves with random fractions.
        let dm: Vec<u16> = (0..n * nb)
            .flat_map(|_| {
                [
                    (0x1800 + rng.next() % 0x1800) as u16,
                    (0x8000 | (0x2800 + rng.next() % 0x1000)) as u16,
                ]
            })
            .collect();
        let x: Vec<f32> = (0..rows * k).map(|_| rng.f() * 3.0).collect();
        let m = Q4_1Matrix::new(k, n, &q, &dm).unwrap();
        let mut p = Prepared::default();
        m.prepare(isa, &x, rows, &mut p);
        let mut y = vec![f32::NAN; rows * n];
        for c in cols {
            unsafe { m.columns(isa, &p, y.as_mut_ptr(), c.clone()) };
        }
        let want = reference(k, n, &q, &dm, &x, rows, isa);
        for (i, (got, (want, size))) in y.iter().zip(&want).enumerate() {
            // f32 sums; the BF16 kernel's also carry 128·d·Σx' until it subtracts it.
            let mut tol = 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt();
            if isa == Isa::Avx512Bf16 {
                tol += size * 2f64.powi(-22);
            }
            assert!(
                (*got as f64 - want).abs() <= tol,
                "{isa:?} K={k} N={n} rows={rows} at {i}: {got} vs {want}"
            );
        }
    }

    fn isas() -> Vec<Isa> {
        let mut isas = Isa::available();
        isas.extend(Isa::detect_bf16());
        isas.extend(Isa::detect_int8());
        isas
    }

    #[test]
    fn matches_the_dequantized_reference_for_every_row_count_and_block_tail() {
        for isa in isas() {
            // K=576: 18 blocks (a group of 2 at the end); K=1536: 48 blocks; K=32 and K=96: less than one group.
            // N = 96: two whole chunks of 48 columns on AVX2 (its widest tiles).
            for (k, n) in [(576, 40), (576, 96), (1536, 17), (32, 3), (96, 5), (160, 9)] {
                // AVX2: tiles up to 31 rows, panels from 32.
                for rows in [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 31, 33] {
                    check(isa, k, n, rows, &[0..n / 2, n / 2..n]);
                }
            }
        }
    }

    #[test]
    fn column_ranges_can_be_split_across_callers() {
        for isa in isas() {
            for rows in [3, 6, 10, 33] {
                check(isa, 576, 70, rows, &[0..7, 7..32, 32..49, 49..50, 50..70]);
            }
        }
    }

    /// Random nibbles, halves (d near 2⁻⁷, m near −2⁻⁶) and `rows` rows of activations for a K × N matrix.
    fn case(rng: &mut Rng, k: usize, n: usize, rows: usize) -> (Vec<u8>, Vec<u16>, Vec<f32>) {
        let nb = k / BLOCK;
        let q = (0..n * nb * 16).map(|_| rng.next() as u8).collect();
        let dm = (0..n * nb * 2)
            .map(|i| if i % 2 == 0 { 0x2000 } else { 0xA400 } + (rng.next() % 0x300) as u16)
            .collect();
        let x = (0..rows * k).map(|_| rng.f()).collect();
        (q, dm, x)
    }

    #[test]
    fn a_row_gets_the_same_bits_whatever_the_rows_beside_it() {
        // N = 83: a whole chunk of 48 columns, then a part chunk ending in a part group. On AVX2, tiles of 1–4 rows up
        // to 31 rows, panels from 32.
        for rows in [2, 3, 4, 5, 6, 7, 8, 11, 13, 32, 37] {
            same_bits_alone_as_beside(rows);
        }
    }

    fn same_bits_alone_as_beside(rows: usize) {
        let (k, n) = (576, 83);
        let (q, dm, x) = case(&mut Rng(99), k, n, rows);
        let m = Q4_1Matrix::new(k, n, &q, &dm).unwrap();
        for isa in isas() {
            let mut p = Prepared::default();
            m.prepare(isa, &x, rows, &mut p);
            let mut together = vec![0f32; rows * n];
            unsafe { m.columns(isa, &p, together.as_mut_ptr(), 0..n) };
            for r in 0..rows {
                m.prepare(isa, &x[r * k..(r + 1) * k], 1, &mut p);
                let mut alone = vec![0f32; n];
                unsafe { m.columns(isa, &p, alone.as_mut_ptr(), 0..n) };
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&alone),
                    bits(&together[r * n..(r + 1) * n]),
                    "{isa:?} row {r} of {rows}"
                );
            }
        }
    }

    #[test]
    fn rows_filled_in_pieces_give_the_bits_of_one_prepare() {
        let (k, n, rows) = (576, 9, 10);
        let mut rng = Rng(5);
        let (q, dm, x) = case(&mut rng, k, n, rows);
        let m = Q4_1Matrix::new(k, n, &q, &dm).unwrap();
        for isa in isas() {
            let mut p = Prepared::default();
            m.prepare(isa, &x, rows, &mut p);
            let mut whole = vec![0f32; rows * n];
            unsafe { m.columns(isa, &p, whole.as_mut_ptr(), 0..n) };
            // A fresh buffer and one holding another call's values (13 other rows): every value of a row is written.
            let other: Vec<f32> = (0..13 * k).map(|_| rng.f() * 7.0).collect();
            m.prepare(isa, &other, 13, &mut p);
            for mut p in [Prepared::default(), p] {
                let out = m.prepare_begin(isa, rows, &mut p);
                for (r0, r1) in [(7, 10), (0, 3), (3, 7)] {
                    unsafe { m.fill_rows(isa, &x[r0 * k..r1 * k], r0, out) };
                }
                let mut pieces = vec![0f32; rows * n];
                unsafe { m.columns(isa, &p, pieces.as_mut_ptr(), 0..n) };
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&pieces), bits(&whole), "{isa:?}");
            }
        }
    }

    /// The fixed tree of `avx512::reduce`: lanes i and i + 8, then i and i + 4, i and i + 2, 0 and 1.
    fn tree(v: [f32; 16]) -> f32 {
        let a: [f32; 8] = std::array::from_fn(|i| v[i] + v[i + 8]);
        let b: [f32; 4] = std::array::from_fn(|i| a[i] + a[i + 4]);
        (b[0] + b[2]) + (b[1] + b[3])
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_sums_at_once_get_the_bits_of_one_at_a_time() {
        use std::arch::x86_64::*;
        if Isa::detect() != Isa::Avx512 {
            return;
        }
        let mut rng = Rng(17);
        for _ in 0..200 {
            // Magnitudes 2^-20 .. 2^20 and both signs, so the order of the additions shows in the bits.
            let v: [[f32; 16]; 16] =
                std::array::from_fn(|_| std::array::from_fn(|_| rng.f() * 2f32.powi((rng.next() % 41) as i32 - 20)));
            // SAFETY: the CPU has AVX-512 (checked above); the arrays are 16 floats.
            let (one, all) = unsafe {
                let vecs: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(v[i].as_ptr()));
                let one: [f32; 16] = std::array::from_fn(|i| avx512::reduce(vecs[i]));
                let mut all = [0f32; 16];
                _mm512_storeu_ps(all.as_mut_ptr(), avx512::reduce16(vecs));
                (one, all)
            };
            for i in 0..16 {
                assert_eq!(one[i].to_bits(), tree(v[i]).to_bits(), "vector {i}");
                assert_eq!(all[4 * (i % 4) + i / 4].to_bits(), one[i].to_bits(), "vector {i}");
            }
        }
    }

    /// A row of `nb` blocks with values that show a wrong lane or a lost bit: −0.0, tiny and huge magnitudes.
    fn awkward_row(rng: &mut Rng, nb: usize) -> Vec<f32> {
        (0..nb * BLOCK)
            .map(|i| match i % 7 {
                0 => -0.0,
                1 => rng.f() * 1e-30,
                2 => rng.f() * 3e38,
                _ => rng.f() * 100.0,
            })
            .collect()
    }

    #[test]
    fn the_avx512_arrangement_holds_the_portable_values_bit_for_bit() {
        if Isa::detect() != Isa::Avx512 {
            eprintln!("no AVX-512 on this CPU: only the portable arrangement runs");
            return;
        }
        let mut rng = Rng(11);
        // Every tail: whole groups, and groups of 1, 2 and 3 blocks at the end.
        for nb in 1..=14 {
            let xr = awkward_row(&mut rng, nb);
            let groups = nb.div_ceil(4);
            let (mut want, mut got) = (vec![1f32; groups * 128], vec![2f32; groups * 128]);
            arrange(&xr, nb, &mut want);
            unsafe { avx512::arrange(&xr, nb, &mut got) };
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{nb} blocks");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_lanes_hold_each_column_s_nibbles_and_halves_in_order() {
        // N = 77: a last chunk of 4 groups, its last group 5 columns; K = 96: 3 blocks.
        let (k, n) = (96, 77);
        let (q, dm, _) = case(&mut Rng(41), k, n, 0);
        let m = Q4_1Matrix::new(k, n, &q, &dm).unwrap();
        let l = lanes::Lanes::new(&m);
        let nb = k / BLOCK;
        for c in 0..n {
            for e in 0..k {
                let (b, o, t) = (e / BLOCK, e % BLOCK / 8, e % 8);
                let want = (q[(c * nb + b) * 16 + e % BLOCK / 2] >> (4 * (e % 2))) & 15;
                assert_eq!(l.nibble(c, b, o, t), want, "column {c}, element {e}");
            }
            for b in 0..nb {
                assert_eq!(
                    l.halves(c, b),
                    (dm[(c * nb + b) * 2], dm[(c * nb + b) * 2 + 1]),
                    "column {c}, block {b}"
                );
            }
        }
        assert_eq!(l.nibble(n, 0, 0, 0), 0, "columns past N are zeros");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_lanes_rows_hold_each_activation_over_its_weight_s_power_of_two_then_the_block_sum() {
        let mut rng = Rng(23);
        for nb in 1..=4 {
            let xr = awkward_row(&mut rng, nb);
            let mut out = vec![f32::NAN; nb * lanes::PER_BLOCK];
            lanes::arrange(&xr, nb, &mut out);
            let mut sums = vec![0f32; nb];
            block_sums(&xr, &mut sums);
            for b in 0..nb {
                for e in 0..BLOCK {
                    let shift = if e % 8 < 7 { 4 * (e % 8) as i32 } else { 0 };
                    let x = xr[b * BLOCK + e];
                    assert_eq!(
                        out[b * lanes::PER_BLOCK + e].to_bits(),
                        (x / 2f32.powi(shift)).to_bits()
                    );
                    // Which undoes the weight's power of two exactly, unless the quotient is subnormal.
                    if x.abs() >= 2f32.powi(-102) {
                        assert_eq!(out[b * lanes::PER_BLOCK + e] * 2f32.powi(shift), x);
                    }
                }
                assert_eq!(out[b * lanes::PER_BLOCK + BLOCK].to_bits(), sums[b].to_bits());
            }
        }
    }

    #[test]
    fn lengths_that_do_not_match_the_shape_are_refused() {
        let q = vec![0u8; 2 * 16];
        let dm = vec![0u16; 4];
        assert!(Q4_1Matrix::new(32, 2, &q, &dm).is_ok());
        assert!(Q4_1Matrix::new(32, 3, &q, &dm).unwrap_err().contains("weights"));
        assert!(Q4_1Matrix::new(33, 2, &q, &dm).is_err());
        assert!(Q4_1Matrix::new(32, 2, &q, &dm[..3])
            .unwrap_err()
            .contains("scales and mins"));
    }

    #[test]
    fn halves_convert_exactly() {
        for (h, f) in [
            (0x3C00, 1.0f32),
            (0xC000, -2.0),
            (0x0000, 0.0),
            (0x7BFF, 65504.0),
            (0x0001, 2f32.powi(-24)),
            (0x03FF, 1023.0 * 2f32.powi(-24)),
            (0x0400, 2f32.powi(-14)),
            (0x3555, 0.333_251_95),
        ] {
            assert_eq!(f16_to_f32(h), f, "{h:#06x}");
        }
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert!(f16_to_f32(0x7C00).is_infinite() && f16_to_f32(0x7E00).is_nan());
    }
}
