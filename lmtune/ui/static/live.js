// lmtune ui: live charts of a training job. Rows (per-step train loss, per-evaluation dev metrics) arrive as
// server-sent events from /api/jobs/ID/metrics and are drawn with uPlot (static/vendor, MIT): offline, no build.
"use strict";

const LIVE_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];

// One chart: a shared x (step) array and one y array per series, null where a series has no value at a step
// (train loss comes every step, dev metrics at each evaluation). uPlot draws nulls as gaps, spanGaps joins them.
class LiveChart {
  constructor(box, title, wanted) {
    Object.assign(this, { box, title, wanted, names: [], xs: [], ys: {}, u: null, rebuild: false, pending: false });
  }

  add(row) {
    const keys = Object.keys(row).filter(k => this.wanted(k) && typeof row[k] === "number" && Number.isFinite(row[k]));
    if (!keys.length || typeof row.step !== "number") return false;
    let i = this.xs.lastIndexOf(row.step);
    if (i < 0) {  // rows come in step order; an evaluation's row repeats the last step
      i = this.xs.length;
      while (i > 0 && this.xs[i - 1] > row.step) i--;
      this.xs.splice(i, 0, row.step);
      Object.values(this.ys).forEach(a => a.splice(i, 0, null));
    }
    keys.forEach(k => {
      if (!this.ys[k]) { this.ys[k] = this.xs.map(() => null); this.names.push(k); this.rebuild = true; }
      this.ys[k][i] = row[k];
    });
    if (!this.pending) {  // redraw at most ~8 times a second, however fast rows arrive
      this.pending = true;
      setTimeout(() => { this.pending = false; this.draw(); }, 120);
    }
    return true;
  }

  // How many values series `name` has drawn (what the browser tests read).
  points(name) {
    const idx = this.names.indexOf(name);
    return this.u && idx >= 0 ? this.u.data[idx + 1].filter(v => v !== null && v !== undefined).length : 0;
  }

  draw() {
    const data = [this.xs.slice(), ...this.names.map(n => this.ys[n].slice())];
    if (this.u && !this.rebuild) { this.u.setData(data); return; }
    if (this.u) this.u.destroy();
    this.rebuild = false;
    this.box.textContent = "";
    const opts = {
      title: this.title, width: Math.max(this.box.clientWidth || 0, 420), height: 240,
      scales: { x: { time: false } },
      series: [{ label: "step" }, ...this.names.map((n, j) => ({
        label: n, stroke: LIVE_COLORS[j % LIVE_COLORS.length], width: 1.5, spanGaps: true,
        points: { show: true, size: 4 }, value: (u, v) => (v === null || v === undefined ? "–" : v.toPrecision(4)),
      }))],
      axes: [{ label: "step" }, {}],
    };
    this.u = new uPlot(opts, data, this.box);
  }
}

// The loss chart (train and dev loss) and the dev metrics chart, as the run page draws them once finished.
function liveCharts(lossBox, metricsBox) {
  const charts = {
    loss: new LiveChart(lossBox, "loss", k => k === "train_loss" || k === "dev_loss"),
    metrics: new LiveChart(metricsBox, "dev metrics", k => k.startsWith("dev_") && k !== "dev_loss" && !k.startsWith("dev_ece")),
    rows: 0,
    add(row) { this.rows += 1; this.loss.add(row); this.metrics.add(row); },
  };
  window.lmtuneLive = charts;  // for people and tests: lmtuneLive.loss.points("train_loss")
  return charts;
}

// Follow a metrics stream (/api/jobs/ID/metrics or /api/run/NAME/metrics) into `charts`; onDone(final state)
// when it ends. EventSource reconnects by itself after a network error, sending the last event id: nothing is
// drawn twice.
function followMetrics(url, charts, onDone) {
  const source = new EventSource(url);
  source.onmessage = e => charts.add(JSON.parse(e.data));
  source.addEventListener("done", e => { source.close(); if (onDone) onDone(JSON.parse(e.data)); });
  return source;
}

// The run page of a run still training: its charts so far, then live until it ends.
const runLive = document.getElementById("run-live");
if (runLive) {
  const charts = liveCharts(document.getElementById("live-loss"), document.getElementById("live-metrics"));
  followMetrics(`/api/run/${encodeURIComponent(runLive.dataset.run)}/metrics`, charts, s => {
    document.getElementById("run-live-status").textContent = `${s.status}: reload the page for its results`;
  });
}
