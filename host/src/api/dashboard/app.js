// The Stepwise dashboard: plain ES modules, no build step. Every figure comes from the API
// with the token kept in this browser (sessionStorage), sent as a bearer header; live updates
// come from the API's Server-Sent Events, read with fetch so that the header can be sent.

const TOKEN_KEY = "stepwise.token";
const page = document.getElementById("page");
let cleanup = [];

// ---------- DOM ----------

/** An element with attributes and children; text is always a text node, never HTML. */
function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(element.dataset, value);
    // Through the CSSOM: the Content-Security-Policy refuses style attributes.
    else if (name === "style") Object.assign(element.style, value);
    else element.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function svg(tag, attributes = {}, ...children) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  for (const child of children.flat()) element.append(child);
  return element;
}

function statusBadge(status) {
  return h("span", { class: `status status-${status}` }, status);
}

/** A time in the viewer's zone, with the UTC value on hover. */
function time(iso) {
  if (!iso) return h("span", { class: "muted" }, "—");
  const date = new Date(iso);
  return h("time", { datetime: iso, title: `${date.toISOString()} (UTC)` }, date.toLocaleString());
}

function duration(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 120000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

function short(id) {
  return id ? id.slice(0, 8) : "";
}

function json(value) {
  return h("pre", {}, JSON.stringify(value, null, 2));
}

// ---------- API ----------

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function headers(extra = {}) {
  const all = { Accept: "application/json", ...extra };
  if (token()) all.Authorization = `Bearer ${token()}`;
  return all;
}

class ApiError extends Error {
  constructor(status, problem) {
    super(problem && problem.detail ? problem.detail : `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

async function api(method, path, body, contentType = "application/json") {
  const options = { method, headers: headers() };
  if (body !== undefined) {
    options.headers["Content-Type"] = contentType;
    options.body = contentType === "application/json" ? JSON.stringify(body) : body;
  }
  const response = await fetch(path, options);
  const text = await response.text();
  const value = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiError(response.status, value);
  return value;
}

/**
 * Follows a Server-Sent Events stream until `signal` aborts, reconnecting (with the last id)
 * when it ends; `onEvent(type, data)` gets each event, `onReset()` a `reset`.
 */
async function follow(path, signal, onEvent, onReset) {
  let lastId = null;
  while (!signal.aborted) {
    try {
      const extra = { Accept: "text/event-stream" };
      if (lastId !== null) extra["Last-Event-ID"] = lastId;
      const response = await fetch(path, { headers: headers(extra), signal });
      if (!response.ok) throw new ApiError(response.status, null);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let type = "message";
          let data = "";
          for (const line of block.split("\n")) {
            const colon = line.indexOf(":");
            if (colon <= 0) continue;
            const field = line.slice(0, colon);
            const text = line.slice(colon + 1).replace(/^ /, "");
            if (field === "event") type = text;
            else if (field === "id") lastId = text;
            else if (field === "data") data += text;
          }
          if (!data) continue;
          if (type === "reset") {
            lastId = null;
            onReset();
          } else {
            onEvent(type, JSON.parse(data));
          }
        }
      }
    } catch (error) {
      if (signal.aborted) return;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function live(path, onEvent, onReset) {
  const controller = new AbortController();
  cleanup.push(() => controller.abort());
  follow(path, controller.signal, onEvent, onReset);
}

function every(ms, action) {
  const timer = setInterval(action, ms);
  cleanup.push(() => clearInterval(timer));
}

function problemText(error) {
  if (error instanceof ApiError) {
    if (error.status === 401) return "This server needs a token: enter one above.";
    const field = error.problem && error.problem.field ? ` (${error.problem.field})` : "";
    return `${error.message}${field}`;
  }
  return String(error.message || error);
}

function showError(target, error) {
  target.replaceChildren(h("p", { class: "error" }, problemText(error)));
}

async function pluginNames() {
  try {
    const list = await api("GET", "/v1/plugins");
    return list.plugins.map((plugin) => plugin.name);
  } catch (error) {
    return [];
  }
}

// ---------- Runs ----------

const STATUSES = ["queued", "running", "passed", "failed", "errored", "timed_out", "cancelled"];
const FINISHED = new Set(["passed", "failed", "errored", "timed_out", "cancelled"]);

function runDuration(run) {
  if (!run.started_at) return "—";
  const end = run.finished_at ? Date.parse(run.finished_at) : Date.now();
  return duration(end - Date.parse(run.created_at));
}

function runSummary(run) {
  if (run.status === "passed") return h("span", { class: "muted" }, "all steps passed");
  const step = run.current_step ? h("code", {}, run.current_step) : "";
  const message = run.message ? h("span", {}, " ", run.message) : "";
  return h("span", {}, step, message);
}

function runRow(run) {
  return h("tr", { dataset: { run: run.id, status: run.status } },
    h("td", {}, h("a", { href: `/runs/${run.id}`, "data-link": true, class: "mono" }, short(run.id))),
    h("td", {}, run.plugin),
    h("td", {}, statusBadge(run.status)),
    h("td", {}, runSummary(run)),
    h("td", {}, time(run.created_at)),
    h("td", {}, runDuration(run)));
}

async function runsPage() {
  const plugins = await pluginNames();
  const query = new URLSearchParams(location.search);
  const triggerError = h("div", { id: "trigger-error" });
  const triggerPlugin = h("select", { id: "trigger-plugin" }, plugins.map((name) => h("option", { value: name }, name)));
  const triggerParams = h("textarea", { id: "trigger-params", rows: 1 }, "{}");
  const trigger = h("form", { class: "inline", onsubmit: async (event) => {
    event.preventDefault();
    triggerError.replaceChildren();
    try {
      const params = JSON.parse(triggerParams.value || "{}");
      const run = await api("POST", "/v1/runs", { plugin: triggerPlugin.value, params });
      upsert(run, true);
    } catch (error) {
      showError(triggerError, error);
    }
  } },
  h("label", {}, "Plugin", triggerPlugin),
  h("label", {}, "Params (JSON)", triggerParams),
  h("button", { id: "trigger", type: "submit", disabled: true }, "Trigger run"));

  const filterPlugin = h("select", { id: "filter-plugin" }, h("option", { value: "" }, "any"),
    plugins.map((name) => h("option", { value: name, selected: query.get("plugin") === name }, name)));
  const filterStatus = h("select", { id: "filter-status" }, h("option", { value: "" }, "any"),
    STATUSES.map((status) => h("option", { value: status, selected: query.get("status") === status }, status)));
  const filterLabel = h("input", { id: "filter-label", placeholder: "key=value", value: query.get("label") || "" });
  const filterSchedule = h("input", { id: "filter-schedule", placeholder: "schedule id", value: query.get("schedule") || "" });
  const filters = h("form", { class: "inline", onsubmit: (event) => {
    event.preventDefault();
    const next = new URLSearchParams();
    for (const [name, input] of [["plugin", filterPlugin], ["status", filterStatus], ["label", filterLabel], ["schedule", filterSchedule]]) {
      if (input.value) next.set(name, input.value);
    }
    navigate(`/${next.toString() ? "?" + next.toString() : ""}`);
  } },
  h("label", {}, "Plugin", filterPlugin), h("label", {}, "Status", filterStatus),
  h("label", {}, "Label", filterLabel), h("label", {}, "Schedule", filterSchedule),
  h("button", { type: "submit", class: "secondary" }, "Filter"));

  const body = h("tbody");
  const table = h("table", { id: "runs" },
    h("thead", {}, h("tr", {}, ["Run", "Plugin", "Status", "Step", "Created", "Duration"].map((name) => h("th", {}, name)))),
    body);
  const more = h("div");
  const listError = h("div");
  page.replaceChildren(
    h("h1", {}, "Runs"),
    h("section", { class: "card" }, h("h2", {}, "Trigger a run"), trigger, triggerError),
    h("section", { class: "card" }, filters, listError, table, more));

  const filter = {};
  for (const name of ["plugin", "status", "label", "schedule"]) if (query.get(name)) filter[name] = query.get(name);
  // Shadow runs decide nothing: the plugin page compares them, the list leaves them out.
  const matches = (run) => !run.shadow_of && (!filter.plugin || run.plugin === filter.plugin)
    && (!filter.status || run.status === filter.status)
    && (!filter.schedule || run.schedule_id === filter.schedule)
    && (!filter.label || (() => { const [key, value] = filter.label.split("="); return run.labels && run.labels[key] === value; })());

  // The trigger's answer can arrive after the stream has already said the run passed: a
  // row never goes back to an earlier status.
  const rank = (status) => (status === "queued" ? 0 : status === "running" ? 1 : 2);
  function upsert(run, fresh) {
    const existing = body.querySelector(`tr[data-run="${CSS.escape(run.id)}"]`);
    if (existing) {
      if (rank(run.status) >= rank(existing.dataset.status)) existing.replaceWith(runRow(run));
    } else if (fresh && matches(run)) {
      body.prepend(runRow(run));
    }
  }

  async function load(cursor) {
    const params = new URLSearchParams({ ...filter, limit: "50" });
    if (cursor) params.set("cursor", cursor);
    try {
      const list = await api("GET", `/v1/runs?${params}`);
      for (const run of list.runs) {
        if (body.querySelector(`tr[data-run="${CSS.escape(run.id)}"]`)) upsert(run, false);
        else body.append(runRow(run));
      }
      more.replaceChildren(list.next_cursor
        ? h("button", { class: "secondary", id: "older", onclick: () => load(list.next_cursor) }, "Older runs")
        : "");
    } catch (error) {
      showError(listError, error);
    }
  }
  // Listening first, then the list: a change made in between arrives on the stream.
  const stream = new URLSearchParams();
  if (filter.plugin) stream.set("plugin", filter.plugin);
  if (filter.schedule) stream.set("schedule", filter.schedule);
  await new Promise((listening) => {
    live(`/v1/events?${stream}`, (type, data) => {
      if (type === "open") listening();
      else if (type === "run") upsert(data, true);
    }, () => { body.replaceChildren(); load(null); });
    setTimeout(listening, 5000);
  });
  await load(null);
  // Only now: a run triggered before the stream listened could finish unseen.
  trigger.querySelector("#trigger").disabled = false;
}

// ---------- One run ----------

function timeline(run) {
  const start = Date.parse(run.created_at);
  const end = run.finished_at ? Date.parse(run.finished_at) : Date.now();
  const span = Math.max(end - start, 1);
  return h("div", { class: "timeline" }, run.steps.map((step, position) => {
    const track = h("div", { class: "track" });
    if (step.first_attempt_at) {
      const from = Date.parse(step.first_attempt_at);
      const to = step.finished_at ? Date.parse(step.finished_at) : (step.last_attempt_at ? Date.parse(step.last_attempt_at) : Date.now());
      const left = ((from - start) / span) * 100;
      const width = Math.max(((to - from) / span) * 100, 0.5);
      track.append(h("div", { class: `bar ${step.status}`, style: { left: `${left}%`, width: `${width}%` },
        title: `${step.name}: ${step.first_attempt_at} → ${step.finished_at || "now"}` }));
    }
    const facts = [statusBadge(step.status), " "];
    if (step.passed_after_ms !== null && step.passed_after_ms !== undefined) {
      facts.push(h("span", { class: "passed-after" }, `passed after ${duration(step.passed_after_ms)}`), " · ");
    }
    facts.push(`${step.attempts} attempt${step.attempts === 1 ? "" : "s"}`);
    const detail = [];
    if (step.message) detail.push(h("div", { class: "muted" }, step.message));
    if (step.output !== null && step.output !== undefined) detail.push(h("details", {}, h("summary", {}, "output"), json(step.output)));
    return h("div", { class: "step", dataset: { position } },
      h("div", {}, h("code", {}, step.name)),
      track,
      h("div", {}, facts, detail));
  }));
}

/** Pages of attempts a run's page loads at once, and on each "Load more". */
const ATTEMPT_PAGES = 5;

function attemptsTable(attempts) {
  return h("table", { id: "attempts" },
    h("thead", {}, h("tr", {}, ["Step", "#", "Outcome", "Started", "Duration", "Lag", "Node", "Message"].map((name) => h("th", {}, name)))),
    h("tbody", {}, attempts.map((attempt) => h("tr", {},
      h("td", {}, h("code", {}, attempt.step)),
      h("td", {}, attempt.attempt),
      h("td", {}, statusBadge(attempt.outcome)),
      h("td", {}, time(attempt.started_at)),
      h("td", {}, duration(attempt.duration_ms)),
      h("td", {}, attempt.due_at ? duration(Date.parse(attempt.started_at) - Date.parse(attempt.due_at)) : "—"),
      h("td", { class: "mono" }, attempt.node || "—"),
      h("td", {}, attempt.message || "",
        attempt.logs && attempt.logs.length ? h("details", {}, h("summary", {}, `${attempt.logs.length} log line${attempt.logs.length === 1 ? "" : "s"}`),
          h("pre", {}, attempt.logs.map((line) => `${line.level.padEnd(5)} ${line.message}`).join("\n"))) : "")))));
}

/** One recorded call, collapsed: what it asked, and what it was answered. */
function recordedCall(call) {
  const request = call.request || {};
  const answer = call.response || {};
  let title = call.call;
  if (call.call === "http") {
    const status = answer.Ok ? answer.Ok.status : "error";
    title = `http ${request.method} ${request.url} → ${status}`;
  } else if (call.call === "sql.query") {
    const rows = answer.Ok ? `${answer.Ok.rows.length} row${answer.Ok.rows.length === 1 ? "" : "s"}` : "error";
    title = `sql.query on ${request.source}: ${request.statement} → ${rows}`;
  } else if (call.call === "kv") {
    title = `kv ${(request.command || []).join(" ")}`;
  } else if (call.call === "messages.find") {
    title = `messages.find on ${request.source}: ${request.subject}`;
  }
  return h("details", { class: "recorded-call" }, h("summary", { class: "mono" }, title),
    h("div", { class: "muted" }, "request"), json(request),
    h("div", { class: "muted" }, "response"), json(answer));
}

/** A run's recording (JSON Lines) as its attempts, each with its calls and log lines. */
function recordingView(id, text) {
  const attempts = [];
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    const entry = JSON.parse(line);
    if (entry.attempt) attempts.push({ ...entry.attempt, entries: [] });
    else if (attempts.length && (entry.call || entry.log || entry.cut || entry.outcome)) attempts[attempts.length - 1].entries.push(entry);
  }
  const download = h("a", { id: "download-recording", href: URL.createObjectURL(new Blob([text], { type: "application/x-ndjson" })), download: `${id}.rec` }, "Download recording");
  return [
    h("h2", {}, "Recorded exchanges"),
    h("p", { class: "muted" }, download, " · replay it offline: ", h("code", {}, `stepwise dev check.wasm --replay ${id}.rec`)),
    ...attempts.map((attempt) => {
      const calls = attempt.entries.filter((entry) => entry.call).length;
      const outcome = attempt.entries.find((entry) => entry.outcome);
      return h("details", { class: "recorded-attempt", dataset: { step: attempt.step, attempt: attempt.attempt } },
        h("summary", {}, h("code", {}, attempt.step), ` #${attempt.attempt} · ${calls} call${calls === 1 ? "" : "s"} · `,
          outcome ? statusBadge(outcome.outcome.outcome) : "unfinished"),
        attempt.entries.map((entry) => entry.call ? recordedCall(entry.call)
          : entry.log ? h("div", { class: "mono muted" }, `log ${entry.log.level}: ${entry.log.message}`)
          : entry.cut ? h("p", { class: "error" }, entry.cut)
          : h("div", { class: "muted" }, `outcome ${entry.outcome.outcome}${entry.outcome.message ? `: ${entry.outcome.message}` : ""}`)));
    }),
  ];
}

async function runPage(id) {
  const header = h("h1");
  const actions = h("div", { class: "inline" });
  const actionError = h("div");
  const steps = h("section", { class: "card" });
  const inputs = h("section", { class: "card" });
  const attempts = h("section", { class: "card" });
  const recording = h("section", { class: "card", id: "recording", hidden: true });
  page.replaceChildren(header, h("section", { class: "card" }, actions, actionError), steps, inputs, attempts, recording);

  // The recording, when the run has one (`recording_bytes`): read when the page opens, and
  // again once the run has finished (a run that passes may drop it), not at every tick.
  let recordingFor = null;
  async function loadRecording(run) {
    const state = FINISHED.has(run.status) ? "finished" : "going";
    if (recordingFor === state) return;
    recordingFor = state;
    if (!run.recording_bytes) {
      recording.hidden = true;
      return;
    }
    const response = await fetch(`/v1/runs/${id}/recording`, { headers: headers({ Accept: "application/x-ndjson" }) });
    if (!response.ok) throw new ApiError(response.status, await response.json());
    recording.replaceChildren(...recordingView(id, await response.text()));
    recording.hidden = false;
  }

  // Attempts come a page at a time, with the log lines this page shows. A new attempt always
  // follows the last one (steps run in order), so a live event reloads only the last page and
  // what follows it, and nothing while later pages are still to be loaded on request.
  const pages = [];
  // One load at a time: a click and a live event must not interleave their pages.
  let loading = Promise.resolve();
  const serially = (task) => (loading = loading.catch(() => {}).then(task));
  async function fetchPage(cursor) {
    const params = new URLSearchParams({ limit: "200", logs: "true" });
    if (cursor) params.set("cursor", cursor);
    const list = await api("GET", `/v1/runs/${id}/attempts?${params}`);
    return { cursor, attempts: list.attempts, next: list.next_cursor };
  }
  function showAttempts() {
    const all = pages.flatMap((page) => page.attempts);
    const last = pages[pages.length - 1];
    const more = last && last.next
      ? h("button", { id: "more-attempts", class: "secondary", onclick: () => serially(() => loadPages(ATTEMPT_PAGES)).catch((error) => showError(attempts, error)) }, "Load more attempts")
      : "";
    attempts.replaceChildren(h("h2", {}, `Attempts (${all.length}${more ? "+" : ""})`), attemptsTable(all), more);
  }
  async function loadPages(count) {
    for (let loaded = 0; loaded < count; loaded++) {
      const last = pages[pages.length - 1];
      if (last && !last.next) break;
      pages.push(await fetchPage(last ? last.next : null));
    }
    showAttempts();
  }
  async function reloadLastPage() {
    const last = pages[pages.length - 1];
    if (!last || last.next) return;
    pages[pages.length - 1] = await fetchPage(last.cursor);
    await loadPages(ATTEMPT_PAGES);
  }

  function show(run) {
    header.replaceChildren(run.plugin, statusBadge(run.status), h("span", { class: "mono muted" }, run.id));
    const cancel = h("button", { id: "cancel", class: "secondary", disabled: FINISHED.has(run.status), onclick: async () => {
      try { show(await api("POST", `/v1/runs/${id}/cancel`)); } catch (error) { showError(actionError, error); }
    } }, "Cancel");
    const rerun = h("button", { id: "rerun", onclick: async () => {
      try {
        const again = await api("POST", "/v1/runs", { plugin: run.plugin, params: run.params, labels: run.labels });
        navigate(`/runs/${again.id}`);
      } catch (error) { showError(actionError, error); }
    } }, "Re-run with the same params");
    actions.replaceChildren(cancel, " ", rerun, " ",
      h("span", { class: "muted" }, "created ", time(run.created_at), " · duration ", runDuration(run),
        run.schedule_id ? ` · schedule ${short(run.schedule_id)}` : "",
        run.created_by ? ` · triggered by ${run.created_by}` : "",
        run.cancelled_by ? ` · cancelled by ${run.cancelled_by}` : "",
        run.message ? ` · ${run.message}` : ""),
      run.shadow_of ? h("p", { class: "shadow-note" }, "A run of the shadow version beside ",
        h("a", { href: `/runs/${run.shadow_of}`, "data-link": true, class: "mono" }, short(run.shadow_of)),
        ", which decides; this one notifies no one.") : "");
    steps.replaceChildren(h("h2", {}, "Steps"), timeline(run));
    inputs.replaceChildren(h("h2", {}, "Params"), json(run.params), h("h2", {}, "Labels"), json(run.labels),
      h("p", { class: "muted" }, `version ${short(run.plugin_version)} · poll ${duration(run.poll_interval_ms)} · errors ${run.error_count}/${run.max_errors}`));
  }

  try {
    const run = await api("GET", `/v1/runs/${id}`);
    show(run);
    await serially(() => loadPages(ATTEMPT_PAGES));
    await loadRecording(run);
  } catch (error) {
    showError(steps, error);
    return;
  }
  let pending = null;
  live(`/v1/runs/${id}/events`, (type, data) => {
    if (type !== "run") return;
    show(data);
    loadRecording(data).catch(() => {});
    clearTimeout(pending);
    pending = setTimeout(() => serially(reloadLastPage).catch(() => {}), 200);
  }, async () => show(await api("GET", `/v1/runs/${id}`)));
}

// ---------- Plugins ----------

async function pluginsPage() {
  const uploadName = h("input", { id: "upload-name", placeholder: "plugin name" });
  const uploadFile = h("input", { id: "upload-file", type: "file", accept: ".wasm,application/wasm" });
  const uploadShadow = h("input", { id: "upload-shadow", type: "checkbox" });
  const uploadState = h("div");
  const list = h("div", { id: "plugins" });
  const upload = h("form", { class: "inline", onsubmit: async (event) => {
    event.preventDefault();
    uploadState.replaceChildren();
    const file = uploadFile.files[0];
    if (!uploadName.value || !file) {
      uploadState.replaceChildren(h("p", { class: "error" }, "Give a name and a .wasm file."));
      return;
    }
    try {
      const mode = uploadShadow.checked ? "?mode=shadow" : "";
      const answer = await api("PUT", `/v1/plugins/${encodeURIComponent(uploadName.value)}${mode}`, await file.arrayBuffer(), "application/wasm");
      const waiting = (answer.versions || []).find((version) => version.pending);
      uploadState.replaceChildren(h("p", {}, waiting
        ? `${answer.name}: version ${short(waiting.version)} is stored and waits for an admin to review and activate it.`
        : mode ? `${answer.name}: version ${short(answer.shadow_version)} runs beside the active one as its shadow.`
        : `${answer.name}: version ${short(answer.active_version)} is active.`));
      await load();
    } catch (error) {
      showError(uploadState, error);
    }
  } }, h("label", {}, "Name", uploadName), h("label", {}, "Component", uploadFile),
    h("label", { class: "check" }, uploadShadow, " as a shadow"), h("button", { type: "submit" }, "Upload"));
  page.replaceChildren(h("h1", {}, "Plugins"), h("section", { class: "card" }, h("h2", {}, "Upload a version"), upload, uploadState), list);

  let caller = { role: "viewer" };
  async function load() {
    try {
      caller = await api("GET", "/v1/whoami");
      const names = (await api("GET", "/v1/plugins")).plugins.map((plugin) => plugin.name);
      const sections = [];
      for (const name of names) {
        const plugin = await api("GET", `/v1/plugins/${encodeURIComponent(name)}`);
        const shadow = await api("GET", `/v1/plugins/${encodeURIComponent(name)}/shadow`);
        sections.push(pluginSection(plugin, shadow));
      }
      list.replaceChildren(...sections);
    } catch (error) {
      showError(list, error);
    }
  }

  function activateButton(plugin, version, state, label = "Activate", mode = "active") {
    return h("button", { class: `secondary ${mode === "shadow" ? "shadow" : "activate"}`, onclick: async () => {
      try {
        await api("POST", `/v1/plugins/${encodeURIComponent(plugin.name)}/activate`, { version: version.version, mode });
        await load();
      } catch (error) { showError(state, error); }
    } }, label);
  }

  function pluginSection(plugin, shadow) {
    const state = h("div");
    const all = plugin.versions || [];
    const active = all.find((version) => version.active);
    const pending = all.filter((version) => version.pending);
    const versions = h("table", { class: "versions" },
      h("thead", {}, h("tr", {}, ["Version", "Steps", "Created", "Uploaded by", ""].map((name) => h("th", {}, name)))),
      h("tbody", {}, all.map((version) => h("tr", { dataset: { version: version.version } },
        h("td", { class: "mono", title: version.version }, short(version.version)),
        h("td", {}, version.steps.join(" → ")),
        h("td", {}, time(version.created_at)),
        h("td", {}, version.uploaded_by || h("span", { class: "muted" }, "—")),
        h("td", {}, version.active ? h("span", { class: "status status-passed active" }, "active")
          : version.pending ? h("span", { class: "status status-queued" }, "pending review")
          : [version.shadow ? h("span", { class: "status status-running" }, "shadow") : activateButton(plugin, version, state, "Shadow", "shadow"),
            " ", activateButton(plugin, version, state, version.shadow ? "Promote" : "Activate")])))));
    return h("section", { class: "card", dataset: { plugin: plugin.name } },
      h("h2", {}, plugin.name, " ", h("span", { class: "muted mono" }, short(plugin.active_version))),
      plugin.description ? h("p", { class: "muted" }, plugin.description) : "",
      pending.map((version) => pendingReview(plugin, version, active, state)),
      shadow.state === "none" ? "" : shadowPanel(plugin, shadow, state),
      versions, state,
      h("details", {}, h("summary", {}, "grant"), json(plugin.grant)));
  }

  /** The shadow version against the active one: disagreements first, then the outcomes side by
   * side and each step's timing; the last shadow's decision once it ended. */
  function shadowPanel(plugin, shadow, state) {
    const current = shadow.state === "shadowing";
    const outcomes = ["passed", "failed", "errored", "timed_out", "cancelled", "unfinished"];
    const counts = h("table", { class: "shadow-counts" },
      h("thead", {}, h("tr", {}, h("th", {}, ""), outcomes.map((outcome) => h("th", {}, outcome.replace("_", " "))))),
      h("tbody", {}, ["primary", "shadow"].map((side) => h("tr", { dataset: { side } },
        h("th", {}, side === "primary" ? `active ${short(plugin.active_version)}` : `shadow ${short(shadow.shadow_version)}`),
        outcomes.map((outcome) => h("td", {}, String(shadow[side][outcome])))))));
    const runLink = (run) => h("a", { href: `/runs/${run.id}`, "data-link": true, class: "mono" }, short(run.id));
    const disagreements = shadow.disagreements.length
      ? h("table", { class: "disagreements" },
        h("thead", {}, h("tr", {}, ["When", "Active", "", "Shadow", ""].map((name) => h("th", {}, name)))),
        h("tbody", {}, shadow.disagreements.map((pair) => h("tr", {},
          h("td", {}, time(pair.created_at)),
          h("td", {}, runLink(pair.primary)), h("td", {}, statusBadge(pair.primary.status)),
          h("td", {}, runLink(pair.shadow)), h("td", {}, statusBadge(pair.shadow.status))))))
      : h("p", { class: "muted" }, "No run has disagreed yet.");
    const ms = (value) => (value == null ? "—" : duration(value));
    const steps = h("table", { class: "shadow-steps" },
      h("thead", {}, h("tr", {}, ["Step", "Passed", "p50", "p95", "Calls"].map((name) => h("th", {}, name)))),
      h("tbody", {}, shadow.steps.map((step) => h("tr", {},
        h("td", {}, step.name),
        h("td", {}, `${step.primary.passed}/${step.primary.decided} · ${step.shadow.passed}/${step.shadow.decided}`),
        h("td", {}, `${ms(step.primary.passed_after_ms_p50)} · ${ms(step.shadow.passed_after_ms_p50)}`),
        h("td", {}, `${ms(step.primary.passed_after_ms_p95)} · ${ms(step.shadow.passed_after_ms_p95)}`),
        h("td", {}, `${step.primary.attempts} · ${step.shadow.attempts}`)))));
    const policy = shadow.policy
      ? `Promoted after ${shadow.policy.promote_after_runs} finished runs within ${(shadow.policy.max_disagreement * 100).toFixed(1)} % disagreement${shadow.policy.rollback_on_worse ? "; dropped when it fails more often beyond that" : ""}.`
      : "No automatic decision: promote or stop it here.";
    const version = h("span", { class: "mono", title: shadow.shadow_version }, short(shadow.shadow_version));
    const heading = current
      ? ["Shadow ", version, ", since ", time(shadow.since)]
      : ["Last shadow ", version, `: ${shadow.state} by ${shadow.ended_by} at `, time(shadow.ended_at)];
    const stop = h("button", { class: "secondary stop-shadow", onclick: async () => {
      try {
        await api("DELETE", `/v1/plugins/${encodeURIComponent(plugin.name)}/shadow`);
        await load();
      } catch (error) { showError(state, error); }
    } }, "Stop shadowing");
    return h("div", { class: `shadow-panel ${current ? "current" : "ended"}`, dataset: { state: shadow.state } },
      h("h3", {}, ...heading),
      h("p", { class: "muted" }, `${shadow.finished} of ${shadow.pairs} runs compared, ${shadow.disagreed} disagreed. `,
        current ? policy : ""),
      h("h4", {}, "Disagreements"), disagreements,
      h("h4", {}, "Outcomes"), counts,
      h("h4", {}, "Steps (active · shadow)"), steps,
      current ? h("p", {}, activateButton(plugin, { version: shadow.shadow_version }, state, "Promote"), " ", stop) : "");
  }

  /** A version that waits for an admin: what changed in `describe`, and the button if allowed. */
  function pendingReview(plugin, version, active, state) {
    const changes = describeChanges(active, version);
    return h("div", { class: "pending-review", dataset: { pending: version.version } },
      h("h3", {}, `Pending version ${short(version.version)}`,
        version.uploaded_by ? h("span", { class: "muted" }, ` uploaded by ${version.uploaded_by}`) : ""),
      h("p", { class: "muted" }, "The grant of this plugin reaches outside its sandbox, so new code runs only once an admin activates it."),
      changes.length ? h("ul", { class: "changes" }, changes.map((change) => h("li", {}, change)))
        : h("p", {}, "describe reports the same steps, description and params schema as the active version."),
      caller.role === "admin" ? activateButton(plugin, version, state, "Review done: activate")
        : h("p", { class: "muted" }, "Only an admin may activate it."));
  }
  await load();
}

/** What `describe` of `next` says differently from `current`, one line per change. */
function describeChanges(current, next) {
  const changes = [];
  const before = current ? current.steps : [];
  for (const step of next.steps) if (!before.includes(step)) changes.push(`step added: ${step}`);
  for (const step of before) if (!next.steps.includes(step)) changes.push(`step removed: ${step}`);
  const kept = next.steps.filter((step) => before.includes(step));
  if (kept.join("\u0000") !== before.filter((step) => next.steps.includes(step)).join("\u0000")) {
    changes.push(`steps reordered: ${next.steps.join(" → ")}`);
  }
  if (current && current.description !== next.description) {
    changes.push(`description: ${JSON.stringify(current.description)} → ${JSON.stringify(next.description)}`);
  }
  const schema = (version) => JSON.stringify(version ? version.params_schema : null);
  if (schema(current) !== schema(next)) changes.push(`params schema: ${schema(current)} → ${schema(next)}`);
  return changes;
}

// ---------- Schedules ----------

function describeTrigger(trigger) {
  if (trigger.cron) return `cron ${trigger.cron} (${trigger.timezone})`;
  if (trigger.interval_ms) return `every ${duration(trigger.interval_ms)}`;
  if (trigger.at) return `once at ${new Date(trigger.at).toLocaleString()}`;
  return JSON.stringify(trigger);
}

function sparkline(runs) {
  const width = 150, height = 24, bar = width / 50;
  const finished = runs.filter((run) => FINISHED.has(run.status)).reverse();
  const rate = finished.length ? Math.round((100 * finished.filter((run) => run.status === "passed").length) / finished.length) : null;
  return h("span", { title: rate === null ? "no finished runs" : `${rate}% passed of the last ${finished.length}` },
    svg("svg", { class: "sparkline", width, height, viewBox: `0 0 ${width} ${height}` },
      finished.map((run, index) => svg("rect", {
        x: index * bar, y: run.status === "passed" ? 4 : 0, width: Math.max(bar - 1, 1),
        height: run.status === "passed" ? height - 4 : height,
        class: ["passed", "failed", "errored", "timed_out"].includes(run.status) ? run.status : "other" }))),
    rate === null ? "" : ` ${rate}%`);
}

async function schedulesPage() {
  const plugins = await pluginNames();
  const createPlugin = h("select", { id: "schedule-plugin" }, plugins.map((name) => h("option", { value: name }, name)));
  const createKind = h("select", { id: "schedule-kind" }, h("option", { value: "interval_ms" }, "every (ms)"), h("option", { value: "cron" }, "cron"));
  const createValue = h("input", { id: "schedule-value", placeholder: "60000 or 0 */5 * * * *" });
  const createParams = h("textarea", { id: "schedule-params", rows: 1 }, "{}");
  const createState = h("div");
  const body = h("tbody");
  const more = h("button", { class: "secondary", id: "schedules-more", hidden: true, onclick: () => load(more.dataset.cursor) }, "More schedules");
  const create = h("form", { class: "inline", onsubmit: async (event) => {
    event.preventDefault();
    createState.replaceChildren();
    try {
      const trigger = createKind.value === "cron" ? { cron: createValue.value } : { interval_ms: Number(createValue.value) };
      await api("POST", "/v1/schedules", { plugin: createPlugin.value, params: JSON.parse(createParams.value || "{}"), trigger });
      await load();
    } catch (error) { showError(createState, error); }
  } }, h("label", {}, "Plugin", createPlugin), h("label", {}, "Trigger", createKind), h("label", {}, "Value", createValue),
  h("label", {}, "Params (JSON)", createParams), h("button", { type: "submit" }, "Create"));
  page.replaceChildren(h("h1", {}, "Schedules"),
    h("section", { class: "card" }, h("h2", {}, "New schedule"), create, createState),
    h("section", { class: "card" }, h("table", { id: "schedules" },
      h("thead", {}, h("tr", {}, ["Schedule", "Plugin", "Trigger", "Next fire", "State", "Recent fires", "Last 50 runs", "Created by", ""].map((name) => h("th", {}, name)))),
      body), more));

  async function row(summary) {
    const [schedule, runs] = await Promise.all([
      api("GET", `/v1/schedules/${summary.id}`),
      api("GET", `/v1/runs?schedule=${encodeURIComponent(summary.id)}&limit=50`),
    ]);
    const fires = (schedule.recent_fires || []).slice(0, 5).map((fire) => h("span", {
      class: `status status-${fire.outcome}`, title: `${fire.scheduled_at}${fire.reason ? ": " + fire.reason : ""}` }, fire.outcome));
    const state = h("div");
    const toggle = h("button", { class: `secondary ${schedule.paused ? "resume" : "pause"}`, onclick: async () => {
      try { await api("PATCH", `/v1/schedules/${schedule.id}`, { paused: !schedule.paused }); await load(); } catch (error) { showError(state, error); }
    } }, schedule.paused ? "Resume" : "Pause");
    const remove = h("button", { class: "secondary delete", onclick: async () => {
      try { await api("DELETE", `/v1/schedules/${schedule.id}`); await load(); } catch (error) { showError(state, error); }
    } }, "Delete");
    return h("tr", { dataset: { schedule: schedule.id } },
      h("td", {}, h("a", { href: `/?schedule=${schedule.id}`, "data-link": true, class: "mono" }, short(schedule.id))),
      h("td", {}, schedule.plugin),
      h("td", {}, describeTrigger(schedule.trigger)),
      h("td", {}, schedule.paused ? h("span", { class: "muted" }, "—") : time(schedule.next_fire_at)),
      h("td", {}, h("span", { class: "state" }, schedule.paused ? "paused" : "active")),
      h("td", {}, fires),
      h("td", {}, sparkline(runs.runs)),
      h("td", {}, schedule.created_by || h("span", { class: "muted" }, "—")),
      h("td", {}, toggle, " ", remove, state));
  }

  /** The first page of schedules, or the page after `cursor` added below the ones shown. */
  async function load(cursor) {
    try {
      const list = await api("GET", `/v1/schedules?limit=50${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
      const rows = await Promise.all(list.schedules.map(row));
      if (cursor) body.append(...rows); else body.replaceChildren(...rows);
      more.hidden = !list.next_cursor;
      more.dataset.cursor = list.next_cursor || "";
    } catch (error) {
      showError(createState, error);
    }
  }
  await load();
}

// ---------- Health ----------

async function healthPage() {
  const content = h("div");
  page.replaceChildren(h("h1", {}, "Health"), content);
  async function load() {
    try {
      const health = await api("GET", "/v1/health");
      const lag = health.tick_lag_last_minute;
      content.replaceChildren(
        h("div", { class: "grid" },
          h("section", { class: "card" }, h("div", { class: "muted" }, "Due now"), h("div", { class: "figure", id: "due-now" }, health.due_now)),
          h("section", { class: "card" }, h("div", { class: "muted" }, "Queued / running"), h("div", { class: "figure" }, `${health.queued} / ${health.running}`)),
          h("section", { class: "card" }, h("div", { class: "muted" }, `Tick lag, last minute (${lag.ticks} ticks)`),
            h("div", { class: "figure" }, lag.ticks ? `p50 ${duration(lag.p50_ms)} · p99 ${duration(lag.p99_ms)}` : "no ticks"))),
        h("section", { class: "card" }, h("h2", {}, "Nodes"),
          h("table", { id: "nodes" },
            h("thead", {}, h("tr", {}, ["Node", "Leases held", "Calls, last minute"].map((name) => h("th", {}, name)))),
            h("tbody", {}, health.nodes.map((node) => h("tr", {},
              h("td", { class: "mono" }, node.node, node.node === health.node ? h("span", { class: "muted" }, " (this node)") : ""),
              h("td", {}, node.leases), h("td", {}, node.calls_last_minute))))),
          health.nodes.length ? "" : h("p", { class: "muted" }, "No node holds a lease or made a call in the last minute.")));
    } catch (error) {
      showError(content, error);
    }
  }
  await load();
  every(2000, load);
}

// ---------- Routing ----------

/** Whether the server asks for a token (`--auth tokens`): then nothing is asked without one. */
const NEEDS_TOKEN = document.querySelector('meta[name="stepwise-auth"]').content === "tokens";

async function render() {
  for (const stop of cleanup) stop();
  cleanup = [];
  if (NEEDS_TOKEN && !token()) {
    page.replaceChildren(h("h1", {}, "Stepwise"),
      h("section", { class: "card" }, h("p", {}, "This server needs an API token. Enter one above ",
        "(from ", h("code", {}, "stepwise token create"), " or an admin); it stays in this browser.")));
    return;
  }
  const path = location.pathname;
  for (const link of document.querySelectorAll("nav a")) {
    const target = link.getAttribute("href");
    link.classList.toggle("current", target === "/" ? path === "/" || path.startsWith("/runs/") : path.startsWith(target));
  }
  const run = path.match(/^\/runs\/([0-9a-f-]+)$/);
  if (run) return runPage(run[1]);
  if (path === "/plugins") return pluginsPage();
  if (path === "/schedules") return schedulesPage();
  if (path === "/health") return healthPage();
  return runsPage();
}

function navigate(path) {
  history.pushState(null, "", path);
  render();
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-link]");
  if (!link || event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  navigate(link.getAttribute("href"));
});
window.addEventListener("popstate", render);

function showTokenState() {
  document.getElementById("token-state").textContent = token() ? "token set" : "no token";
}
document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token");
  if (input.value.trim()) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = "";
  showTokenState();
  render();
});
document.getElementById("token-forget").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  showTokenState();
  render();
});
showTokenState();
render();
