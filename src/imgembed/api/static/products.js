// The product view: a store's catalogue searched by text, by a photo, or both; each card shows
// the fused score and its two parts (image and text cosine) with the product's own weights.
"use strict";

const products = { stores: [] };

// What the product view reads of an answer (see SHAPES in app.js)
const isProductHit = (hit) => isRecord(hit) && typeof hit.product_id === "string" && isNumber(hit.score)
  && typeof hit.ranked_by === "string" && (hit.price === undefined || hit.price === null || isNumber(hit.price));
const PRODUCT_SHAPES = {
  stores: ["list of stores", (body) => listOf(body, (s) => isRecord(s) && typeof s.store_id === "string")],
  hits: ["list of products", (body) => isRecord(body) && listOf(body.results, isProductHit)],
};

function store() {
  return $("#store").value;
}

async function loadStores() {
  askAgainLater(loadStores); // this is the list's new turn
  const turn = listTurn(loadStores);
  const asking = "Asking the server for its stores…";
  if (visible("products") && !products.stores.length && !$("#status").textContent) {
    status(asking); // none to search in yet: said why
  }
  let list = [];
  let error = null;
  try {
    list = await listFrom(loadStores, turn, "/api/v1/stores", PRODUCT_SHAPES.stores, asking);
  } catch (caught) {
    error = caught; // a list the key no longer opens is not offered (as collections)
  }
  if (!newest(loadStores, turn)) return; // asked for again meanwhile: that answer counts
  if (turn.cancelled) return; // at Escape (said then): the list stays as it was
  products.stores = list;
  const failure = error && `Cannot list stores: ${error.message}${askAgainLater(loadStores, error)}`;
  const chosen = store();
  $("#store").replaceChildren(
    ...products.stores.map((s) => new Option(`${isolated(s.store_id)} (${isNumber(s.products) ? s.products : "?"})`, s.store_id)),
  );
  keepChoice($("#store"), chosen, "products");
  $("#store-info").textContent = products.stores.length || failure ? "" : "no stores: import products first";
  if (visible("products")) status(failure ?? "", Boolean(failure)); // an earlier failure is over
}

function showView(name) {
  for (const node of document.querySelectorAll("[data-view]")) node.hidden = node.dataset.view !== name;
  $("#view-images").setAttribute("aria-pressed", String(name === "images"));
  $("#view-products").setAttribute("aria-pressed", String(name === "products"));
  cancel();
  clearResults();
  status("");
  if (name === "products") loadStores();
  else loadCollections(); // what failed (a key, the model) is said again
}

function fixed(value) {
  return isNumber(value) ? value.toFixed(4) : "–";
}

function productCard(hit) {
  const node = $("#product-card").content.firstElementChild.cloneNode(true);
  node.dataset.id = hit.product_id;
  node.querySelector(".score").textContent = `${ranked(hit)}${hit.score.toFixed(4)}`;
  const parts = hit.ranked_by === "combined"
    ? `image ${fixed(hit.image_score)} × ${hit.image_weight} + text ${fixed(hit.text_score)} × ${hit.text_weight}`
    : `by ${hit.ranked_by} only`;
  node.querySelector(".parts").textContent = parts;
  node.querySelector(".title").textContent = isolated(hit.title ?? ""); // the badge stays as it reads
  const price = isNumber(hit.price) ? `${hit.price.toFixed(2)} ${hit.currency ?? ""}` : "";
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
    loadImage(img, path);
  } else {
    noImage(img, "no image");
  }
  return node;
}

function productTopK() {
  return Math.max(1, Math.min(200, Number($("#product-top-k").value) || 24));
}

// `note`: what the status line says first (that one of several files dropped was taken)
async function searchProducts(file, note = "") {
  if (!store()) return nothingChosen(loadStores, "store");
  const text = $("#product-query").value.trim();
  if (!text && !file) return status("Type a text, drop a photo, or both.", true);
  const form = new FormData();
  if (text) form.append("query", text);
  if (file) form.append("file", file, file.name);
  const category = $("#product-category").value.trim();
  if (category) form.append("category", category);
  const maxPrice = $("#max-price").value; // as sent: the field may change before the answer
  if (maxPrice) form.append("max_price", maxPrice);
  form.append("top_k", String(productTopK()));
  const what = [text && quoted(text), file && isolated(file.name)].filter(Boolean).join(" + ");
  const signal = begin(`${note}Searching ${isolated(store())} for ${what}…`);
  try {
    const path = `/api/v1/stores/${encodeURIComponent(store())}/search`;
    const answer = await api(path, { method: "POST", body: form, signal }, PRODUCT_SHAPES.hits);
    end(signal);
    showAll(answer.results, productCard);
    const seconds = took(answer);
    if (answer.results.length) {
      status(`${note}${plural(answer.results.length, "product")} for ${what}, ranked by ${answer.results[0].ranked_by}${seconds}`);
    } else {
      const filters = [category && `category ${quoted(category)}`, maxPrice && `price ≤ ${maxPrice}`];
      const which = filters.filter(Boolean).join(" and ");
      status(`${note}No products for ${what}${which ? ` with ${which}: try without the filter` : ""}${seconds}`);
    }
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
    clearResults();
    status("");
  });
}

setUpProducts();
