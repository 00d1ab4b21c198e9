#!/usr/bin/env bash
# Builds gradcast with CUDA support (`--features cuda`) on a machine without a
# system CUDA installation: the CUDA compiler, headers and libraries come from
# PyPI wheels (NVIDIA's nvidia-cuda-* packages) installed into a venv.
#
#   deploy/cuda-build.sh                      # CUDA 13 wheels, compute capability 90 (H100/H200)
#   CUDA_COMPUTE_CAP=80 deploy/cuda-build.sh  # A100
#   CUDA_MAJOR=12 deploy/cuda-build.sh        # the -cu12 wheels instead
#   CUDNN=1 deploy/cuda-build.sh              # also cuDNN (nvidia-cudnn wheel), --features cudnn
#   CUDA_TOOLKIT=13.2 deploy/cuda-build.sh    # a newer toolkit (for a newer driver, see below)
#
# candle's kernels ship as PTX that the NVIDIA driver compiles when they are
# first loaded, and a driver accepts PTX only from toolkits up to its own CUDA
# version (`nvidia-smi` prints it): PTX from a newer nvcc fails to load with
# CUDA_ERROR_UNSUPPORTED_PTX_VERSION. So the toolkit is pinned to the oldest
# CUDA 13 release (13.0, the R580 drivers) unless CUDA_TOOLKIT says otherwise.
#
# Result: target/cuda/release/gradcast (also `gradcast bench`; deploy/gpu-proof.sh
# is the script to run with it on a GPU machine) (a separate target folder, so the CPU
# build in target/release is left alone). At run time it loads the CUDA
# driver (libcuda.so.1, from the NVIDIA driver) and the CUDA runtime libraries
# (libcudart, libcublas, libcublasLt, libcurand, libnvrtc). They are found
# through the usual dynamic-loader search; point LD_LIBRARY_PATH at the
# folder printed at the end (or at the nvidia/*/lib folders of an installed
# PyTorch, which ships the same libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
MAJOR=${CUDA_MAJOR:-13}
CAP=${CUDA_COMPUTE_CAP:-90}
VENV=${CUDA_VENV:-target/cuda-venv}

if [ "$MAJOR" = 13 ]; then
  tk=${CUDA_TOOLKIT:-13.0}
  pkgs=("nvidia-cuda-nvcc==$tk.*" "nvidia-cuda-crt==$tk.*" "nvidia-nvvm==$tk.*" "nvidia-cuda-runtime==$tk.*"
    "nvidia-cuda-cccl==$tk.*" "nvidia-cuda-nvrtc==$tk.*" "nvidia-cublas==$tk.*" nvidia-curand)
else
  pkgs=(nvidia-cuda-nvcc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12 nvidia-cuda-nvrtc-cu12 nvidia-cublas-cu12 nvidia-curand-cu12)
fi
features=cuda
if [ -n "${CUDNN:-}" ]; then
  pkgs+=("nvidia-cudnn-cu$MAJOR")
  features=cudnn
fi
[ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "${pkgs[@]}"
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

nvcc=$(find "$site/nvidia" -path '*/bin/nvcc' -type f | sed -n 1p)
[ -n "$nvcc" ] || { echo "no nvcc in the wheels under $site/nvidia" >&2; exit 1; }
root=$(dirname "$(dirname "$nvcc")")
chmod +x "$nvcc" "$root"/bin/* 2>/dev/null || true
find "$root" -path '*/nvvm/bin/*' -type f -exec chmod +x {} + 2>/dev/null || true

# One lib folder with unversioned names, as linkers and dlopen(libX.so) expect.
libs="$PWD/target/cuda-lib"
mkdir -p "$libs"
while IFS= read -r so; do
  base=$(basename "$so")
  ln -sf "$so" "$libs/$base"
  ln -sf "$so" "$libs/${base%%.so*}.so"
done < <(find "$site/nvidia" -name 'lib*.so*' -type f)
# The CUDA driver library (libcuda.so.1) comes with the NVIDIA driver, not with
# the toolkit wheels. To link without a driver installed, build a stub with the
# driver API's symbols (taken from cudarc's bindings) and soname libcuda.so.1;
# at run time the real driver library is loaded instead.
if ! ls "$libs"/libcuda.so >/dev/null 2>&1 || [ -n "${REBUILD_CUDA_STUB:-}" ]; then
  find_bindings() {
    find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-*/src/driver/sys/mod.rs' 2>/dev/null | sort -V | tail -n 1
  }
  bindings=$(find_bindings || true)
  if [ -z "$bindings" ]; then
    cargo fetch --quiet
    bindings=$(find_bindings)
  fi
  grep -o 'fn cu[A-Z][A-Za-z0-9_]*' "$bindings" | sed 's/^fn //' | sort -u \
    | sed 's/.*/void &(void) {}/' > "$libs/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$libs/libcuda.so" "$libs/cuda_stub.c"
  rm -f "$libs/libcuda.so.1"
fi
includes=$(find "$site/nvidia" -name 'cuda_runtime.h' -printf '%h\n' | sort -u | paste -sd: -)

export PATH="$root/bin:$PATH"
export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_HOME="$root"
export CUDA_COMPUTE_CAP="$CAP"
export CPATH="$includes${CPATH:+:$CPATH}"
export LIBRARY_PATH="$libs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvcc --version | tail -n 2
# cudarc knows toolkits up to a given release (13.4 for the version candle
# 0.11 uses); newer 13.x toolkits work with its 13.4 bindings.
if [ -z "${CUDARC_CUDA_VERSION:-}" ]; then
  release=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  read -r cmaj cmin <<<"$release"
  if [ "$cmaj" = 13 ] && [ "$cmin" -gt 4 ]; then cmin=4; fi
  if [ "$cmaj" = 12 ] && [ "$cmin" -gt 9 ]; then cmin=9; fi
  export CUDARC_CUDA_VERSION="${cmaj}0${cmin}0"
fi
echo "cudarc bindings for CUDA $CUDARC_CUDA_VERSION"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}
cargo build --release --features "$features" --bin gradcast
strip "$CARGO_TARGET_DIR/release/gradcast"
echo "built $CARGO_TARGET_DIR/release/gradcast (features: $features) with CUDA $MAJOR for compute capability $CAP"
echo "runtime libraries: LD_LIBRARY_PATH=$libs (or a PyTorch install's nvidia/*/lib)"
