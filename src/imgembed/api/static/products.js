// The product view: a store's catalogue searched by text, by a photo, or both; each card shows
// the fused score and its two parts (image and text cosine) with the product's own weights.
"use strict";

const products = { stores: [] };

function store() {
  return $("#store").value;
}

async function loadStores() {
  try {
    products.stores = await api("/api/v1/stores");
  } catch (error) {
    if (!$("[data-view=products]").hidden) status(`Cannot list stores: ${error.message}`, true);
    return;
  }
  const chosen = store();
  $("#store").replaceChildren(
    ...products.stores.map((s) => new Option(`${s.store_id} (${s.products})`, s.store_id)),
  );
  keepChoice($("#store"), chosen, "products");
  $("#store-info").textContent = products.stores.length ? "" : "no stores: import products first";
}

function showView(name) {
  for (const node of document.querySelectorAll("[data-view]")) node.hidden = node.dataset.view !== name;
  $("#view-images").setAttribute("aria-pressed", String(name === "images"));
  $("#view-products").setAttribute("aria-pressed", String(name === "products"));
  cancel();
  releaseThumbnails();
  $("#results").replaceChildren();
  status("");
  if (name === "products") loadStores();
}

function fixed(value) {
  return value === null || value === undefined ? "–" : value.toFixed(4);
}

function productCard(hit) {
  const node = $("#product-card").content.firstElementChild.cloneNode(true);
  node.dataset.id = hit.product_id;
  node.querySelector(".score").textContent = `#${hit.rank}  ${hit.score.toFixed(4)}`;
  const parts = hit.ranked_by === "combined"
    ? `image ${fixed(hit.image_score)} × ${hit.image_weight} + text ${fixed(hit.text_score)} × ${hit.text_weight}`
    : `by ${hit.ranked_by} only`;
  node.querySelector(".parts").textContent = parts;
  node.querySelector(".title").textContent = hit.title;
  const price = hit.price === null ? "" : `${hit.price.toFixed(2)} ${hit.currency ?? ""}`;
  node.querySelector(".price").textContent = [price, hit.category].filter(Boolean).join(" · ");
  node.querySelector(".source").textContent = hit.product_id;
  if (hit.text_only) {
    node.querySelector(".title").append(" ", Object.assign(document.createElement("span"), {
      className: "badge", textContent: "no image" }));
  }
  const img = node.querySelector("img");
  if (hit.image_url) {
    const path = `/api/v1/stores/${encodeURIComponent(store())}/products/`
      + `${encodeURIComponent(hit.product_id)}/thumbnail?size=256`;
    loadImage(img, path, "no thumbnail (the image cannot be read)");
  } else {
    img.alt = "no image";
  }
  return node;
}

function productTopK() {
  return Math.max(1, Math.min(200, Number($("#product-top-k").value) || 24));
}

async function searchProducts(file) {
  if (!store()) return status("Choose a store first.", true);
  const text = $("#product-query").value.trim();
  if (!text && !file) return status("Type a text, drop a photo, or both.", true);
  const form = new FormData();
  if (text) form.append("query", text);
  if (file) form.append("file", file, file.name);
  const category = $("#product-category").value.trim();
  if (category) form.append("category", category);
  if ($("#max-price").value) form.append("max_price", $("#max-price").value);
  form.append("top_k", String(productTopK()));
  const what = [text && `“${text}”`, file && file.name].filter(Boolean).join(" + ");
  const signal = begin(`Searching ${store()} for ${what}…`);
  try {
    const path = `/api/v1/stores/${encodeURIComponent(store())}/search`;
    const answer = await api(path, { method: "POST", body: form, signal });
    end(signal);
    releaseThumbnails();
    $("#results").replaceChildren(...answer.results.map(productCard));
    status(`${answer.results.length} products for ${what}, ranked by ${answer.ranked_by ?? "-"} `
      + `(${answer.processing_time.toFixed(2)} s)`);
  } catch (error) {
    failed(signal, error);
  }
}

function setUpProducts() {
  $("#view-images").addEventListener("click", () => showView("images"));
  $("#view-products").addEventListener("click", () => showView("products"));
  $("#product-form").addEventListener("submit", (event) => {
    event.preventDefault();
    searchProducts(null);
  });
  dropZone($("#product-drop"), $("#product-file"), searchProducts);
  $("#store").addEventListener("change", () => {
    // the results shown were the other store's (as for a collection: see app.js)
    cancel();
    releaseThumbnails();
    $("#results").replaceChildren();
    status("");
  });
}

setUpProducts();
