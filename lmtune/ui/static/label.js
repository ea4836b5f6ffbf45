// lmtune ui, labeling page: accept a suggestion or type a correction per row (saved at once through the guarded
// POST API), then retrain with the saved labels as a job, and ask a run for its next batch (a job; the page reloads
// with the batch when it is written). Plain JavaScript shipped with the package.
"use strict";

// an error's detail: FastAPI's is a string, or a list of {loc, msg} for a request that fails validation
const detail = data => Array.isArray(data.detail) ? data.detail.map(e => `${e.loc.slice(1).join(".")}: ${e.msg}`).join("; ")
                                                  : String(data.detail);
const post = (url, body) => fetch(url, {method: "POST", headers: {"Content-Type": "application/json", "X-Lmtune-UI": "1"},
                                        body: JSON.stringify(body)}).then(async r => ({ok: r.ok, data: await r.json()}));

(() => {
  const next = document.getElementById("label-next");
  if (!next) return;
  const status = document.getElementById("next-status");
  const follow = async id => {  // the job's state until it ends: a finished one wrote the batch, so reload to show it
    const r = await fetch(`/api/jobs/${id}`).then(x => x.json());
    if (r.status === "running") { setTimeout(() => follow(id), 1000); return; }
    if (r.status === "finished") location.reload();
    else { status.textContent = `the job ${r.status}; its output is on the jobs page`; button.disabled = false; }
  };
  const button = document.getElementById("next-batch");
  button.addEventListener("click", async () => {
    button.disabled = true;  // one ask at a time (the server refuses a second job on the run with 409 too)
    const r = await post(`/api/run/${next.dataset.run}/label/next`, {
      pool: document.getElementById("next-pool").value, size: parseInt(document.getElementById("next-size").value, 10) || 0,
      strategy: document.getElementById("next-strategy").value});
    status.textContent = r.ok ? `asking: job ${r.data.id} (${r.data.status})` : detail(r.data);
    if (r.ok) follow(r.data.id); else button.disabled = false;
  });
})();

(() => {
  const section = document.getElementById("label-batch");
  if (!section) return;
  const run = section.dataset.run, batch = parseInt(section.dataset.batch, 10);
  const status = document.getElementById("label-status"), saved = document.getElementById("label-saved");
  const save = async (row, value) => {
    const labels = value.split(",").map(s => s.trim()).filter(Boolean);
    const r = await post(`/api/run/${run}/label`, {batch, labels: {[row.dataset.rank]: labels}});
    status.textContent = r.ok ? `row ${row.dataset.rank} saved` : detail(r.data);
    if (r.ok) saved.textContent = r.data.saved;
  };
  section.querySelectorAll("#label-rows tbody tr").forEach(row => {
    const input = row.querySelector(".label-value");
    row.querySelector(".accept").addEventListener("click", () => { input.value = row.dataset.suggestion; save(row, input.value); });
    row.querySelector(".save").addEventListener("click", () => save(row, input.value));
  });
  document.getElementById("retrain").addEventListener("click", async () => {
    const r = await post(`/api/run/${run}/label/retrain`, {batch});
    status.textContent = r.ok ? `retraining: job ${r.data.id} (${r.data.status}); the new run appears on the runs page` : detail(r.data);
  });
})();
