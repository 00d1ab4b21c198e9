//! The shapes of one convolution, and which path computes it.

use candle_core::{bail, Result};

use crate::direct;

/// Fewest input channels for the direct path (below, im2col + one gemm):
/// with AVX-512 the images' three (measured: resnet20's 3-channel 3×3 stem
/// trains in 4.7 ms per step on one thread against 7.0 with im2col), for the gemm
/// fallback eight.
const DIRECT_MIN_CHANNELS: usize = 8;
const DIRECT_MIN_CHANNELS_AVX: usize = 3;
/// Most input and output channels for the direct path (measured on
/// resnet20's 16- and 32-channel layers; wider ones, where im2col's copies
/// are a smaller share of the gemm, keep im2col: unmeasured on a loaded machine).
const DIRECT_MAX_CHANNELS: usize = 32;

/// How a convolution is computed. Chosen once per shape ([`Geom::path`]),
/// from the shape, the CPU and `GRADCAST_KERNEL_PATH`; the forward and both
/// gradients then follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConvPath {
    /// 1×1, stride 1, no padding: the input already is the column matrix,
    /// one gemm.
    Identity,
    /// im2col + one gemm (col2im for the input gradient).
    Im2col,
    /// Stride 1 on CPUs without AVX-512 or AVX2: one gemm per kernel tap
    /// over zero-padded planes ([`super::plan::Plan`]), no column matrix.
    TapGemms,
    /// The register-blocked direct kernels of [`direct`] (AVX-512 or AVX2):
    /// stride 1, or stride 2 through phase planes (its input gradient in
    /// [`super::phases`]).
    Direct,
}

impl ConvPath {
    /// The two im2col-free paths, which share their layout ([`super::plan::Plan`]).
    pub(crate) fn is_direct(self) -> bool {
        matches!(self, ConvPath::TapGemms | ConvPath::Direct)
    }
}

/// Shapes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    pub(crate) n: usize,
    pub(crate) cin: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) cout: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) stride: usize,
    pub(crate) top: usize,
    pub(crate) left: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
}

impl Geom {
    pub(crate) fn new(x: &[usize], k: &[usize], stride: usize, pad: [usize; 4]) -> Result<Self> {
        let (&[n, cin, h, w], &[cout, kcin, kh, kw]) = (x, k) else {
            bail!("conv2d expects 4-D input and kernel, got {x:?} and {k:?}")
        };
        if kcin != cin {
            bail!("conv2d: input has {cin} channels, kernel expects {kcin}");
        }
        if stride == 0 || kh == 0 || kw == 0 {
            bail!("conv2d: stride and kernel sizes must be positive");
        }
        let [top, bottom, left, right] = pad;
        let (ph, pw) = (h + top + bottom, w + left + right);
        if ph < kh || pw < kw {
            bail!("conv2d: kernel {kh}x{kw} larger than padded input {ph}x{pw}");
        }
        let (oh, ow) = ((ph - kh) / stride + 1, (pw - kw) / stride + 1);
        Ok(Self {
            n,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            stride,
            top,
            left,
            oh,
            ow,
        })
    }

    /// Rows of the column matrix: `cin · kh · kw`.
    pub(super) fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// Output positions per image.
    pub(crate) fn p(&self) -> usize {
        self.oh * self.ow
    }

    /// Values per input image.
    pub(super) fn image(&self) -> usize {
        self.cin * self.h * self.w
    }

    /// Whether the column matrix of an image is the image itself (1×1, stride 1, no padding).
    fn identity(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.oh == self.h && self.ow == self.w
    }

    /// The path for this shape on this CPU (see [`ConvPath`]).
    pub(crate) fn path(&self) -> ConvPath {
        if self.direct() {
            if direct::available() {
                ConvPath::Direct
            } else {
                ConvPath::TapGemms
            }
        } else if self.identity() {
            ConvPath::Identity
        } else {
            ConvPath::Im2col
        }
    }

    /// Whether the direct (im2col-free) path applies: stride 1, a kernel
    /// wider than 1×1, paddings under the kernel size (so that the input
    /// gradient is again such a convolution) and enough input channels. With
    /// the direct kernels (AVX-512 or AVX2) that is all; the gemm-per-tap fallback also needs few enough
    /// channels for the copies to matter and maps wide enough.
    fn direct(&self) -> bool {
        if !crate::path::direct_allowed() {
            return false;
        }
        let avx = direct::available();
        if self.stride == 2 {
            return avx && self.strided_direct();
        }
        let bottom = (self.oh + self.kh - 1).checked_sub(self.h + self.top);
        let right = (self.ow + self.kw - 1).checked_sub(self.w + self.left);
        self.stride == 1
            && !self.identity()
            && (self.kh > 1 || self.kw > 1)
            && self.cin
                >= if avx {
                    DIRECT_MIN_CHANNELS_AVX
                } else {
                    DIRECT_MIN_CHANNELS
                }
            && (avx || (self.cin <= DIRECT_MAX_CHANNELS && self.cout <= DIRECT_MAX_CHANNELS))
            && self.top < self.kh
            && self.left < self.kw
            && bottom.is_some_and(|b| b < self.kh)
            && right.is_some_and(|r| r < self.kw)
            && (avx || 8 * self.wide_len() <= 9 * self.p())
    }

    /// Whether a stride-2 convolution fits the direct path's phase planes
    /// (see [`Plan`]): enough input channels, and every input position
    /// inside the planes, which are as tall and wide as the output plus
    /// half the kernel. (1×1 kernels too: ResNet's projection shortcuts.)
    fn strided_direct(&self) -> bool {
        let (mh, mw) = ((self.kh - 1) / 2, (self.kw - 1) / 2);
        self.stride == 2
            && self.cin >= DIRECT_MIN_CHANNELS_AVX
            && (self.h + self.top - 1) / 2 < self.oh + mh
            && (self.w + self.left - 1) / 2 < self.ow + mw
    }

    /// Output length per channel of the direct path (see [`Plan`]): rows of
    /// the padded width, rounded up to whole vectors. On small maps the
    /// wrapped-around columns outweigh the copies it saves (8×8: 25 % extra).
    pub(super) fn wide_len(&self) -> usize {
        ((self.oh - 1) * (self.ow + self.kw - 1) + self.ow).next_multiple_of(16)
    }

    /// Output columns `[lo, hi)` whose input column `ox·s + kx − left` lies inside the image.
    pub(super) fn valid_cols(&self, kx: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = self.left.saturating_sub(kx).div_ceil(s).min(self.ow);
        let hi = (self.w + self.left)
            .saturating_sub(kx)
            .div_ceil(s)
            .clamp(lo, self.ow);
        (lo, hi)
    }

    /// Input row of output row `oy` for kernel row `ky`, if inside the image.
    pub(super) fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride + ky)
            .checked_sub(self.top)
            .filter(|&iy| iy < self.h)
    }
}
