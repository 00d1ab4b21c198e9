//! Winograd's F(2×2, 3×3) and F(2×2, 2×2) for 3×3 and 2×2 stride-1
//! convolutions of many channels: each 2×2 block of outputs from a 4×4
//! (3×3) block of inputs with 16 (9) multiplications per input and output
//! channel instead of 36 (16).
//!
//! With `Bᵀ`, `G` and `Aᵀ` the transforms of Lavin and Gray (2015) (for
//! 2×2 kernels: `Bᵀ = [1 −1 0; 0 1 0; 0 −1 1]`, `G = [1 0; 1 1; 0 1]`,
//! `Aᵀ = [1 1 0; 0 1 1]`), an image's output is `Y = Aᵀ [Σ_ci U ⊙ V] A` per
//! 2×2 tile, where `U = G g Gᵀ` is the transform of each kernel (made once
//! per convolution, [`kernel`]) and `V = Bᵀ d B` that of each input tile
//! `d`. The sum over input channels is, for each of the positions ξ of a
//! tile (16, or 9), the
//! product of a `cout × cin` matrix `U_ξ` with a `cin × tiles` matrix `V_ξ`:
//! a 1×1 convolution with `cin` input planes of one value per tile, which
//! the register-blocked direct kernel ([`super::forward`]) already does at
//! close to the CPU's peak. So this module only adds the transforms, and
//! 2.25× fewer multiplications make the layer faster where the products
//! dominate (wide layers; see [`applies`]).
//!
//! The results differ from the direct kernels' in the last bits (other
//! arithmetic), and are fixed to the bit for a given CPU path like theirs.

use super::{packed_index, packed_len, Wide};

/// Fewest input and output channels for which the transforms pay: on the
/// Zen 4 variant resnet20's 16-channel layers' forward took 7.4 ms through
/// them instead of 9.3 on the direct kernel, and on a CPU with AVX2 only
/// (AMD EPYC family 23) 14.6 instead of 19.0 (batch 128, one thread,
/// forward with its BatchNorm).
const MIN_CHANNELS: usize = 16;

/// Whether the convolution of shape `g` runs through Winograd's transforms:
/// a shape they compute ([`fits`]) with at least [`MIN_CHANNELS`] in and
/// out, on the direct kernels (AVX-512 or AVX2), and not turned off with
/// `GRADCAST_WINOGRAD=off`.
pub(crate) fn applies(g: &Wide) -> bool {
    fits(g) && super::isa().is_some() && enabled() && g.cin.min(g.cout) >= MIN_CHANNELS
}

/// Whether the transforms compute shape `g`: 3×3 or 2×2, stride 1, an even
/// number of output rows and columns.
fn fits(g: &Wide) -> bool {
    let ow = g.wp.saturating_sub(g.kw.saturating_sub(1));
    (g.kh == 3 || g.kh == 2)
        && g.kw == g.kh
        && g.stride == 1
        && g.oh > 0
        && g.oh.is_multiple_of(2)
        && ow.is_multiple_of(2)
        && g.cin > 0
        && g.cout > 0
}

/// How the transforms run: in AVX-512 registers, 16 tiles per vector with
/// masked loads and lane permutes ([`avx512`]), or in AVX2 registers from
/// the input planes split into even and odd columns ([`rows`]). Both do
/// the same additions in the same order ([`input_transform`],
/// [`output_transform`]), so they give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transforms {
    Avx512,
    Rows,
}

impl super::choices::Choice for Transforms {
    fn name(self) -> &'static str {
        match self {
            Transforms::Avx512 => "avx512",
            Transforms::Rows => "rows",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "avx512" => Some(Transforms::Avx512),
            "rows" => Some(Transforms::Rows),
            _ => None,
        }
    }
}

/// The transforms this process uses: the AVX2 rows wherever the CPU has
/// AVX2 and FMA, whichever width the products run in, else the AVX-512
/// ones. On the Zen 4 variant the two are level (one image's forward:
/// 16-channel 32×32 30 µs and 31, 32-channel 16×16 28 and 27, 64-channel
/// 8×8 26 and 27; resnet20 trained within the machine's noise either way),
/// and the rows are the ones every x86-64 CPU with direct kernels can run.
/// `GRADCAST_KERNEL_PATH=measure` chooses per shape on a CPU with both
/// ([`transforms_for`]).
fn transforms() -> Transforms {
    if crate::path::cpu_has_avx2() {
        Transforms::Rows
    } else {
        Transforms::Avx512
    }
}

/// The transforms for shape `g`: [`transforms`], or with
/// `GRADCAST_KERNEL_PATH=measure` on a CPU with AVX-512 and AVX2 the faster
/// of the two for this shape, timed on one image's forward at its first
/// use (on zeros, best of three) and kept like the other choices (see
/// [`super::choices`]). Either gives the same bits.
fn transforms_for(g: &Wide) -> Transforms {
    if !(crate::path::measuring_shapes()
        && crate::path::cpu_has_avx512()
        && crate::path::cpu_has_avx2())
    {
        return transforms();
    }
    super::choices::choose("transforms", g, || {
        let xp = vec![0f32; g.cin * g.s];
        let u = vec![0f32; positions(g) * packed_len(g.cin, 1, g.cout)];
        let mut out = vec![0f32; g.cout * g.l];
        let [avx512, rows] = [Transforms::Avx512, Transforms::Rows]
            .map(|t| super::choices::best_of_three(|| forward_using(t, g, &xp, &u, &mut out)));
        (
            if avx512 < rows {
                Transforms::Avx512
            } else {
                Transforms::Rows
            },
            format!("avx512 {avx512:?}, rows {rows:?}"),
        )
    })
}

/// Which transforms this CPU can run (for the tests of each).
#[cfg(test)]
fn runnable() -> Vec<Transforms> {
    let mut all = Vec::new();
    if crate::path::cpu_has_avx512() {
        all.push(Transforms::Avx512);
    }
    if crate::path::cpu_has_avx2() {
        all.push(Transforms::Rows);
    }
    all
}

/// `GRADCAST_WINOGRAD=off` keeps every convolution on the direct kernels
/// (read once).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("GRADCAST_WINOGRAD").map_or(true, |v| v != "off"))
}

/// Whether shape `g` (which [`applies`]) takes the transforms: always,
/// except with `GRADCAST_KERNEL_PATH=measure`, where the first use of each
/// shape times one image's forward both ways (on zeros, best of three, the
/// kernel's transform not counted: it is made once per batch) and keeps
/// the faster for the process (or reads it from the plan file: see
/// [`super::choices`]); `GRADCAST_KERNEL_PROFILE=1` prints the timings and
/// the choice.
pub(crate) fn chosen(g: &Wide) -> bool {
    if !crate::path::measuring_shapes() {
        return true;
    }
    super::choices::choose("winograd", g, || {
        let xp = vec![0f32; g.cin * g.s];
        let w = vec![0f32; packed_len(g.cin, g.kh * g.kw, g.cout)];
        let u = kernel(g, &w);
        let mut out = vec![0f32; g.cout * g.l];
        let direct = super::choices::best_of_three(|| super::forward(g, &xp, &w, &mut out));
        let transformed = super::choices::best_of_three(|| forward(g, &xp, &u, &mut out));
        (
            transformed < direct,
            format!("direct {direct:?}, winograd {transformed:?}"),
        )
    })
}

/// Tiles of an image: rows and columns of 2×2 output blocks, and their
/// count rounded up to whole vectors (the length of a transformed plane).
fn tiles(g: &Wide) -> (usize, usize, usize) {
    let (th, tw) = (g.oh / 2, (g.wp - (g.kw - 1)) / 2);
    (th, tw, (th * tw).next_multiple_of(16))
}

/// Distance between the transformed planes of two tile positions ξ, for
/// `channels` planes of `tp` values: one cache line more than they fill, so
/// that the sixteen (nine) planes a transform writes or reads at once do not
/// all fall into the same cache set (their size is often a power of two).
fn planes(channels: usize, tp: usize) -> usize {
    channels * tp + 16
}

/// Positions ξ of a transformed tile: 16 for 3×3 kernels, 9 for 2×2.
fn positions(g: &Wide) -> usize {
    (g.kh + 1) * (g.kh + 1)
}

/// The 1×1 convolution that multiplies the transformed planes: `cin` planes
/// of `tp` values in, `cout` out.
fn products(g: &Wide, tp: usize) -> Wide {
    Wide {
        cin: g.cin,
        cout: g.cout,
        s: tp,
        wp: tp,
        kh: 1,
        kw: 1,
        l: tp,
        stride: 1,
        sp: 0,
        oh: 0,
    }
}

/// The transformed kernel `U` of the packed kernel `w` of shape `g` (see
/// [`applies`]): one kernel packed for [`products`] per tile position ξ.
pub(crate) fn kernel(g: &Wide, w: &[f32]) -> Vec<f32> {
    let (k, n) = (g.kh, g.kh + 1);
    assert!(
        w.len() >= packed_len(g.cin, k * k, g.cout),
        "kernel too short"
    );
    let len = packed_len(g.cin, 1, g.cout);
    let mut u = vec![0f32; n * n * len];
    // G applied to the k values of a kernel row or column.
    let transform = |x: [f32; 3]| -> [f32; 4] {
        let [a, b, d] = x;
        if k == 3 {
            [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d]
        } else {
            [a, a + b, b, 0.0]
        }
    };
    for co in 0..g.cout {
        for ci in 0..g.cin {
            let tap = |ky: usize, kx: usize| w[packed_index(g.cin, k * k, (ci, k * ky + kx, co))];
            let column = |c: usize| std::array::from_fn(|r| if r < k { tap(r, c) } else { 0.0 });
            // G g (n×k), then (G g) Gᵀ (n×n).
            let gg: [[f32; 4]; 3] = std::array::from_fn(|c| {
                if c < k {
                    transform(column(c))
                } else {
                    [0.0; 4]
                }
            });
            let at = packed_index(g.cin, 1, (ci, 0, co));
            for r in 0..n {
                let row = transform(std::array::from_fn(|c| gg[c][r]));
                for (c, v) in row.into_iter().take(n).enumerate() {
                    u[(n * r + c) * len + at] = v;
                }
            }
        }
    }
    u
}

thread_local! {
    /// Each thread's transformed input and products, reused from image to
    /// image (megabytes for wide layers).
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>, rows::Scratch)> =
        std::cell::RefCell::new(Default::default());
}

/// [`super::forward`] of one image through the transforms, with `u` the
/// transformed kernel from [`kernel`]: writes every valid output position
/// `q = oy·wp + ox` (`oy < oh`, `ox < wp − 2`) of each channel's wide plane
/// (the wrapped columns past them are left as they were).
pub(crate) fn forward(g: &Wide, xp: &[f32], u: &[f32], out: &mut [f32]) {
    forward_using(transforms_for(g), g, xp, u, out)
}

/// [`forward`] with the transforms `t` (which the CPU must run).
fn forward_using(t: Transforms, g: &Wide, xp: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(fits(g), "not a Winograd shape: {g:?}");
    g.check(xp.len());
    assert!(out.len() >= g.cout * g.l, "output too short");
    let (th, tw, tp) = tiles(g);
    let one = products(g, tp);
    let len = packed_len(g.cin, 1, g.cout);
    let xis = positions(g);
    assert!(u.len() >= xis * len, "transformed kernel too short");
    SCRATCH.with_borrow_mut(|(v, m, rows)| {
        // Past each plane's tiles the values are whatever was there: the
        // products there are computed and ignored.
        let (pv, pm) = (planes(g.cin, tp), planes(g.cout, tp));
        v.resize(xis * pv, 0.0);
        m.resize(xis * pm, 0.0);
        transform_input(t, g, xp, (th, tw, tp), v, rows);
        for xi in 0..xis {
            super::forward(
                &one,
                &v[xi * pv..][..g.cin * tp],
                &u[xi * len..][..len],
                &mut m[xi * pm..][..g.cout * tp],
            );
        }
        transform_output(t, g, m, (th, tw, tp), out);
    });
}

/// Whether the weight gradient of shape `g` runs through the transforms
/// ([`weight_grad`]): where the forward does ([`applies`]) with more than
/// one vector of output channels, unless `GRADCAST_WINOGRAD_GRAD=off`.
/// With a single vector (16 channels) the gemm-shaped products are bound
/// by their broadcasts, one per multiply-add, and the row kernel does as
/// well (resnet20's 16-channel layers, Zen 4: 15.2 against 15.4 ms of
/// backward). On the Zen 4 variant: resnet20's 32-channel layers' backward
/// 12.9 → 10.9 ms, the 64-channel ones' 12.8 → 9.9 (batch 128, one
/// thread); complex-cnn trained 66–67 → 77–78 img/s (2 threads). With
/// `GRADCAST_KERNEL_PATH=measure` each shape the forward runs through the
/// transforms (16 channels included) takes the faster of the two, timed
/// at its first use ([`time_weight_grads`]).
pub(crate) fn weight_grad_applies(g: &Wide) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| std::env::var("GRADCAST_WINOGRAD_GRAD").map_or(true, |v| v != "off"))
        || !applies(g)
    {
        return false;
    }
    if !crate::path::measuring_shapes() {
        return g.cout > 16;
    }
    super::choices::choose("winograd-grad", g, || time_weight_grads(g))
}

/// Times shape `g`'s weight gradient over a group of images as the
/// backward runs it ([`super::GradTiming`]): through the transforms (the
/// gradients' transposes included), and in the form the direct kernels
/// would take. Returns whether the transforms were faster, and the
/// timings for the log.
fn time_weight_grads(g: &Wide) -> (bool, String) {
    let mut timing = super::GradTiming::new(g);
    let mut du = vec![0f32; grad_len(g)];
    let winograd = super::choices::best_of_three(|| {
        timing.transpose();
        let n = (timing.images, timing.xs, timing.ts);
        weight_grad(g, n, &timing.xp, &timing.t, &mut du);
        kernel_grad(g, &du, &mut timing.dw);
    });
    let direct = timing.direct();
    (
        winograd < direct,
        format!(
            "{} images: winograd {winograd:?}, direct {direct:?}",
            timing.images
        ),
    )
}

/// Values of the transformed kernel gradient [`weight_grad`] accumulates:
/// `[ξ][cin][cout]`.
pub(crate) fn grad_len(g: &Wide) -> usize {
    positions(g) * g.cin * g.cout
}

thread_local! {
    /// Each thread's transformed inputs and gradients for [`weight_grad`].
    static GRAD_SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>, rows::Scratch)> =
        std::cell::RefCell::new(Default::default());
}

/// `dU_ξ[ci][co] += Σ_images Σ_tiles V_ξ[ci][tile] · (A dY Aᵀ)_ξ[tile][co]`:
/// the gradient of the transformed kernel `U` (see [`kernel_grad`] for the
/// kernel's), for `images` images whose padded input planes lie `xs` apart
/// in `xp` and whose wide output gradients, transposed (`[q][co]`, rows
/// of [`super::transposed_width`] values), lie `ts` apart in `t`. `V` is
/// the forward's input transform; `A dY Aᵀ` the adjoint of its output
/// transform; the products are the 1×1 gemm-shaped weight gradient over
/// the tiles of all the images.
pub(crate) fn weight_grad(
    g: &Wide,
    (images, xs, ts): (usize, usize, usize),
    xp: &[f32],
    t: &[f32],
    du: &mut [f32],
) {
    assert!(fits(g) && images > 0);
    let np = super::transposed_width(g.cout);
    let (th, tw, tp) = tiles(g);
    let xis = positions(g);
    let pv = planes(g.cin, tp);
    let (vs, ms) = (xis * pv, xis * tp * np);
    assert!(xp.len() >= (images - 1) * xs + g.cin * g.s);
    assert!(t.len() >= (images - 1) * ts + g.l * np);
    assert!(du.len() >= grad_len(g));
    let one = products(g, tp);
    let transforms = transforms_for(g);
    GRAD_SCRATCH.with_borrow_mut(|(v, m, rows)| {
        v.resize(images * vs, 0.0);
        m.resize(images * ms, 0.0);
        for i in 0..images {
            let vi = &mut v[i * vs..][..vs];
            transform_input(
                transforms,
                g,
                &xp[i * xs..][..g.cin * g.s],
                (th, tw, tp),
                vi,
                rows,
            );
            // The products run over whole vectors of tiles: zeros past the
            // last tile of each plane (the transforms leave them as they were).
            for plane in vi.chunks_exact_mut(pv) {
                for ch in plane[..g.cin * tp].chunks_exact_mut(tp) {
                    ch[th * tw..].fill(0.0);
                }
            }
            gradient_transform(
                g,
                &t[i * ts..][..g.l * np],
                (th, tw, tp),
                &mut m[i * ms..][..ms],
            );
        }
        let len = g.cin * g.cout;
        for xi in 0..xis {
            super::weight_grad_gemm(
                &one,
                (images, vs, ms),
                &v[xi * pv..],
                &m[xi * tp * np..],
                &mut du[xi * len..][..len],
            );
        }
    });
}

/// `M_ξ[tile][co] = (A dY Aᵀ)_ξ` of every tile of one image's transposed
/// wide gradient `t` (`[q][co]`, `np` values a row), into `m`
/// (`[ξ][tile][co]`, `tp` tiles of `np` values per ξ; the tiles past the
/// last are zero). `A` is `Aᵀ`'s transpose: `Aᵀ = [1 1 1 0; 0 1 −1 −1]`
/// (3×3 kernels) or `[1 1 0; 0 1 1]` (2×2).
fn gradient_transform(g: &Wide, t: &[f32], tiles: (usize, usize, usize), m: &mut [f32]) {
    let (th, tw, tp) = tiles;
    let np = super::transposed_width(g.cout);
    let n = g.kh + 1;
    assert!(m.len() >= n * n * tp * np && (2 * th - 1) * g.wp + 2 * tw <= g.l);
    assert!(t.len() >= g.l * np);
    #[cfg(target_arch = "x86_64")]
    if crate::path::cpu_has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just now).
        unsafe { gradient_transform_avx2(g, t, tiles, m) };
        return;
    }
    gradient_transform_lanes(g, t, tiles, m);
}

/// [`gradient_transform_lanes`] compiled for AVX2.
///
/// # Safety
///
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gradient_transform_avx2(
    g: &Wide,
    t: &[f32],
    tiles: (usize, usize, usize),
    m: &mut [f32],
) {
    gradient_transform_lanes(g, t, tiles, m)
}

/// Sixteen lanes of a transform's values.
type Sixteen = [f32; 16];

/// `A`'s rows applied lane by lane to a pair `(a, b)` (a tile's column,
/// then row, of two gradient values): `n` values out. A plain function
/// with loops, not closures handed to `from_fn` or `map`, so that it is
/// compiled inside its AVX2 caller (see [`input_transform`]).
#[inline(always)]
fn expand(n: usize, a: &Sixteen, b: &Sixteen) -> [Sixteen; 4] {
    let mut out = [[0f32; 16]; 4];
    for i in 0..16 {
        let (x, y) = (a[i], b[i]);
        out[0][i] = x;
        out[1][i] = x + y;
        if n == 4 {
            out[2][i] = x - y;
            out[3][i] = -y;
        } else {
            out[2][i] = y;
        }
    }
    out
}

/// [`gradient_transform`]'s arithmetic, 16 output channels at a time.
#[inline(always)]
fn gradient_transform_lanes(
    g: &Wide,
    t: &[f32],
    (th, tw, tp): (usize, usize, usize),
    m: &mut [f32],
) {
    let np = super::transposed_width(g.cout);
    let n = g.kh + 1;
    let load = |q: usize, co: usize| -> Sixteen {
        let mut v = [0f32; 16];
        v.copy_from_slice(&t[q * np + co..][..16]);
        v
    };
    for ty in 0..th {
        for tx in 0..tw {
            let tile = ty * tw + tx;
            let q = 2 * ty * g.wp + 2 * tx;
            for co in (0..np).step_by(16) {
                // Z = A dY (n×2), then Z Aᵀ (n×n).
                let z0 = expand(n, &load(q, co), &load(q + g.wp, co));
                let z1 = expand(n, &load(q + 1, co), &load(q + g.wp + 1, co));
                for r in 0..n {
                    let row = expand(n, &z0[r], &z1[r]);
                    for (c, values) in row.iter().enumerate().take(n) {
                        m[((n * r + c) * tp + tile) * np + co..][..16].copy_from_slice(values);
                    }
                }
            }
        }
    }
    for xi in 0..n * n {
        m[(xi * tp + th * tw) * np..(xi + 1) * tp * np].fill(0.0);
    }
}

/// `dw[ci][tap][co] += (Gᵀ dU G)` of the transformed kernel gradient `du`
/// from [`weight_grad`]: the adjoint of [`kernel`]'s `U = G g Gᵀ`, into
/// the plain `[cin][kh·kw][cout]` layout.
pub(crate) fn kernel_grad(g: &Wide, du: &[f32], dw: &mut [f32]) {
    let (k, n) = (g.kh, g.kh + 1);
    let len = g.cin * g.cout;
    assert!(du.len() >= n * n * len && dw.len() >= g.cin * k * k * g.cout);
    // Gᵀ applied to the n values of a row or column of dU.
    let reduce = |x: [f32; 4]| -> [f32; 3] {
        let [a, b, c, d] = x;
        if k == 3 {
            [a + 0.5 * (b + c), 0.5 * (b - c), 0.5 * (b + c) + d]
        } else {
            [a + b, b + c, 0.0]
        }
    };
    for ci in 0..g.cin {
        for co in 0..g.cout {
            let at = ci * g.cout + co;
            let u = |r: usize, c: usize| {
                if r < n && c < n {
                    du[(n * r + c) * len + at]
                } else {
                    0.0
                }
            };
            // Gᵀ dU (k×n), then (Gᵀ dU) G (k×k).
            let gu: [[f32; 3]; 4] =
                std::array::from_fn(|c| reduce(std::array::from_fn(|r| u(r, c))));
            for ky in 0..k {
                let row = reduce(std::array::from_fn(|c| gu[c][ky]));
                for (kx, v) in row.into_iter().take(k).enumerate() {
                    dw[(ci * k * k + k * ky + kx) * g.cout + co] += v;
                }
            }
        }
    }
}

/// Adds and subtracts of a vector of tiles, one tile per lane: the only
/// arithmetic of the transforms, written once for both ([`input_transform`],
/// [`output_transform`]) whatever the vector.
trait Lanes: Copy {
    /// # Safety
    /// The CPU has the vector's instructions.
    unsafe fn add(self, b: Self) -> Self;
    /// # Safety
    /// The CPU has the vector's instructions.
    unsafe fn sub(self, b: Self) -> Self;
}

/// `V = Bᵀ d B` of a vector of tiles: `d(r, c)` is value `(r, c)` of the
/// tiles, `store(ξ, V_ξ)` takes each of the `(K + 1)²` results.
///
/// # Safety
///
/// The CPU has `V`'s instructions, and `d` and `store` may be called.
#[inline(always)]
unsafe fn input_transform<V: Lanes, const K: usize>(
    d: impl Fn(usize, usize) -> V,
    mut store: impl FnMut(usize, V),
) {
    // Written out without closures handed to library functions (`map`,
    // `from_fn`): a closure the compiler keeps out of line loses the
    // caller's vector instructions, and each add becomes a call.
    // SAFETY: the caller's contract.
    unsafe {
        if K == 2 {
            // Bᵀ d over the rows, then the same over the columns.
            let (a, b, c) = (
                [d(0, 0), d(0, 1), d(0, 2)],
                [d(1, 0), d(1, 1), d(1, 2)],
                [d(2, 0), d(2, 1), d(2, 2)],
            );
            let bd: [[V; 3]; 3] = [
                [a[0].sub(b[0]), a[1].sub(b[1]), a[2].sub(b[2])],
                b,
                [c[0].sub(b[0]), c[1].sub(b[1]), c[2].sub(b[2])],
            ];
            for (i, [a, b, c]) in bd.into_iter().enumerate() {
                store(3 * i, a.sub(b));
                store(3 * i + 1, b);
                store(3 * i + 2, c.sub(b));
            }
            return;
        }
        let row = |r: usize| [d(r, 0), d(r, 1), d(r, 2), d(r, 3)];
        let (x0, x1, x2, x3) = (row(0), row(1), row(2), row(3));
        // Bᵀ d, column by column.
        let bd: [[V; 4]; 4] = [
            [
                x0[0].sub(x2[0]),
                x0[1].sub(x2[1]),
                x0[2].sub(x2[2]),
                x0[3].sub(x2[3]),
            ],
            [
                x1[0].add(x2[0]),
                x1[1].add(x2[1]),
                x1[2].add(x2[2]),
                x1[3].add(x2[3]),
            ],
            [
                x2[0].sub(x1[0]),
                x2[1].sub(x1[1]),
                x2[2].sub(x1[2]),
                x2[3].sub(x1[3]),
            ],
            [
                x1[0].sub(x3[0]),
                x1[1].sub(x3[1]),
                x1[2].sub(x3[2]),
                x1[3].sub(x3[3]),
            ],
        ];
        // (Bᵀ d) B, row by row.
        for (i, [a, b, c, e]) in bd.into_iter().enumerate() {
            store(4 * i, a.sub(c));
            store(4 * i + 1, b.add(c));
            store(4 * i + 2, c.sub(b));
            store(4 * i + 3, b.sub(e));
        }
    }
}

/// `Y = Aᵀ M A` of a vector of tiles: `m(r, c)` is `M_ξ` at `ξ = (K + 1)r
/// + c`; returns each output row's two columns.
///
/// # Safety
///
/// The CPU has `V`'s instructions, and `m` may be called for `r, c ≤ K`.
#[inline(always)]
unsafe fn output_transform<V: Lanes, const K: usize>(m: impl Fn(usize, usize) -> V) -> [(V, V); 2] {
    // (Written out as `input_transform` is.)
    // SAFETY: the caller's contract.
    unsafe {
        if K == 2 {
            // Aᵀ M (2×3), then the two output columns of each row.
            let (m0, m1, m2) = (
                [m(0, 0), m(0, 1), m(0, 2)],
                [m(1, 0), m(1, 1), m(1, 2)],
                [m(2, 0), m(2, 1), m(2, 2)],
            );
            let a = [m0[0].add(m1[0]), m0[1].add(m1[1]), m0[2].add(m1[2])];
            let b = [m1[0].add(m2[0]), m1[1].add(m2[1]), m1[2].add(m2[2])];
            return [
                (a[0].add(a[1]), a[1].add(a[2])),
                (b[0].add(b[1]), b[1].add(b[2])),
            ];
        }
        let column = |c: usize| (m(0, c), m(1, c), m(2, c), m(3, c));
        let (c0, c1, c2, c3) = (column(0), column(1), column(2), column(3));
        let top = |(m0, m1, m2, _): (V, V, V, V)| m0.add(m1).add(m2);
        let bottom = |(_, m1, m2, m3): (V, V, V, V)| m1.sub(m2).sub(m3);
        let [a, b, c, e] = [top(c0), top(c1), top(c2), top(c3)];
        let [f, g, h, k] = [bottom(c0), bottom(c1), bottom(c2), bottom(c3)];
        [
            (a.add(b).add(c), b.sub(c).sub(e)),
            (f.add(g).add(h), g.sub(h).sub(k)),
        ]
    }
}

/// Tile rows that share a vector: `16 / tw` when rows of `tw` tiles fill
/// one exactly (small maps, where a row alone would leave lanes empty),
/// else 1.
fn rows_per_vector(th: usize, tw: usize) -> usize {
    match tw {
        1 | 2 | 4 | 8 if th.is_multiple_of(16 / tw) => 16 / tw,
        _ => 1,
    }
}

/// The blocks of up to 16 tiles that share a vector, as `(ty, tx, n, k)`:
/// `k` rows of tiles from row `ty` (all of each row: `k·tw = 16`, see
/// [`rows_per_vector`]), or with `k = 1` the `n` tiles of row `ty` from
/// column `tx`. Tiles `ty·tw + tx ..` of a block are consecutive.
fn blocks(th: usize, tw: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let k = rows_per_vector(th, tw);
    (0..th).step_by(k).flat_map(move |ty| {
        (0..tw)
            .step_by(16)
            .map(move |tx| (ty, tx, if k > 1 { 16 } else { (tw - tx).min(16) }, k))
    })
}

/// The input transform of one image with the transforms `t`.
fn transform_input(
    t: Transforms,
    g: &Wide,
    xp: &[f32],
    tiles: (usize, usize, usize),
    v: &mut [f32],
    scratch: &mut rows::Scratch,
) {
    match t {
        Transforms::Avx512 => input(g, xp, tiles, v),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Rows` is only used where the CPU has AVX2 and FMA
        // ([`transforms`], [`transforms_for`], or a test checked it).
        Transforms::Rows => unsafe {
            if g.kh == 3 {
                rows::input::<3>(g, xp, tiles, v, scratch)
            } else {
                rows::input::<2>(g, xp, tiles, v, scratch)
            }
        },
        #[cfg(not(target_arch = "x86_64"))]
        Transforms::Rows => unreachable!("the transforms need x86-64"),
    }
}

/// The output transform of one image with the transforms `t`.
fn transform_output(
    t: Transforms,
    g: &Wide,
    m: &[f32],
    tiles: (usize, usize, usize),
    out: &mut [f32],
) {
    match t {
        Transforms::Avx512 => output(g, m, tiles, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `transform_input`.
        Transforms::Rows => unsafe {
            if g.kh == 3 {
                rows::output::<3>(g, m, tiles, out)
            } else {
                rows::output::<2>(g, m, tiles, out)
            }
        },
        #[cfg(not(target_arch = "x86_64"))]
        Transforms::Rows => unreachable!("the transforms need x86-64"),
    }
}

/// `V = Bᵀ d B` of every input tile `d` (4×4, or 3×3 for 2×2 kernels; tile
/// `(ty, tx)` starts at padded row `2ty`, column `2tx`), into
/// `v[ξ][ci][tile]`, a block of tiles ([`blocks`]) per vector.
fn input(g: &Wide, xp: &[f32], (th, tw, tp): (usize, usize, usize), v: &mut [f32]) {
    let plane = planes(g.cin, tp);
    assert!(v.len() >= positions(g) * plane);
    let kh = g.kh;
    for ci in 0..g.cin {
        for (ty, tx, n, k) in blocks(th, tw) {
            let at = ci * g.s + 2 * ty * g.wp + 2 * tx;
            // Rows 2ty .. 2ty + 2k + kh − 1, the block's columns of each
            // tile row and the kh − 1 past them (at most wp).
            assert!(at + (2 * k + kh - 2) * g.wp + 2 * (n / k) + kh - 1 <= xp.len());
            // SAFETY: `Transforms::Avx512` is only used where the CPU has
            // AVX-512F (the direct kernels run in it, or a test checked); the
            // rows read are inside `xp` (asserted above) and the stores
            // inside `v` (tiles `ty·tw + tx .. + n ≤ tp`, one plane per
            // position ξ, asserted above).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let (x, vp) = (
                    xp.as_ptr().add(at),
                    v.as_mut_ptr().add(ci * tp + ty * tw + tx),
                );
                let shape = (g.wp, tw, k);
                if kh == 3 {
                    avx512::input_block::<3>(x, shape, n, vp, plane)
                } else {
                    avx512::input_block::<2>(x, shape, n, vp, plane)
                }
            }
        }
    }
}

/// `Y = Aᵀ M A` of every tile's products `M` (4×4, or 3×3 for 2×2
/// kernels; `m[ξ][co][tile]`), into the 2×2 outputs of the tile in `out`'s
/// wide planes, a block of tiles ([`blocks`]) per vector.
fn output(g: &Wide, m: &[f32], (th, tw, tp): (usize, usize, usize), out: &mut [f32]) {
    let plane = planes(g.cout, tp);
    assert!(m.len() >= positions(g) * plane && out.len() >= g.cout * g.l);
    for co in 0..g.cout {
        for (ty, tx, n, k) in blocks(th, tw) {
            let q = co * g.l + 2 * ty * g.wp + 2 * tx;
            // Rows 2ty .. 2ty + 2k, the block's 2·n/k columns (≤ ow < wp).
            assert!(q + (2 * k - 1) * g.wp + 2 * (n / k) <= out.len());
            // SAFETY: AVX-512F (as in `input`), and every access inside `m`
            // (tiles `ty·tw + tx .. + n ≤ tp`) and `out` (asserted above).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let (mp, y) = (
                    m.as_ptr().add(co * tp + ty * tw + tx),
                    out.as_mut_ptr().add(q),
                );
                let shape = (g.wp, tw, k);
                if g.kh == 3 {
                    avx512::output_block::<3>(mp, plane, shape, n, y)
                } else {
                    avx512::output_block::<2>(mp, plane, shape, n, y)
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n.min(16)) - 1) as __mmask16
    }

    /// Columns `0, 2, …, 30` and `1, 3, …, 31` of the 32 values at `p`
    /// (of which only the first `need` are read).
    ///
    /// # Safety
    ///
    /// AVX-512F, and `p .. p + need` readable.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn even_odd(p: *const f32, need: usize) -> (__m512, __m512) {
        // SAFETY: the caller upholds this function's contract; the masks
        // read nothing at or past `p + need`.
        unsafe {
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            let a = _mm512_maskz_loadu_ps(lanes(need), p);
            let b = _mm512_maskz_loadu_ps(lanes(need.saturating_sub(16)), p.wrapping_add(16));
            (
                _mm512_permutex2var_ps(a, even, b),
                _mm512_permutex2var_ps(a, odd, b),
            )
        }
    }

    /// Columns `c0, c0 + 2, …` and `c0 + 1, c0 + 3, …` of row `r` of each
    /// of `k` tile rows (`2·16/k` columns each, of which the first `take`
    /// are read and the rest are zero; the tile rows two input rows apart),
    /// the tile rows one after the other in the lanes.
    ///
    /// # Safety
    ///
    /// AVX-512F, and rows `r, r + 2, …, r + 2(k − 1)` (`wp` apart from
    /// `x`) readable at columns `c0 .. c0 + take`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn row_pairs(
        x: *const f32,
        (wp, tw, k): (usize, usize, usize),
        r: usize,
        (c0, take): (usize, usize),
    ) -> (__m512, __m512) {
        // SAFETY: the caller upholds this function's contract; a masked
        // load reads only its lanes (the pointer is moved back by the lane
        // offset, and the lanes before it are masked off).
        unsafe {
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            let seg = 2 * tw;
            let (mut a, mut b) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for i in 0..k {
                let p = x.add((2 * i + r) * wp + c0);
                let start = i * seg;
                let (reg, o) = if start < 16 {
                    (&mut a, start)
                } else {
                    (&mut b, start - 16)
                };
                let mask = (((1u32 << take.min(seg)) - 1) << o) as __mmask16;
                *reg = _mm512_mask_loadu_ps(*reg, mask, p.wrapping_sub(o));
            }
            (
                _mm512_permutex2var_ps(a, even, b),
                _mm512_permutex2var_ps(a, odd, b),
            )
        }
    }

    /// The input transform of a block of `n` (≤ 16) tiles, one per lane:
    /// `k` rows of `tw` tiles (`n = k·tw = 16`) or, with `k = 1`, `n`
    /// tiles of one row; `x` at the block's first input row and column,
    /// rows `wp` apart; `V_ξ` of the block's tile `j` to `v[ξ · plane + j]`.
    ///
    /// # Safety
    ///
    /// AVX-512F, input rows `0 .. 2k + K − 1` readable at columns
    /// `0 .. 2n/k + K − 1`, and `v + ξ·plane .. + n` writable for every ξ.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn input_block<const K: usize>(
        x: *const f32,
        shape: (usize, usize, usize),
        n: usize,
        v: *mut f32,
        plane: usize,
    ) {
        // SAFETY: the caller upholds this function's contract.
        unsafe {
            let (wp, tw, k) = shape;
            // d[r][c]: column 2j + c of row r of tile j, in lane j.
            let mut d = [[_mm512_setzero_ps(); 4]; 4];
            for (r, row) in d.iter_mut().enumerate().take(K + 1) {
                if k > 1 {
                    (row[0], row[1]) = row_pairs(x, shape, r, (0, 2 * tw));
                    // (2×2 kernels need column 2j + 2 only: it ends at 2tw.)
                    (row[2], row[3]) = row_pairs(x, shape, r, (2, 2 * tw + K - 3));
                } else {
                    let (p, need) = (x.add(r * wp), 2 * n + K - 1);
                    (row[0], row[1]) = even_odd(p, need);
                    (row[2], row[3]) = even_odd(p.add(2), need - 2);
                }
            }
            transform_input::<K>(&d, v, plane, lanes(n));
        }
    }

    /// The output transform of a block of `n` tiles (as in [`input_block`]):
    /// `M_ξ` of tile `j` at `m[ξ · plane + j]`, its 2×2 outputs to `y + 2j`
    /// (the tile's row of the block moves the place by two output rows)
    /// and the same one row (`wp`) below.
    ///
    /// # Safety
    ///
    /// AVX-512F, `m + ξ·plane .. + n` readable for every ξ, and output rows
    /// `0 .. 2k` (`wp` apart from `y`) writable at columns `0 .. 2n/k`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn output_block<const K: usize>(
        m: *const f32,
        plane: usize,
        (wp, tw, k): (usize, usize, usize),
        n: usize,
        y: *mut f32,
    ) {
        // SAFETY: the caller upholds this function's contract; a masked
        // store writes only its lanes (the pointer is moved back by the
        // lane offset, and the lanes before it are masked off).
        unsafe {
            let outputs = transform_output::<K>(m, plane, lanes(n));
            for (r, (lo, hi)) in outputs.into_iter().enumerate() {
                if k == 1 {
                    let row = y.add(r * wp);
                    _mm512_mask_storeu_ps(row, lanes(2 * n), lo);
                    _mm512_mask_storeu_ps(
                        row.wrapping_add(16),
                        lanes((2 * n).saturating_sub(16)),
                        hi,
                    );
                    continue;
                }
                // Tile row i's 2tw values start at lane 2tw·i of (lo, hi).
                let seg = 2 * tw;
                for i in 0..k {
                    let start = i * seg;
                    let (reg, o) = if start < 16 {
                        (lo, start)
                    } else {
                        (hi, start - 16)
                    };
                    let mask = (((1u32 << seg) - 1) << o) as __mmask16;
                    _mm512_mask_storeu_ps(y.add((2 * i + r) * wp).wrapping_sub(o), mask, reg);
                }
            }
        }
    }

    impl super::Lanes for __m512 {
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            // SAFETY: the caller's contract (AVX-512F).
            unsafe { _mm512_add_ps(self, b) }
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            // SAFETY: the caller's contract (AVX-512F).
            unsafe { _mm512_sub_ps(self, b) }
        }
    }

    /// `(Bᵀ d) B` of 16 tiles in the lanes of `d[row][column]`, into
    /// `v[ξ · plane]` (the lanes of `mask`).
    ///
    /// # Safety
    ///
    /// AVX-512F, and `v + ξ·plane` writable at the mask's lanes for `ξ < 16`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transform_input<const K: usize>(
        d: &[[__m512; 4]; 4],
        v: *mut f32,
        plane: usize,
        mask: __mmask16,
    ) {
        // SAFETY: the caller upholds this function's contract.
        unsafe {
            super::input_transform::<__m512, K>(
                |r, c| d[r][c],
                |xi, value| _mm512_mask_storeu_ps(v.add(xi * plane), mask, value),
            )
        }
    }

    /// `Aᵀ M A` of 16 tiles (`M_ξ` at `m[ξ · plane]`, the lanes of `mask`
    /// read): per output row, its 32 values (two per tile, interleaved) in
    /// two registers.
    ///
    /// # Safety
    ///
    /// AVX-512F, and `m + ξ·plane` readable at the mask's lanes for `ξ < 16`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transform_output<const K: usize>(
        m: *const f32,
        plane: usize,
        mask: __mmask16,
    ) -> [(__m512, __m512); 2] {
        // SAFETY: the caller upholds this function's contract.
        unsafe {
            let n = K + 1;
            let rows = super::output_transform::<__m512, K>(|r, c| {
                _mm512_maskz_loadu_ps(mask, m.add((n * r + c) * plane))
            });
            // Each output row's two columns interleaved.
            let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let hi =
                _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            rows.map(|(left, right)| {
                (
                    _mm512_permutex2var_ps(left, lo, right),
                    _mm512_permutex2var_ps(left, hi, right),
                )
            })
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod rows;
#[cfg(not(target_arch = "x86_64"))]
mod rows {
    /// The transforms' scratch (no transforms run off x86-64).
    #[derive(Default)]
    pub(super) struct Scratch;
}

#[cfg(test)]
mod tests {
    use super::*;
    use data::Rng;

    /// The transforms give the direct kernel's convolution at every valid
    /// position, for tile rows of one vector, several, and a masked tail,
    /// and tile counts that leave padding in the transformed planes.
    #[test]
    fn winograd_matches_the_direct_kernel() {
        let mut rng = Rng::new(5);
        for (k, cin, cout, oh, ow) in [
            (3usize, 32usize, 40, 6, 34),
            (3, 33, 32, 2, 2),
            (3, 48, 64, 8, 8),
            (3, 32, 32, 4, 30),
            // Several tile rows per vector: 2, 8 and 16 of them.
            (3, 32, 32, 16, 16),
            (3, 40, 32, 16, 4),
            (3, 32, 36, 32, 2),
            // Narrow layers (the AVX2 transforms take them), 8 + 4 + 1 + 1
            // tiles a row.
            (3, 16, 16, 32, 32),
            (3, 16, 24, 4, 28),
            // 2×2 kernels, one and several tile rows per vector.
            (2, 32, 40, 6, 34),
            (2, 48, 32, 4, 30),
            (2, 32, 32, 16, 16),
            (2, 36, 64, 8, 8),
            (2, 32, 32, 32, 2),
        ] {
            let g = shape(k, cin, cout, oh, ow);
            let (s, wp, l) = (g.s, g.wp, g.l);
            // Every shape is one the transforms compute, whether or not
            // this CPU's channel minimum sends it through them.
            assert!(fits(&g));
            if super::super::isa().is_none() {
                eprintln!("SKIPPED: the direct kernels need AVX-512 or AVX2");
                return;
            }
            let mut random =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect() };
            let xp = random(cin * s);
            let w = random(packed_len(cin, k * k, cout));
            let mut want = vec![0f32; cout * l];
            super::super::forward(&g, &xp, &w, &mut want);
            let mut first: Option<Vec<f32>> = None;
            for t in runnable() {
                let mut got = vec![f32::NAN; cout * l];
                forward_using(t, &g, &xp, &kernel(&g, &w), &mut got);
                // Relative to the largest output, like the kernel tests: the
                // transforms round differently, not worse than the sums' scale.
                let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                let mut worst = 0f32;
                for co in 0..cout {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let q = co * l + oy * wp + ox;
                            assert!(
                                got[q].is_finite(),
                                "{t:?} k{k} {cin}x{cout} {oh}x{ow}: position {q} not written"
                            );
                            worst = worst.max((got[q] - want[q]).abs() / scale);
                        }
                    }
                }
                assert!(
                    worst < 1e-5,
                    "{t:?} k{k} {cin}x{cout} {oh}x{ow}: relative difference {worst}"
                );
                // Every transform gives the same bits at the valid positions
                // (so `measure` may choose either).
                let valid = |v: &[f32]| -> Vec<u32> {
                    (0..cout * oh * ow)
                        .map(|i| v[(i / (oh * ow)) * l + (i / ow % oh) * wp + i % ow].to_bits())
                        .collect()
                };
                match &first {
                    None => first = Some(got),
                    Some(other) => assert!(
                        valid(other) == valid(&got),
                        "{t:?} k{k} {cin}x{cout} {oh}x{ow}: other bits than the first transforms"
                    ),
                }
            }
        }
    }

    /// The shape of a stride-1 convolution with `oh × ow` outputs in the
    /// wide layout the kernels use.
    fn shape(k: usize, cin: usize, cout: usize, oh: usize, ow: usize) -> Wide {
        let wp: usize = ow + k - 1;
        let l = ((oh - 1) * wp + ow).next_multiple_of(16);
        let s = ((oh + k - 1) * wp).max((k - 1) * (wp + 1) + l);
        Wide {
            cin,
            cout,
            s,
            wp,
            kh: k,
            kw: k,
            l,
            stride: 1,
            sp: 0,
            oh,
        }
    }

    /// The weight gradient through the transforms equals the direct
    /// kernel's (relative to its largest value), summed over several
    /// images spaced apart, for 3×3 and 2×2 kernels, one and several
    /// vectors of output channels and a partial one, and tiles that leave
    /// padding in the transformed planes.
    #[test]
    fn winograd_weight_gradient_matches_the_direct_kernel() {
        if super::super::isa().is_none() {
            eprintln!("SKIPPED: the direct kernels need AVX-512 or AVX2");
            return;
        }
        let mut rng = Rng::new(7);
        for (k, cin, cout, oh, ow) in [
            (3usize, 32usize, 40, 6, 34),
            (3, 16, 24, 4, 28),
            (3, 48, 64, 8, 8),
            (3, 33, 17, 2, 2),
            (3, 32, 32, 16, 16),
            (2, 32, 40, 6, 34),
            (2, 36, 64, 8, 8),
        ] {
            let g = shape(k, cin, cout, oh, ow);
            let images = 3;
            let np = super::super::transposed_width(cout);
            let (xs, ds, ts) = (cin * g.s + 5, cout * g.l + 3, g.l * np + 16);
            let mut random =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect() };
            let xp = random(images * xs);
            // The wide gradient, zero past each row's `ow` valid columns.
            let mut dy = random(images * ds);
            for image in dy.chunks_exact_mut(ds) {
                for (q, v) in image[..cout * g.l].iter_mut().enumerate() {
                    let q = q % g.l;
                    if q % g.wp >= ow || q / g.wp >= oh {
                        *v = 0.0;
                    }
                }
            }
            let mut t = vec![0f32; images * ts];
            for (dyi, ti) in dy.chunks_exact(ds).zip(t.chunks_exact_mut(ts)) {
                super::super::transpose_gradient(&g, dyi, g.l, ti);
            }
            let taps = k * k;
            let mut want = vec![0f32; cin * taps * cout];
            super::super::weight_grad(&g, (images, xs, ds, g.l), &xp, &dy, &mut want, 1);
            let mut du = vec![0f32; grad_len(&g)];
            // Two calls, as the backward makes one per group of images.
            weight_grad(&g, (2, xs, ts), &xp, &t, &mut du);
            weight_grad(&g, (1, xs, ts), &xp[2 * xs..], &t[2 * ts..], &mut du);
            let mut got = vec![0f32; cin * taps * cout];
            kernel_grad(&g, &du, &mut got);
            let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let worst = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs() / scale));
            assert!(
                worst < 1e-5,
                "k{k} {cin}x{cout} {oh}x{ow}: relative difference {worst}"
            );
        }
    }
}
