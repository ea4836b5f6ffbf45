// lmtune ui, error analysis: filter the examples by gold and predicted label (NER: entity type), by
// confidence, and errors only or all. The filters live in the address (?gold=&pred=&conf=&show=), so a
// filtered view can be bookmarked or shared. Plain JavaScript shipped with the package: no CDN, no build step.
"use strict";

(() => {
  const form = document.getElementById("error-filters");
  if (!form) return;
  const show = document.getElementById("filter-show"), gold = document.getElementById("filter-gold");
  const pred = document.getElementById("filter-pred"), conf = document.getElementById("filter-conf");
  const confValue = document.getElementById("filter-conf-value"), count = document.getElementById("error-count");
  const empty = document.getElementById("errors-empty");
  const rows = Array.from(document.querySelectorAll("#errors tbody tr"));
  // a row's data-gold / data-pred hold one label, or (NER) the sentence's entity types separated by spaces
  const has = (value, wanted) => !wanted || value.split(" ").includes(wanted);

  const apply = () => {
    const max = parseFloat(conf.value);
    confValue.textContent = max.toFixed(3);
    let shown = 0;
    rows.forEach(r => {
      const ok = (show.value === "all" || r.dataset.wrong === "1") && has(r.dataset.gold, gold.value)
        && has(r.dataset.pred, pred.value) && parseFloat(r.dataset.conf) <= max + 1e-9;
      r.hidden = !ok;
      shown += ok;
    });
    count.textContent = `${shown} of ${rows.length} shown`;
    count.dataset.shown = String(shown);
    empty.hidden = shown > 0;
    const q = new URLSearchParams(location.search);
    [["show", show.value, "errors"], ["gold", gold.value, ""], ["pred", pred.value, ""], ["conf", conf.value, "1"]]
      .forEach(([k, v, dflt]) => (v === dflt ? q.delete(k) : q.set(k, v)));
    history.replaceState(null, "", location.pathname + (q.toString() ? "?" + q : ""));
  };

  const q = new URLSearchParams(location.search);
  const pick = (select, v) => { if (v !== null && Array.from(select.options).some(o => o.value === v)) select.value = v; };
  pick(show, q.get("show")); pick(gold, q.get("gold")); pick(pred, q.get("pred"));
  if (q.get("conf") !== null && !isNaN(parseFloat(q.get("conf")))) conf.value = q.get("conf");
  [show, gold, pred].forEach(s => s.addEventListener("change", apply));
  conf.addEventListener("input", apply);
  form.addEventListener("submit", e => e.preventDefault());
  apply();
})();
