// lmtune ui: sorting and filtering tables, Try it, cleaned data copies (training: train.js, live.js).
// Plain JavaScript shipped with the package: no CDN, no build step.
"use strict";

const HEADERS = { "Content-Type": "application/json", "X-Lmtune-UI": "1" };

async function call(method, url, body, raw) {
  const opts = { method, headers: raw ? { "X-Lmtune-UI": "1" } : HEADERS };
  if (body !== undefined) opts.body = raw ? body : JSON.stringify(body);
  const r = await fetch(url, opts);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.detail || r.statusText);
  return data;
}

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => e.setAttribute(k, v));
  if (text !== undefined) e.textContent = text;
  return e;
}

// ---- sortable tables ----
function sortBy(table, th) {
  const idx = Array.from(th.parentNode.children).indexOf(th);
  const asc = !th.classList.contains("sorted-asc");
  table.querySelectorAll("th").forEach(h => h.classList.remove("sorted-asc", "sorted-desc"));
  th.classList.add(asc ? "sorted-asc" : "sorted-desc");
  const num = th.hasAttribute("data-num");
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const key = r => { const c = r.cells[idx]; const v = c ? (c.dataset.value ?? c.textContent.trim()) : "";
                     return num ? (parseFloat(v) || 0) : v.toLowerCase(); };
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1));
  rows.forEach(r => body.appendChild(r));
}
document.querySelectorAll("table.sortable").forEach(t =>
  t.querySelectorAll("th[data-key], th[data-num]").forEach(th => th.addEventListener("click", () => sortBy(t, th))));

// ---- runs page ----
const filter = document.getElementById("filter");
if (filter) {
  const apply = () => {
    const q = filter.value.toLowerCase();
    document.querySelectorAll("#runs tbody tr").forEach(r => { r.hidden = q && !r.textContent.toLowerCase().includes(q); });
  };
  filter.addEventListener("input", apply);
  const compare = document.getElementById("compare-selected");
  const picked = () => Array.from(document.querySelectorAll("input.pick:checked")).map(c => c.value);
  document.addEventListener("change", e => { if (e.target.classList.contains("pick")) compare.disabled = picked().length < 2; });
  compare.addEventListener("click", () => { location.href = "/compare?" + picked().map(n => "run=" + encodeURIComponent(n)).join("&"); });
  // while a run is in progress, refresh the table (status, metrics) every few seconds
  const table = document.getElementById("runs");
  if (table.dataset.refresh === "1") {
    setInterval(async () => {
      const runs = await call("GET", "/api/runs");
      const busy = runs.some(r => r.status === "running");
      const known = new Set(Array.from(table.tBodies[0].rows).map(r => r.dataset.run));
      if (runs.some(r => !known.has(r.run)) || !busy) location.reload();
      runs.forEach(r => { const row = table.querySelector(`tr[data-run="${CSS.escape(r.run)}"]`);
                          if (row) row.cells[6].textContent = r.status; });
    }, 4000);
  }
}

// ---- Try it ----
const tryForm = document.getElementById("try-form");
if (tryForm) {
  tryForm.addEventListener("submit", async e => {
    e.preventDefault();
    const out = document.getElementById("try-result");
    out.textContent = "…";
    const pair = document.getElementById("try-pair");
    try {
      const row = await call("POST", `/api/run/${encodeURIComponent(tryForm.dataset.run)}/predict`,
                             { text: document.getElementById("try-text").value, pair: pair ? pair.value : null });
      out.textContent = "";
      const label = row.label ?? (row.labels ? row.labels.join(", ") : row.value ?? "");
      out.appendChild(el("div", { class: "label", id: "try-label" }, String(label) + (row.abstained ? " (abstained)" : "")));
      Object.entries(row.probabilities || {}).sort((a, b) => b[1] - a[1]).slice(0, 8).forEach(([k, p]) => {
        const line = el("div", { class: "prob" });
        line.appendChild(el("span", {}, `${k} ${p.toFixed(3)}`));
        line.appendChild(el("span", { class: "bar", style: `width:${Math.round(p * 200)}px` }));
        out.appendChild(line);
      });
      (row.entities || []).forEach(en => out.appendChild(el("div", {}, `${en.label ?? en.type}: ${en.text}`)));
      if (row.interval) out.appendChild(el("div", {}, `interval ${row.interval[0]} – ${row.interval[1]}`));
    } catch (err) { out.textContent = ""; out.appendChild(el("span", { class: "error" }, err.message)); }
  });
}

// ---- cleaned copies ----
const cleanForm = document.getElementById("clean-form");
if (cleanForm) {
  cleanForm.addEventListener("submit", async e => {
    e.preventDefault();
    const byFile = {};
    cleanForm.querySelectorAll("tr[data-line]").forEach(r => {
      const v = r.querySelector("select").value;
      if (!v) return;
      const [action, label] = v.split(":");
      (byFile[r.dataset.path] = byFile[r.dataset.path] || []).push({ line: r.dataset.line, action, label });
    });
    const out = document.getElementById("clean-result");
    try {
      const done = [];
      for (const [path, actions] of Object.entries(byFile)) {
        done.push(await call("POST", "/api/clean", { path, actions, label_column: cleanForm.dataset.labelColumn }));
      }
      out.textContent = done.map(d => `${d.cleaned}: ${d.rows_before} -> ${d.rows_after} rows`).join("; ") || "nothing marked";
    } catch (err) { out.textContent = err.message; }
  });
}
// training from the browser: train.js (the training page loads it)
