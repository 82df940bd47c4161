// The web page of `delivery api`: plain JavaScript, no build step, nothing from outside.
// It calls the same HTTP API as every other client; the session cookie stands in for the
// Bearer key, and every change carries the session's CSRF token (X-CSRF-Token).
"use strict";

const state = { session: null };
const main = () => document.getElementById("main");

// Builds DOM nodes (never innerHTML with data, so nothing from the API is parsed as markup).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v === true) node.setAttribute(k, "");
    else node.setAttribute(k, String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

class ApiFailure extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.session) headers["X-CSRF-Token"] = state.session.csrf_token;
  let answer;
  try {
    answer = await fetch(path, {
      method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiFailure(0, "network", "The API did not answer: check that `delivery api` is running, then reload.");
  }
  if (answer.status === 204) return null;
  const payload = await answer.json().catch(() => null);
  if (!answer.ok) {
    const e = (payload && payload.error) || { code: "internal", message: answer.statusText };
    throw new ApiFailure(answer.status, e.code, e.message);
  }
  return payload;
}

function advice(err) {
  if (err.status === 401) return " Sign in again with your API key.";
  if (err.status === 403) return " Ask for a key with that scope (delivery keys create TENANT --scopes ...).";
  if (err.status === 404) return " It may have been removed, or it belongs to another tenant.";
  if (err.status === 503) return " The database is away; try again in a moment.";
  return "";
}

function showError(err) {
  const box = document.getElementById("alert");
  box.textContent = err.message + advice(err);
  box.hidden = false;
  if (err.status === 401) { state.session = null; renderSignIn(); }
}

function clearError() { document.getElementById("alert").hidden = true; }

// A time in the viewer's zone; the UTC value on hover.
function when(iso) {
  if (!iso) return el("span", { class: "muted" }, "never");
  const d = new Date(iso);
  return el("time", { datetime: d.toISOString(), title: d.toISOString().replace(".000Z", "Z") + " (UTC)" },
    d.toLocaleString());
}

function stateCell(value, label) {
  return el("td", { "data-label": label, class: "state-" + value }, value);
}

function td(label, ...content) { return el("td", { "data-label": label }, ...content); }

function table(headers, rows, empty) {
  if (!rows.length) return el("p", { class: "empty" }, empty);
  return el("div", { class: "table-wrap" },
    el("table", { class: "stack" },
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows)));
}

// The datetime-local inputs speak the viewer's zone; the API wants RFC 3339.
function rfc3339(localValue) { return localValue ? new Date(localValue).toISOString() : null; }

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) q.set(k, v);
  const s = q.toString();
  return s ? "?" + s : "";
}

function render(...nodes) {
  const m = main();
  m.replaceChildren(...nodes);
}

// ---------------------------------------------------------------- sign-in / sign-out

function renderSignIn() {
  document.getElementById("nav").hidden = true;
  const input = el("input", { id: "key", name: "key", type: "password", autocomplete: "off", required: true, placeholder: "dk_..." });
  const form = el("form", { class: "row", onsubmit: async (ev) => {
    ev.preventDefault();
    clearError();
    try {
      state.session = await api("POST", "/v1/session", { key: input.value });
      input.value = "";
      showNav();
      route();
    } catch (err) { showError(err); }
  } },
  el("label", { for: "key" }, "API key", input),
  el("button", { type: "submit" }, "Sign in"));
  render(el("h1", {}, "Sign in"),
    el("p", {}, "Sign in with an API key of your tenant (from `delivery keys create`). The key is sent once, in the body; the page then holds only a session cookie."),
    form);
  input.focus();
}

function showNav() {
  const s = state.session;
  document.getElementById("nav").hidden = false;
  document.getElementById("nav-ops").hidden = !s.scopes.includes("operator");
  document.getElementById("who").textContent = `tenant ${s.tenant_id} · ${s.scopes.join(", ")}`;
}

async function signOut() {
  try { await api("DELETE", "/v1/session"); } catch (err) { if (err.status !== 401) { showError(err); return; } }
  state.session = null;
  location.hash = "#/";
  renderSignIn();
}

// ---------------------------------------------------------------- subscriptions

async function viewSubscriptions() {
  const [health, page] = await Promise.all([
    api("GET", "/v1/subscription-health"),
    api("GET", "/v1/subscriptions?limit=200"),
  ]);
  const byId = new Map(page.items.map((s) => [s.id, s]));
  const rows = health.items.map((h) => el("tr", {},
    td("Subscription", el("a", { href: `#/subscriptions/${h.id}` }, h.id), el("div", { class: "mono" }, h.url),
      h.ordered ? el("div", { class: "legend" }, `ordered · ${h.blocked_accounts} blocked account${h.blocked_accounts === 1 ? "" : "s"}`) : ""),
    stateCell(h.state, "State"),
    stateCell(h.circuit, "Circuit"),
    el("td", { class: "num", "data-label": "Pending" }, h.pending),
    el("td", { class: "num", "data-label": "Retrying" }, h.retrying),
    el("td", { class: "num", "data-label": "Dead" }, h.dead),
    td("Last success", when(h.last_success)),
    td("Events", (byId.get(h.id) || h).events.join(", "))));
  const url = el("input", { id: "new-url", name: "url", type: "url", required: true, placeholder: "https://example.com/webhooks" });
  const events = el("input", { id: "new-events", name: "events", required: true, value: "*" });
  const account = el("input", { id: "new-account", name: "account", placeholder: "all accounts" });
  const ordered = el("input", { id: "new-ordered", name: "ordered", type: "checkbox" });
  const created = el("div", {});
  const form = el("form", { class: "row", onsubmit: async (ev) => {
    ev.preventDefault(); clearError();
    const body = { url: url.value, events: events.value.split(",").map((s) => s.trim()).filter(Boolean) };
    if (account.value.trim()) body.account_id = account.value.trim();
    if (ordered.checked) body.ordered = true;
    try {
      const sub = await api("POST", "/v1/subscriptions", body);
      await viewSubscriptions();
      main().prepend(secretBox(sub, "Subscription created."));
    } catch (err) { showError(err); }
  } },
  el("label", { for: "new-url" }, "Endpoint URL", url),
  el("label", { for: "new-events" }, "Event types (comma-separated globs)", events),
  el("label", { for: "new-account" }, "Account (optional)", account),
  el("label", { for: "new-ordered", class: "inline", title: "Per account, each event waits until the one before it succeeded or was dead-lettered" }, ordered, "Ordered"),
  el("button", { type: "submit" }, "Create subscription"));
  render(el("h1", {}, "Subscriptions"), created,
    table(["Subscription", "State", "Circuit", "Pending", "Retrying", "Dead", "Last success", "Events"], rows,
      "No subscriptions yet. Create one below with the URL of your endpoint; it receives every matching event from then on."),
    el("h2", {}, "New subscription"), form);
}

function secretBox(sub, what) {
  const secret = sub.secret || sub.public_key;
  return el("div", { class: "secret", role: "status" },
    el("strong", {}, what + " "),
    sub.secret ? "Its signing secret, shown only now: store it where your endpoint verifies signatures." :
      "Its public key (verify the v1a signatures with it):",
    el("div", {}, el("code", { id: "shown-secret" }, secret)));
}

async function viewSubscription(id, params) {
  const filters = { state: params.get("state") || "", since: params.get("since") || "", until: params.get("until") || "" };
  const [sub, health, page] = await Promise.all([
    api("GET", `/v1/subscriptions/${encodeURIComponent(id)}`),
    api("GET", "/v1/subscription-health"),
    api("GET", `/v1/subscriptions/${encodeURIComponent(id)}/deliveries` + query({
      state: filters.state, since: filters.since, until: filters.until, limit: 200 })),
  ]);
  const h = health.items.find((x) => x.id === id) || {};
  const notice = el("div", {});
  const act = (label, fn, cls) => el("button", { type: "button", class: cls, onclick: async () => {
    clearError();
    try { await fn(); } catch (err) { showError(err); }
  } }, label);
  const paused = sub.state === "paused";
  const actions = el("div", { class: "row" },
    paused ? act("Resume", async () => { await api("POST", `/v1/subscriptions/${id}/resume`); await route(); })
           : act("Pause", async () => { await api("POST", `/v1/subscriptions/${id}/pause`); await route(); }),
    act("Rotate secret", async () => {
      if (!confirm("Rotate the secret? The old one keeps signing during the grace period.")) return;
      const rotated = await api("POST", `/v1/subscriptions/${id}/rotate-secret`);
      notice.replaceChildren(secretBox(rotated, "Secret rotated."));
    }, "secondary"),
    act("Send test event", async () => {
      const event = testEvent(sub);
      if (!event) { notice.replaceChildren(el("p", { class: "note" }, "None of the catalogue's types matches this subscription's patterns.")); return; }
      const r = await api("POST", "/v1/events", event);
      notice.replaceChildren(el("p", { class: "note", role: "status" }, `Test event ${r.ids[0]} (${event.type}) published; it appears below once dispatched.`));
    }, "secondary"),
    el("a", { href: `#/dead-letters?subscription_id=${encodeURIComponent(id)}` }, "Dead letters of this subscription"));

  const stateSel = el("select", { id: "f-state", name: "state" },
    ["", "pending", "delivered", "dead"].map((v) => el("option", { value: v, selected: v === filters.state }, v || "any")));
  const since = el("input", { id: "f-since", type: "datetime-local", value: localInput(filters.since) });
  const until = el("input", { id: "f-until", type: "datetime-local", value: localInput(filters.until) });
  const filterForm = el("form", { class: "row", onsubmit: (ev) => {
    ev.preventDefault();
    location.hash = `#/subscriptions/${id}` + query({ state: stateSel.value, since: rfc3339(since.value), until: rfc3339(until.value) });
  } },
  el("label", { for: "f-state" }, "State", stateSel),
  el("label", { for: "f-since" }, "Published since", since),
  el("label", { for: "f-until" }, "until", until),
  el("button", { type: "submit", class: "secondary" }, "Filter"));

  const rows = page.items.map((d) => el("tr", {},
    td("Event", el("span", { class: "mono" }, d.event_id)),
    stateCell(d.state, "State"),
    el("td", { class: "num", "data-label": "Attempts" }, d.attempts),
    td("Last attempt", when(d.last_attempt_at)),
    td("Reason", d.state === "delivered" ? "" : d.dead_reason || d.last_error || (d.last_status ? `HTTP ${d.last_status}` : "")),
    td("Attempts log", el("ol", { class: "attempts" }, d.attempt_log.map((a) => el("li", {},
      when(a.started_at), ` · ${a.outcome}`, a.status ? ` · HTTP ${a.status}` : "",
      ` · ${Math.round(a.duration_ms)} ms`, a.error ? ` · ${a.error}` : "",
      a.response_excerpt ? el("div", { class: "mono" }, a.response_excerpt.slice(0, 200)) : ""))))));
  render(
    el("p", {}, el("a", { href: "#/subscriptions" }, "← Subscriptions")),
    el("h1", {}, "Subscription ", el("span", { class: "mono" }, sub.id)),
    el("div", { class: "cards" },
      card("State", sub.state, "state-" + sub.state), card("Circuit", sub.circuit_state, "state-" + sub.circuit_state),
      card("Pending", h.pending ?? "?"), card("Retrying", h.retrying ?? "?"), card("Dead", h.dead ?? "?"),
      el("div", { class: "card" }, el("div", {}, "Last success"), when(h.last_success))),
    el("p", { class: "mono" }, sub.url, " · ", sub.events.join(", "), sub.account_id ? ` · account ${sub.account_id}` : "",
      sub.ordered ? " · ordered" : ""),
    actions, notice,
    sub.ordered ? await blockedSection(id) : "",
    el("h2", {}, "Attempts over time"), chart(page.items),
    el("h2", {}, "Deliveries"), filterForm,
    table(["Event", "State", "Attempts", "Last attempt", "Reason", "Attempts log"], rows,
      filters.state || filters.since || filters.until
        ? "No deliveries match this filter: widen the time window or choose another state."
        : "No deliveries yet. Send a test event, or publish an event of a matching type."));
}

function card(label, value, cls) {
  return el("div", { class: "card" }, el("div", {}, label), el("div", { class: "big " + (cls || "") }, value));
}

function localInput(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

// A test event: the first catalogue type the subscription's patterns match, for its account
// (or "ui-test"), published through POST /v1/events like any producer's (needs `publish`).
const SAMPLES = {
  "trade.executed": { trade_id: "ui-test", order_id: "ui-test", instrument: "TEST-USD", side: "buy", quantity: "1", price: "1.00", executed_at: null },
  "trade.cancelled": { trade_id: "ui-test", order_id: "ui-test", reason: "test event from the web page" },
  "account.created": { owner: "ui-test", currency: "USD" },
  "account.balance_changed": { asset: "USD", delta: "0.00", balance: "0.00", reason: "adjustment" },
  "account.closed": { reason: "test event from the web page" },
};

function globMatch(pattern, type) {
  const re = new RegExp("^" + pattern.split("*").map((p) => p.replace(/[.+?^${}()|[\]\\]/g, "\\$&")).join(".*") + "$");
  return re.test(type);
}

// An ordered subscription's accounts held behind a dead letter, each with a Skip action;
// it reloads itself after a skip, so the result message stays in view.
async function blockedSection(id) {
  const result = el("div", { id: "blocked-result" });
  const body = el("div", {});
  const load = async () => {
    const blocked = await api("GET", `/v1/subscriptions/${encodeURIComponent(id)}/blocked-accounts`);
    const rows = blocked.items.map((b) => el("tr", {},
      td("Account", el("span", { class: "mono" }, b.account_id)),
      el("td", { class: "num", "data-label": "Sequence held" }, b.sequence),
      td("Dead letter", el("span", { class: "mono" }, b.event_id), ` (#${b.dead_letter_id})`),
      td("Reason", b.reason || (b.last_status ? `HTTP ${b.last_status}` : "")),
      td("Dead since", when(b.dead_at)),
      td("Action", el("button", { type: "button", class: "secondary", "aria-label": `Skip ${b.event_id} of account ${b.account_id}`, onclick: async () => {
        clearError();
        if (!confirm(`Skip event ${b.event_id} (sequence ${b.sequence} of account ${b.account_id})? It is never sent; the account's later events go on.`)) return;
        try {
          const r = await api("POST", "/v1/dead-letters/skip", { ids: [b.dead_letter_id] });
          result.replaceChildren(el("p", { class: "note", role: "status" }, r.skipped
            ? `Skipped ${b.event_id}: account ${b.account_id} is released, its later events are sent in order.`
            : `Nothing skipped: ${b.event_id} is no longer a dead letter (replayed or skipped already).`));
          await load();
        } catch (err) { showError(err); }
      } }, "Skip"))));
    body.replaceChildren(table(["Account", "Sequence held", "Dead letter", "Reason", "Dead since", ""], rows,
      "No account is blocked: every account's deliveries go on in order."));
  };
  await load();
  return el("section", { id: "blocked", "aria-labelledby": "h-blocked" },
    el("h2", { id: "h-blocked" }, "Blocked accounts"),
    el("p", { class: "legend" }, "Ordered: an account's later events wait behind its dead letter until it is replayed (Dead letters) or skipped here."),
    result, body);
}

function testEvent(sub) {
  const type = Object.keys(SAMPLES).find((t) => sub.events.some((p) => globMatch(p, t)));
  if (!type) return null;
  const data = { ...SAMPLES[type] };
  if ("executed_at" in data) data.executed_at = new Date().toISOString();
  return { type, account_id: sub.account_id || "ui-test", data };
}

// Attempts and failures per time bucket, from the attempts of the deliveries shown.
function chart(deliveries) {
  const attempts = deliveries.flatMap((d) => d.attempt_log);
  if (!attempts.length) return el("p", { class: "empty" }, "No attempts in this view yet.");
  const times = attempts.map((a) => Date.parse(a.started_at));
  const lo = Math.min(...times), hi = Math.max(...times) + 1;
  const n = 24, width = 600, height = 120, bw = width / n;
  const total = new Array(n).fill(0), failed = new Array(n).fill(0);
  attempts.forEach((a, i) => {
    const b = Math.min(n - 1, Math.floor(((times[i] - lo) / (hi - lo)) * n));
    total[b] += 1;
    if (a.outcome !== "success" && !(a.status >= 200 && a.status < 300)) failed[b] += 1;
  });
  const max = Math.max(...total);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height + 4}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img");
  const nFailed = failed.reduce((x, y) => x + y, 0);
  svg.setAttribute("aria-label", `${attempts.length} attempts, ${nFailed} failed, from ${new Date(lo).toLocaleString()} to ${new Date(hi).toLocaleString()}`);
  const bar = (i, v, color) => {
    const r = document.createElementNS(ns, "rect");
    const h = (v / max) * height;
    r.setAttribute("x", String(i * bw + 1)); r.setAttribute("width", String(bw - 2));
    r.setAttribute("y", String(height - h)); r.setAttribute("height", String(h));
    r.setAttribute("fill", color);
    return r;
  };
  for (let i = 0; i < n; i++) {
    if (total[i]) svg.append(bar(i, total[i], "#8bb8e8"));
    if (failed[i]) svg.append(bar(i, failed[i], "#c62828"));
  }
  return el("figure", {}, svg, el("figcaption", { class: "legend" },
    `${attempts.length} attempts (blue), ${nFailed} failed (red); `, when(new Date(lo).toISOString()), " to ", when(new Date(hi).toISOString())));
}

// ---------------------------------------------------------------- dead letters

async function viewDeadLetters(params) {
  const filters = { subscription_id: params.get("subscription_id") || "", since: params.get("since") || "", until: params.get("until") || "" };
  const page = await api("GET", "/v1/dead-letters" + query({ ...filters, limit: 200 }));
  const progress = el("div", { id: "progress", role: "status" });
  const checks = new Map();
  const replayIds = async (ids) => {
    // In chunks, so a long list shows its progress and one failure leaves the rest known.
    const bar = el("progress", { max: ids.length, value: 0 });
    const text = el("span", {}, ` 0 of ${ids.length}`);
    progress.replaceChildren(el("label", { class: "inline" }, "Replaying", bar, text));
    let replayed = 0, skipped = 0;
    for (let i = 0; i < ids.length; i += 25) {
      const r = await api("POST", "/v1/dead-letters/replay", { ids: ids.slice(i, i + 25) });
      replayed += r.replayed; skipped += r.skipped;
      bar.value = Math.min(ids.length, i + 25);
      text.textContent = ` ${bar.value} of ${ids.length}`;
    }
    progress.replaceChildren(el("p", { class: "note" }, `Replayed ${replayed}` + (skipped ? `, skipped ${skipped} (their subscription is not active: resume it first)` : "") + ". They are sent again with the same webhook-id."));
  };
  const rows = page.items.map((d) => {
    const box = el("input", { type: "checkbox", id: `dl-${d.id}`, "aria-label": `Select dead letter ${d.event_id}` });
    checks.set(d.id, box);
    return el("tr", {},
      td("Select", box),
      td("Event", el("span", { class: "mono" }, d.event_id), " ", d.event_type),
      td("Subscription", el("a", { href: `#/subscriptions/${d.subscription_id}` }, d.subscription_id)),
      td("Reason", d.reason || (d.last_status ? `HTTP ${d.last_status}` : "")),
      el("td", { class: "num", "data-label": "Attempts" }, d.attempts),
      td("Dead since", when(d.dead_at)),
      td("Action", el("button", { type: "button", class: "secondary", "aria-label": `Replay ${d.event_id}`, onclick: async () => {
        clearError();
        try { await replayIds([d.id]); } catch (err) { showError(err); }
      } }, "Replay")));
  });
  const sub = el("input", { id: "dl-sub", value: filters.subscription_id, placeholder: "any" });
  const since = el("input", { id: "dl-since", type: "datetime-local", value: localInput(filters.since) });
  const until = el("input", { id: "dl-until", type: "datetime-local", value: localInput(filters.until) });
  const filterForm = el("form", { class: "row", onsubmit: (ev) => {
    ev.preventDefault();
    location.hash = "#/dead-letters" + query({ subscription_id: sub.value.trim(), since: rfc3339(since.value), until: rfc3339(until.value) });
  } },
  el("label", { for: "dl-sub" }, "Subscription", sub),
  el("label", { for: "dl-since" }, "Published since", since),
  el("label", { for: "dl-until" }, "until", until),
  el("button", { type: "submit", class: "secondary" }, "Filter"));
  const bulk = el("div", { class: "row" },
    el("button", { type: "button", disabled: !page.items.length, onclick: async () => {
      clearError();
      const ids = [...checks].filter(([, b]) => b.checked).map(([id]) => id);
      if (!ids.length) { progress.replaceChildren(el("p", { class: "note" }, "Select dead letters first (the boxes on the left).")); return; }
      try { await replayIds(ids); } catch (err) { showError(err); }
    } }, "Replay selected"),
    el("button", { type: "button", disabled: !page.items.length, onclick: async () => {
      clearError();
      const selection = { subscription_id: filters.subscription_id || undefined, since: filters.since || undefined, until: filters.until || undefined };
      if (!selection.subscription_id && !selection.since && !selection.until) selection.all = true;
      try {
        progress.replaceChildren(el("span", {}, "Replaying every dead letter that matches the filter…"));
        const r = await api("POST", "/v1/dead-letters/replay", selection);
        progress.replaceChildren(el("p", { class: "note" }, `Replayed ${r.replayed}` + (r.skipped ? `, skipped ${r.skipped} (subscription not active)` : "") + "."));
      } catch (err) { showError(err); }
    } }, "Replay all matching the filter"));
  render(el("h1", {}, "Dead letters"), filterForm, bulk, progress,
    table(["", "Event", "Subscription", "Reason", "Attempts", "Dead since", ""], rows,
      filters.subscription_id || filters.since || filters.until
        ? "No dead letters match this filter."
        : "No dead letters: every delivery succeeded or is still being retried."),
    page.next_cursor ? el("p", { class: "note" }, "Only the newest 200 are shown: narrow the time window to see older ones.") : "");
}

// ---------------------------------------------------------------- on-call

async function viewOps(section) {
  const [o, poison] = await Promise.all([api("GET", "/v1/ops/overview"), api("GET", "/v1/ops/poison-messages")]);
  const queues = Object.entries(o.queues).map(([name, depth]) => el("tr", {},
    td("Queue", el("span", { class: "mono" }, name)), el("td", { class: "num", "data-label": "Ready" }, depth ?? "not declared yet (no worker has started)")));
  const unhealthy = o.unhealthy.map((s) => el("tr", {},
    td("Tenant", s.tenant_id), td("Subscription", el("span", { class: "mono" }, s.id), el("div", { class: "mono" }, s.url)),
    stateCell(s.state, "State"), stateCell(s.circuit, "Circuit"),
    el("td", { class: "num", "data-label": "Dead" }, s.dead), el("td", { class: "num", "data-label": "Retrying" }, s.retrying),
    el("td", { class: "num", "data-label": "Pending" }, s.pending),
    td("Failing since", when(s.failing_since)), td("Last success", when(s.last_success))));
  // What `delivery status` prints: each unhealthy thing, since when, and the alert covering it.
  const since = o.unhealthy_since.map((u) => el("tr", {},
    td("Since", when(u.since)), td("What", u.kind.replaceAll("_", " ")), td("Subject", el("span", { class: "mono" }, u.subject)),
    td("Detail", u.detail), td("Alert", u.alert ? el("span", { class: "mono" }, u.alert) : "none")));
  const poisonRows = poison.items.map((p) => el("tr", {},
    td("Received", when(p.received_at)), td("Message", el("span", { class: "mono" }, p.message_id || "?")),
    td("Routing key", p.routing_key || ""), td("Reason", p.reason), el("td", { class: "num", "data-label": "Deaths" }, p.death_count ?? "")));
  render(el("h1", {}, "On-call"),
    el("section", { id: "backlog", "aria-labelledby": "h-backlog" }, el("h2", { id: "h-backlog" }, "Outbox backlog"),
      el("div", { class: "cards" }, card("Events waiting", o.outbox.pending), card("Oldest age", `${o.outbox.oldest_age_s.toFixed(1)} s`),
        card("Poison messages", o.poison_messages))),
    el("section", { id: "queues", "aria-labelledby": "h-queues" }, el("h2", { id: "h-queues" }, "Queue depths"),
      o.queues_error ? el("p", { class: "alert" }, `Queue depths unknown: ${o.queues_error}. Check RabbitMQ (runbooks/broker-down.md).`) : "",
      table(["Queue", "Ready"], queues, "No queues yet: start a worker.")),
    el("section", { id: "since", "aria-labelledby": "h-since" }, el("h2", { id: "h-since" }, "Unhealthy since"),
      table(["Since", "What", "Subject", "Detail", "Alert"], since, "Nothing is unhealthy.")),
    el("section", { id: "unhealthy", "aria-labelledby": "h-unhealthy" }, el("h2", { id: "h-unhealthy" }, "Unhealthy subscriptions, by impact"),
      table(["Tenant", "Subscription", "State", "Circuit", "Dead", "Retrying", "Pending", "Failing since", "Last success"], unhealthy,
        "Every subscription is healthy.")),
    el("section", { id: "poison", "aria-labelledby": "h-poison" }, el("h2", { id: "h-poison" }, `Poison messages (${poison.total})`),
      table(["Received", "Message", "Routing key", "Reason", "Deaths"], poisonRows, "No poison messages.")));
  if (section) {
    const target = document.getElementById(section);
    if (target) { target.scrollIntoView(); target.querySelector("h2").setAttribute("tabindex", "-1"); target.querySelector("h2").focus(); }
  }
}

// ---------------------------------------------------------------- routing

async function route() {
  if (!state.session) return renderSignIn();
  const [path, qs] = (location.hash.slice(1) || "/subscriptions").split("?");
  const params = new URLSearchParams(qs || "");
  const parts = path.split("/").filter(Boolean);
  for (const a of document.querySelectorAll("#nav a")) {
    a.toggleAttribute("aria-current", ("#/" + (parts[0] || "subscriptions")) === a.getAttribute("href"));
    if (a.hasAttribute("aria-current")) a.setAttribute("aria-current", "page");
  }
  clearError();
  try {
    if (parts[0] === "subscriptions" && parts[1]) await viewSubscription(decodeURIComponent(parts[1]), params);
    else if (parts[0] === "dead-letters") await viewDeadLetters(params);
    else if (parts[0] === "ops") await viewOps(parts[1]);
    else await viewSubscriptions();
  } catch (err) {
    showError(err);
    if (err.status !== 401) render(el("h1", {}, "Could not load this page"), el("p", {}, err.message + advice(err)));
  }
}

async function start() {
  document.getElementById("sign-out").addEventListener("click", signOut);
  window.addEventListener("hashchange", route);
  try {
    state.session = await api("GET", "/v1/session");
    showNav();
  } catch (err) {
    if (err.status !== 401) showError(err);
  }
  await route();
}

document.addEventListener("DOMContentLoaded", start);
