#!/usr/bin/env bash
# Install mmcv 2.1.0 (full, with its compiled ops) into the active Python environment, for the `seg` extra.
#
# Why a script: mmcv 2.1 has no wheels on PyPI, mmseg 1.2.2 needs 2.0.0rc4 <= mmcv < 2.2.0, and mmcv's
# setup.py passes -std=c++17 while torch >= 2.14's headers need C++20. So the source distribution is
# unpacked, its flag changed to -std=c++20, and built against the installed torch (about 10 minutes on
# 2 cores). The wheel is kept in a folder named after the torch version and the kind of ops built
# (pip's own wheel cache does not key on the torch version and would silently reuse a wheel built
# against another torch), so later runs install it in seconds.
#
# Usage: bash tools/install_mmcv.sh            (then: pip install -e '.[seg]')
# Env:   FNABENCH_WHEELS  where built wheels live (default ~/.cache/fnabench/wheels)
#        MAX_JOBS         parallel compile jobs (default: the number of CPU cores)
set -euo pipefail

MMCV_VERSION=2.1.0
python=${PYTHON:-python}

torch_version=$("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null) || {
    echo "install_mmcv: torch is not importable by '$python'; install torch first (pip install torch==2.14.1 torchvision==0.29.1)" >&2
    exit 2
}
# CUDA ops are built only where a GPU is visible (or FORCE_CUDA=1); the folder says which kind this is.
ops=$("$python" -c 'import os, torch; print("cuda" if torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1" else "cpu")')
py_tag=$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheel_dir=${FNABENCH_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/fnabench/wheels}/torch-${torch_version}-${ops}
wheel=$(ls "$wheel_dir"/mmcv-"$MMCV_VERSION"-"$py_tag"-*.whl 2>/dev/null | head -n 1 || true)

if [ -z "$wheel" ]; then
    echo "install_mmcv: building mmcv $MMCV_VERSION against torch $torch_version ($ops ops) into $wheel_dir (about 10 minutes on 2 cores)"
    start=$(date +%s)
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # mmcv's setup.py imports pkg_resources, gone from setuptools >= 81: build tools go into a side folder
    # on PYTHONPATH (used without build isolation) so the environment's own setuptools is left as it is.
    "$python" -m pip install --quiet --no-cache-dir --target "$work/buildtools" "setuptools==80.10.2" wheel ninja
    export PYTHONPATH="$work/buildtools${PYTHONPATH:+:$PYTHONPATH}" PATH="$work/buildtools/bin:$PATH"
    "$python" -m pip download --quiet --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV_VERSION" -d "$work"
    tar -xzf "$work"/mmcv-"$MMCV_VERSION".tar.gz -C "$work"
    src="$work/mmcv-$MMCV_VERSION"
    grep -q -- '-std=c++17' "$src/setup.py" || { echo "install_mmcv: -std=c++17 not found in mmcv's setup.py" >&2; exit 1; }
    sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
    mkdir -p "$wheel_dir"
    MAX_JOBS=${MAX_JOBS:-$(nproc)} "$python" -m pip wheel --quiet --no-deps --no-build-isolation --no-cache-dir "$src" -w "$wheel_dir"
    wheel=$(ls "$wheel_dir"/mmcv-"$MMCV_VERSION"-"$py_tag"-*.whl | head -n 1)
    echo "install_mmcv: built $(basename "$wheel") in $(( $(date +%s) - start )) s"
else
    echo "install_mmcv: reusing $wheel"
fi

"$python" -m pip install --quiet "mmcv @ file://$wheel"
"$python" -c 'import mmcv, mmcv.ops; print("install_mmcv: mmcv", mmcv.__version__, "with compiled ops")'
