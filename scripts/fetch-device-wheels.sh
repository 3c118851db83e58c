#!/usr/bin/env bash
# Wheels that a GPU machine without a package index needs to run bench/gpu_check.sh: tunelab's own
# pure dependencies that such images lack (pydantic and its parts), for CPython 3.12 on x86-64.
# Writes them to .whl/ (gitignored); bench/gpu_check.sh installs whatever it finds there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
done
ls .whl
