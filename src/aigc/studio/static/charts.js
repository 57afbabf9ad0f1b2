// Small SVG charts (no library): line charts with axes, and a forecast fan chart.
"use strict";
const PALETTE = ["#1f4e8c", "#c0392b", "#1b6b2a", "#8e44ad", "#b9770e", "#2c3e50"];

function svgEl(tag, attrs, parent) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

function niceNum(v) {
  if (!isFinite(v)) return "";
  const a = Math.abs(v);
  return a >= 1000 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : a >= 1 ? v.toFixed(2) : v.toPrecision(2);
}

// series: [{name, points: [[x, y], ...], color, dash}], opts: {width, height, xlabel, ylabel, title}
function lineChart(series, opts = {}) {
  const W = opts.width || 420, H = opts.height || 220, L = 52, R = 10, T = 12, B = 34;
  const svg = svgEl("svg", {class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img",
                            "aria-label": opts.title || opts.ylabel || "chart"});
  const pts = series.flatMap(s => s.points).filter(p => isFinite(p[0]) && isFinite(p[1]));
  if (!pts.length) { svgEl("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, svg).textContent = "—"; return svg; }
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 1; y1 += 1; }
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R), Y = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svgEl("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#888"}, svg);
  svgEl("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#888"}, svg);
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + (y1 - y0) * i / 4, xv = x0 + (x1 - x0) * i / 4;
    svgEl("text", {x: L - 4, y: Y(yv) + 4, "text-anchor": "end"}, svg).textContent = niceNum(yv);
    svgEl("text", {x: X(xv), y: H - B + 14, "text-anchor": "middle"}, svg).textContent = niceNum(xv);
  }
  if (opts.xlabel) svgEl("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle"}, svg).textContent = opts.xlabel;
  if (opts.ylabel) svgEl("text", {x: 4, y: T + 8}, svg).textContent = opts.ylabel;
  if (opts.band) {  // {upper: [[x, y]], lower: [[x, y]], color}
    for (const band of [].concat(opts.band)) {
      const d = band.upper.map((p, i) => `${i ? "L" : "M"}${X(p[0])},${Y(p[1])}`).join("") +
        band.lower.slice().reverse().map(p => `L${X(p[0])},${Y(p[1])}`).join("") + "Z";
      svgEl("path", {d, fill: band.color || "#1f4e8c", "fill-opacity": band.opacity || 0.18, stroke: "none"}, svg);
    }
  }
  series.forEach((s, i) => {
    const good = s.points.filter(p => isFinite(p[0]) && isFinite(p[1]));
    if (!good.length) return;
    const d = good.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    svgEl("path", {d, fill: "none", stroke: s.color || PALETTE[i % PALETTE.length], "stroke-width": s.width || 1.6,
                   "stroke-dasharray": s.dash || "", "stroke-opacity": s.opacity || 1}, svg);
  });
  return svg;
}

// a forecast as the API returns it: {time, forecast, lower, upper, level, paths?, history?: {time, values}}
function fanChart(forecast, opts = {}) {
  const hist = forecast.history || {values: []};
  const n0 = hist.values.length, h = forecast.forecast.length;
  const at = i => n0 + i;
  const series = [];
  if (n0) series.push({name: "history", points: hist.values.map((v, i) => [i, v]), color: "#222"});
  for (const path of (forecast.paths || []).slice(0, 50))
    series.push({name: "path", points: path.map((v, i) => [at(i), v]), color: "#b9770e", width: 0.8, opacity: 0.45});
  series.push({name: "forecast", points: forecast.forecast.map((v, i) => [at(i), v]), color: "#1f4e8c", width: 2});
  const band = {upper: forecast.upper.map((v, i) => [at(i), v]), lower: forecast.lower.map((v, i) => [at(i), v])};
  return lineChart(series, {...opts, band, xlabel: opts.xlabel || `t (${h} ahead)`});
}
