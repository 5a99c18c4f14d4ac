#!/usr/bin/env bash
# The paper's four-domain run: builds the `moa` tool in Release (build-release/, or MOA_BUILD_DIR)
# and runs `moa four-domain` on the converted data: a base model, then Single-LoRA, Single-LoRA
# (mixed), MoE-LoRA, MoE-LoRA (naive) and MoA, evaluated on every domain's test split.
#   bash scripts/four_domain.sh [--data DIR] [--preset quick|full] [--out DIR] [...]
# The data folder: --data, else $MOA_FOUR_DOMAIN_DATA, else ../shared/data/four-domain beside the
# checkout. Without data the program stops and says how to make it (`moa data prepare`).
# Results: <out>/results.md (the table), results.json, curves.svg, confusion.svg. Run it again
# with the same --out after an interruption and it continues from its checkpoints.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/deps.sh

build_dir=${MOA_BUILD_DIR:-build-release}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS="" >/dev/null
cmake --build "$build_dir" -j "$(nproc)" --target moa_cli

if [[ -z ${MOA_FOUR_DOMAIN_DATA:-} && -d ../shared/data/four-domain ]]; then
  export MOA_FOUR_DOMAIN_DATA=../shared/data/four-domain
fi
exec env OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" \
  "$build_dir/examples/moa" four-domain --preset quick --out runs/four-domain-quick "$@"
