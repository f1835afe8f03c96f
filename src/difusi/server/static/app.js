// difusi web UI: plain JavaScript over the server's own API, no build step.
// Generation goes through /difusi/v1/jobs (returns an id at once, then polled for progress, the live
// preview and the result); listings and PNG info use the A1111 endpoints any client would use.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;
const HISTORY_PAGE = 48;  // history cards per request; "Load more" asks for the next page by offset
// A hint, not an example: an example prompt in grey reads as if it were filled in (A1111 writes the same kind).
const PROMPT_HINT = "Prompt (press Ctrl+Enter to generate)";
// Field metadata comes from the server (GET /difusi/v1/fields): nothing about a job field is hard-coded here.
const GROUPS = [  // form sections in order; "open" ones are always visible, the rest fold away
  { name: "prompt", open: true }, { name: "sampling", open: true }, { name: "size", open: true },
  { name: "batch", open: true }, { name: "seed", open: true }, { name: "variation", title: "Variation seed" },
  { name: "advanced", title: "Advanced sampling" }, { name: "speed", title: "Speed modes (opt-in, approximate)" },
];
const CHOICE_SOURCES = {  // where a field's "choices" list comes from
  samplers: { url: "/sdapi/v1/samplers", value: (s) => s.name },
  schedulers: { url: "/sdapi/v1/schedulers", value: (s) => s.label || s.name },
  rng_sources: { url: "/difusi/v1/rng-sources", value: (s) => s },
  backends: { url: "/difusi/v1/backends", value: (s) => s },
  // A1111's "SD VAE" choices: Automatic, None, then the VAE files (what /difusi/v1/networks lists as `vaes`).
  vaes: { url: "/sdapi/v1/sd-vae", value: (v) => v.model_name, first: ["Automatic", "None"] },
};
const QUICK_GROUP = "model";  // fields shown in the top bar next to the checkpoint (A1111's quicksettings: SD VAE)

const ui = { jobId: null, shown: null, results: [], pngParams: null, fields: [],
  networks: null, networksKind: "lora", promptTarget: "prompt" };

async function api(path, options = {}) {
  const init = { ...options, headers: { ...(options.headers || {}) } };
  if (options.json !== undefined) {
    init.method = init.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  if (!response.ok) {
    const error = new Error((data && (data.detail || data.error)) || `HTTP ${response.status}`);
    error.field = data && data.field;
    error.status = response.status;
    throw error;
  }
  return data;
}

function option(value, label) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = label ?? value;
  return element;
}

function setStatus(text) { $("server-status").textContent = text; }

function showError(error) {
  document.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
  const box = $("error");
  if (!error) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false;
  box.textContent = error.message || String(error);
  const field = error.field === "sd_model_checkpoint" ? "model" : error.field;
  if (field && $(field)) $(field).classList.add("invalid");
}

// ---- listings ------------------------------------------------------------------------------------------
async function loadModels() {
  const [models, options] = await Promise.all([api("/sdapi/v1/sd-models"), api("/sdapi/v1/options")]);
  const select = $("model");
  select.replaceChildren(...models.map((m) => option(m.title)));
  select.value = options.sd_model_checkpoint;
  select.dataset.current = options.sd_model_checkpoint;
}

// ---- the form, built from the field table ----------------------------------------------------------------------
async function loadFields() {
  const table = await api("/difusi/v1/fields?kind=txt2img");
  ui.fields = table.fields.filter((f) => f.http);
  const container = $("fields");
  const networksArea = $("networks-area"), networksToggle = $("networks-toggle");  // held: may be detached below
  container.replaceChildren();
  $("quick-fields").replaceChildren(...ui.fields.filter((f) => f.group === QUICK_GROUP).map(quickControl));
  for (const group of GROUPS) {
    const members = ui.fields.filter((f) => f.group === group.name);
    if (!members.length) continue;
    let target = container;
    if (!group.open) {
      target = document.createElement("details");
      const summary = document.createElement("summary");
      summary.textContent = group.title;
      target.append(summary);
      container.append(target);
    }
    // Selects first (sampler, schedule), then numbers, two to a row.
    const inline = [...members.filter((f) => f.widget === "select"), ...members.filter((f) => f.widget === "number")];
    for (const field of members.filter((f) => !inline.includes(f))) target.append(...blockControl(field));
    for (let i = 0; i < inline.length; i += 2) {
      const row = document.createElement("div");
      row.className = "row";
      row.append(...inline.slice(i, i + 2).map(inlineControl));
      target.append(row);
    }
    if (group.name === "prompt" && $("prompt")) {  // the cards sit under the prompts, the toggle by the label
      const label = container.querySelector("label[for=prompt]");
      const row = document.createElement("div");
      row.className = "label-row";
      label.replaceWith(row);
      row.append(label, networksToggle);
      container.append(networksArea);
    }
  }
  await Promise.all(ui.fields.filter((f) => f.choices in CHOICE_SOURCES).map(loadChoices));
}

function inputFor(field) {
  const element = document.createElement(field.widget === "textarea" ? "textarea" : field.widget === "select" ? "select" : "input");
  element.id = element.name = field.name;
  element.title = field.help;
  if (field.widget === "textarea") {
    element.rows = field.name === "prompt" ? 4 : 2;
    if (field.name === "prompt") element.placeholder = PROMPT_HINT;
    else if (field.name === "negative_prompt") element.placeholder = "Negative prompt (optional)";
  } else if (element.tagName === "INPUT") {
    element.type = "number";
    if (field.min !== null) element.min = String(field.min);
    if (field.max !== null) element.max = String(field.max);
    element.step = field.step ? String(field.step) : field.type === "integer" ? "1" : "any";
    if (field.default !== null) element.value = String(field.default);
    else element.placeholder = ["width", "height"].includes(field.name) ? "native" : field.max === null ? "inf" : "default";
  }
  return element;
}

function quickControl(field) {
  const label = document.createElement("label");
  label.className = "model-picker";
  label.append(field.label, " ", inputFor(field));
  return label;
}

function inlineControl(field) {
  const label = document.createElement("label");
  label.append(field.label, " ", inputFor(field));
  return label;
}

function blockControl(field) {
  const label = document.createElement("label");
  label.htmlFor = field.name;
  label.textContent = field.label;
  if (field.widget !== "seed") return [label, inputFor(field)];
  const row = document.createElement("div");
  row.className = "seed-row";
  row.append(inputFor(field));
  if (field.name === "seed") {
    row.append(iconButton("random-seed", "🎲", "Random seed (-1)", () => { $("seed").value = "-1"; }),
      iconButton("reuse-seed", "♻", "Reuse the seed of the shown image", () => { if (ui.shown) $("seed").value = String(ui.shown.seed); }));
  }
  return [label, row];
}

function iconButton(id, text, title, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.id = id;
  button.className = "icon";
  button.title = title;
  button.setAttribute("aria-label", title);
  button.textContent = text;
  button.addEventListener("click", onClick);
  return button;
}

async function loadChoices(field) {
  const source = CHOICE_SOURCES[field.choices];
  const items = await api(source.url);
  setChoices(field.name, [...(source.first || []), ...items.map(source.value)], field.default);
}

// Replace a select's options, keeping `keep` (the current value) selected when it is still offered.
function setChoices(name, values, keep) {
  const select = $(name);
  select.replaceChildren(...[...new Set(values)].map((value) => option(value)));
  if (values.includes(keep)) select.value = keep;
}

async function switchModel() {
  const select = $("model");
  const wanted = select.value;
  setStatus(`Loading ${wanted}…`);
  showError(null);  // an earlier failed switch (or job) must not stay on screen once this one succeeds
  select.disabled = true;
  try {
    await api("/sdapi/v1/options", { json: { sd_model_checkpoint: wanted } });
    select.dataset.current = wanted;
    setStatus(`Model: ${wanted}`);
  } catch (error) {
    select.value = select.dataset.current || "";
    setStatus("");
    showError(error);
  } finally {
    select.disabled = false;
  }
}

function readForm() {
  const body = {};
  for (const field of ui.fields) {
    const raw = $(field.name).value.trim();
    if (raw === "") continue;
    body[field.name] = field.type === "string" ? $(field.name).value : Number(raw);
  }
  body.override_settings = { sd_model_checkpoint: $("model").value };
  return body;
}

function setField(name, value) {
  if (value === undefined || value === null || !$(name)) return;
  const element = $(name);
  if (element.tagName === "SELECT" && ![...element.options].some((o) => o.value === String(value))) {
    element.appendChild(option(String(value)));
  }
  element.value = String(value);
}

function fillForm(values) {
  for (const field of ui.fields) setField(field.name, values[field.name]);
  if (values.model) {
    const match = [...$("model").options].find((o) => o.value === values.model ||
      o.value.startsWith(`${values.model} [`) || (values.model_hash && o.value.endsWith(`[${values.model_hash}]`)));
    if (match) $("model").value = match.value;
  }
  markNetworksInPrompt();
}

// A1111 infotext keys (from /sdapi/v1/png-info) -> form fields, by each field's infotext key.
function valuesFromInfotextFields(p) {
  const values = { model: p["Model"], model_hash: p["Model hash"] };
  for (const field of ui.fields) if (field.infotext && p[field.infotext] !== undefined) values[field.name] = p[field.infotext];
  return values;
}

// ---- generating ------------------------------------------------------------------------------------------
async function generate(event) {
  event.preventDefault();
  showError(null);
  let job;
  try {
    const axes = xyzAxes();  // null unless the X/Y/Z plot script is chosen
    job = axes ? await api("/difusi/v1/xyz", { json: { ...readForm(), ...axes } })
      : await api("/difusi/v1/jobs", { json: readForm() });
  } catch (error) {
    showError(error);
    return;
  }
  ui.jobId = job.id;
  clearResults();  // the previous job's image and infotext are not this job's
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  setProgress(0, job.position ? `Queued (${job.position} ahead)` : "Starting…");
  poll(job.id);
}

function setProgress(fraction, text) {
  $("progress-bar").style.width = `${Math.round(fraction * 100)}%`;
  $("progress-text").textContent = text;
}

async function poll(id) {
  let status;
  try {
    status = await api(`/difusi/v1/jobs/${id}?preview=true`);
  } catch (error) {
    finishJob();
    showError(error);
    return;
  }
  if (id !== ui.jobId) return;
  if (status.status === "queued") {
    setProgress(0, `Queued (${status.position} ahead)`);
  } else if (status.status === "running") {
    const text = status.kind === "xyz" ? `X/Y/Z plot: ${status.iteration} of ${status.n_iter} cells done` :
      status.steps ? `Step ${status.step}/${status.steps} · batch ${status.iteration + 1}/${status.n_iter}` +
      (status.eta_relative > 0 ? ` · ~${status.eta_relative.toFixed(1)} s left` : "") : "Loading model…";
    setProgress(status.progress, text);
    if (status.preview) showPreview(status.preview);
  } else {
    finishJob();
    if (status.result) showResults(status.result, status.status);
    if (status.error) showError(new Error(status.error.detail));
    setProgress(status.status === "done" ? 1 : status.progress,
      status.status === "done" ? "Done" : status.status.charAt(0).toUpperCase() + status.status.slice(1));
    loadHistory();
    return;
  }
  setTimeout(() => poll(id), POLL_MS);
}

function finishJob() {
  ui.jobId = null;
  $("generate").disabled = false;
  $("interrupt").disabled = true;
  $("preview").hidden = true;
}

async function interrupt() {
  if (!ui.jobId) return;
  $("interrupt").disabled = true;
  try { await api(`/difusi/v1/jobs/${ui.jobId}`, { method: "DELETE" }); } catch (error) { showError(error); }
}

function showPreview(b64) {
  $("stage-empty").hidden = true;
  $("main-image").hidden = true;
  $("preview").src = `data:image/png;base64,${b64}`;
  $("preview").hidden = false;
}

function imageSource(entry) {
  return entry.url || `data:image/png;base64,${entry.image}`;
}

function clearResults() {
  ui.results = [];
  ui.shown = null;
  $("results").replaceChildren();
  $("main-image").hidden = true;
  $("main-image").removeAttribute("src");
  $("stage-empty").hidden = false;
  $("infotext").textContent = "";
  showWarnings([]);
}

// The job's warnings (prompt syntax used as literal text, removed <lora:...> tags): A1111 is silent, difusi says it.
function showWarnings(lines) {
  $("warnings").textContent = lines.join("\n");
  $("warnings").hidden = !lines.length;
}

function showResults(result, state) {
  ui.results = result.images;
  showWarnings((result.info && result.info.warnings) || []);
  const thumbs = result.images.map((entry, index) => {
    const img = document.createElement("img");
    img.src = imageSource(entry);
    img.alt = `Result ${index + 1} (seed ${entry.seed})`;
    img.addEventListener("click", () => selectResult(index));
    return img;
  });
  $("results").replaceChildren(...(thumbs.length > 1 ? thumbs : []));
  if (result.images.length) {
    selectResult(0);
  } else {
    $("main-image").hidden = true;
    $("stage-empty").hidden = false;
    $("infotext").textContent = state === "interrupted" ? "Interrupted before any image was finished." : "";
  }
}

function selectResult(index) {
  const entry = ui.results[index];
  ui.shown = entry;
  $("main-image").src = imageSource(entry);
  $("main-image").hidden = false;
  $("stage-empty").hidden = true;
  $("infotext").textContent = entry.infotext;
  [...$("results").children].forEach((img, i) => img.classList.toggle("selected", i === index));
}

// ---- scripts: X/Y/Z plot ---------------------------------------------------------------------------------------
// Axis types come from the field table (every numeric or choice field, by its label), plus A1111's Prompt S/R and
// Checkpoint name; the server parses "TYPE=VALUES" (difusi.batch.xyz), so nothing about axes is duplicated here.
const AXIS_HINTS = { x: "e.g. Euler a, DPM++ 2M", y: "e.g. 10-40 [4] or 1-5 (+2)", z: "optional" };

function axisTypes() {
  const types = [{ value: "", label: "Nothing" }];
  for (const field of ui.fields) {
    if (field.type !== "string" || field.choices) types.push({ value: field.name, label: field.label });
  }
  types.push({ value: "Checkpoint name", label: "Checkpoint name" }, { value: "Prompt S/R", label: "Prompt S/R" });
  return types;
}

function buildXyzAxes() {
  const defaults = { x: "sampler_name", y: "steps", z: "" };
  const rows = ["x", "y", "z"].map((axis) => {
    const row = document.createElement("div");
    row.className = "row xyz-axis";
    const type = document.createElement("select");
    type.id = `${axis}-type`;
    type.setAttribute("aria-label", `${axis.toUpperCase()} type`);
    type.replaceChildren(...axisTypes().map((t) => option(t.value, t.label)));
    type.value = defaults[axis];
    const values = document.createElement("input");
    values.id = axis;  // the server's error `field` for a bad axis is "x", "y" or "z": showError marks this input
    values.type = "text";
    values.placeholder = AXIS_HINTS[axis];
    values.setAttribute("aria-label", `${axis.toUpperCase()} values`);
    const typeLabel = document.createElement("label");
    typeLabel.append(`${axis.toUpperCase()} type `, type);
    const valuesLabel = document.createElement("label");
    valuesLabel.append(`${axis.toUpperCase()} values `, values);
    row.append(typeLabel, valuesLabel);
    return row;
  });
  $("xyz-axes").replaceChildren(...rows);
}

// {x, y, z} in the CLI's "TYPE=VALUES" syntax, or null when no script is chosen.
function xyzAxes() {
  if ($("script").value !== "xyz") return null;
  const axes = {};
  for (const axis of ["x", "y", "z"]) {
    const type = $(`${axis}-type`).value;
    const values = $(axis).value.trim();
    axes[axis] = type && values ? `${type}=${values}` : null;
  }
  return axes;
}

// ---- extra networks (A1111's cards) ---------------------------------------------------------------------------
// GET /difusi/v1/networks lists the LoRAs (with `prompt_name`, the name the server's resolver maps back to the file:
// the alias when unique, as A1111's default "Alias from file", else the file name, else sub/name) and the
// embeddings; a card's thumbnail is its `preview` URL. Clicking a card toggles its text in a prompt as A1111 does:
// appended after a space when absent, removed (with that space) when present.
const NETWORK_SEPARATOR = " ";  // A1111's extra_networks_add_text_separator

async function loadNetworks() {
  try {
    ui.networks = await api("/difusi/v1/networks");
  } catch (error) {
    showError(error);
    return;
  }
  if ($("sd_vae")) setChoices("sd_vae", ui.networks.vaes, $("sd_vae").value);
  renderNetworks();
}

async function refreshNetworks() {
  $("networks-refresh").disabled = true;
  try {
    await Promise.all(["refresh-loras", "refresh-embeddings", "refresh-vae"].map((name) =>
      api(`/sdapi/v1/${name}`, { method: "POST" })));
    await loadNetworks();
  } catch (error) {
    showError(error);
  } finally {
    $("networks-refresh").disabled = false;
  }
}

function toggleNetworks() {
  const panel = $("networks");
  panel.hidden = !panel.hidden;
  $("networks-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  if (!panel.hidden && !ui.networks) loadNetworks();
}

function selectNetworkTab(kind) {
  ui.networksKind = kind;
  for (const tab of document.querySelectorAll("#networks .tabs [role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.kind === kind));
  }
  renderNetworks();
}

function networkItems(kind) {
  if (!ui.networks) return [];
  if (kind === "lora") {
    return ui.networks.loras.map((item) => ({ ...item, text: `<lora:${item.prompt_name}:1>`,
      search: [item.name, item.alias, item.relative],
      detail: [item.alias !== item.name ? `alias ${item.alias}` : null, item.relative !== item.name ? item.relative : null,
        item.base_model, item.hash].filter(Boolean).join(" · ") }));
  }
  const { loaded, skipped, checked } = ui.networks.embeddings;
  return [
    ...loaded.map((item) => ({ ...item, text: item.name, search: [item.name],
      detail: `${item.vectors} vector${item.vectors === 1 ? "" : "s"} · ${item.hash}` +
        (checked ? "" : " · not checked against a model yet") })),
    ...skipped.map((item) => ({ ...item, skipped: item.reason, search: [item.name], detail: `skipped: ${item.reason}` })),
  ];
}

function renderNetworks() {
  const kind = ui.networksKind;
  const items = networkItems(kind);
  $("networks-cards").replaceChildren(...items.map((item) => networkCard(kind, item)));
  filterNetworks();
  markNetworksInPrompt();
}

function networkCard(kind, item) {
  const card = document.createElement("figure");
  card.className = "card network-card";
  card.dataset.kind = kind;
  card.dataset.name = item.name;
  card.dataset.search = item.search.join("\n").toLowerCase();
  card.title = item.skipped ? `${item.name}: ${item.skipped}` : `${item.name}: click to add ${item.text} (click again to remove)`;
  let thumb;
  if (item.preview) {
    thumb = document.createElement("img");
    thumb.src = item.preview;
    thumb.alt = item.name;
    thumb.loading = "lazy";
  } else {
    thumb = document.createElement("div");
    thumb.className = "network-placeholder";
    thumb.textContent = "No preview";
  }
  const meta = document.createElement("figcaption");
  meta.className = "meta";
  const name = document.createElement("span");
  name.className = "prompt network-name";
  name.textContent = item.name;
  const detail = document.createElement("span");
  detail.className = "muted";
  detail.textContent = item.detail;
  meta.append(name, detail);
  card.append(thumb, meta);
  if (item.skipped) {
    card.classList.add("skipped");
    card.setAttribute("aria-disabled", "true");
    return card;
  }
  card.dataset.text = item.text;
  card.tabIndex = 0;
  card.setAttribute("role", "button");
  card.addEventListener("click", () => networkCardClicked(card));
  card.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); networkCardClicked(card); }
  });
  return card;
}

function filterNetworks() {
  const query = $("networks-search").value.trim().toLowerCase();
  let shown = 0;
  for (const card of $("networks-cards").children) {
    card.hidden = Boolean(query) && !card.dataset.search.includes(query);
    if (!card.hidden) shown += 1;
  }
  const empty = $("networks-empty");
  empty.hidden = shown > 0;
  empty.textContent = !ui.networks ? "" : query ? "Nothing matches the search." :
    ui.networksKind === "lora" ? "No LoRA files: put them in the models folder's Lora/ and press Refresh." :
      "No embeddings: put them in the models folder's embeddings/ and press Refresh.";
}

function escapeRegExp(text) { return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"); }

// Where `text` (a card's) is in `value`: A LoRA tag is found by its name whatever its multipliers; an embedding's
// name as a whole word (between spaces, commas, brackets or the ends).
function networkPattern(kind, text) {
  if (kind === "lora") {
    const name = text.slice("<lora:".length, text.lastIndexOf(":"));
    return new RegExp(`<(?:lora|lyco):${escapeRegExp(name)}(?::[^>]*)?>`, "g");
  }
  return new RegExp(`(?<=^|[\\s,()\\[\\]])${escapeRegExp(text)}(?=$|[\\s,()\\[\\]:])`, "g");
}

// A1111's updatePromptArea: remove the network when the prompt has it (with the separator before it), else append.
function togglePromptText(textarea, kind, text) {
  const pattern = networkPattern(kind, text);
  let value = textarea.value;
  if (pattern.test(value)) {
    pattern.lastIndex = 0;
    value = value.replace(pattern, "\u0000").replace(/ ?\u0000 ?/g, (found) => (found === " \u0000 " ? " " : ""));
    textarea.value = value;
  } else {
    const separator = value === "" || /\s$/.test(value) ? "" : NETWORK_SEPARATOR;
    textarea.value = value + separator + text;
  }
  textarea.dispatchEvent(new Event("input", { bubbles: true }));
}

function networkCardClicked(card) {
  const kind = card.dataset.kind;
  // Embeddings go where the user last typed (A1111's activePromptTextarea); a LoRA tag only works in the prompt.
  const target = kind === "embedding" ? $(ui.promptTarget) || $("prompt") : $("prompt");
  togglePromptText(target, kind, card.dataset.text);
}

function markNetworksInPrompt() {
  const texts = [$("prompt"), $("negative_prompt")].filter(Boolean).map((el) => el.value);
  for (const card of document.querySelectorAll(".network-card[data-text]")) {
    const kind = card.dataset.kind;
    const present = (kind === "lora" ? texts.slice(0, 1) : texts).some((value) =>
      networkPattern(kind, card.dataset.text).test(value));
    card.classList.toggle("active", present);
  }
}

// ---- history ---------------------------------------------------------------------------------------------
// `more`: append the next page (offset = cards shown) instead of reloading the first one.
async function loadHistory(more = false) {
  const query = $("history-search").value.trim();
  const offset = more === true ? $("history").children.length : 0;
  let data;
  try {
    data = await api(`/difusi/v1/history?limit=${HISTORY_PAGE}&offset=${offset}` +
      (query ? `&query=${encodeURIComponent(query)}` : ""));
  } catch (error) {
    showError(error);
    return;
  }
  const cards = data.items.map(historyCard);
  if (offset) $("history").append(...cards); else $("history").replaceChildren(...cards);
  $("history-empty").hidden = $("history").children.length > 0;
  // A full page may have more behind it; a short one is the end (one extra request at most when it is exact).
  $("history-more").hidden = data.items.length < HISTORY_PAGE;
}

function historyCard(item) {
  const card = document.createElement("figure");
  card.className = "card";
  card.dataset.id = item.id;
  const img = document.createElement("img");
  img.src = item.url;
  img.alt = item.prompt;
  img.loading = "lazy";
  img.addEventListener("click", () => {
    ui.results = [item];
    $("results").replaceChildren();
    selectResult(0);
  });
  const meta = document.createElement("figcaption");
  meta.className = "meta";
  const prompt = document.createElement("span");
  prompt.className = "prompt";
  prompt.textContent = item.prompt || "(empty prompt)";
  prompt.title = item.infotext;
  const detail = document.createElement("span");
  detail.className = "muted";
  detail.textContent = `seed ${item.seed} · ${item.sampler_name} · ${item.steps} steps`;
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "reuse";
  reuse.textContent = "♻ Reuse parameters";
  reuse.addEventListener("click", () => reuseHistory(item));
  meta.append(prompt, detail, reuse);
  card.append(img, meta);
  return card;
}

function reuseHistory(item) {
  fillForm({ ...item.params, sampler_name: item.sampler_name, scheduler: item.scheduler, seed: item.seed,
    model: item.model_name, model_hash: item.model_hash });
  window.scrollTo({ top: 0, behavior: "smooth" });
}

// ---- PNG info (drop an image anywhere) ----------------------------------------------------------------------
function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function showPngInfo(file) {
  showError(null);
  try {
    const dataURL = await readAsDataURL(file);
    const data = await api("/sdapi/v1/png-info", { json: { image: dataURL } });
    $("pnginfo-image").src = dataURL;
    ui.pngParams = data.info ? valuesFromInfotextFields(data.parameters) : null;
    $("pnginfo-text").textContent = data.info || "This image has no generation parameters.";
    $("pnginfo-use").disabled = !data.info;
    $("pnginfo").hidden = false;
    $("pnginfo").scrollIntoView({ behavior: "smooth" });
  } catch (error) {
    showError(error);
  }
}

function installDropZone() {
  let depth = 0;
  const overlay = $("drop-overlay");
  const hasFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");
  document.addEventListener("dragenter", (event) => { if (hasFiles(event)) { depth += 1; overlay.hidden = false; } });
  document.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) overlay.hidden = true; });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    overlay.hidden = true;
    const file = event.dataTransfer?.files?.[0];
    if (file) showPngInfo(file);
  });
}

// ---- start -------------------------------------------------------------------------------------------------
async function start() {
  $("txt2img").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", interrupt);
  $("model").addEventListener("change", switchModel);
  $("history-refresh").addEventListener("click", () => loadHistory());
  $("history-more").addEventListener("click", () => loadHistory(true));
  $("history-search").addEventListener("input", () => { clearTimeout(ui.searchTimer); ui.searchTimer = setTimeout(() => loadHistory(), 250); });
  $("pnginfo-close").addEventListener("click", () => { $("pnginfo").hidden = true; });
  $("pnginfo-use").addEventListener("click", () => { if (ui.pngParams) { fillForm(ui.pngParams); window.scrollTo({ top: 0 }); } });
  $("pnginfo-file").addEventListener("change", (event) => { if (event.target.files[0]) showPngInfo(event.target.files[0]); });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("generate").disabled) $("txt2img").requestSubmit();
  });
  installDropZone();
  $("script").addEventListener("change", () => { $("xyz-axes").hidden = $("script").value !== "xyz"; });
  $("networks-toggle").addEventListener("click", toggleNetworks);
  $("networks-refresh").addEventListener("click", refreshNetworks);
  $("networks-search").addEventListener("input", filterNetworks);
  for (const tab of document.querySelectorAll("#networks .tabs [role=tab]")) {
    tab.addEventListener("click", () => selectNetworkTab(tab.dataset.kind));
  }
  try {
    await Promise.all([loadModels(), loadFields()]);
    buildXyzAxes();
    for (const name of ["prompt", "negative_prompt"]) {
      if (!$(name)) continue;
      $(name).addEventListener("focus", () => { ui.promptTarget = name; });
      $(name).addEventListener("input", markNetworksInPrompt);
    }
    setStatus(`Model: ${$("model").value}`);
  } catch (error) {
    showError(error);
  }
  loadHistory();
  document.body.dataset.ready = "true";
}

start();
