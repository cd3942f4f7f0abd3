// The search page: plain JavaScript against the JSON API (no build step, nothing from a CDN).
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { collections: [], thumbnails: [], fetching: new AbortController() };
const HIDDEN_METADATA = new Set(["id", "content_hash", "quality"]);

// The API key, kept in the browser's storage; where the browser refuses storage (all
// cookies blocked: reading localStorage throws) it is kept for this page only, and the
// page works all the same (it stopped at its first line).
const keys = (() => {
  try {
    localStorage.getItem("imgembed-key");
    return localStorage;
  } catch {
    const kept = new Map();
    return { getItem: (name) => kept.get(name) ?? null, setItem: (name, value) => kept.set(name, value) };
  }
})();

function headers(extra = {}) {
  const key = keys.getItem("imgembed-key");
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// A request that failed: the answer's status (0: none came), the seconds its Retry-After
// asked to wait (0: none said) and the server's error type ("CollectionNotFoundError"...).
class ApiError extends Error {
  constructor(message, status, retryAfter = 0, type = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
    this.type = type;
  }

  // a server away, restarting or overloaded: asking again later may work
  get passing() {
    return this.status === 0 || this.status >= 500;
  }
}

// fetch's own errors ("Failed to fetch", a header it cannot send) said plainly.
async function send(path, options) {
  try {
    return await fetch(path, options);
  } catch (error) {
    if (options?.signal?.aborted) throw error; // superseded or timed out: the caller knows
    if (String(error.message).includes("ISO-8859-1")) {
      throw new Error("the API key holds characters an HTTP header cannot carry: check it");
    }
    throw new ApiError("cannot reach the server: is imgembed serve still running?", 0);
  }
}

// What the page reads of an answer is checked before it is used: JSON of another shape (an
// older server's, a proxy's own: `{}`, `{"results": null}`, a hit without its score) is
// said in words; it was met as a script error ("Cannot read properties of null"), or left a
// list that broke every search after it. A shape: [what it holds, its test].
const isRecord = (value) => value !== null && typeof value === "object" && !Array.isArray(value);
const isNumber = (value) => typeof value === "number" && Number.isFinite(value);
const isId = (value) => typeof value === "string" || isNumber(value);
const listOf = (value, each) => Array.isArray(value) && value.every(each);
const isHit = (hit) => isRecord(hit) && isNumber(hit.similarity_score) && isId(hit.image_path)
  && (hit.metadata === undefined || hit.metadata === null || isRecord(hit.metadata));
const SHAPES = {
  collections: ["list of collections", (body) => listOf(body, (c) => isRecord(c) && typeof c.name === "string")],
  hits: ["list of results", (body) => isRecord(body) && listOf(body.results, isHit)],
  groups: ["groups of near-duplicates", (body) => isRecord(body)
    && listOf(body.groups, (group) => listOf(group, (m) => isRecord(m) && isId(m.id) && isId(m.source)))],
};

async function api(path, options = {}, shape = null) {
  const response = await send(path, { ...options, headers: headers(options.headers) });
  const body = await readJson(response);
  // aborted as the answer arrived: it is as late as one that arrives after
  if (options.signal?.aborted) throw new DOMException("superseded", "AbortError");
  if (!response.ok) {
    const wait = Math.ceil(Number(response.headers.get("retry-after"))) || 0; // not a date
    const type = body?.error_type ?? body?.error?.type;
    let message = `${response.status}: ${failure(response, body)}`;
    if (response.status === 401) {
      // the page sends the key: where to give it, not the header to send, is what helps
      $("#key-box").open = true;
      message += ` (${keys.getItem("imgembed-key") ? "check" : "enter"} the key under “API key” above)`;
    }
    throw new ApiError(message, response.status, wait, type);
  }
  if (body === null) {
    // e.g. a proxy's or a login portal's page: not an answer of imgembed's
    throw new Error(`the server answered ${response.status} without the JSON imgembed sends: is a proxy in between?`);
  }
  if (shape && !shape[1](body)) {
    throw new Error(`the server's answer holds no ${shape[0]} as imgembed sends it: is an older server or a proxy in between?`);
  }
  return body;
}

// The JSON body of an answer; null when there is none or it cannot be read (cut short, or
// a page that only says it is JSON).
async function readJson(response) {
  if (!response.headers.get("content-type")?.includes("json")) return null;
  try {
    return await response.json();
  } catch (error) {
    if (error.name === "AbortError") throw error;
    return null;
  }
}

// What a failed answer says: imgembed's message (or OpenAI's shape), else the status's name.
// The server's words quote a user's names (a file "evil\u202Egnp.exe.png: not a recognised
// image"): their bidirectional controls are taken out, else the words after the name read
// backwards ("(tpurroc ro tamrof nwonknu)"); what is left is the name as it is spelled.
// The words are then set apart as a whole (an isolate, as a user's text is): a message in
// Hebrew or Arabic ran into the page's words around it, its own full stop drawn on the
// wrong side ("503: השרת עמוס. (try again ...)" read with the stop before the message).
// A status's reason phrase (a proxy's own words) is the server's words too.
function failure(response, body) {
  const given = [body?.error?.message, body?.error].find((text) => typeof text === "string" && text);
  const words = given || fromBytes(response.statusText);
  return words ? serverWords(words) : "the server gave no reason";
}

// The browser gives a reason phrase as its bytes, a character each: one sent as UTF-8 read
// "×©×¨×ª" for "שרת". Bytes that are UTF-8 are read as such; others are kept as they came.
function fromBytes(text) {
  if (/[^\u0000-\u00ff]/.test(text)) return text; // already characters: not bytes
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(Uint8Array.from(text, (char) => char.charCodeAt(0)));
  } catch {
    return text;
  }
}

function serverWords(text) {
  return isolated(unformatted(text));
}

const BIDI_CONTROLS = /[\u202A-\u202E\u2066-\u2069]/g; // embeddings, overrides, isolates

function unformatted(text) {
  return text.replace(BIDI_CONTROLS, "");
}

// A list the server cannot give now (away, restarting, overloaded) is asked for again by
// itself, so the page comes back with the server: what to add to the failure's message.
const LIST_AGAIN_S = 5;
const listAgain = new Map(); // loader -> its timer

function askAgainLater(load, error) {
  clearTimeout(listAgain.get(load));
  if (!error?.passing) return "";
  const seconds = Math.max(LIST_AGAIN_S, error.retryAfter);
  listAgain.set(load, setTimeout(load, seconds * 1000));
  return `; asking again in ${plural(seconds, "second")}`;
}

// A list asked for anew (a key given, a view shown) while an earlier request for it is still
// out: only the newest answer is shown. A slow 401 of before the key emptied the list the
// key had opened, and said "401" under it. While a list is out, the page says it waits.
const turns = new Map(); // loader -> its newest request: { out, cancelled, controller, asking }

function listTurn(load) {
  const turn = { out: true, cancelled: false };
  turns.set(load, turn);
  return turn;
}

function newest(load, turn) {
  if (turns.get(load) !== turn) return false;
  turn.out = false;
  return true;
}

function listing(load) {
  return Boolean(turns.get(load)?.out);
}

// A list's request, waited for as a search is: the seconds said after WAIT_NOTICE_S (on the
// status line while it says `asking`, the list's own words) and given up after GIVE_UP_S, a
// failure asked for again later. A server that never answered left "Asking the server for
// its collections…" for ever, with no count and no end.
async function listFrom(load, turn, path, shape, asking) {
  const controller = new AbortController();
  Object.assign(turn, { controller, asking });
  const started = Date.now();
  const ticker = setInterval(() => {
    const seconds = Math.round((Date.now() - started) / 1000);
    if (seconds >= GIVE_UP_S) controller.abort("timeout");
    else if (turns.get(load) === turn && $("#status").textContent.startsWith(asking)) {
      status(`${asking} (no answer yet after ${seconds} s: still waiting for the server)`);
    }
  }, WAIT_NOTICE_S * 1000);
  try {
    return await api(path, { signal: controller.signal }, shape);
  } catch (error) {
    if (controller.signal.reason !== "timeout") throw error;
    throw new ApiError(`no answer from the server in ${GIVE_UP_S} s: it may be overloaded or stuck`, 0);
  } finally {
    clearInterval(ticker);
  }
}

// A search asked for with nothing to search in: the list may not have come yet (a slow
// server: the page said "Choose a collection first." with none to choose).
function nothingChosen(load, what) {
  const message = listing(load)
    ? `The ${what}s are not listed yet (no answer from the server so far): search once they are.`
    : `Choose a ${what} first.`;
  return status(message, true);
}

// A query as the status line echoes it: quoted, and cut short (a pasted page is not repeated;
// cut between characters, not inside an emoji's surrogate pair).
function quoted(text, limit = 80) {
  const chars = [...text];
  return `“${isolated(chars.length > limit ? `${chars.slice(0, limit - 1).join("")}…` : text)}”`;
}

// A user's text or name inside the page's own words, set apart for the bidirectional
// algorithm (an isolate, U+2068 ... U+2069): right-to-left text, or a right-to-left override
// in it (a file named "photo\u202Egnp.exe"), cannot turn the words after it around.
// The isolate holds: the text's own controls are paired first (a "\u2069" in it closed the
// isolate early, and an override after it turned the rest of the line around; one left open
// is closed), so they act inside it only.
function isolated(text) {
  return `\u2068${paired(text)}\u2069`;
}

function paired(text) {
  const open = []; // the closer each control still open asks for, innermost last
  let out = "";
  for (const char of text) {
    if ("\u202A\u202B\u202D\u202E".includes(char)) open.push("\u202C");
    else if ("\u2066\u2067\u2068".includes(char)) open.push("\u2069");
    else if (char === "\u202C" && open.at(-1) === "\u202C") open.pop();
    else if (char === "\u2069" && open.includes("\u2069")) open.length = open.lastIndexOf("\u2069");
    else if (char === "\u202C" || char === "\u2069") continue; // closes nothing of the text's
    out += char;
  }
  return out + open.reverse().join("");
}

function plural(count, noun) {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

function status(text, isError = false) {
  const line = $("#status");
  line.textContent = text;
  line.classList.toggle("error", isError);
}

// One request at a time shows its results: a new search (or another view, collection or
// store) aborts the one still running, so a late answer never replaces a newer one's.
// A server that does not answer is said so while we wait, and given up after a while.
const WAIT_NOTICE_S = 5;
const GIVE_UP_S = 120;
let running = null;

function begin(text) {
  cancel();
  stopThumbnails(); // the results shown go when this search ends, however it ends
  const controller = new AbortController();
  const started = Date.now();
  const ticker = setInterval(() => {
    const seconds = Math.round((Date.now() - started) / 1000);
    if (seconds >= GIVE_UP_S) controller.abort("timeout");
    else status(`${text} (no answer yet after ${seconds} s: still waiting for the server)`);
  }, WAIT_NOTICE_S * 1000);
  running = { controller, ticker, text };
  $("#results").setAttribute("aria-busy", "true");
  status(text);
  return controller.signal;
}

function cancel(reason = "superseded") {
  if (!running) return;
  running.controller.abort(reason);
  end(running.controller.signal);
}

// Escape gives up what the page waits for (a search, a list), as a slow server may keep
// it waiting: the request is aborted, so its answer, if it still comes, is never shown.
// The results shown go, as after a search given up (their thumbnails were stopped).
// Returns whether there was anything to give up.
function cancelByUser() {
  const said = [];
  let any = false;
  if (running) {
    said.push(`${running.text.replace(/…$/, "")}: cancelled`);
    cancel("cancelled");
    clearResults();
    any = true;
  }
  for (const [load, turn] of turns) {
    if (!turn.out || !turn.controller || turn.cancelled) continue;
    turn.cancelled = true;
    turn.controller.abort("cancelled");
    const view = load === loadCollections ? "images" : "products";
    if (visible(view)) said.push(`${turn.asking.replace(/…$/, "")}: cancelled; reload the page to ask again`);
    any = true;
  }
  if (said.length) status(`${said.join(". ")}.`);
  return any;
}

function end(signal) {
  if (running?.controller.signal !== signal) return; // a newer request owns the page
  clearInterval(running.ticker);
  running = null;
  $("#results").removeAttribute("aria-busy");
}

// The error of a request begun with `begin`: nothing for one superseded by another. The
// results shown were the last search's, not this one's: they go.
function failed(signal, error) {
  end(signal);
  if (!signal.aborted || signal.reason === "timeout") clearResults();
  if (signal.reason === "timeout") {
    status(`No answer from the server in ${GIVE_UP_S} s: it may be overloaded or stuck; try again.`, true);
  } else if (!signal.aborted) {
    const wait = error.retryAfter ? ` (try again in ${plural(error.retryAfter, "second")})` : "";
    status(`${error.message}${wait}`, true);
  }
}

// A search in a collection dropped meanwhile (by another client or a CLI run): said so,
// and the list reloaded, so it is offered no more.
function collectionGone(error) {
  if (error.type !== "CollectionNotFoundError") return;
  status(`${error.message}: it was dropped; the list of collections is reloaded`, true);
  loadCollections(true);
}

function collection() {
  return state.collections.find((c) => c.name === $("#collection").value);
}

// The collections, listed anew; `quiet`: the status line keeps what it says (unless the
// list fails).
async function loadCollections(quiet = false) {
  askAgainLater(loadCollections); // this is the list's new turn
  const turn = listTurn(loadCollections);
  const asking = "Asking the server for its collections…";
  if (!quiet && visible("images") && !state.collections.length && !$("#status").textContent) {
    status(asking); // none to search in yet: said why
  }
  let list = [];
  let error = null;
  try {
    list = await listFrom(loadCollections, turn, "/api/v1/collections", SHAPES.collections, asking);
  } catch (caught) {
    error = caught; // a list the key no longer opens is not offered: it is empty
  }
  if (!newest(loadCollections, turn)) return; // asked for again meanwhile: that answer counts
  if (turn.cancelled) return; // at Escape (said then): the list stays as it was
  state.collections = list;
  const failure = error && `Cannot list collections: ${error.message}${askAgainLater(loadCollections, error)}`;
  const select = $("#collection");
  const chosen = select.value;
  select.replaceChildren(
    ...state.collections.map((c) => new Option(`${isolated(c.name)} (${isNumber(c.count) ? c.count : "?"})`, c.name)),
  );
  keepChoice(select, chosen, "images");
  if (!visible("images")) {
    // the status line is the products view's now
  } else if (failure) status(failure, true);
  else if (quiet) {
    // what the status line says stays
  } else if (!state.collections.length) status("No collections yet: index some images first.");
  else status(""); // an earlier failure (e.g. before the key was given) is over
  describeCollection();
  watchModel();
}

function visible(view) {
  return !document.querySelector(`div[data-view=${view}]`).hidden;
}

// The keyboard's focus on a result that goes ("More like this" replaces its own card) is
// moved to the results themselves: it fell to the page's body, and a screen reader or the
// next Tab started again from the top.
function clearResults() {
  nearEnd.disconnect(); // the results that go are drawn no further
  releaseThumbnails();
  const results = $("#results");
  const focused = results !== document.activeElement && results.contains(document.activeElement);
  results.replaceChildren();
  if (focused) results.focus();
}

// A list reloaded (e.g. a new API key) keeps the user's choice while it is still there;
// otherwise the results shown in its view were the gone choice's, so they go.
function keepChoice(select, chosen, view) {
  if ([...select.options].some((option) => option.value === chosen)) select.value = chosen;
  else if (chosen && visible(view)) clearResults();
}

// "ViT-B-32 (openai), 512-d": what of it the server said (an older one may say less)
function about(current) {
  const text = (value) => (typeof value === "string" ? value : "");
  const model = [text(current.model), text(current.pretrained) && `(${current.pretrained})`];
  const dimension = isNumber(current.dimension) ? `${current.dimension}-d` : "";
  return [model.filter(Boolean).join(" "), dimension].filter(Boolean).join(", ");
}

function describeCollection() {
  const current = collection();
  $("#collection-info").textContent = current ? about(current) : "";
  const text = Boolean(current?.has_text_tower);
  $("#query").disabled = !text;
  $("#search").disabled = !text;
  if (!current) $("#query").placeholder = "No collection to search";
  else if (text) $("#query").placeholder = "Describe an image: a red bicycle, a cat on a sofa…";
  else $("#query").placeholder = "This collection's model has no text tower: search by image";
}

// The thumbnails of results that go are not fetched any further: a new search would wait
// behind them (a browser opens 6 connections to a server), up to 200 of them.
function stopThumbnails() {
  nearScreen.disconnect(); // and those not asked for yet are not
  state.fetching.abort();
  state.fetching = new AbortController();
}

// A thumbnail is asked for when its card comes near the screen: of 200 results the server
// makes the few in sight, not all 200 at once (each one an image read and decoded).
const waiting = new WeakMap(); // img -> what fetches it
const nearScreen = new IntersectionObserver((seen) => {
  for (const { target, isIntersecting } of seen) {
    if (!isIntersecting) continue;
    nearScreen.unobserve(target);
    waiting.get(target)?.();
    waiting.delete(target);
  }
}, { rootMargin: "400px" });

function loadImage(img, path) {
  waiting.set(img, () => fetchImage(img, path));
  nearScreen.observe(img);
}

function releaseThumbnails() {
  stopThumbnails();
  state.thumbnails.forEach((url) => URL.revokeObjectURL(url));
  state.thumbnails = [];
}

// Images come through the API (with the key, if any), as blobs. One that cannot be had
// is a box with the server's reason (a file gone, not a local file, outside the roots, the
// server busy or away), or one saying the answer is no picture the browser can show.
async function fetchImage(img, path) {
  const signal = state.fetching.signal;
  try {
    const response = await send(path, { headers: headers(), signal });
    if (!response.ok) throw new Error(failure(response, await readJson(response)));
    const url = URL.createObjectURL(await response.blob());
    state.thumbnails.push(url);
    img.addEventListener("error", () => noImage(img, "no thumbnail: the server sent no picture"));
    img.src = url;
  } catch (error) {
    if (!signal.aborted) noImage(img, `no thumbnail: ${error.message}`);
  }
}

// A box that says why there is no picture, where the browser would draw a broken image.
function noImage(img, reason) {
  img.replaceWith(Object.assign(document.createElement("div"), { className: "no-image", textContent: reason }));
}

function thumbnail(img, id) {
  const name = encodeURIComponent(collection().name);
  const path = `/api/v1/collections/${name}/thumbnail?size=256&id=${encodeURIComponent(id)}`;
  loadImage(img, path);
}

// "#3  " before a score; nothing where the server said no rank
function ranked(hit) {
  return isNumber(hit.rank) ? `#${hit.rank}  ` : "";
}

// " (0.05 s)" after a search's summary; nothing where the server said no time
function took(answer) {
  return isNumber(answer.processing_time) ? ` (${answer.processing_time.toFixed(2)} s)` : "";
}

// A list of plain values (tags: ["sale", "new"]) as the card shows it: "sale, new".
function listed(value) {
  const plain = Array.isArray(value) && value.every((item) => item === null || typeof item !== "object");
  return plain ? value.join(", ") : value;
}

function card(hit) {
  const node = $("#card").content.firstElementChild.cloneNode(true);
  const id = hit.metadata?.id ?? hit.id ?? hit.image_path;
  node.dataset.id = id;
  const score = node.querySelector(".score");
  if (hit.similarity_score === undefined) score.remove();
  else score.textContent = `${ranked(hit)}${hit.similarity_score.toFixed(4)}`;
  node.querySelector(".source").textContent = hit.image_path ?? hit.source;
  const list = node.querySelector(".metadata");
  for (const [key, given] of Object.entries(hit.metadata ?? {})) {
    const value = listed(given);
    if (HIDDEN_METADATA.has(key) || value === null || typeof value === "object") continue;
    list.append(Object.assign(document.createElement("dt"), { textContent: key }));
    list.append(Object.assign(document.createElement("dd"), { textContent: String(value) }));
  }
  const more = node.querySelector(".more");
  more.setAttribute("aria-label", `More like this: ${hit.image_path ?? hit.source}`); // which one
  more.addEventListener("click", () => search({ query_id: id }, "this image"));
  thumbnail(node.querySelector("img"), id);
  return node;
}

function show(hits) {
  showAll(hits, card);
}

// A long list of results (a server that sends 5000) is drawn a part at a time: drawn at
// once it froze the page for seconds (every card made and laid out, its thumbnail
// watched). The rest come as the end of the list nears the screen, or at the button after
// the last card, which says how many are still to come (and keeps the keyboard's focus).
const PART = 100;
const nearEnd = new IntersectionObserver((seen) => {
  for (const { target, isIntersecting } of seen) if (isIntersecting) target.click();
}, { rootMargin: "400px" });

function showAll(items, make) {
  clearResults();
  const more = Object.assign(document.createElement("button"), { type: "button", className: "secondary more-results" });
  let next = 0;
  const part = () => {
    nearEnd.unobserve(more);
    const nodes = items.slice(next, next + PART).map(make);
    next += nodes.length;
    more.before(...nodes);
    const left = items.length - next;
    if (!left) {
      const focused = document.activeElement === more;
      more.remove();
      if (focused) nodes.at(-1)?.querySelector("button")?.focus(); // not lost to the page's top
      return;
    }
    more.textContent = `Show ${Math.min(PART, left)} more (${left} of ${items.length} not shown yet)`;
    nearEnd.observe(more); // anew: it says at once whether the button is still in sight
  };
  more.addEventListener("click", part);
  $("#results").replaceChildren(more);
  part();
}

// No result at all (none of these searches filters): the collection holds nothing. `what`:
// which search it was, as its results would have said it (which of several files dropped
// was taken: the status line said so of 7 results, not of none).
function empty(current, note = "", what = "") {
  status(`${note}No results${what}: ${isolated(current.name)} holds no images yet; index some into it first.`);
}

function topK() {
  return Math.max(1, Math.min(200, Number($("#top-k").value) || 24));
}

async function search(query, what) {
  const current = collection();
  if (!current) return nothingChosen(loadCollections, "collection");
  const signal = begin(`Searching ${isolated(current.name)} for ${what}…`);
  try {
    const body = JSON.stringify({ ...query, collection: current.name, top_k: topK() });
    const answer = await api("/api/v1/search/image", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body,
      signal,
    }, SHAPES.hits);
    end(signal);
    show(answer.results);
    if (!answer.results.length) return empty(current);
    status(`${plural(answer.results.length, "result")} for ${what}${took(answer)}`);
  } catch (error) {
    failed(signal, error);
    collectionGone(error);
  }
}

// `note`: what the status line says first (that one of several files dropped was taken)
async function searchByFile(file, note = "") {
  const current = collection();
  if (!current) return nothingChosen(loadCollections, "collection");
  const signal = begin(`${note}Searching ${isolated(current.name)} for images like ${isolated(file.name)}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("collection", current.name);
  form.append("top_k", String(topK()));
  try {
    const answer = await api("/api/v1/search/image", { method: "POST", body: form, signal }, SHAPES.hits);
    end(signal);
    show(answer.results);
    if (!answer.results.length) return empty(current, note, ` like ${isolated(file.name)}`);
    status(`${note}${plural(answer.results.length, "result")} like ${isolated(file.name)}${took(answer)}`);
  } catch (error) {
    failed(signal, error);
    collectionGone(error);
  }
}

async function duplicates() {
  const current = collection();
  if (!current) return nothingChosen(loadCollections, "collection");
  const signal = begin(`Looking for near-duplicates in ${isolated(current.name)}…`);
  try {
    const name = encodeURIComponent(current.name);
    const answer = await api(`/api/v1/collections/${name}/duplicates`, { signal }, SHAPES.groups);
    end(signal);
    let n = 0;
    showAll(answer.groups, (members) => {
      const row = document.createElement("div");
      row.className = "group";
      row.append(Object.assign(document.createElement("h2"), { textContent: `group ${++n}` }));
      row.append(...members.map((m) => card({ id: m.id, source: m.source })));
      return row;
    });
    const threshold = isNumber(answer.threshold) ? ` (cosine ≥ ${answer.threshold})` : "";
    status(`${plural(answer.groups.length, "group")} of near-duplicates${threshold}`);
  } catch (error) {
    failed(signal, error);
    collectionGone(error);
  }
}

// A file the browser knows is no image (a text, a PDF) is said so at once; one it cannot
// tell (no extension, a format it does not know) goes to the server, which says.
function isImage(file) {
  return !file.type || file.type.startsWith("image/");
}

// A file chosen in `input` or dropped on `zone` goes to `onFile`. The zone opens the file
// chooser from the keyboard too (Enter or Space). Of several files dropped the first image
// is searched with, and the status line says so (it took the first file, and said nothing).
function dropZone(zone, input, onFile) {
  // A file the browser cannot read (a folder dropped, a file moved or deleted since it was
  // chosen) failed its upload as if the server were away: said as what it is.
  const offer = async (files) => {
    const file = files.find(isImage);
    if (!file) {
      const which = files.length === 1
        ? `${isolated(files[0].name)} is not an image (${files[0].type})`
        : `None of the ${files.length} files dropped is an image`;
      return status(`${which}: choose an image file (JPEG, PNG, WebP…).`, true);
    }
    try {
      await (file.size ? file.slice(0, 1) : file).arrayBuffer(); // one byte, or none
    } catch {
      return status(`Cannot read ${isolated(file.name)}: a folder, or a file moved or deleted since? Choose an image file.`, true);
    }
    onFile(file, files.length > 1 ? `${plural(files.length, "file")} dropped, a search takes one image: ` : "");
  };
  input.addEventListener("change", () => {
    const files = [...input.files];
    input.value = ""; // else choosing the same file again sends nothing
    if (files.length) offer(files);
  });
  zone.tabIndex = 0;
  zone.setAttribute("role", "button");
  zone.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" && event.key !== " ") return;
    event.preventDefault();
    input.click();
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const files = [...event.dataTransfer.files];
    if (files.length) offer(files);
    else status("Drop an image file (not text or a link).", true);
  });
}

function setUp() {
  // Escape closes the key box, and the focus goes back to its "API key"
  $("#key-box").addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || !$("#key-box").open) return;
    event.preventDefault(); // this Escape is the box's: a search running goes on
    $("#key-box").open = false;
    $("#key-box summary").focus();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented) return;
    if (cancelByUser()) event.preventDefault(); // the search field keeps its text to try again
  });
  $("#api-key").value = keys.getItem("imgembed-key") ?? "";
  $("#api-key").addEventListener("change", (event) => {
    keys.setItem("imgembed-key", event.target.value.trim());
    loadCollections();
    if (typeof loadStores === "function") loadStores();
  });
  $("#collection").addEventListener("change", () => {
    // another collection's results would read as this one's, and "More like this" on them
    // would ask this collection for items it does not hold
    cancel();
    clearResults();
    status("");
    describeCollection();
  });
  $("#text-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("#query").value.trim();
    if (text) search({ query_text: text }, quoted(text));
    else status("Type what to look for, or drop an image below.", true);
  });
  $("#duplicates").addEventListener("click", duplicates);
  dropZone($("#drop"), $("#file"), searchByFile);
  loadCollections();
}

// A model that cannot load is said when the page opens, not at the first search; one that
// loads is said while it does (searches meanwhile answer 503). /ready answers without a
// key; while the model loads it is asked again (one watch at a time).
const LOADING = "The server's model is loading: searches work once it is loaded.";
let watching = false;
async function watchModel() {
  if (watching) return;
  let ready;
  try {
    ready = await (await send("/ready")).json();
  } catch {
    return; // an unreachable server is said by the collection list
  }
  if (!isRecord(ready)) return; // not imgembed's answer (a proxy's): the searches will say
  const line = $("#status");
  if (ready.model === "loading") {
    if (visible("images") && !line.textContent) status(LOADING);
    watching = true;
    setTimeout(() => { watching = false; watchModel(); }, 2000);
  } else if (line.textContent === LOADING) {
    status(""); // loaded now (or failed: said below)
  }
  if (String(ready.model).startsWith("failed")) {
    const reason = serverWords(String(ready.model).replace(/^failed:\s*/, ""));
    status(`The server's model cannot load (${reason}): searches with it fail until that is fixed.`, true);
  }
}

setUp();
