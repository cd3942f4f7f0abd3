#!/usr/bin/env bash
# The main job: embed the sample photos (CC0 / public domain, fetched by setup.sh), embed a
# few text queries, and show which photo each query finds. Uses CLIP ViT-B-32 (openai); if
# its weights cannot be had (offline), says so and falls back to the test-only tiny model.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=data/demo
mkdir -p "$OUT"
MODEL=()
.venv/bin/imgembed embed .testdata/photos --output "$OUT/photos.npy"
rc=$?
if [ "$rc" -eq 4 ]; then
  echo "NOTE: CLIP ViT-B-32 weights are not available on this machine (see the error above)." >&2
  echo "NOTE: falling back to the TEST-ONLY tiny model: the pipeline runs, the vectors carry no meaning." >&2
  MODEL=(--model imgembed-tiny --pretrained seed:0)
  .venv/bin/imgembed embed .testdata/photos --output "$OUT/photos.npy" "${MODEL[@]}" || exit
elif [ "$rc" -ne 0 ]; then
  exit "$rc"
fi
QUERIES=("an astronaut" "a rocket launch" "a cup of coffee" "a cat" "stars and galaxies")
.venv/bin/imgembed embed-text "${QUERIES[@]}" --output "$OUT/queries.npy" "${MODEL[@]+"${MODEL[@]}"}" || exit
.venv/bin/python - "$OUT" <<'PY'
import sys
from pathlib import Path

import numpy as np

out = Path(sys.argv[1])
photos = np.load(out / "photos.npy")
names = [Path(p).name for p in (out / "photos.npy.sources.txt").read_text().splitlines()]
queries = np.load(out / "queries.npy")
texts = (out / "queries.npy.sources.txt").read_text().splitlines()
print(f"\n{'query':22} best match (cosine)")
for text, scores in zip(texts, queries @ photos.T):
    best = int(np.argmax(scores))
    print(f"{text:22} {names[best]} ({scores[best]:.3f})")
PY
