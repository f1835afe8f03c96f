// difusi web UI: plain JavaScript over the server's own API, no build step.
// Generation goes through /difusi/v1/jobs (txt2img) and /difusi/v1/img2img (img2img, inpaint, outpaint): each returns
// an id at once, then is polled for progress, the live preview and the result; listings, PNG info and Extras use the
// A1111 endpoints any client would use.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;
const HISTORY_PAGE = 48;  // history cards per request; "Load more" asks for the next page by offset
// A hint, not an example: an example prompt in grey reads as if it were filled in (A1111 writes the same kind).
const PROMPT_HINT = "Prompt (press Ctrl+Enter to generate)";
// Field metadata comes from the server (GET /difusi/v1/fields): nothing about a job field is hard-coded here.
// Each tab's form holds the fields whose `kinds` meet the tab's kinds; ids are the field names with the tab's prefix
// (txt2img keeps the bare names). Groups in order; "open" ones are always visible, the rest fold away.
const COMMON_GROUPS = [
  { name: "prompt", open: true }, { name: "sampling", open: true }, { name: "size", open: true },
  { name: "batch", open: true }, { name: "seed", open: true },
];
const TAIL_GROUPS = [
  { name: "variation", title: "Variation seed" }, { name: "advanced", title: "Advanced sampling" },
  { name: "speed", title: "Speed modes (opt-in, approximate)" },
];
const FORMS = {
  txt2img: { key: "txt2img", prefix: "", kinds: ["txt2img"], container: "fields", error: "error", fields: [],
    groups: [...COMMON_GROUPS, { name: "hires", title: "Hires. fix" }, { name: "img2img", title: "img2img" },
      { name: "inpaint", title: "Inpainting model" }, ...TAIL_GROUPS] },
  img2img: { key: "img2img", prefix: "i2i-", kinds: ["img2img", "inpaint"], container: "i2i-fields", error: "i2i-error",
    fields: [], groups: [...COMMON_GROUPS, { name: "img2img", open: true }, { name: "inpaint", title: "Inpainting" },
      { name: "outpaint", title: "Outpainting" }, ...TAIL_GROUPS] },
};
const CHOICE_SOURCES = {  // where a field's "choices" list comes from
  samplers: { url: "/sdapi/v1/samplers", value: (s) => s.name },
  schedulers: { url: "/sdapi/v1/schedulers", value: (s) => s.label || s.name },
  rng_sources: { url: "/difusi/v1/rng-sources", value: (s) => s },
  backends: { url: "/difusi/v1/backends", value: (s) => s },
  unet_precisions: { url: "/difusi/v1/unet-precisions", value: (s) => s },
  // A1111's "SD VAE" choices: Automatic, None, then the VAE files (what /difusi/v1/networks lists as `vaes`).
  vaes: { url: "/sdapi/v1/sd-vae", value: (v) => v.model_name, first: ["Automatic", "None"] },
  // Hires fix upscalers as A1111 lists them: the latent modes first, then None, Lanczos, Nearest and the model files.
  upscalers: { url: "/sdapi/v1/upscalers", value: (u) => u.name, before: "/sdapi/v1/latent-upscale-modes" },
};
const QUICK_GROUP = "model";  // fields shown in the top bar next to the checkpoint (A1111's quicksettings: SD VAE)
const DIRECTIONS = ["left", "right", "up", "down"];  // outpaint_directions, as checkboxes

const ui = { jobId: null, jobForm: null, shown: null, results: [], resultParams: null, pngParams: null, fields: [],
  networks: null, networksKind: "lora", promptTarget: "prompt", tab: "txt2img", table: [], cache: {},
  init: null, mask: { tool: "brush", drawing: false, last: null }, extras: null };

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

function cachedApi(path) {  // listings several selects share (samplers for both tabs and the hires pass)
  if (!ui.cache[path]) ui.cache[path] = api(path).catch((error) => { delete ui.cache[path]; throw error; });
  return ui.cache[path];
}

function option(value, label) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = label ?? value;
  return element;
}

function setStatus(text) { $("server-status").textContent = text; }

// The error box of the tab that made the request (`tab`: txt2img, img2img or extras; the shown tab by default), and
// the control of the field the server named marked.
function showError(error, tab = ui.tab) {
  document.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
  for (const id of ["error", "i2i-error", "extras-error"]) { $(id).hidden = true; $(id).textContent = ""; }
  if (!error) return;
  const box = $(tab === "img2img" ? "i2i-error" : tab === "extras" ? "extras-error" : "error");
  box.hidden = false;
  box.textContent = error.message || String(error);
  let field = error.field === "sd_model_checkpoint" ? "model" : error.field;
  if (!field) return;
  if (tab === "img2img") field = ["init_images", "mask"].includes(field) ? "i2i-stage" : $(`i2i-${field}`) ? `i2i-${field}` : field;
  if (tab === "extras") field = $(`extras-${field}`) ? `extras-${field}` : "extras-stage";
  if ($(field)) $(field).classList.add("invalid");
}

// ---- tabs ------------------------------------------------------------------------------------------------
function switchTab(name) {
  ui.tab = name;
  for (const tab of document.querySelectorAll("#main-tabs [role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.tab === name));
  }
  $("txt2img").hidden = name !== "txt2img";
  $("img2img").hidden = name !== "img2img";
  $("extras").hidden = name !== "extras";
}

// ---- listings ------------------------------------------------------------------------------------------
async function loadModels() {
  const [models, options] = await Promise.all([api("/sdapi/v1/sd-models"), api("/sdapi/v1/options")]);
  const select = $("model");
  select.replaceChildren(...models.map((m) => option(m.title)));
  select.value = options.sd_model_checkpoint;
  select.dataset.current = options.sd_model_checkpoint;
}

// ---- the forms, built from the field table ----------------------------------------------------------------------
const fid = (form, name) => form.prefix + name;

async function loadFields() {
  const table = await api("/difusi/v1/fields");
  ui.table = table.fields.filter((f) => f.http);
  $("quick-fields").replaceChildren(...ui.table.filter((f) => f.group === QUICK_GROUP).map((f) => quickControl(f)));
  for (const form of Object.values(FORMS)) {
    form.fields = ui.table.filter((f) => f.group !== QUICK_GROUP && f.kinds.some((k) => form.kinds.includes(k)));
    buildForm(form);
  }
  ui.fields = [...FORMS.txt2img.fields, ...ui.table.filter((f) => f.group === QUICK_GROUP)];
  const loads = [];
  for (const form of Object.values(FORMS)) {
    for (const field of form.fields) if (field.choices in CHOICE_SOURCES) loads.push(loadChoices(field, form));
  }
  for (const field of ui.table) if (field.group === QUICK_GROUP && field.choices in CHOICE_SOURCES) loads.push(loadChoices(field, { prefix: "" }));
  loads.push(loadExtrasUpscalers());
  await Promise.all(loads);
}

// A field shown only when another is on (`requires`): only where that other field is in the same form (the hires
// fields need enable_hr in txt2img; in img2img the denoising strength stands alone).
function requirement(form, field) {
  return field.requires && form.fields.some((f) => f.name === field.requires) ? field.requires : null;
}

function buildForm(form) {
  const container = $(form.container);
  const isTxt = form.key === "txt2img";
  const networksArea = $("networks-area"), networksToggle = $("networks-toggle");  // held: may be detached below
  container.replaceChildren();
  const groupOf = (field) => {  // a field that needs another sits in that one's group (denoising strength: hires)
    const needed = requirement(form, field);
    return needed ? form.fields.find((f) => f.name === needed).group : field.group;
  };
  const known = new Set(form.groups.map((g) => g.name));
  const groups = [...form.groups, ...[...new Set(form.fields.map(groupOf))].filter((g) => !known.has(g))
    .map((name) => ({ name, title: name }))];  // a group the UI does not know yet still gets its fields shown
  for (const group of groups) {
    const members = form.fields.filter((f) => groupOf(f) === group.name);
    if (!members.length) continue;
    let target = container;
    if (!group.open) {
      target = document.createElement("details");
      target.id = `${form.prefix || "t2i-"}group-${group.name}`;
      const summary = document.createElement("summary");
      summary.textContent = group.title;
      target.append(summary);
      container.append(target);
    }
    // Selects first (sampler, schedule), then numbers, two to a row; the rest (prompts, seeds, checkboxes,
    // sliders) one to a line. A field that requires another comes after it, hidden while that one is off.
    const isInline = (f) => ["select", "number"].includes(widgetOf(f));
    const plain = members.filter((f) => !requirement(form, f));
    const dependent = members.filter((f) => requirement(form, f));
    place(form, target, plain, isInline);
    if (dependent.length) {
      const box = document.createElement("div");
      box.className = "dependent";
      box.id = `${form.prefix || "t2i-"}needs-${dependent[0].requires}`;
      box.dataset.requires = fid(form, dependent[0].requires);
      place(form, box, dependent, isInline);
      target.append(box);
    }
    if (isTxt && group.name === "prompt" && $("prompt")) {  // the cards sit under the prompts, the toggle by the label
      const label = container.querySelector("label[for=prompt]");
      const row = document.createElement("div");
      row.className = "label-row";
      label.replaceWith(row);
      row.append(label, networksToggle);
      container.append(networksArea);
    }
  }
  for (const box of container.querySelectorAll(".dependent")) {  // show the dependants while their field is on
    const control = $(box.dataset.requires);
    const update = () => { box.hidden = !fieldValue(control); };
    control.addEventListener("change", update);
    update();
  }
  for (const slider of container.querySelectorAll("input[type=range]")) {
    const shown = $(`${slider.id}-value`);
    const update = () => { shown.textContent = slider.value; };
    slider.addEventListener("input", update);
    update();
  }
}

function place(form, target, members, isInline) {
  const inline = [...members.filter((f) => isInline(f) && widgetOf(f) === "select"),
    ...members.filter((f) => isInline(f) && widgetOf(f) === "number")];
  for (const field of members.filter((f) => !inline.includes(f))) target.append(...blockControl(field, form));
  for (let i = 0; i < inline.length; i += 2) {
    const row = document.createElement("div");
    row.className = "row";
    row.append(...inline.slice(i, i + 2).map((f) => inlineControl(f, form)));
    target.append(row);
  }
}

function widgetOf(field) {
  if (field.name === "outpaint_directions") return "directions";
  if (field.labels) return "select";  // an int (or bool) field whose values have names: a select of the names
  return field.widget;
}

function inputFor(field, form = FORMS.txt2img) {
  const widget = widgetOf(field);
  const id = fid(form, field.name);
  if (widget === "directions") {
    const box = document.createElement("span");
    box.id = id;
    box.className = "directions";
    box.setAttribute("role", "group");
    box.setAttribute("aria-label", field.label);
    const on = String(field.default || "").split(",");
    for (const direction of DIRECTIONS) {
      const label = document.createElement("label");
      const check = document.createElement("input");
      check.type = "checkbox";
      check.id = `${id}-${direction}`;
      check.value = direction;
      check.checked = on.includes(direction);
      label.append(check, ` ${direction}`);
      box.append(label);
    }
    return box;
  }
  const tag = widget === "textarea" ? "textarea" : widget === "select" ? "select" : "input";
  const element = document.createElement(tag);
  element.id = element.name = id;
  element.title = field.help;
  element.dataset.field = field.name;
  if (widget === "textarea") {
    element.rows = field.name === "prompt" ? 4 : 2;
    if (field.name === "prompt") element.placeholder = PROMPT_HINT;
    else if (field.name.endsWith("negative_prompt")) element.placeholder = "Negative prompt (optional)";
  } else if (widget === "select") {
    if (field.labels) {  // the value sent is the label's index (a boolean: false, true)
      const values = field.type === "boolean" ? ["false", "true"] : field.labels.map((_, i) => String(i));
      element.replaceChildren(...field.labels.map((label, i) => option(values[i], label)));
      if (field.default !== null) element.value = String(field.default);
    } else if (field.default === "") {
      element.append(option("", "Same as first pass"));
    }
  } else if (widget === "checkbox") {
    element.type = "checkbox";
    element.checked = Boolean(field.default);
  } else {
    element.type = widget === "slider" ? "range" : "number";
    if (field.min !== null) element.min = String(field.min);
    if (field.max !== null) element.max = String(field.max);
    element.step = field.step ? String(field.step) : field.type === "integer" ? "1" : "any";
    if (field.default !== null) element.value = String(field.default);
    else element.placeholder = ["width", "height"].includes(field.name) ? "native" : field.max === null ? "inf" : "default";
  }
  return element;
}

// A control's value as the request wants it (undefined: leave the field to the server's default).
function fieldValue(element, field = null) {
  if (element.classList.contains("directions")) {
    return [...element.querySelectorAll("input:checked")].map((c) => c.value).join(",");
  }
  if (element.type === "checkbox") return element.checked;
  if (field && field.type === "boolean") return element.value === "true";
  if (element.tagName === "SELECT" && !field) return element.value !== "" && element.value !== "false" && element.value !== "0";
  const raw = element.value.trim();
  if (raw === "") return undefined;
  return field && field.type === "string" ? element.value : field ? Number(raw) : raw;
}

function quickControl(field) {
  const label = document.createElement("label");
  label.className = "model-picker";
  label.append(field.label, " ", inputFor(field, { prefix: "" }));
  return label;
}

function inlineControl(field, form) {
  const label = document.createElement("label");
  label.append(field.label, " ", inputFor(field, form));
  return label;
}

function blockControl(field, form) {
  const widget = widgetOf(field);
  const id = fid(form, field.name);
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = field.label;
  if (widget === "checkbox") {
    label.className = "check";
    label.replaceChildren(inputFor(field, form), ` ${field.label}`);
    return [label];
  }
  if (widget === "slider") {
    const row = document.createElement("div");
    row.className = "slider-row";
    const value = document.createElement("output");
    value.id = `${id}-value`;
    value.htmlFor = id;
    row.append(inputFor(field, form), value);
    return [label, row];
  }
  if (widget === "directions") {
    const row = document.createElement("div");
    row.className = "directions-row";
    label.removeAttribute("for");
    row.append(label, inputFor(field, form));
    return [row];
  }
  if (widget !== "seed") return [label, inputFor(field, form)];
  const row = document.createElement("div");
  row.className = "seed-row";
  row.append(inputFor(field, form));
  if (field.name === "seed") {
    row.append(iconButton(`${form.prefix}random-seed`, "🎲", "Random seed (-1)", () => { $(id).value = "-1"; }),
      iconButton(`${form.prefix}reuse-seed`, "♻", "Reuse the seed of the shown image",
        () => { if (ui.shown && ui.shown.seed !== undefined) $(id).value = String(ui.shown.seed); }));
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

async function loadChoices(field, form) {
  const source = CHOICE_SOURCES[field.choices];
  const [before, items] = await Promise.all([source.before ? cachedApi(source.before) : [], cachedApi(source.url)]);
  const values = [...(source.first || []), ...before.map((item) => item.name), ...items.map(source.value)];
  setChoices(fid(form, field.name), field.default === "" ? ["", ...values] : values, field.default);
}

// Replace a select's options, keeping `keep` (the current value) selected when it is still offered.
function setChoices(id, values, keep) {
  const select = $(id);
  select.replaceChildren(...[...new Set(values)].map((value) => option(value, value === "" ? "Same as first pass" : value)));
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

// The request body of a tab's form (txt2img by default), with the quick settings of the top bar.
function readForm(form = FORMS.txt2img) {
  const body = {};
  const fields = [...form.fields, ...ui.table.filter((f) => f.group === QUICK_GROUP)];
  for (const field of fields) {
    const element = $(field.group === QUICK_GROUP ? field.name : fid(form, field.name));
    if (!element) continue;
    const value = fieldValue(element, field);
    if (value !== undefined) body[field.name] = value;
  }
  body.override_settings = { sd_model_checkpoint: $("model").value };
  return body;
}

function setField(id, value) {
  if (value === undefined || value === null || !$(id)) return;
  const element = $(id);
  if (element.type === "checkbox") {
    element.checked = value === true || value === "True" || value === "true";
    element.dispatchEvent(new Event("change"));
    return;
  }
  if (element.tagName === "SELECT" && ![...element.options].some((o) => o.value === String(value))) {
    const byLabel = [...element.options].find((o) => o.textContent === String(value));  // infotext gives labels
    if (byLabel) { element.value = byLabel.value; element.dispatchEvent(new Event("change")); return; }
    element.appendChild(option(String(value)));
  }
  element.value = String(value);
  element.dispatchEvent(new Event(element.type === "range" ? "input" : "change"));
}

function fillForm(values, form = FORMS.txt2img) {
  for (const field of ui.fields) {
    setField(field.group === QUICK_GROUP ? field.name : fid(form, field.name), values[field.name]);
  }
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
  if (p["Hires upscale"] !== undefined || p["Hires resize-1"] !== undefined) values.enable_hr = true;  // as A1111
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
    showError(error, "txt2img");
    return;
  }
  startJob(job, "txt2img");
}

async function generateImg2img(event) {
  event.preventDefault();
  showError(null);
  if (!ui.init) {
    showError(Object.assign(new Error("Upload or drop a picture first."), { field: "init_images" }), "img2img");
    return;
  }
  const body = { ...readForm(FORMS.img2img), init_images: [ui.init.dataURL] };
  const mask = maskDataURL();
  if (mask) body.mask = mask;
  let job;
  try {
    job = await api("/difusi/v1/img2img", { json: body });
  } catch (error) {
    showError(error, "img2img");
    return;
  }
  startJob(job, "img2img");
}

function startJob(job, tab) {
  ui.jobId = job.id;
  ui.jobForm = tab;
  clearResults();  // the previous job's image and infotext are not this job's
  for (const id of ["generate", "i2i-generate"]) $(id).disabled = true;
  $("interrupt").disabled = $("i2i-interrupt").disabled = false;
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
    const tab = ui.jobForm;
    finishJob();
    showError(error, tab);
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
    const tab = ui.jobForm;
    finishJob();
    if (status.result) showResults(status.result, status.status);
    if (status.error) showError(Object.assign(new Error(status.error.detail), { field: status.error.field }), tab);
    setProgress(status.status === "done" ? 1 : status.progress,
      status.status === "done" ? "Done" : status.status.charAt(0).toUpperCase() + status.status.slice(1));
    loadHistory();
    return;
  }
  setTimeout(() => poll(id), POLL_MS);
}

function finishJob() {
  ui.jobId = null;
  ui.jobForm = null;
  $("generate").disabled = $("i2i-generate").disabled = false;
  $("interrupt").disabled = $("i2i-interrupt").disabled = true;
  $("preview").hidden = true;
}

async function interrupt() {
  if (!ui.jobId) return;
  $("interrupt").disabled = $("i2i-interrupt").disabled = true;
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
  ui.resultParams = null;
  $("results").replaceChildren();
  $("main-image").hidden = true;
  $("main-image").removeAttribute("src");
  $("stage-empty").hidden = false;
  $("infotext").textContent = "";
  $("send-row").hidden = true;
  showWarnings([]);
}

// The job's warnings (prompt syntax used as literal text, removed <lora:...> tags): A1111 is silent, difusi says it.
function showWarnings(lines) {
  $("warnings").textContent = lines.join("\n");
  $("warnings").hidden = !lines.length;
}

function showResults(result, state) {
  ui.results = result.images;
  ui.resultParams = result.parameters || null;
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
  $("send-row").hidden = false;
  [...$("results").children].forEach((img, i) => img.classList.toggle("selected", i === index));
}

// ---- send to img2img / inpaint / extras ------------------------------------------------------------------------
// `entry`: a result ({url | image, seed, infotext}) or a history item ({url, prompt, negative_prompt, seed, params}).
async function sendTo(target, entry, params = null) {
  if (!entry) return;
  const source = imageSource(entry);
  showError(null);
  try {
    if (target === "extras") {
      switchTab("extras");
      await setExtrasImage(source);
    } else {
      switchTab("img2img");
      await setInitImage(source);
      const p = entry.params || params || {};
      setField("i2i-prompt", p.prompt ?? entry.prompt);
      setField("i2i-negative_prompt", p.negative_prompt ?? entry.negative_prompt);
      if (entry.seed !== undefined && entry.seed !== null) setField("i2i-seed", entry.seed);
      if (target === "inpaint") setMaskTool("brush");
      if (target === "inpaint") $("i2i-mask").focus();
    }
    window.scrollTo({ top: 0 });
  } catch (error) {
    showError(error, target === "extras" ? "extras" : "img2img");
  }
}

// ---- img2img: the init picture and the mask brush ------------------------------------------------------------
async function toDataURL(source) {
  if (source.startsWith("data:")) return source;
  const response = await fetch(source);
  if (!response.ok) throw new Error(`could not load the picture (HTTP ${response.status})`);
  return readAsDataURL(await response.blob());
}

function loadImage(source) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("not a picture the browser can read"));
    img.src = source;
  });
}

async function setInitImage(source) {
  const dataURL = await toDataURL(source);
  const img = await loadImage(dataURL);
  ui.init = { dataURL, width: img.naturalWidth, height: img.naturalHeight };
  const canvas = $("i2i-mask");
  canvas.width = img.naturalWidth;  // the mask is kept at the picture's own size, whatever size it is shown at
  canvas.height = img.naturalHeight;
  clearMask();
  $("i2i-image").src = dataURL;
  $("i2i-picture").hidden = false;
  $("i2i-empty").hidden = true;
  $("i2i-size").textContent = `${img.naturalWidth}×${img.naturalHeight}`;
}

function clearMask() {
  const canvas = $("i2i-mask");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  updateMaskState();
}

function setMaskTool(tool) {
  ui.mask.tool = tool;
  $("mask-brush").setAttribute("aria-pressed", String(tool === "brush"));
  $("mask-eraser").setAttribute("aria-pressed", String(tool === "eraser"));
  $("i2i-mask").dataset.tool = tool;
}

// Painted = alpha at least half; painted pixels are drawn opaque white on the canvas (shown translucent by CSS).
function maskPixels() {
  const canvas = $("i2i-mask");
  return canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
}

function invertMask() {
  if (!ui.init) return;
  const canvas = $("i2i-mask");
  const data = maskPixels();
  for (let i = 0; i < data.data.length; i += 4) {
    const painted = data.data[i + 3] >= 128;
    data.data[i] = data.data[i + 1] = data.data[i + 2] = 255;
    data.data[i + 3] = painted ? 0 : 255;
  }
  canvas.getContext("2d").putImageData(data, 0, 0);
  updateMaskState();
}

function maskIsPainted() {
  if (!ui.init) return false;
  const data = maskPixels().data;
  for (let i = 3; i < data.length; i += 4) if (data[i] >= 128) return true;
  return false;
}

function updateMaskState() {
  const painted = maskIsPainted();
  $("mask-state").textContent = painted ? "Mask: inpaint the painted area" : "No mask: plain img2img";
}

// The mask the server gets: a PNG of the picture's size, opaque, white where painted and black elsewhere; null when
// nothing is painted (plain img2img).
function maskDataURL() {
  if (!maskIsPainted()) return null;
  const source = maskPixels();
  const out = document.createElement("canvas");
  out.width = source.width;
  out.height = source.height;
  const context = out.getContext("2d");
  const pixels = context.createImageData(source.width, source.height);
  for (let i = 0; i < source.data.length; i += 4) {
    const value = source.data[i + 3] >= 128 ? 255 : 0;
    pixels.data[i] = pixels.data[i + 1] = pixels.data[i + 2] = value;
    pixels.data[i + 3] = 255;
  }
  context.putImageData(pixels, 0, 0);
  return out.toDataURL("image/png");
}

// Mouse (pointer) position -> picture pixels: the canvas may be shown scaled.
function canvasPoint(event) {
  const canvas = $("i2i-mask");
  const box = canvas.getBoundingClientRect();
  return { x: (event.clientX - box.left) * canvas.width / box.width, y: (event.clientY - box.top) * canvas.height / box.height };
}

function paint(from, to) {
  const context = $("i2i-mask").getContext("2d");
  const size = Math.max(1, Number($("brush-size").value) || 1);
  context.save();
  context.globalCompositeOperation = ui.mask.tool === "eraser" ? "destination-out" : "source-over";
  context.strokeStyle = context.fillStyle = "#ffffff";
  context.lineWidth = size;
  context.lineCap = context.lineJoin = "round";
  context.beginPath();
  if (from.x === to.x && from.y === to.y) {
    context.arc(to.x, to.y, size / 2, 0, Math.PI * 2);
    context.fill();
  } else {
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
  }
  context.restore();
}

function installMaskBrush() {
  const canvas = $("i2i-mask");
  canvas.addEventListener("pointerdown", (event) => {
    if (!ui.init || event.button !== 0) return;
    event.preventDefault();
    canvas.setPointerCapture?.(event.pointerId);
    ui.mask.drawing = true;
    ui.mask.last = canvasPoint(event);
    paint(ui.mask.last, ui.mask.last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!ui.mask.drawing) return;
    const point = canvasPoint(event);
    paint(ui.mask.last, point);
    ui.mask.last = point;
  });
  const stop = () => {
    if (!ui.mask.drawing) return;
    ui.mask.drawing = false;
    updateMaskState();
  };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
  $("mask-brush").addEventListener("click", () => setMaskTool("brush"));
  $("mask-eraser").addEventListener("click", () => setMaskTool("eraser"));
  $("mask-clear").addEventListener("click", clearMask);
  $("mask-invert").addEventListener("click", invertMask);
  $("i2i-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) readAsDataURL(file).then(setInitImage).catch((error) => showError(error, "img2img"));
  });
  setMaskTool("brush");
}

// ---- Extras (A1111's single image upscale) --------------------------------------------------------------------
async function loadExtrasUpscalers() {
  const items = await cachedApi("/sdapi/v1/upscalers");
  const names = items.map((u) => u.name).filter((name) => name !== "None");
  $("extras-upscaler_1").replaceChildren(...names.map((name) => option(name)));
  if (names.includes("Lanczos")) $("extras-upscaler_1").value = "Lanczos";
}

async function setExtrasImage(source) {
  const dataURL = await toDataURL(source);
  const img = await loadImage(dataURL);
  ui.extras = { dataURL, width: img.naturalWidth, height: img.naturalHeight };
  $("extras-image").src = dataURL;
  $("extras-image").hidden = false;
  $("extras-empty").hidden = true;
  $("extras-size").textContent = `${img.naturalWidth}×${img.naturalHeight}`;
}

async function runExtras(event) {
  event.preventDefault();
  showError(null);
  if (!ui.extras) {
    showError(Object.assign(new Error("Upload or drop a picture first."), { field: "image" }), "extras");
    return;
  }
  const body = { image: ui.extras.dataURL, resize_mode: 0, upscaling_resize: Number($("extras-upscaling_resize").value),
    upscaler_1: $("extras-upscaler_1").value };
  $("extras-run").disabled = true;
  setProgress(0, "Upscaling…");
  try {
    const data = await api("/sdapi/v1/extra-single-image", { json: body });
    clearResults();
    const text = new DOMParser().parseFromString(data.html_info || "", "text/html").body.textContent;
    showResults({ images: [{ image: data.image, infotext: text }] }, "done");
    setProgress(1, "Done");
  } catch (error) {
    setProgress(0, "Idle");
    showError(error, "extras");
  } finally {
    $("extras-run").disabled = false;
  }
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
  const send = document.createElement("div");
  send.className = "send-row";
  for (const [target, text] of [["img2img", "→ img2img"], ["inpaint", "→ inpaint"], ["extras", "→ extras"]]) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = `send-${target}`;
    button.textContent = text;
    button.title = `Send to ${target}`;
    button.addEventListener("click", () => sendTo(target, item));
    send.append(button);
  }
  meta.append(prompt, detail, reuse, send);
  // A click on a card's button leaves the focus where it was (the search box): moving it lets Chromium scroll that
  // box back into view between mouse down and up after a window resize, and the click then misses the button.
  meta.addEventListener("mousedown", (event) => { if (event.target.closest("button")) event.preventDefault(); });
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

function dropTargetAt(event) {
  const direct = event.target instanceof Element && event.target.closest(".drop-target");
  if (direct) return direct.dataset.drop;
  for (const element of document.querySelectorAll(".drop-target")) {  // under the overlay: by position
    const box = element.getBoundingClientRect();
    if (element.offsetParent !== null && event.clientX >= box.left && event.clientX <= box.right &&
        event.clientY >= box.top && event.clientY <= box.bottom) return element.dataset.drop;
  }
  return null;
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
    if (!file) return;
    // Onto the img2img picture area: the init picture; onto the Extras one: its source; elsewhere: PNG info.
    const target = dropTargetAt(event);
    if (target === "img2img") readAsDataURL(file).then(setInitImage).catch((error) => showError(error, "img2img"));
    else if (target === "extras") readAsDataURL(file).then(setExtrasImage).catch((error) => showError(error, "extras"));
    else showPngInfo(file);
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
  $("img2img").addEventListener("submit", generateImg2img);
  $("i2i-interrupt").addEventListener("click", interrupt);
  $("extras").addEventListener("submit", runExtras);
  $("extras-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) readAsDataURL(file).then(setExtrasImage).catch((error) => showError(error, "extras"));
  });
  for (const tab of document.querySelectorAll("#main-tabs [role=tab]")) {
    tab.addEventListener("click", () => switchTab(tab.dataset.tab));
  }
  for (const target of ["img2img", "inpaint", "extras"]) {
    $(`send-${target}`).addEventListener("click", () => sendTo(target, ui.shown, ui.resultParams));
  }
  installMaskBrush();
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
    if (ui.tab === "txt2img" && !$("generate").disabled) $("txt2img").requestSubmit();
    else if (ui.tab === "img2img" && !$("i2i-generate").disabled) $("img2img").requestSubmit();
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
