// lmtune ui, compare page: a click on a chart's legend entry hides or shows that run's curve, so two
// overlaid runs can be read one at a time. Plain JavaScript shipped with the package: no CDN, no build step.
"use strict";

document.querySelectorAll("svg.chart").forEach(svg => {
  svg.querySelectorAll("text.legend[data-name]").forEach(entry => {
    entry.setAttribute("role", "button");
    entry.setAttribute("tabindex", "0");
    const toggle = () => {
      const hidden = !entry.classList.contains("off");
      entry.classList.toggle("off", hidden);
      svg.querySelectorAll("g.series-group").forEach(g => {
        if (g.dataset.name === entry.dataset.name) g.style.display = hidden ? "none" : "";
      });
    };
    entry.addEventListener("click", toggle);
    entry.addEventListener("keydown", e => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); toggle(); } });
  });
});
