// The fsrl playground: plain JavaScript against this server's own API (docs/api.md).
// Everything the server sends (labels, contexts, generated text) is untrusted text: it is only
// ever put on the page through textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "fsrl-api-key"; // sessionStorage only: the key leaves with the tab
const SWEEP_SCALES = [0, 0.25, 0.5, 1];

const state = {
  baseModel: null,      // the base model's name, for the OpenAI snippet's `model`
  adapters: new Map(),  // id -> /adapters entry
  clamps: [],           // {index, op, value, when: null | {index, comparison, threshold}}
  aborts: [],           // {index, comparison, threshold}: abort_when
  cards: new Map(),     // index -> Promise of /features/{index}
  steered: [],          // the last A/B run's steered token events
  base: [],
  selected: -1,         // the steered token whose features are shown
  partAt: null,         // the first token index where steered and base differ
  checkedTo: 0,         // tokens compared so far
  runs: null,           // AbortController of the A/B run or sweep in flight
  cardFor: 0,           // bumps on each adapter change, so a slow answer for an old pick is dropped
};

// --- talking to the server ------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, error, retryAfter) {
    const code = error && error.code ? ` ${error.code}` : "";
    super(`${status}${code}: ${(error && error.message) || "the server gave no reason"}`);
    this.status = status;
    this.code = error && error.code;
    this.retryAfter = retryAfter;
  }
}

function headers(json) {
  const h = {};
  if (json) h["content-type"] = "application/json";
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

async function failure(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON: a proxy's page, say */ }
  return new ApiError(response.status, body && body.error, response.headers.get("retry-after"));
}

async function request(method, path, body, signal) {
  let response;
  try {
    response = await fetch(path, {method, headers: headers(body !== undefined), signal,
                                  body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new Error(`could not reach the server (${err.message})`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

async function getJSON(path) {
  return (await request("GET", path)).json();
}

// POST /generate with stream: true, read with fetch + ReadableStream (EventSource cannot POST).
// Calls onToken for each token event; returns the final response object.
async function streamGenerate(body, onToken, signal) {
  const response = await request("POST", "/generate", {...body, stream: true}, signal);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let final = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") {
          if (!final) throw new Error("the stream ended without a response");
          return final;
        }
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(response.status, event.error); // failed mid-stream
        if (event.type === "token") onToken(event);
        else if (event.type === "response") final = event.response;
      }
    }
  }
  throw new Error("the stream was cut off before it finished");
}

// --- the alert region -----------------------------------------------------------------------

function showError(err, what) {
  if (err && err.name === "AbortError") return;
  let text = `${what}: ${err.message}`;
  if (err.status === 401) {
    text += " Enter the server's API key in the Request section.";
    showKeyField();
  } else if (err.status === 503) {
    text += err.retryAfter ? ` The server is busy: retry in ${err.retryAfter} s.` : " The server is busy.";
  }
  $("alert-text").textContent = text;
  $("alert").classList.add("shown");
  $("alert-dismiss").hidden = false;
}

function clearError() {
  $("alert").classList.remove("shown");
  $("alert-dismiss").hidden = true;
  $("alert-text").textContent = "";
}

function showKeyField() {
  $("key-row").hidden = false;
}

// --- small DOM helpers ----------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k.startsWith("aria") || k.startsWith("data")) node.setAttribute(k.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase()), v);
    else node[k] = v;
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  return Number.isInteger(x) ? String(x) : x.toFixed(digits);
}

// A token as text one can see: whitespace made visible.
function showToken(t) {
  return t.replace(/\n/g, "⏎").replace(/\t/g, "⇥") || "∅";
}

// --- the request editor ---------------------------------------------------------------------

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function num(id, fallback) {
  const raw = $(id).value.trim();
  if (raw === "") return fallback;
  const n = Number(raw);
  return Number.isFinite(n) ? n : raw; // a bad value goes to the server, which names the field
}

function addTurn(role = "user", content = "") {
  const turns = $("turns");
  const n = turns.children.length + 1;
  const roleSelect = el("select", {ariaLabel: `Role of earlier message ${n}`},
                        ...["user", "assistant", "system"].map((r) => el("option", {value: r, text: r})));
  roleSelect.value = role;
  const text = el("textarea", {rows: 2, value: content, ariaLabel: `Content of earlier message ${n}`});
  const row = el("div", {class: "turn"}, roleSelect, text,
                 el("button", {type: "button", text: "Remove", ariaLabel: `Remove earlier message ${n}`,
                               onclick: () => { row.remove(); renumberTurns(); }}));
  turns.append(row);
}

function renumberTurns() {
  [...$("turns").children].forEach((row, i) => {
    const [role, text, remove] = row.children;
    role.setAttribute("aria-label", `Role of earlier message ${i + 1}`);
    text.setAttribute("aria-label", `Content of earlier message ${i + 1}`);
    remove.setAttribute("aria-label", `Remove earlier message ${i + 1}`);
  });
}

// The /generate body the editor describes (without compare/stream, which each run sets).
function buildBody() {
  const body = {};
  const prompt = $("prompt").value;
  if (mode() === "chat") {
    const messages = [];
    if ($("system").value.trim()) messages.push({role: "system", content: $("system").value});
    for (const row of $("turns").children) {
      messages.push({role: row.children[0].value, content: row.children[1].value});
    }
    messages.push({role: "user", content: prompt});
    body.messages = messages;
  } else {
    body.prompt = prompt;
  }
  const adapter = $("adapter").value;
  if (adapter) {
    body.adapter = adapter;
    body.steering_scale = Number($("scale").value);
  }
  if (state.clamps.length) {
    body.features = state.clamps.map((c) => {
      const f = (c.op === "ablate" || c.op === "unsteer") ? {index: c.index, op: c.op} : {index: c.index, op: c.op, value: c.value};
      if (c.when) f.when = condition(c.when);
      return f;
    });
  }
  if (state.aborts.length) body.abort_when = state.aborts.map(condition);
  body.steer_positions = $("steer-positions").value;
  body.max_new_tokens = num("max-tokens", 48);
  body.temperature = num("temperature", 0);
  body.top_p = num("top-p", 1);
  const topK = num("top-k", 0);
  if (topK) body.top_k = topK;
  // OpenAI's penalties, sent only when set (0 is the contract's default).
  for (const [id, key] of [["presence-penalty", "presence_penalty"], ["frequency-penalty", "frequency_penalty"]]) {
    const penalty = num(id, 0);
    if (penalty) body[key] = penalty;
  }
  const seed = num("seed", null);
  if (seed !== null) body.seed = seed;
  const stop = $("stop").value.split("\n").filter((s) => s.length);
  if (stop.length) body.stop = stop;
  if ($("ignore-eos").checked) body.ignore_eos = true;
  return body;
}

// --- adapters and the adapter card ----------------------------------------------------------

async function loadServer() {
  try {
    const health = await getJSON("/health");
    state.baseModel = health.model;
    $("server-info").textContent =
      `${health.model} · SAE ${health.sae} · layer ${health.layer} · ${health.device}`;
  } catch (err) {
    $("server-info").textContent = "The server is not ready.";
    showError(err, "Server health");
  }
  await loadAdapters();
}

async function loadAdapters() {
  let list;
  try {
    list = (await getJSON("/adapters")).adapters;
  } catch (err) {
    showError(err, "Loading adapters");
    return;
  }
  const select = $("adapter");
  const keep = select.value;
  state.adapters = new Map(list.map((a) => [a.id, a]));
  select.replaceChildren(el("option", {value: "", text: "none"}),
                         ...list.map((a) => el("option", {value: a.id, text: a.id})));
  select.value = state.adapters.has(keep) ? keep : "";
  showAdapterCard();
}

function definitionList(obj, depth = 0) {
  const dl = el("dl");
  for (const [key, value] of Object.entries(obj)) {
    dl.append(el("dt", {text: key}), el("dd", {}, summaryValue(value, depth + 1)));
  }
  return dl;
}

// Any JSON value of a free-form summary: scalars as text, lists of objects as small tables,
// objects as nested definition lists (bounded depth: a summary is for reading, not for dumping).
function summaryValue(value, depth) {
  if (value === null || typeof value !== "object") return document.createTextNode(fmt(value));
  if (depth > 4) return document.createTextNode(JSON.stringify(value));
  if (Array.isArray(value)) {
    if (value.length && value.every((v) => v && typeof v === "object" && !Array.isArray(v))) {
      const cols = [...new Set(value.flatMap((v) => Object.keys(v)))];
      return el("table", {class: "small"},
        el("thead", {}, el("tr", {}, ...cols.map((c) => el("th", {scope: "col", text: c})))),
        el("tbody", {}, ...value.map((row) => el("tr", {}, ...cols.map((c) => {
          const cell = row[c];
          return el("td", {}, cell !== null && typeof cell === "object"
            ? document.createTextNode(JSON.stringify(cell)) : document.createTextNode(fmt(cell)));
        })))));
    }
    return document.createTextNode(value.map((v) => typeof v === "object" ? JSON.stringify(v) : fmt(v)).join(", "));
  }
  return definitionList(value, depth);
}

async function showAdapterCard() {
  const id = $("adapter").value;
  const ticket = ++state.cardFor;
  const body = $("card-body");
  if (!id) {
    body.hidden = true;
    $("card-empty").hidden = false;
    return;
  }
  $("card-empty").hidden = true;
  body.hidden = false;
  const entry = state.adapters.get(id);
  const meta = {id, status: entry.status, activation: entry.metadata.activation,
                clamp_nonnegative: entry.metadata.clamp_nonnegative, parameters: entry.parameters,
                device: entry.device};
  $("card-meta").replaceWith(Object.assign(definitionList(meta), {id: "card-meta"}));
  const rows = $("card-features").tBodies[0];
  rows.replaceChildren(el("tr", {}, el("td", {colSpan: 7, text: "Loading…"})));
  const analysis = $("card-analysis");
  analysis.replaceChildren(document.createTextNode("Loading…"));
  try {
    const top = await getJSON(`/adapters/${encodeURIComponent(id)}/features?top=20`);
    if (ticket !== state.cardFor) return;
    rows.replaceChildren(...top.features.map((f) => {
      const cls = el("td", {text: "…"});
      featureCard(f.index).then((card) => { cls.textContent = card.class || "–"; },
                                () => { cls.textContent = "?"; });
      return el("tr", {},
        el("td", {}, dashboardButton(f.index)), el("td", {text: f.label || "(unlabelled)"}), cls,
        el("td", {text: fmt(f.mean_abs_v)}), el("td", {text: fmt(f.mean_v)}),
        el("td", {text: fmt(f.active_share)}),
        el("td", {}, el("button", {type: "button", text: "Clamp", ariaLabel: `Clamp feature ${f.index}`,
                                  onclick: () => addClamp(f.index, "unsteer")})));
    }));
    if (!top.features.length) rows.replaceChildren(el("tr", {}, el("td", {colSpan: 7, text: "This adapter pushes no feature on the reference prompts."})));
  } catch (err) {
    if (ticket !== state.cardFor) return;
    if (err.status === 400) { // a server with no reference prompts to measure on: not the user's doing
      rows.replaceChildren(el("tr", {}, el("td", {colSpan: 7, text: `Not measured here: ${err.message}`})));
    } else {
      rows.replaceChildren();
      showError(err, `Adapter ${id}'s features`);
    }
  }
  try {
    const card = await getJSON(`/adapters/${encodeURIComponent(id)}/card`);
    if (ticket !== state.cardFor) return;
    const notes = [];
    if (card.weights_match === false) {
      notes.push(el("p", {class: "hint warn", text: "This analysis was made on other weights than the adapter's current ones."}));
    }
    if (card.report) notes.push(el("p", {class: "hint", text: `The full report: ${card.report}, beside the adapter.`}));
    analysis.replaceChildren(definitionList(card.summary || {}), ...notes);
  } catch (err) {
    if (ticket !== state.cardFor) return;
    if (err.status === 404) {
      analysis.replaceChildren(el("p", {class: "hint", text: "No analysis yet for this adapter."}));
    } else {
      analysis.replaceChildren();
      showError(err, `Adapter ${id}'s analysis`);
    }
  }
}

// --- features: search, dashboards, clamps ---------------------------------------------------

function featureCard(index) {
  if (!state.cards.has(index)) {
    const p = getJSON(`/features/${index}`);
    p.catch(() => state.cards.delete(index)); // a failure is not remembered
    state.cards.set(index, p);
  }
  return state.cards.get(index);
}

function dashboardButton(index) {
  return el("button", {type: "button", class: "link", text: `#${index}`,
                       ariaLabel: `Dashboard for feature ${index}`, onclick: () => openDashboard(index)});
}

async function searchFeatures(event) {
  event.preventDefault();
  const q = $("feature-query").value.trim();
  const list = $("search-results");
  if (!q) return;
  const params = new URLSearchParams({q, limit: "20"});
  if ($("feature-class").value) params.set("class", $("feature-class").value);
  list.replaceChildren(el("li", {class: "hint", text: "Searching…"}));
  try {
    const found = (await getJSON(`/features?${params}`)).features;
    list.replaceChildren(...found.map((f) => el("li", {},
      dashboardButton(f.index), " ",
      el("span", {class: "label", text: f.label || "(unlabelled)"}), " ",
      el("span", {class: "badge", text: f.class || "–"}), " ",
      el("button", {type: "button", text: "Clamp", ariaLabel: `Clamp feature ${f.index}`,
                    onclick: () => addClamp(f.index)}))));
    if (!found.length) list.replaceChildren(el("li", {class: "hint", text: `No feature matches “${q}”.`}));
  } catch (err) {
    list.replaceChildren();
    showError(err, "Feature search");
  }
}

async function openDashboard(index) {
  const body = $("dash-body");
  $("dash-empty").hidden = true;
  body.hidden = false;
  body.replaceChildren(el("p", {class: "hint", text: `Loading feature ${index}…`}));
  let card;
  try {
    card = await featureCard(index);
  } catch (err) {
    body.replaceChildren(el("p", {class: "hint", text: `No dashboard for feature ${index}.`}));
    showError(err, `Feature ${index}`);
    return;
  }
  const parts = [
    el("h3", {text: `Feature ${card.index}: ${card.label || "(unlabelled)"}`}),
    definitionList({class: card.class, "label source": card.label_source,
                    density: card.density === null ? null : `${(100 * card.density).toFixed(3)} %`,
                    "max activation": card.max_activation, corpus: card.corpus}),
    el("button", {type: "button", text: `Clamp feature ${card.index}`, onclick: () => addClamp(card.index)}),
  ];
  if (card.histogram && card.histogram.counts) {
    const most = Math.max(1, ...card.histogram.counts);
    parts.push(el("h4", {text: "Activations"}), el("div", {class: "histogram", ariaLabel: "Activation histogram"},
      ...card.histogram.counts.map((n, j) => {
        const bar = el("span", {class: "bar", title: `(${card.histogram.edges[j]}, ${card.histogram.edges[j + 1] ?? "∞"}]: ${n}`});
        bar.style.height = `${Math.max(1, Math.round(40 * n / most))}px`;
        return bar;
      })));
  }
  if (card.top_contexts && card.top_contexts.length) {
    parts.push(el("h4", {text: "Top contexts"}), el("ol", {class: "contexts"},
      ...card.top_contexts.map((c) => el("li", {},
        ...c.tokens.map((t, i) => i === c.peak ? el("mark", {text: t}) : document.createTextNode(t)),
        el("span", {class: "activation", text: ` (${fmt(c.activation, 2)})`})))));
  }
  for (const [name, list] of [["Promoted tokens", card.promoted], ["Suppressed tokens", card.suppressed]]) {
    if (list && list.length) {
      parts.push(el("h4", {text: name}), el("ul", {class: "chips", ariaLabel: name},
        ...list.map(([tok, logit]) => el("li", {}, el("code", {text: showToken(tok)}), ` ${fmt(logit, 2)}`))));
    }
  }
  if (!card.top_contexts) parts.push(el("p", {class: "hint", text: "No dashboards were built for this SAE."}));
  body.replaceChildren(...parts);
  $("dashboard").scrollIntoView({block: "nearest"});
}

function addClamp(index, op = "set", value = 10) {
  index = Number(index);
  if (!Number.isInteger(index) || index < 0) {
    showError(new Error("a feature index is a whole number from 0"), "Adding a clamp");
    return;
  }
  if (!state.clamps.some((c) => c.index === index)) {
    state.clamps.push({index, op, value});
    featureCard(index).catch((err) => showError(err, `Feature ${index}`)); // say so now, not at Run
  }
  renderClamps();
  const row = document.querySelector(`#clamps tr[data-index="${index}"] select`);
  if (row) row.focus();
}

// {index, comparison, threshold} as the API's condition: {"index": j, "above": t}.
function condition(c) {
  return {index: c.index, [c.comparison]: c.threshold};
}

function whenControls(c) {
  const kind = el("select", {ariaLabel: `Condition for feature ${c.index}`},
                  el("option", {value: "", text: "everywhere"}), el("option", {value: "above", text: "feature above"}),
                  el("option", {value: "below", text: "feature below"}));
  const index = el("input", {type: "number", min: "0", step: "1", ariaLabel: `Condition feature for feature ${c.index}`});
  const threshold = el("input", {type: "number", step: "any", ariaLabel: `Condition threshold for feature ${c.index}`});
  const sync = () => {
    index.disabled = threshold.disabled = !kind.value;
    c.when = kind.value ? {index: Number(index.value || 0), comparison: kind.value, threshold: Number(threshold.value || 0)} : null;
  };
  if (c.when) { kind.value = c.when.comparison; index.value = c.when.index; threshold.value = c.when.threshold; }
  for (const input of [kind, index, threshold]) input.addEventListener("input", sync);
  kind.addEventListener("change", sync);
  sync();
  return el("td", {}, kind, " ", index, " ", threshold);
}

function addAbort(event) {
  event.preventDefault();
  const index = Number($("abort-index").value), threshold = Number($("abort-threshold").value);
  if (!Number.isInteger(index) || index < 0 || $("abort-index").value === "" || !Number.isFinite(threshold)) {
    showError(new Error("a stop condition needs a feature index (a whole number from 0) and a threshold"), "Adding a stop condition");
    return;
  }
  state.aborts.push({index, comparison: $("abort-comparison").value, threshold});
  renderAborts();
}

function renderAborts() {
  $("aborts").replaceChildren(...state.aborts.map((a) => el("li", {},
    `Stop when feature ${a.index} is ${a.comparison} ${a.threshold} `,
    el("button", {type: "button", text: "Remove", ariaLabel: `Remove the stop condition on feature ${a.index}`,
                  onclick: () => { state.aborts = state.aborts.filter((x) => x !== a); renderAborts(); }}))));
}

// "stop", "length", or which feature stopped the row.
function finished(out) {
  return out.finish_reason === "feature" ? `stopped: feature ${out.fired_feature} fired` : out.finish_reason;
}

function renderClamps() {
  const tbody = $("clamps").tBodies[0];
  tbody.replaceChildren(...state.clamps.map((c) => {
    const label = el("span", {class: "label", text: "…"});
    featureCard(c.index).then((card) => { label.textContent = card.label || "(unlabelled)"; },
                              () => { label.textContent = "(unknown feature)"; });
    const op = el("select", {ariaLabel: `Operation for feature ${c.index}`},
                  ...["set", "add", "scale", "ablate", "unsteer"].map((o) => el("option", {value: o, text: o})));
    op.value = c.op;
    const value = el("input", {type: "number", step: "any", value: String(c.value),
                               ariaLabel: `Value for feature ${c.index}`});
    const needsValue = () => { value.disabled = c.op === "ablate" || c.op === "unsteer"; };
    needsValue();
    op.addEventListener("change", () => { c.op = op.value; needsValue(); });
    value.addEventListener("input", () => { c.value = value.value === "" ? null : Number(value.value); });
    return el("tr", {dataIndex: String(c.index)},
      el("td", {}, dashboardButton(c.index), " ", label),
      el("td", {}, op), el("td", {}, value), whenControls(c),
      el("td", {}, el("button", {type: "button", text: "Remove", ariaLabel: `Remove feature ${c.index}`,
                                onclick: () => { state.clamps = state.clamps.filter((x) => x !== c); renderClamps(); }})));
  }));
  $("no-clamps").hidden = state.clamps.length > 0;
}

// --- A/B run --------------------------------------------------------------------------------

function tokensBox(id) {
  return document.querySelector(`#${id} .tokens`);
}

function startRun() {
  if (state.runs) state.runs.abort();
  state.runs = new AbortController();
  $("stop-run").disabled = false;
  clearError();
  return state.runs.signal;
}

function endRun(signal) {
  if (state.runs && state.runs.signal === signal) {
    state.runs = null;
    $("stop-run").disabled = true;
  }
}

// Marks the first position where the rows chose different tokens.
function markParting() {
  const s = state.steered, b = state.base;
  if (state.partAt !== null) return;
  for (let i = state.checkedTo; i < Math.min(s.length, b.length); i++) {
    if (s[i].token_id !== b[i].token_id) {
      state.partAt = i;
      for (const row of ["steered", "base"]) {
        const span = tokensBox(row).children[i];
        span.classList.add("part");
        span.title = "the first token where steered and base part";
      }
      return;
    }
  }
  state.checkedTo = Math.min(s.length, b.length);
}

function partingNote() {
  const s = state.steered, b = state.base;
  if (state.partAt !== null) {
    const i = state.partAt;
    return `They part at token ${i + 1}: “${showToken(s[i].text)}” (steered) vs “${showToken(b[i].text)}” (base).`;
  }
  if (s.length !== b.length) return `Same tokens for ${Math.min(s.length, b.length)}, then one stops.`;
  return "Steered and base are the same.";
}

function tokenSpan(event, i, hoverable) {
  const span = el("span", {class: "tok", text: event.text, dataI: String(i)});
  if (event.text === "") span.classList.add("held"); // text held back until the next token decides it
  if (event.token_id === null) { // a stop condition ended the row: no token, only held-back text
    span.classList.add("stopped");
    span.title = `stopped: feature ${event.fired_feature} fired`;
  }
  if (hoverable) span.addEventListener("mouseenter", () => selectToken(i));
  return span;
}

// Two lines under the A/B view, one point per steered token: the steering's L2 norm in the
// residual stream (solid) and KL(steered || base) of the next-token distributions (dashed),
// each scaled to its own maximum; pushed features and conditions that passed go in the summary.
function renderTelemetry() {
  const points = state.steered.filter((ev) => ev.telemetry).map((ev) => ev.telemetry);
  const svg = $("telemetry-plot");
  svg.toggleAttribute("hidden", points.length === 0); // an <svg> has no .hidden property
  if (!points.length) return;
  const ns = "http://www.w3.org/2000/svg";
  const line = (values, cls) => {
    const finite = values.filter((v) => typeof v === "number");
    const top = Math.max(...finite, 1e-12);
    const step = points.length > 1 ? 600 / (points.length - 1) : 0;
    const node = document.createElementNS(ns, "polyline");
    node.setAttribute("class", cls);
    node.setAttribute("points", values.map((v, i) => `${(i * step).toFixed(1)},${(115 - 110 * (typeof v === "number" ? v : 0) / top).toFixed(1)}`).join(" "));
    return node;
  };
  svg.replaceChildren(line(points.map((t) => t.norm), "norm"), line(points.map((t) => t.kl), "kl"));
  const maxNorm = Math.max(...points.map((t) => t.norm));
  const kls = points.map((t) => t.kl).filter((v) => typeof v === "number");
  const fired = points.filter((t) => t.conditions.length).length;
  $("telemetry-summary").textContent = `${points.length} tokens: norm up to ${fmt(maxNorm, 2)} (solid), ` +
    `KL up to ${kls.length ? fmt(Math.max(...kls), 3) : "–"} (dashed), ` +
    `${fmt(points.reduce((a, t) => a + t.pushed, 0) / points.length, 1)} features pushed per token on average, ` +
    `conditions passed at ${fired} of the tokens.`;
}

function selectToken(i) {
  const box = tokensBox("steered");
  const old = box.querySelector(".tok.selected");
  if (old) old.classList.remove("selected");
  const ev = state.steered[i];
  if (!ev) return;
  state.selected = i;
  box.children[i].classList.add("selected");
  const table = document.querySelector("#token-features table");
  $("token-hint").textContent = `Token ${i + 1} “${showToken(ev.text)}”: ` +
    (ev.features === undefined ? "ask for features per token to see them."
      : ev.features.length ? "the features steering pushed hardest where it was chosen." : "no feature was pushed here.");
  table.tBodies[0].replaceChildren(...(ev.features || []).map((f) => el("tr", {},
    el("td", {}, dashboardButton(f.index)), el("td", {text: f.label || "(unlabelled)"}),
    el("td", {class: "num", text: f.delta === null ? "not finite" : (f.delta > 0 ? "+" : "") + f.delta.toFixed(3)}))));
  table.hidden = !(ev.features && ev.features.length);
}

async function runAB() {
  const signal = startRun();
  const body = {...buildBody(), compare: true, return_features: num("return-features", 0), telemetry: true};
  state.steered = [];
  state.base = [];
  state.partAt = null;
  state.checkedTo = 0;
  state.selected = -1;
  for (const row of ["steered", "base"]) {
    tokensBox(row).replaceChildren();
    $(row).setAttribute("aria-busy", "true");
  }
  document.querySelector("#token-features table").hidden = true;
  $("telemetry-plot").setAttribute("hidden", "");
  $("token-hint").textContent = "Hover a steered token to see the features steering pushed hardest where it was chosen.";
  $("run-status").textContent = "Running…";
  try {
    const response = await streamGenerate(body, (ev) => {
      const rows = ev.output === "steered" ? state.steered : state.base;
      tokensBox(ev.output).append(tokenSpan(ev, rows.length, ev.output === "steered"));
      rows.push(ev);
      markParting();
      if (ev.output === "steered" && ev.telemetry) renderTelemetry();
    }, signal);
    const s = response.steered, b = response.base;
    $("run-status").textContent = `Done. Seed ${response.seed}; steered ${s.completion_tokens} tokens ` +
      `(${finished(s)}), base ${b.completion_tokens} tokens (${finished(b)}); ` +
      `${Math.round(response.timing.total_ms)} ms. ${partingNote()}`;
  } catch (err) {
    $("run-status").textContent = err.name === "AbortError" ? "Stopped." : "Failed.";
    showError(err, "A/B run");
  } finally {
    for (const row of ["steered", "base"]) $(row).setAttribute("aria-busy", "false");
    endRun(signal);
  }
}

// Arrow keys walk the steered tokens, for those who do not hover.
function tokenKeys(event) {
  if (!state.steered.length) return;
  let i = state.selected;
  if (event.key === "ArrowRight") i = Math.min(state.steered.length - 1, i + 1);
  else if (event.key === "ArrowLeft") i = Math.max(0, i - 1);
  else return;
  event.preventDefault();
  selectToken(i);
}

// --- sweep ----------------------------------------------------------------------------------

async function runSweep() {
  const signal = startRun();
  const body = buildBody();
  delete body.steering_scale;
  const scales = [...SWEEP_SCALES];
  const custom = num("custom-scale", null);
  if (typeof custom === "number" && !scales.includes(custom)) scales.push(custom);
  // One seed for every column, so only the scale differs between them.
  if (body.seed === undefined) body.seed = Math.floor(Math.random() * 2 ** 31);
  const sweep = $("sweep");
  const columns = scales.map((scale) => {
    const tokens = el("div", {class: "tokens"});
    const note = el("p", {class: "hint", text: "Running…"});
    const id = `sweep-${String(scale).replace(/[^0-9a-z]/gi, "_")}`;
    const section = el("section", {class: "output", ariaLabelledby: id, ariaBusy: "true"},
                       el("h3", {id, text: `Scale ${scale}`}), tokens, note);
    return {scale, section, tokens, note};
  });
  sweep.replaceChildren(...columns.map((c) => c.section));
  $("sweep-status").textContent = `Running ${scales.length} scales with seed ${body.seed}` +
    (body.adapter ? "…" : " (no adapter is picked: the scale has nothing to scale)…");
  const results = await Promise.allSettled(columns.map(async (c) => {
    try {
      const response = await streamGenerate(
        {...body, ...(body.adapter ? {steering_scale: c.scale} : {})},
        (ev) => c.tokens.append(tokenSpan(ev, c.tokens.children.length, false)), signal);
      c.note.textContent = `${response.steered.completion_tokens} tokens (${finished(response.steered)})`;
    } catch (err) {
      c.note.textContent = err.name === "AbortError" ? "Stopped." : `Failed: ${err.message}`;
      throw err;
    } finally {
      c.section.setAttribute("aria-busy", "false");
    }
  }));
  const failed = results.filter((r) => r.status === "rejected");
  $("sweep-status").textContent = `Done: ${scales.length - failed.length} of ${scales.length} scales with seed ${body.seed}.`;
  if (failed.length) showError(failed[0].reason, `Sweep (${failed.length} of ${scales.length} scales failed)`);
  endRun(signal);
}

// --- reproduce it ---------------------------------------------------------------------------

function shellQuote(s) {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

function curlSnippet() {
  const body = {...buildBody(), compare: true};
  const rf = num("return-features", 0);
  if (rf) body.return_features = rf;
  const lines = [`curl -sS ${shellQuote(location.origin + "/generate")}`,
                 "  -H 'content-type: application/json'"];
  if (!$("key-row").hidden) lines.push('  -H "Authorization: Bearer $FSRL_API_KEY"');
  lines.push(`  -d ${shellQuote(JSON.stringify(body))}`);
  const note = body.seed === undefined && body.temperature > 0
    ? "# no seed: a sampled answer differs from run to run\n" : "";
  return note + lines.join(" \\\n");
}

// A JSON value as a Python literal.
function py(v, indent = "") {
  if (v === null || v === undefined) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  if (typeof v === "number") return String(v);
  if (typeof v === "string") return JSON.stringify(v); // JSON's escapes are Python's too
  if (Array.isArray(v)) return `[${v.map((x) => py(x, indent)).join(", ")}]`;
  return `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${py(x, indent)}`).join(", ")}}`;
}

// The same request through the OpenAI routes: `model` names the adapter (or the base model),
// and fsrl's extras ride in extra_body (docs/api.md, OpenAI-compatible routes).
function pythonSnippet() {
  const body = buildBody();
  const chat = body.messages !== undefined;
  const args = [[`model`, py(body.adapter || state.baseModel || "base")]];
  args.push(chat ? ["messages", py(body.messages)] : ["prompt", py(body.prompt)]);
  args.push(["max_tokens", py(body.max_new_tokens)], ["temperature", py(body.temperature)],
            ["top_p", py(body.top_p)]);
  if (body.seed !== undefined) args.push(["seed", py(body.seed)]);
  for (const key of ["presence_penalty", "frequency_penalty"]) {
    if (body[key] !== undefined) args.push([key, py(body[key])]);
  }
  if (body.stop) args.push(["stop", py(body.stop)]);
  const extra = {};
  if (body.adapter || body.features || body.abort_when) {
    extra.steering = {scale: body.adapter ? body.steering_scale : 1.0, features: body.features || [],
                      steer_positions: body.steer_positions};
  }
  if (body.abort_when) extra.steering = {...(extra.steering || {}), abort_when: body.abort_when};
  if (body.top_k) extra.top_k = body.top_k;
  if (body.ignore_eos) extra.ignore_eos = true;
  if (Object.keys(extra).length) args.push(["extra_body", py(extra)]);
  const call = chat ? "client.chat.completions.create" : "client.completions.create";
  return [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${py(location.origin + "/v1")}, api_key=os.environ.get("FSRL_API_KEY", "none"))`,
    "# The steered answer. The OpenAI routes have no compare: for the base answer, send the same",
    `# call with model=${py(state.baseModel || "base")} and no "steering".`,
    `response = ${call}(`,
    ...args.map(([k, v]) => `    ${k}=${v},`),
    ")",
    chat ? "print(response.choices[0].message.content)" : "print(response.choices[0].text)",
  ].join("\n");
}

async function copySnippet(text) {
  $("snippet").value = text;
  try {
    await navigator.clipboard.writeText(text);
    $("copy-status").textContent = "Copied to the clipboard.";
  } catch (_) {
    $("snippet").select();
    $("copy-status").textContent = "The browser kept the clipboard closed: the snippet is selected above, copy it from there.";
  }
}

// --- wiring ---------------------------------------------------------------------------------

function init() {
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) {
    $("api-key").value = key;
    showKeyField();
  }
  const saveKey = () => {
    const value = $("api-key").value.trim();
    if (value === (sessionStorage.getItem(KEY_STORE) || "")) return;
    if (value) sessionStorage.setItem(KEY_STORE, value); else sessionStorage.removeItem(KEY_STORE);
    state.cards.clear();
    clearError();
    loadAdapters();
  };
  $("key-row").addEventListener("submit", (event) => { event.preventDefault(); saveKey(); });
  $("api-key").addEventListener("change", saveKey);
  $("alert-dismiss").addEventListener("click", clearError);
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => { $("chat-extras").hidden = mode() !== "chat"; });
  }
  $("add-turn").addEventListener("click", () => addTurn());
  $("scale").addEventListener("input", () => { $("scale-value").textContent = $("scale").value; });
  $("adapter").addEventListener("change", showAdapterCard);
  $("search-form").addEventListener("submit", searchFeatures);
  $("abort-form").addEventListener("submit", addAbort);
  $("index-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if ($("feature-index").value !== "") addClamp($("feature-index").value);
  });
  $("run").addEventListener("click", runAB);
  $("stop-run").addEventListener("click", () => { if (state.runs) state.runs.abort(); });
  $("run-sweep").addEventListener("click", runSweep);
  $("copy-curl").addEventListener("click", () => copySnippet(curlSnippet()));
  $("copy-python").addEventListener("click", () => copySnippet(pythonSnippet()));
  tokensBox("steered").addEventListener("keydown", tokenKeys);
  renderClamps();
  loadServer();
}

init();
