#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs offline (--wheels DIR) on a CUDA machine that already has
# torch but not nnU-Net:
#
#   bash scripts/gpu_wheels.sh DIR [PYTHON_VERSION=3.12]
#
# Pinned to the versions this project is tested with (nnU-Net 2.8.1's dependency closure, SimpleITK included).
# Left out, because a machine with a CUDA build of torch has them or does not need them: torch and its CUDA
# libraries (nvidia-*, triton), numpy, sympy, networkx, jinja2, filelock, fsspec, pillow, setuptools. Still the
# scientific stack (scipy, SimpleITK, scikit-image, pandas, ...) is large: the script prints the total and, when it
# exceeds 64 MB, the largest wheels; EXCLUDE="scipy pandas" leaves more out for machines (e.g. NGC PyTorch
# images) that already ship them. Writes DIR/requirements.txt, which gpu_check.sh installs with --no-index.
# Pure-Python packages published only as source (surface-distance, ...) are built into wheels locally.
# torchvision (which nnU-Net needs through timm) must match the target's torch: it is left out unless
# TORCH_VERSION names that torch (e.g. TORCH_VERSION=2.11 fetches torchvision 0.26.*, the rule being
# 0.(minor + 15)); a CUDA torch usually comes with its torchvision. ARCH=aarch64 for Arm machines (default x86_64).
set -euo pipefail
dir="${1:?usage: bash scripts/gpu_wheels.sh DIR [PYTHON_VERSION]}"; pyver="${2:-3.12}"
py="${PYTHON:-python3}"
abi="cp${pyver/./}"
arch="${ARCH:-x86_64}"
case "$arch" in x86_64|aarch64) ;; *) echo "ARCH must be x86_64 or aarch64, not $arch" >&2; exit 2 ;; esac
mkdir -p "$dir"
torchvision=()
if [ -n "${TORCH_VERSION:-}" ]; then
  [[ "$TORCH_VERSION" =~ ^2\.([0-9]+) ]] || { echo "TORCH_VERSION must look like 2.11 or 2.11.0" >&2; exit 2; }
  torchvision=("torchvision==0.$((BASH_REMATCH[1] + 15)).*")
else
  echo "torchvision left out (set TORCH_VERSION=<the target's torch, e.g. 2.11> if it has none)"
fi
pkgs=(
  nnunetv2==2.8.1 acvl-utils==0.2.6 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 blosc2==4.14.1
  dynamic-network-architectures==0.4.4 simpleitk==2.5.7 surface-distance==0.1 h5py==3.16.0 scipy==1.17.1
  scikit-learn==1.9.1 scikit-image==0.26.0 matplotlib==3.11.2 pandas==3.1.1 seaborn==0.13.2 nibabel==5.4.2
  tifffile==2026.3.3 imageio==2.38.2 imagecodecs==2026.3.6 connected-components-3d==4.1.1 einops==0.8.2
  timm==1.0.22 "${torchvision[@]}" huggingface-hub==2.4.0 safetensors==0.8.0 hf-xet==1.8.0 pyyaml==6.0.4
  tqdm==4.70.1 requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.3
  graphviz==0.21 yacs==0.1.8 dicom2nifti pydicom absl-py==2.5.1 msgpack==1.2.4 ndindex==1.10.1 numexpr==2.14.2
  joblib==1.6.0 threadpoolctl==3.8.0 lazy-loader==0.6 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0
  kiwisolver==1.5.1 pyparsing==3.3.3 python-dateutil==4.0.0 six==1.17.0 tzdata==2026.6 packaging==26.4
  future==1.0.0 linecache2==1.0.0 traceback2==1.4.0 unittest2==1.1.0 argparse==1.4.0 pydantic==2.14.4
  pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 click==8.5.1 rich==15.0.0
  markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0
  narwhals==2.29.0 cloudpickle==3.1.3 importlib-resources==7.1.0
)
exclude=" ${EXCLUDE:-} "
: > "$dir/requirements.txt"
for spec in "${pkgs[@]}"; do
  name="${spec%%==*}"
  case "$exclude" in *" $name "*) echo "left out: $name"; continue ;; esac
  echo "$spec" >> "$dir/requirements.txt"
  if ! "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --abi "$abi" --abi abi3 --abi none --platform "manylinux_2_28_$arch" --platform "manylinux_2_17_$arch" \
        --platform "manylinux2014_$arch" --platform any -d "$dir" "$spec"; then
    echo "no wheel for $spec on PyPI: building one from source (pure Python only)"
    "$py" -m pip wheel -q --no-deps -w "$dir" "$spec"
  fi
done
total=$(du -sm "$dir" | cut -f1)
echo "wheels for Python $pyver in $dir: ${total} MB"
if [ "$total" -gt 64 ]; then
  echo "over 64 MB; the largest wheels (leave out what the target machine has with EXCLUDE=\"name ...\"):"
  ls -S -s --block-size=M "$dir"/*.whl | sed -n '1,8p'  # sed reads everything: head would SIGPIPE ls under pipefail
fi
