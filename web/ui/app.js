// The breakglass web UI: a small single-page app over the JSON API (/api/v1, described by
// /api/v1/openapi.json). Our own code; the only third-party code is asciinema-player, served
// from npm's install under /ui/player/.
"use strict";

const $main = () => document.getElementById("main");
let me = null;

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function fmtTime(t) {
  if (!t) return "";
  return esc(t.replace("T", " ").replace(/\.\d+Z$/, "Z"));
}

function fmtSecs(s, digits = 1) {
  if (s === null || s === undefined) return "–";
  const m = Math.floor(s / 60), sec = (s % 60).toFixed(digits);
  return m ? `${m}m${sec.padStart(digits + 3, "0")}s` : `${sec}s`;
}

async function api(path, opts = {}) {
  const init = { credentials: "same-origin", headers: {} };
  if (opts.method && opts.method !== "GET") {
    init.method = opts.method;
    // The CSRF header: a cross-site form cannot send it, so our cookie alone never writes.
    init.headers["X-Breakglass-CSRF"] = "1";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(opts.body ?? {});
  }
  const resp = await fetch(path, init);
  const text = await resp.text();
  let body;
  try { body = JSON.parse(text); } catch { body = text; }
  if (!resp.ok) {
    const msg = (body && body.error) || text || resp.statusText;
    const err = new Error(msg);
    err.status = resp.status;
    throw err;
  }
  return body;
}

function showError(e) {
  if (e.status === 401) {
    $main().innerHTML = `<h1>Log in</h1><p class="notice">${esc(e.message)}</p>
      <p>Get a single-use login link over SSH: <code>ssh -p 2222 breakglass@GATEWAY login</code>, then open it here.</p>`;
    return;
  }
  $main().insertAdjacentHTML("afterbegin", `<div class="error" role="alert">${esc(e.message)}</div>`);
}

function params() {
  const h = location.hash.replace(/^#/, "");
  const [path, query] = h.split("?");
  return { path: path || "/sessions", q: new URLSearchParams(query || "") };
}

function go(path, q) {
  const qs = q ? new URLSearchParams(Object.entries(q).filter(([, v]) => v !== "" && v != null)).toString() : "";
  location.hash = qs ? `${path}?${qs}` : path;
}

function formValues(form) {
  const out = {};
  for (const [k, v] of new FormData(form).entries()) if (String(v).trim() !== "") out[k] = String(v).trim();
  return out;
}

// ------------------------------------------------------------------ login

async function login() {
  const token = location.hash.replace(/^#/, "");
  history.replaceState(null, "", "/login"); // keep the secret out of history
  if (!token) {
    $main().innerHTML = `<h1>Log in</h1><p>Get a single-use link with <code>ssh -p 2222 breakglass@GATEWAY login</code>.</p>`;
    return;
  }
  try {
    await api("/api/v1/login", { method: "POST", body: { token } });
    location.replace("/#/sessions");
  } catch (e) {
    $main().innerHTML = `<h1>Log in</h1><div class="error" id="login-error" role="alert">${esc(e.message)}</div>`;
  }
}

// ------------------------------------------------------------------ sessions list

async function sessionsPage(q) {
  const f = Object.fromEntries(q.entries());
  const page = Number(f.page || 1);
  $main().innerHTML = `<h1>Sessions</h1>
  <form class="filters" id="filters">
    <label>Person<input name="person" value="${esc(f.person)}"></label>
    <label>Target<input name="target" value="${esc(f.target)}"></label>
    <label>Protocol<select name="protocol">${["", "ssh", "postgres"].map((p) => `<option ${f.protocol === p ? "selected" : ""} value="${p}">${p || "any"}</option>`).join("")}</select></label>
    <label>Since<input name="since" placeholder="30d or 2026-11-01" value="${esc(f.since)}"></label>
    <label>Until<input name="until" value="${esc(f.until)}"></label>
    <label>Incident<input name="incident" value="${esc(f.incident)}"></label>
    <label>Review<select name="review">${["", "none", "open", "overdue", "signed"].map((p) => `<option ${f.review === p ? "selected" : ""} value="${p}">${p || "any"}</option>`).join("")}</select></label>
    <button class="primary">Filter</button>
  </form><div id="list">Loading…</div>`;
  document.getElementById("filters").onsubmit = (ev) => { ev.preventDefault(); go("/sessions", formValues(ev.target)); };
  const data = await api(`/api/v1/sessions?${new URLSearchParams({ ...f, page })}`);
  const rows = data.sessions.map((s) => `<tr>
      <td><a class="session-link" href="#/session/${esc(s.id)}">${esc(s.id.slice(0, 8))}</a></td>
      <td>${fmtTime(s.started_at)}</td><td>${esc(s.person)}</td><td>${esc(s.target)}</td><td>${esc(s.protocol)}</td>
      <td>${esc(s.incident_id)}</td><td>${esc(s.end_reason || (s.ended_at ? "" : "live"))}</td>
      <td>${reviewBadge(s.review)}</td></tr>`).join("");
  document.getElementById("list").innerHTML = `<table id="sessions"><thead><tr><th>Session</th><th>Started</th><th>Person</th><th>Target</th><th>Protocol</th><th>Incident</th><th>End</th><th>Review</th></tr></thead>
    <tbody>${rows || `<tr><td colspan="8">No sessions match.</td></tr>`}</tbody></table>
    <div class="pager">${page > 1 ? `<button id="prev">← Previous</button>` : ""}<span>Page ${page}</span>${data.has_more ? `<button id="next">Next →</button>` : ""}</div>`;
  const prev = document.getElementById("prev"), next = document.getElementById("next");
  if (prev) prev.onclick = () => go("/sessions", { ...f, page: page - 1 });
  if (next) next.onclick = () => go("/sessions", { ...f, page: page + 1 });
}

function reviewBadge(r) {
  if (!r) return `<span class="badge">none</span>`;
  const cls = { signed: "ok", overdue: "bad", open: "warn" }[r.state] || "";
  return `<span class="badge ${cls}">${esc(r.state)}</span>`;
}

// ------------------------------------------------------------------ session page

const players = {};
const cmdTimes = {};

// Where a jump to the command submitted at `t` lands: just before the next command, so the
// command and all of its output are on screen (the end of the recording for the last one).
async function jumpTarget(ch, t) {
  const next = (cmdTimes[ch] || []).find((x) => x > t + 1e-6);
  if (next != null) return Math.max(t, next - 0.0001);
  try {
    const d = await players[ch].getDuration();
    if (Number.isFinite(d)) return d;
  } catch { /* fall through */ }
  return t + 1;
}

// The audit findings of a session (or a review's sessions), each a link to its moment.
function lookHereFirst(sessionId, findings) {
  const attrs = `class="card look-here-first"${sessionId ? ` id="look-here-first"` : ""}`;
  if (!findings || !findings.length) return `<section ${attrs}><h2>Look here first</h2><p>No findings.</p></section>`;
  return `<section ${attrs}><h2>Look here first</h2><ul>${findings.map((f) => {
    const sid = sessionId || f.session_id;
    const where = f.channel != null ? `?ch=${f.channel}&t=${f.offset_seconds}` : "";
    return `<li class="finding ${esc(f.severity)}"><span class="badge ${f.severity === "high" ? "bad" : "warn"}">${esc(f.severity)}</span> <a class="finding-link" href="#/session/${encodeURIComponent(sid)}${where}">${esc(f.rule)} at ${fmtTime(f.at)}</a>: ${esc(f.detail)}</li>`;
  }).join("")}</ul></section>`;
}

async function sessionPage(id, q) {
  const d = await api(`/api/v1/sessions/${encodeURIComponent(id)}`);
  const s = d.session;
  const integrity = d.integrity;
  const icls = { ok: "ok", incomplete: "warn", tampered: "bad" }[integrity.verdict] || "bad";
  const g = d.grant, r = d.request;
  const approvals = r ? r.approvals.map((a) => `${esc(a.approver)} at ${fmtTime(a.at)}`).join("; ") : "";
  let html = `<h1>Session <span class="mono">${esc(s.id)}</span></h1>
  <p>Integrity: <span class="badge ${icls}" id="integrity">${esc(integrity.verdict.toUpperCase())}</span> <span class="mono">${esc(integrity.summary)}</span></p>
  <div class="cols"><dl class="grid">
    <dt>Person</dt><dd>${esc(s.person)}</dd><dt>Target</dt><dd>${esc(s.target)} (${esc(s.protocol)})</dd>
    <dt>Client</dt><dd>${esc(s.client_addr)}</dd><dt>Started</dt><dd>${fmtTime(s.started_at)}</dd>
    <dt>Deadline</dt><dd>${fmtTime(s.deadline)}</dd><dt>Ended</dt><dd>${fmtTime(s.ended_at) || "live"} ${esc(s.end_reason)}</dd>
    <dt>Bytes</dt><dd>${s.bytes_in} in / ${s.bytes_out} out</dd><dt>Recording</dt><dd class="mono">${esc(s.recording)}</dd>
  </dl><dl class="grid">
    <dt>Grant</dt><dd class="mono">${esc(g ? g.id : s.grant_id)}</dd>
    ${g ? `<dt>Reason</dt><dd>${esc(g.reason)}</dd><dt>Incident</dt><dd>${esc(g.incident_id)}</dd><dt>Created by</dt><dd>${esc(g.created_by)}</dd>
    <dt>Valid until</dt><dd>${fmtTime(g.expires_at)}${g.revoked_at ? ` (revoked ${fmtTime(g.revoked_at)} by ${esc(g.revoked_by)})` : ""}</dd>` : ""}
    ${r ? `<dt>Request</dt><dd class="mono">${esc(r.id)} (${esc(r.severity)}, ${esc(r.scenario)})</dd><dt>Approvals</dt><dd id="approvals">${approvals || (r.emergency ? "none: emergency self-service" : "none")}</dd>` : ""}
    <dt>Review</dt><dd>${reviewBadge(d.review)} ${d.review && d.review.signed_by ? `signed by ${esc(d.review.signed_by)}: ${esc(d.review.findings)}` : ""}</dd>
  </dl></div>
  ${g && me && me.roles.some((x) => ["reviewer", "auditor", "admin"].includes(x)) ? `<p><a id="incident-report" href="/api/v1/incidents/${encodeURIComponent(g.incident_id)}/report" target="_blank" rel="noopener">Incident report for ${esc(g.incident_id)}</a></p>` : ""}
  ${lookHereFirst(s.id, d.audit_findings)}`;
  for (const c of d.channels) {
    html += `<section class="card" id="ch-${c.channel}"><h2>Channel ${c.channel}: ${esc(channelLabel(c))}</h2>`;
    html += `<p><a href="/api/v1/sessions/${encodeURIComponent(s.id)}/channels/${c.channel}/cast?download=true" download>Download ${c.postgres ? "SQL timeline (JSONL)" : "asciicast"}</a>${c.exit_status != null ? ` · exit status ${c.exit_status}` : ""}</p>`;
    if (c.postgres) {
      html += `<div id="sql-${c.channel}">Loading statements…</div>`;
    } else {
      html += `<div class="cols"><div><div class="player" id="player-${c.channel}"></div>
        <label>Speed <select class="speed" data-ch="${c.channel}">${[0.5, 1, 2, 4, 8].map((v) => `<option ${v === 1 ? "selected" : ""}>${v}</option>`).join("")}</select></label></div>
        <div class="commands"><h2>Commands</h2>${commandsTable(c)}</div></div>`;
    }
    if (c.transfers && c.transfers.length) {
      html += `<h2>File transfers</h2><table class="transfers"><thead><tr><th>Protocol</th><th>Direction</th><th>Path</th><th>Size</th><th>SHA-256</th><th>Complete</th></tr></thead><tbody>
      ${c.transfers.map((t) => `<tr><td>${esc(t.protocol)}</td><td>${esc(t.direction)}</td><td class="mono">${esc(t.path)}</td><td>${t.size}</td><td class="mono">${esc(t.sha256.slice(0, 16))}…</td><td>${t.complete ? "yes" : "no"}</td></tr>`).join("")}</tbody></table>`;
    }
    html += `</section>`;
  }
  if (!d.channels.length) html += `<p>The session opened no channels.</p>`;
  $main().innerHTML = html;
  const wantCh = q.get("ch"), wantT = q.get("t");
  for (const c of d.channels) cmdTimes[c.channel] = (c.commands || []).map((m) => m.time).sort((a, b) => a - b);
  for (const c of d.channels) {
    if (c.postgres) await sqlTimeline(s.id, c.channel, wantCh == c.channel ? Number(wantT) : null);
    else await mountPlayer(s.id, c.channel, 1, wantCh == c.channel && wantT ? Number(wantT) : null);
  }
  for (const sel of document.querySelectorAll("select.speed")) {
    sel.onchange = async () => {
      const ch = sel.dataset.ch;
      const at = players[ch] ? await players[ch].getCurrentTime() : 0;
      await mountPlayer(s.id, ch, Number(sel.value), at, true);
    };
  }
  for (const b of document.querySelectorAll("button.jump")) {
    b.onclick = () => jump(b.dataset.ch, Number(b.dataset.t));
  }
  if (wantCh) document.getElementById(`ch-${wantCh}`)?.scrollIntoView();
}

function channelLabel(c) {
  const k = c.kind || {};
  if (k.type === "exec") return `exec ${k.command}`;
  if (k.type === "subsystem") return `subsystem ${k.name}`;
  if (k.type === "postgres") return `PostgreSQL ${k.role}@${k.database}`;
  if (k.type === "shell") return c.pty ? `shell (${c.pty.term} ${c.pty.cols}×${c.pty.rows})` : "shell";
  return c.format;
}

function commandsTable(c) {
  if (!c.commands.length) return `<p>No commands extracted.</p>`;
  return `<table class="cmds"><tbody>${c.commands.map((m) => `<tr><td><button class="jump" data-ch="${c.channel}" data-t="${m.time}">${fmtSecs(m.time)}</button></td>
    <td class="mono">${esc(m.text)}${m.uncertain ? ` <span class="badge warn" title="completion or history keys were used">uncertain</span>` : ""}${m.complete ? "" : ` <span class="badge">not submitted</span>`}</td></tr>`).join("")}</tbody></table>`;
}

async function mountPlayer(sessionId, ch, speed, at, exact = false) {
  const el = document.getElementById(`player-${ch}`);
  if (!window.AsciinemaPlayer) {
    el.innerHTML = `<div class="notice">asciinema-player is not installed on the gateway: run <code>npm ci --prefix web</code>.</div>`;
    return;
  }
  const text = await fetch(`/api/v1/sessions/${encodeURIComponent(sessionId)}/channels/${ch}/cast`, { credentials: "same-origin" }).then((r) => {
    if (!r.ok) throw new Error(`replay of channel ${ch}: ${r.status}`);
    return r.text();
  });
  if (players[ch]) players[ch].dispose();
  el.innerHTML = "";
  const opts = { speed, idleTimeLimit: 2, fit: "width", terminalFontSize: "13px" };
  // Without a jump target, show the last frame so the outcome is visible before playing.
  opts.poster = at == null ? "npt:99:59:59" : `npt:${at}`;
  players[ch] = AsciinemaPlayer.create({ data: text }, el, opts);
  if (at != null) await players[ch].seek(exact ? at : await jumpTarget(ch, at));
}

async function jump(ch, t) {
  const p = players[ch];
  if (!p) return;
  await p.seek(await jumpTarget(ch, t));
  document.getElementById(`ch-${ch}`)?.scrollIntoView();
}

async function sqlTimeline(sessionId, ch, focus) {
  const el = document.getElementById(`sql-${ch}`);
  const d = await api(`/api/v1/sessions/${encodeURIComponent(sessionId)}/channels/${ch}/sql`);
  const rows = d.events.filter((e) => ["query", "parse", "bind", "complete", "error", "copy", "function_call", "password_message"].includes(e.event) || e.sql);
  // A search hit names a statement by its time; statements and outcomes can be microseconds
  // apart, so exactly one row is marked: the statement nearest that time.
  let focusRow = null;
  if (focus != null) {
    for (const e of rows) {
      if (e.sql != null && (focusRow == null || Math.abs(e.time - focus) < Math.abs(focusRow.time - focus))) focusRow = e;
    }
  }
  el.innerHTML = `<table class="sql"><thead><tr><th>Time</th><th>Event</th><th>Statement / outcome</th></tr></thead><tbody>${rows.map((e) => {
    const isErr = e.event === "error";
    const outcome = isErr ? `ERROR ${e.error?.sqlstate ?? ""} ${e.error?.message ?? ""}`
      : e.command_tag ? `${e.command_tag}${e.rows_returned != null ? ` (${e.rows_returned} rows)` : ""}`
      : e.event === "copy" ? `COPY ${e.copy_direction} ${e.format ?? ""}: ${e.rows ?? "unknown"} rows, ${e.bytes} bytes` : "";
    // The gateway masked a secret before recording: say so next to the statement.
    const redacted = (e.redacted ?? []).map((r) => ` [${r.kind} redacted, ${r.bytes} bytes]`).join("");
    const what = (e.sql ?? outcome) + redacted;
    const hit = e === focusRow ? " hit" : "";
    return `<tr class="${isErr ? "err" : ""}${hit}" data-t="${e.time}"><td>${fmtSecs(e.time, 3)}</td><td>${esc(e.event)}</td><td class="mono">${esc(what)}</td></tr>`;
  }).join("")}</tbody></table>`;
  el.querySelector("tr.hit")?.scrollIntoView();
}

// ------------------------------------------------------------------ search

async function searchPage(q) {
  const f = Object.fromEntries(q.entries());
  $main().innerHTML = `<h1>Search commands and SQL</h1>
  <form class="filters" id="search-form">
    <label>Text<input name="q" id="q" size="40" placeholder="DROP TABLE" value="${esc(f.q)}"></label>
    <label>Person<input name="person" value="${esc(f.person)}"></label>
    <label>Target<input name="target" value="${esc(f.target)}"></label>
    <label>Since<input name="since" placeholder="30d" value="${esc(f.since)}"></label>
    <label>Until<input name="until" value="${esc(f.until)}"></label>
    <button class="primary">Search</button></form><div id="results"></div>`;
  document.getElementById("search-form").onsubmit = (ev) => { ev.preventDefault(); go("/search", formValues(ev.target)); };
  if (!f.q) return;
  const d = await api(`/api/v1/search?${new URLSearchParams(f)}`);
  document.getElementById("results").innerHTML = `<table id="hits"><thead><tr><th>When</th><th>Person</th><th>Target</th><th>Kind</th><th>Text</th></tr></thead><tbody>
    ${d.hits.map((h) => `<tr><td><a class="hit-link" href="#/session/${esc(h.session_id)}?ch=${h.channel}&t=${h.time}">${fmtTime(h.at)}</a></td><td>${esc(h.person)}</td><td>${esc(h.target)}</td><td>${esc(h.kind)}</td><td class="mono">${esc(h.text)}</td></tr>`).join("") || `<tr><td colspan="5">Nothing found.</td></tr>`}</tbody></table>`;
}

// ------------------------------------------------------------------ requests

async function requestsPage() {
  const d = await api("/api/v1/requests");
  $main().innerHTML = `<h1>Pending requests</h1><table id="requests"><thead><tr><th>Request</th><th>Person</th><th>Target</th><th>Incident</th><th>Severity</th><th>Reason</th><th>For</th><th>Approvals</th><th></th></tr></thead><tbody>
  ${d.requests.map((r) => {
    const own = me && r.person === me.person;
    return `<tr data-id="${esc(r.id)}"><td class="mono">${esc(r.id)}</td><td>${esc(r.person)}</td><td>${esc(r.target)}</td><td>${esc(r.incident_id)}</td><td>${esc(r.severity)}</td>
      <td>${esc(r.justification)}</td><td>${fmtSecs(r.duration_seconds)}</td><td>${r.approvals.map((a) => esc(a.approver)).join(", ") || "–"}</td>
      <td>${own ? `<span class="badge" title="nobody approves their own request">your request</span>` : `<button class="primary approve" data-id="${esc(r.id)}">Approve</button> <button class="danger deny" data-id="${esc(r.id)}">Deny</button>`}</td></tr>`;
  }).join("") || `<tr><td colspan="9">Nothing waits for approval.</td></tr>`}</tbody></table><div id="outcome"></div>`;
  for (const b of document.querySelectorAll("button.approve")) {
    b.onclick = () => decide(b.dataset.id, "approve");
  }
  for (const b of document.querySelectorAll("button.deny")) {
    b.onclick = () => {
      const reason = prompt("Why deny this request?");
      if (reason) decide(b.dataset.id, "deny", { reason });
    };
  }
}

async function decide(id, what, body) {
  const out = document.getElementById("outcome");
  try {
    const r = await api(`/api/v1/requests/${encodeURIComponent(id)}/${what}`, { method: "POST", body });
    await requestsPage();
    document.getElementById("outcome").innerHTML = `<p class="notice" id="decision">${esc(r.message)}</p>`;
  } catch (e) {
    out.innerHTML = `<div class="error" role="alert">${esc(e.message)}</div>`;
  }
}

// ------------------------------------------------------------------ reviews

// A required yes/no question of the review.
function yesNo(name, question) {
  return `<fieldset class="yes-no"><legend>${esc(question)}</legend>
    <label><input type="radio" name="${name}" value="yes" required> yes</label>
    <label><input type="radio" name="${name}" value="no"> no</label></fieldset>`;
}

async function reviewsPage() {
  const d = await api("/api/v1/reviews");
  $main().innerHTML = `<h1>Post-incident reviews</h1><div id="outcome"></div>
  ${d.reviews.map((r) => `<section class="card review" data-id="${esc(r.id)}">
    <h2>${esc(r.id)} ${reviewBadge(r)} ${r.emergency ? `<span class="badge bad">emergency self-service</span>` : ""}</h2>
    <p>${esc(r.person)} on ${esc(r.target)} (${esc(r.scenario)}); approved by ${esc(r.approvers.join(", ") || "nobody")}; due ${fmtTime(r.due_at)}.
      <a href="#/sessions?person=${encodeURIComponent(r.person)}&target=${encodeURIComponent(r.target)}">Sessions</a></p>
    ${lookHereFirst(null, r.audit_findings)}
    ${r.you_may_sign ? `<form class="sign" data-id="${esc(r.id)}">
      <label>Findings: what did the recordings show?<br><textarea name="findings" rows="3" cols="80" required></textarea></label><br>
      ${yesNo("thresholds_met", "Were the documented thresholds for break-glass access met?")}
      <label>If not, why did access go ahead?<br><textarea name="thresholds_note" rows="2" cols="80"></textarea></label><br>
      ${yesNo("escalation_possible", "Could the standard escalation paths have worked instead?")}
      <label>If so, why were they not used?<br><textarea name="escalation_note" rows="2" cols="80"></textarea></label><br>
      <label>Root cause<br><textarea name="root_cause" rows="2" cols="80" required></textarea></label><br>
      <label>Actions taken during the access<br><textarea name="actions_taken" rows="2" cols="80" required></textarea></label><br>
      ${yesNo("procedure_update", "Does the break-glass procedure need an update?")}
      <label>If so, which?<br><textarea name="procedure_change" rows="2" cols="80"></textarea></label><br>
      <button class="primary">Sign off</button></form>` : `<p class="notice">You may not sign this review off (reviewers who took no part in the incident sign off).</p>`}
  </section>`).join("") || `<p>No open reviews.</p>`}`;
  for (const f of document.querySelectorAll("form.sign")) {
    f.onsubmit = async (ev) => {
      ev.preventDefault();
      try {
        const r = await api(`/api/v1/reviews/${encodeURIComponent(f.dataset.id)}/sign`, { method: "POST", body: formValues(f) });
        await reviewsPage();
        document.getElementById("outcome").innerHTML = `<p class="notice" id="signed">${esc(r.message)}</p>`;
      } catch (e) {
        document.getElementById("outcome").innerHTML = `<div class="error" role="alert">${esc(e.message)}</div>`;
      }
    };
  }
}

// ------------------------------------------------------------------ reports

async function reportsPage(q) {
  const f = { since: "90d", period: "week", ...Object.fromEntries(q.entries()) };
  $main().innerHTML = `<h1>Reports</h1>
  <form class="filters" id="report-form">
    <label>Since<input name="since" value="${esc(f.since)}"></label>
    <label>Until<input name="until" value="${esc(f.until)}"></label>
    <label>Period<select name="period">${["day", "week", "month"].map((p) => `<option ${f.period === p ? "selected" : ""}>${p}</option>`).join("")}</select></label>
    <button class="primary">Show</button></form><div id="report">Loading…</div>
  <section id="export-section" ${me && me.roles.some((r) => r === "auditor" || r === "admin") ? "" : "hidden"}>
  <h2>Auditor export</h2>
  <form class="filters" id="export-form">
    <label>Since<input name="since" value="${esc(f.since)}"></label><label>Until<input name="until" value="${esc(f.until)}"></label>
    <label>Format<select name="format"><option>json</option><option>csv</option></select></label>
    <button>Export session metadata</button></form><div id="export"></div></section>`;
  document.getElementById("report-form").onsubmit = (ev) => { ev.preventDefault(); go("/reports", formValues(ev.target)); };
  document.getElementById("export-form").onsubmit = (ev) => { ev.preventDefault(); auditExport(formValues(ev.target)); };
  const r = await api(`/api/v1/reports?${new URLSearchParams(f)}`);
  const t = r.totals;
  const pct = (v) => (v === null || v === undefined ? "–" : `${v.toFixed(1)}%`);
  document.getElementById("report").innerHTML = `
  <dl class="grid" id="totals"><dt>Break-glass sessions</dt><dd>${t.events}</dd><dt>Grants issued</dt><dd>${t.grants}</dd>
    <dt>Unique users</dt><dd>${t.unique_users}</dd><dt>Mean time between sessions</dt><dd>${fmtSecs(t.mean_time_between_events_seconds)}</dd>
    <dt>Outside maintenance windows</dt><dd>${t.outside_windows} (${pct(t.outside_windows_pct)})</dd>
    <dt>Maintenance windows (UTC)</dt><dd>${esc((r.maintenance_windows || []).join(", ") || "none configured")}</dd></dl>
  <h2>Sessions per ${esc(r.period)}</h2>${barChart(r.per_period)}
  <h2>Per system</h2><table id="per-system"><thead><tr><th>Target</th><th>Protocol</th><th>Sessions</th><th>Unique users</th><th>Mean time between</th><th>Outside windows</th><th>Last</th></tr></thead><tbody>
  ${r.per_system.map((s) => `<tr><td>${esc(s.target)}</td><td>${esc(s.protocol)}</td><td>${s.events}</td><td>${s.unique_users}</td><td>${fmtSecs(s.mean_time_between_events_seconds)}</td><td>${s.outside_windows} (${pct(s.outside_windows_pct)})</td><td>${fmtTime(s.last_event)}</td></tr>`).join("") || `<tr><td colspan="7">No sessions in this period.</td></tr>`}</tbody></table>`;
}

function barChart(buckets) {
  const w = 900, h = 180, pad = 24;
  const max = Math.max(1, ...buckets.map((b) => b.events));
  const bw = (w - 2 * pad) / Math.max(1, buckets.length);
  const bars = buckets.map((b, i) => {
    const x = pad + i * bw, bh = ((h - 2 * pad) * b.events) / max, oh = ((h - 2 * pad) * b.outside_windows) / max;
    return `<g><title>${esc(b.start)}: ${b.events} sessions, ${b.outside_windows} outside windows, ${b.unique_users} users</title>
      <rect class="bar" x="${x + 1}" y="${h - pad - bh}" width="${Math.max(1, bw - 2)}" height="${bh}"></rect>
      <rect class="out" x="${x + 1}" y="${h - pad - oh}" width="${Math.max(1, bw - 2)}" height="${oh}"></rect>
      ${buckets.length <= 31 ? `<text x="${x + 2}" y="${h - 8}">${esc(b.start.slice(5, 10))}</text>` : ""}</g>`;
  }).join("");
  return `<svg class="chart" id="chart" viewBox="0 0 ${w} ${h}" width="100%" role="img" aria-label="sessions per period">
    <text x="${pad}" y="14">max ${max} · blue: sessions · red: outside maintenance windows</text>${bars}</svg>`;
}

async function auditExport(f) {
  const out = document.getElementById("export");
  try {
    const b = await api(`/api/v1/audit-export?${new URLSearchParams(f)}`);
    const link = (name, text, type) => {
      const url = URL.createObjectURL(new Blob([text], { type }));
      return `<a href="${url}" download="${esc(name)}">${esc(name)}</a>`;
    };
    out.innerHTML = `<p class="notice" id="export-done">${b.manifest.rows} sessions, sha256 ${esc(b.manifest.sha256.slice(0, 16))}…, signed with key ${esc(b.signature.key_id)}.
      Download: ${link(b.file_name, b.content, "text/plain")} · ${link("manifest.json", b.manifest_text, "application/json")} · ${link("manifest.json.sig", JSON.stringify(b.signature, null, 2), "application/json")}.
      Check with <code>breakglass audit-export verify DIR</code>.</p>`;
  } catch (e) {
    out.innerHTML = `<div class="error" role="alert">${esc(e.message)}</div>`;
  }
}

// ------------------------------------------------------------------ router

async function route() {
  if (location.pathname === "/login") return login();
  const { path, q } = params();
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", path.startsWith(a.getAttribute("href").slice(1)));
  try {
    if (!me) {
      me = await api("/api/v1/status");
      document.getElementById("me").textContent = `${me.person} (${me.roles.join(", ") || "requester"})`;
    }
    if (path.startsWith("/session/")) return await sessionPage(decodeURIComponent(path.slice(9)), q);
    if (path === "/search") return await searchPage(q);
    if (path === "/requests") return await requestsPage();
    if (path === "/reviews") return await reviewsPage();
    if (path === "/reports") return await reportsPage(q);
    return await sessionsPage(q);
  } catch (e) {
    showError(e);
  }
}

async function logout() {
  await api("/api/v1/logout", { method: "POST" }).catch(() => {});
  me = null;
  location.replace("/login");
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("logout").onclick = logout;
});
window.addEventListener("DOMContentLoaded", route);
