#!/usr/bin/env bash
# Create (or reuse) the project virtualenv at .venv and install mhe_scale with all extras,
# every package pinned by constraints.txt (torch stays 2.13.0: CPU wheel here, never a CUDA pull).
# A venv built for the same pins is cached under $MHE_VENV_CACHE (default ~/.cache/mhe_scale)
# and reused, so repeated CI runs on one machine skip the ~450 MB download.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PIP_CONSTRAINT="$root/constraints.txt" DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
key=$(cat constraints.txt setup.py | sha256sum | cut -c1-16)
cache=${MHE_VENV_CACHE:-$HOME/.cache/mhe_scale}/venv-$key
if [ ! -f "$cache/.complete" ]; then
  echo "[install] building venv $cache"
  rm -rf "$cache" && python3 -m venv "$cache"   # built in place: venv scripts hard-code their path
  "$cache/bin/python" -m pip install -q torch==2.13.0
  "$cache/bin/python" -m pip install -q -e ".[test,text,face,deepspeed,logging]"
  touch "$cache/.complete"
fi
# venvs are not relocatable: point .venv at the cached one and (re)install this checkout into it
if [ "$(readlink -f .venv 2>/dev/null)" != "$(readlink -f "$cache")" ]; then rm -rf .venv; ln -s "$cache" .venv; fi
.venv/bin/python -m pip install -q --no-deps -e . >/dev/null
.venv/bin/python -c "import torch, mhe_scale; print('[install] torch', torch.__version__, '| mhe_scale', mhe_scale.__version__)"
