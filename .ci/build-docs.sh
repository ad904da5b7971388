#!/usr/bin/env bash
# CI: build the Sphinx user guide with warnings as errors.
#
# Run from anywhere, with the environment that has the package's requirements
# installed (autodoc imports declarative, hence torch, sympy, numpy, scipy); .ci/run
# calls it after its install step. Installs sphinx (docs/requirements.txt) into that
# environment and builds into docs/_build/html from scratch, so that warnings of
# unchanged pages are not hidden by an incremental build.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch, sympy, numpy, scipy" 2>/dev/null; then
    echo "build-docs: install the package first (pip install -e .): autodoc imports it" >&2
    exit 1
fi
python -m pip install --quiet -r docs/requirements.txt
rm -rf docs/_build
python -m sphinx -W --keep-going -E -b html docs docs/_build/html
echo "build-docs: docs/_build/html/index.html"
