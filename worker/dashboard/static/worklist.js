// Worklist: probability bars (set here, not inline: the page's CSP allows no inline styles)
// and whole-row links.
"use strict";
document.querySelectorAll(".bar > span[data-p]").forEach((el) => {
  el.style.width = (100 * Math.max(0, Math.min(1, parseFloat(el.dataset.p)))).toFixed(1) + "%";
});
document.querySelectorAll("tr[data-href]").forEach((row) => {
  row.addEventListener("click", (ev) => {
    if (ev.target.closest("a")) return;
    window.location.assign(row.dataset.href);
  });
});
