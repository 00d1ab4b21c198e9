//! Winograd's input and output transforms in AVX2: the transforms for CPUs
//! without AVX-512 (those of the parent module use AVX-512's masked loads
//! and lane permutes).
//!
//! Per input channel the padded plane is split once into its even and odd
//! columns ([`split`]); column `2tx + c` of a tile row is then value `tx +
//! c/2` of one of the halves, so a vector of consecutive tiles of a row
//! loads each of its `(K + 1)²` values with one unaligned load, and
//! `Bᵀ d B` is a few adds and subtracts in registers ([`input_tiles`]),
//! stored to the tile's planes of the parent's layout. The output transform
//! loads the products' planes the same way and interleaves each tile's two
//! output columns back into the rows ([`output_tiles`]). A row runs eight
//! tiles per vector, then four, then one ([`blocks`]), so narrow maps (four
//! tiles a row) waste no lanes, and the arithmetic of a tile is the same
//! whatever its vector: the bits do not depend on the map's width.

use std::arch::x86_64::*;

use super::{input_transform, output_transform, planes, Lanes, Wide};

/// Each thread's split planes.
#[derive(Default)]
pub(super) struct Scratch {
    even: Vec<f32>,
    odd: Vec<f32>,
}

/// A vector of tiles, one per lane: eight (`__m256`), four (`__m128`) or
/// one (`f32`), so that every width of map runs in whole vectors and a
/// tail.
trait Tiles: Lanes {
    /// # Safety
    /// AVX2; as many values from `p` as the vector has lanes readable.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// AVX2; as many values from `p` as the vector has lanes writable.
    unsafe fn store(self, p: *mut f32);
    /// `p[2t] = left[t]`, `p[2t + 1] = right[t]`.
    ///
    /// # Safety
    /// AVX2; twice as many values from `p` as the vector has lanes writable.
    unsafe fn store_pairs(left: Self, right: Self, p: *mut f32);
}

impl Lanes for __m256 {
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        // SAFETY: the caller's contract.
        unsafe { _mm256_add_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        // SAFETY: the caller's contract.
        unsafe { _mm256_sub_ps(self, b) }
    }
}

impl Tiles for __m256 {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's contract.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe { _mm256_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn store_pairs(left: Self, right: Self, p: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe {
            // [l0 r0 l1 r1 | l4 r4 l5 r5] and [l2 r2 l3 r3 | l6 r6 l7 r7].
            let (lo, hi) = (
                _mm256_unpacklo_ps(left, right),
                _mm256_unpackhi_ps(left, right),
            );
            _mm256_storeu_ps(p, _mm256_permute2f128_ps::<0x20>(lo, hi));
            _mm256_storeu_ps(p.add(8), _mm256_permute2f128_ps::<0x31>(lo, hi));
        }
    }
}

impl Lanes for __m128 {
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        // SAFETY: the caller's contract.
        unsafe { _mm_add_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        // SAFETY: the caller's contract.
        unsafe { _mm_sub_ps(self, b) }
    }
}

impl Tiles for __m128 {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's contract.
        unsafe { _mm_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe { _mm_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn store_pairs(left: Self, right: Self, p: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe {
            _mm_storeu_ps(p, _mm_unpacklo_ps(left, right));
            _mm_storeu_ps(p.add(4), _mm_unpackhi_ps(left, right));
        }
    }
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        self + b
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        self - b
    }
}

impl Tiles for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's contract.
        unsafe { p.read() }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe { p.write(self) }
    }
    #[inline(always)]
    unsafe fn store_pairs(left: Self, right: Self, p: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe {
            p.write(left);
            p.add(1).write(right);
        }
    }
}

/// Calls `f(tx, lanes)` for the tiles `0 .. tw` of a row: blocks of eight,
/// then four, then one.
#[inline(always)]
fn blocks(tw: usize, mut f: impl FnMut(usize, usize)) {
    let mut tx = 0;
    while tx + 8 <= tw {
        f(tx, 8);
        tx += 8;
    }
    if tx + 4 <= tw {
        f(tx, 4);
        tx += 4;
    }
    while tx < tw {
        f(tx, 1);
        tx += 1;
    }
}

/// The input transform of a vector of tiles of one row (one per lane): `d[r][c]` (column
/// `2tx + c` of row `r` of the tile) is value `tx + c/2` of row `r` of the
/// even (even `c`) or odd (odd `c`) half, rows `hw` apart from `even` and
/// `odd`; `V_ξ` of the tiles goes to `v + ξ·plane`.
///
/// # Safety
///
/// AVX2; the rows `0 .. K + 1` of both halves readable at `0 .. lanes +
/// 1`, and `v + ξ·plane .. + lanes` writable for `ξ < (K + 1)²`.
#[inline(always)]
unsafe fn input_tiles<V: Tiles, const K: usize>(
    (even, odd, hw): (*const f32, *const f32, usize),
    v: *mut f32,
    plane: usize,
) {
    // SAFETY: the caller's contract.
    unsafe {
        let d = |r: usize, c: usize| {
            let half = if c.is_multiple_of(2) { even } else { odd };
            V::load(half.add(r * hw + c / 2))
        };
        input_transform::<V, K>(d, |xi, value| value.store(v.add(xi * plane)));
    }
}

/// The output transform of a vector of tiles of one row: `M_ξ` of the tiles
/// at `m + ξ·plane`, their 2×2 outputs to `y + 2t` and the same one row
/// (`wp`) below.
///
/// # Safety
///
/// AVX2; `m + ξ·plane .. + lanes` readable for `ξ < (K + 1)²`, and `y ..
/// y + 2·lanes` and `y + wp ..` the same writable.
#[inline(always)]
unsafe fn output_tiles<V: Tiles, const K: usize>(
    m: *const f32,
    plane: usize,
    y: *mut f32,
    wp: usize,
) {
    // SAFETY: the caller's contract.
    unsafe {
        let n = K + 1;
        let rows = output_transform::<V, K>(|r, c| V::load(m.add((n * r + c) * plane)));
        for (r, (left, right)) in rows.into_iter().enumerate() {
            V::store_pairs(left, right, y.add(r * wp));
        }
    }
}

/// `even[i] = src[2i]`, `odd[i] = src[2i + 1]` for the values `src` has
/// (the rest of `even` and `odd` left as they are): eight of each from two
/// vectors at a time.
///
/// # Safety
///
/// AVX2 (only inlined into functions compiled for it).
#[inline(always)]
unsafe fn split(src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    assert!(even.len() >= src.len().div_ceil(2) && odd.len() >= src.len() / 2);
    let whole = src.len() / 16;
    for i in 0..whole {
        // SAFETY: AVX2 (the caller's contract); reads 16 values from 16i
        // (whole chunks of `src`), writes 8 to each half from 8i (inside
        // them, asserted above).
        unsafe {
            let a = _mm256_loadu_ps(src.as_ptr().add(16 * i));
            let b = _mm256_loadu_ps(src.as_ptr().add(16 * i + 8));
            // [a0 a2 b0 b2 | a4 a6 b4 b6], then the 64-bit pairs reordered.
            let e = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
            let o = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
            let e = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(e)));
            let o = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(o)));
            _mm256_storeu_ps(even.as_mut_ptr().add(8 * i), e);
            _mm256_storeu_ps(odd.as_mut_ptr().add(8 * i), o);
        }
    }
    for (j, &v) in src.iter().enumerate().skip(16 * whole) {
        if j.is_multiple_of(2) {
            even[j / 2] = v;
        } else {
            odd[j / 2] = v;
        }
    }
}

/// `V = Bᵀ d B` of every input tile `d` of the `cin` padded planes of `xp`
/// (`K + 1` square, tile `(ty, tx)` from padded row `2ty`, column `2tx`)
/// into `v[ξ][ci][tile]` (the parent's layout: planes `planes(cin, tp)`
/// apart, tile `ty·tw + tx`).
///
/// # Safety
///
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn input<const K: usize>(
    g: &Wide,
    xp: &[f32],
    (th, tw, tp): (usize, usize, usize),
    v: &mut [f32],
    scratch: &mut Scratch,
) {
    let n = K + 1;
    let plane = planes(g.cin, tp);
    assert!(v.len() >= n * n * plane && th * tw <= tp && g.cin > 0);
    // Rows 0 .. oh + K − 1 of a padded plane, each split in halves of `hw`
    // (a tile row's column 2tx + c is value tx + c/2 ≤ tw < hw of half c
    // mod 2).
    let (rows, hw) = (g.oh + K - 1, g.wp.div_ceil(2));
    assert!(2 * th + K - 1 <= rows && tw < hw);
    let Scratch { even, odd } = scratch;
    even.resize(rows * hw, 0.0);
    odd.resize(rows * hw, 0.0);
    for ci in 0..g.cin {
        let x = &xp[ci * g.s..][..rows * g.wp];
        // SAFETY: AVX2 (this function's contract). `split` checks its
        // slices; the tiles read rows 2ty .. 2ty + K of the halves (below
        // `rows`, asserted) at values tx + c/2 .. + lanes, up to tw < hw
        // (asserted), and write tiles
        // `ty·tw + tx .. + lanes ≤ th·tw ≤ tp` of channel `ci`'s part of
        // each of the n² planes of `v` (asserted).
        unsafe {
            if g.wp.is_multiple_of(2) {
                // Rows of even width: the plane's halves are its rows' halves.
                split(x, even, odd);
            } else {
                for r in 0..rows {
                    let at = r * hw;
                    split(&x[r * g.wp..][..g.wp], &mut even[at..], &mut odd[at..]);
                }
            }
            let (e, o) = (even.as_ptr(), odd.as_ptr());
            let vp = v.as_mut_ptr().add(ci * tp);
            for ty in 0..th {
                let row = 2 * ty * hw;
                blocks(tw, |tx, lanes| {
                    let halves = (e.add(row + tx), o.add(row + tx), hw);
                    let at = vp.add(ty * tw + tx);
                    match lanes {
                        8 => input_tiles::<__m256, K>(halves, at, plane),
                        4 => input_tiles::<__m128, K>(halves, at, plane),
                        _ => input_tiles::<f32, K>(halves, at, plane),
                    }
                });
            }
        }
    }
}

/// `Y = Aᵀ M A` of every tile's products (`m[ξ][co][tile]`, planes
/// `planes(cout, tp)` apart) into the 2×2 outputs of the tile in `out`'s
/// wide planes (`l` apart, rows `wp` wide).
///
/// # Safety
///
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn output<const K: usize>(
    g: &Wide,
    m: &[f32],
    (th, tw, tp): (usize, usize, usize),
    out: &mut [f32],
) {
    let n = K + 1;
    let plane = planes(g.cout, tp);
    assert!(m.len() >= n * n * plane && th * tw <= tp);
    assert!(out.len() >= g.cout * g.l && (2 * th - 1) * g.wp + 2 * tw <= g.l);
    for co in 0..g.cout {
        // SAFETY: AVX2 (this function's contract); the tiles read
        // `ty·tw + tx .. + lanes ≤ tp` of channel `co`'s part of each plane
        // of `m`, and write rows 2ty, 2ty + 1 at columns 2tx .. 2(tx +
        // lanes) ≤ 2tw of channel `co`'s wide plane (asserted).
        unsafe {
            let (mp, y) = (m.as_ptr().add(co * tp), out.as_mut_ptr().add(co * g.l));
            for ty in 0..th {
                blocks(tw, |tx, lanes| {
                    let (at, to) = (mp.add(ty * tw + tx), y.add(2 * ty * g.wp + 2 * tx));
                    match lanes {
                        8 => output_tiles::<__m256, K>(at, plane, to, g.wp),
                        4 => output_tiles::<__m128, K>(at, plane, to, g.wp),
                        _ => output_tiles::<f32, K>(at, plane, to, g.wp),
                    }
                });
            }
        }
    }
}
