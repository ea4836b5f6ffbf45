// lmtune ui: the training form and its YAML view, starting and following a job (log, progress, live charts),
// and the run page's export / push jobs. Uses call() and el() from ui.js, liveCharts() from live.js.
"use strict";

// ---- the form <-> YAML ----
// The YAML text is what a job runs. A form change is merged into it by the server (/api/form/yaml); a YAML edit
// is read back into the form (/api/form/values) only when the server finds it a valid config.
const trainForm = document.getElementById("train-form");
if (trainForm) {
  const yamlBox = document.getElementById("config"), yamlStatus = document.getElementById("yaml-status");
  const start = document.getElementById("start"), stop = document.getElementById("stop");
  const status = document.getElementById("job-status"), log = document.getElementById("log");
  const bar = document.getElementById("progress");
  const controls = Array.from(trainForm.querySelectorAll("[data-key]"));
  const byKey = Object.fromEntries(controls.map(c => [c.dataset.key, c]));
  let queue = Promise.resolve();  // form -> YAML merges run one after another, in the order they were made
  let job = null;

  const readControl = c => {
    if (c.type === "checkbox") return c.checked;
    if (c.type === "number") return c.value === "" ? null : Number(c.value);
    return c.value.trim() === "" ? null : c.value.trim();
  };
  const ensureOption = (select, value) => {
    if (![...select.options].some(o => o.value === value)) select.appendChild(el("option", { value }, value));
  };
  const writeControl = (c, v) => {  // no change event: setting a control from the YAML does not echo back
    if (c.type === "checkbox") { c.checked = Boolean(v); return; }
    const text = v === null || v === undefined ? "" : String(v);
    if (c.tagName === "SELECT" && text) ensureOption(c, text);
    c.value = text;
  };
  const refreshStart = () => { start.disabled = Boolean(job) || !yamlBox.value.trim(); };

  const mergeIntoYaml = values => {
    queue = queue.then(async () => {
      try {
        yamlBox.value = (await call("POST", "/api/form/yaml", { config: yamlBox.value, values })).config;
        yamlStatus.textContent = ""; yamlStatus.className = "muted";
      } catch (err) { yamlStatus.textContent = err.message; yamlStatus.className = "error"; }
      refreshStart();
    });
    return queue;
  };

  const readYaml = async () => {
    try {
      const { values } = await call("POST", "/api/form/values", { config: yamlBox.value });
      Object.entries(values).forEach(([k, v]) => byKey[k] && writeControl(byKey[k], v));
      yamlStatus.textContent = "valid config; the form shows it"; yamlStatus.className = "muted";
    } catch (err) { yamlStatus.textContent = "not applied to the form: " + err.message; yamlStatus.className = "error"; }
    refreshStart();
  };
  let yamlTimer = null;
  yamlBox.addEventListener("input", () => { clearTimeout(yamlTimer); yamlTimer = setTimeout(readYaml, 400); refreshStart(); });

  // the train file's columns fill the column pickers; lmtune init's guess of task and columns is applied
  const fillColumns = async path => {
    let info;
    try { info = await call("POST", "/api/columns", { path }); }
    catch (err) { status.textContent = err.message; return {}; }
    trainForm.querySelectorAll("select.column").forEach(sel => {
      const keep = sel.value;
      sel.querySelectorAll("option:not([value=''])").forEach(o => o.remove());
      info.columns.forEach(col => sel.appendChild(el("option", { value: col }, col)));
      if (keep) ensureOption(sel, keep);
      sel.value = keep;
    });
    const guessed = {};
    Object.entries(info.guess || {}).forEach(([k, v]) => { if (byKey[k]) { writeControl(byKey[k], v); guessed[k] = v; } });
    document.getElementById("data-path").textContent = info.columns.length ? `columns: ${info.columns.join(", ")}` : "";
    return guessed;
  };

  const useTrainFile = async path => {
    writeControl(byKey["data.train"], path);
    const guessed = await fillColumns(path);
    await mergeIntoYaml({ "data.train": path, ...guessed });
  };

  controls.forEach(c => c.addEventListener("change", async () => {
    if (c.dataset.key === "data.train" && c.value) { await useTrainFile(c.value); return; }
    if (c.type === "number" && c.value !== "" && !c.checkValidity()) {
      yamlStatus.textContent = `${c.dataset.key}: ${c.validationMessage}`; yamlStatus.className = "error"; return;
    }
    await mergeIntoYaml({ [c.dataset.key]: readControl(c) });
  }));

  const files = trainForm.querySelectorAll("select.data-file");
  call("GET", "/api/files").then(list => list.forEach(f => files.forEach(s => ensureOption(s, f))));
  document.getElementById("upload").addEventListener("change", async e => {
    const f = e.target.files[0];
    if (!f) return;
    try {
      const up = await call("POST", "/api/upload?name=" + encodeURIComponent(f.name), f, true);
      files.forEach(s => ensureOption(s, up.path));
      await useTrainFile(up.path);
    } catch (err) { status.textContent = err.message; }
  });
  readYaml();  // the defaults into the form

  // ---- a job: its log and progress (/events) and its live charts (/metrics) ----
  start.addEventListener("click", async () => {
    await queue;  // a merge still on its way belongs in the config that starts
    try { job = await call("POST", "/api/jobs", { config: yamlBox.value }); }
    catch (err) { status.textContent = err.message; return; }
    start.disabled = true; stop.disabled = false; log.textContent = ""; status.textContent = "running";
    const charts = liveCharts(document.getElementById("live-loss"), document.getElementById("live-metrics"));
    followMetrics(`/api/jobs/${encodeURIComponent(job.id)}/metrics`, charts);
    const events = new EventSource(`/api/jobs/${job.id}/events`);
    events.onmessage = e => {
      const line = JSON.parse(e.data).line;
      log.textContent += line + "\n"; log.scrollTop = log.scrollHeight;
      const m = /^train (\d+)\/(\d+)/.exec(line);
      if (m) { bar.max = +m[2]; bar.value = +m[1]; }
    };
    events.addEventListener("done", e => {
      events.close();
      const s = JSON.parse(e.data);
      job = null; stop.disabled = true; refreshStart();
      if (s.status === "finished") bar.value = bar.max;
      status.textContent = s.status;
      if (s.run) { status.appendChild(document.createTextNode(" · ")); status.appendChild(el("a", { href: "/run/" + s.run, id: "job-run" }, s.run)); }
    });
  });
  stop.addEventListener("click", async () => { if (job) status.textContent = (await call("POST", `/api/jobs/${job.id}/stop`)).status; });
}

// ---- the run page: export (ONNX) and push as jobs ----
const runActions = document.getElementById("run-actions");
if (runActions) {
  const run = runActions.dataset.run;
  const out = document.getElementById("action-status"), actionLog = document.getElementById("action-log");
  const buttons = runActions.querySelectorAll("button");
  const follow = job => {
    buttons.forEach(b => { b.disabled = true; });
    out.textContent = `${job.kind}: running`; actionLog.textContent = "";
    const events = new EventSource(`/api/jobs/${job.id}/events`);
    events.onmessage = e => { actionLog.textContent += JSON.parse(e.data).line + "\n"; actionLog.scrollTop = actionLog.scrollHeight; };
    events.addEventListener("done", e => {
      events.close();
      const s = JSON.parse(e.data);
      out.textContent = `${s.kind}: ${s.status}`;
      buttons.forEach(b => { b.disabled = false; });
    });
  };
  const startAction = async (url, body) => {
    try { follow(await call("POST", url, body)); }
    catch (err) { out.textContent = err.message; }
  };
  document.getElementById("export-onnx").addEventListener("click", () => startAction(`/api/run/${encodeURIComponent(run)}/export`));
  // `lmtune push RUN --to DIR`: the Hub layout into a local folder
  document.getElementById("push-run").addEventListener("click", () =>
    startAction(`/api/run/${encodeURIComponent(run)}/push`, { to: document.getElementById("push-to").value }));
}
