// Small SVG charts (no library): line charts with axes, a forecast fan chart, parallel coordinates and bars.
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

// the position of v on an axis, 0 (bottom) .. 1 (top): numeric axes linear or log, categorical ones evenly spaced
function axisPosition(axis, v) {
  if (v === null || v === undefined) return null;
  if (axis.type === "categorical") {
    const i = axis.choices.findIndex(c => String(c) === String(v));
    if (i < 0) return null;
    return axis.choices.length === 1 ? 0.5 : i / (axis.choices.length - 1);
  }
  if (typeof v !== "number" || !isFinite(v)) return null;
  const f = axis.log ? Math.log10 : x => x;
  const lo = f(axis.low), hi = f(axis.high);
  return hi === lo ? 0.5 : Math.min(1, Math.max(0, (f(v) - lo) / (hi - lo)));
}

// tick values of an axis: a categorical axis its choices; an int axis its integers when few; otherwise five
// values evenly spaced (in log space on a log axis)
function axisTicks(axis) {
  if (axis.type === "categorical") return axis.choices;
  const {low, high} = axis;
  if (high === low) return [low];
  if (axis.type === "int" && high - low <= 8) return Array.from({length: high - low + 1}, (_, i) => low + i);
  return [0, 1, 2, 3, 4].map(i => axis.log ? 10 ** (Math.log10(low) + (Math.log10(high) - Math.log10(low)) * i / 4)
    : low + (high - low) * i / 4);
}

function tickLabel(v) {
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 0.01 || a >= 1e4) ? v.toExponential(1) : niceNum(v);
}

// low (good) .. high (bad) as dark blue .. teal .. amber; t in 0..1
const RAMP = [[31, 78, 140], [42, 150, 140], [224, 170, 0]];
function rampColor(t) {
  const x = Math.min(1, Math.max(0, t)) * (RAMP.length - 1), i = Math.min(RAMP.length - 2, Math.floor(x)), f = x - i;
  const c = RAMP[i].map((a, k) => Math.round(a + (RAMP[i + 1][k] - a) * f));
  return `rgb(${c.join(",")})`;
}

// A parallel-coordinates plot: one vertical axis per parameter and one for the objective; one polyline per trial.
// axes: [{name, type: int | float | categorical, low, high, log, choices}] (the objective last, type float);
// lines: [{number, values: {axis name: value}, state, best, title}]. Complete trials are coloured by their
// objective (dark = lower = better), pruned and failed ones grey and under them, the best one thickest.
// opts: {width, height, title, legend: (low, high) => the colour bar's caption}
function parallelCoordinates(axes, lines, opts = {}) {
  const W = opts.width || Math.max(480, Math.min(1100, 170 * axes.length)), H = opts.height || 320;
  const L = 70, R = 70, T = 34, B = 46;
  const svg = svgEl("svg", {class: "chart parallel", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img",
                            "aria-label": opts.title || "parallel coordinates"});
  const X = i => axes.length === 1 ? W / 2 : L + i * (W - L - R) / (axes.length - 1);
  const Y = p => T + (1 - p) * (H - T - B);
  const objective = axes[axes.length - 1];
  // colours span the complete trials' values (a pruned trial's last value may lie outside them)
  const done = lines.filter(l => l.state === "complete").map(l => l.values[objective.name]).filter(v => isFinite(v));
  const lo = Math.min(...done), hi = Math.max(...done);
  const colorOf = line => line.state !== "complete" ? "#a8a8a8"
    : rampColor(hi > lo ? (line.values[objective.name] - lo) / (hi - lo) : 0);
  const order = {fail: 0, pruned: 1, running: 1, waiting: 1, complete: 2};
  const drawn = [...lines].sort((a, b) => (order[a.state] ?? 1) - (order[b.state] ?? 1) || (a.best - b.best));
  for (const line of drawn) {
    const points = axes.map((axis, i) => [X(i), axisPosition(axis, line.values[axis.name])])
      .filter(([, p]) => p !== null).map(([x, p]) => `${x.toFixed(1)},${Y(p).toFixed(1)}`);
    if (points.length < 2) continue;
    const grey = line.state !== "complete";
    const el = svgEl("polyline", {points: points.join(" "), fill: "none", stroke: colorOf(line),
                                  "stroke-width": line.best ? 3.5 : 1.8, "stroke-opacity": grey ? 0.75 : 0.9,
                                  "stroke-dasharray": line.state === "fail" ? "5 4" : "",
                                  class: `trial ${line.state}${line.best ? " best" : ""}`, "data-trial": line.number}, svg);
    svgEl("title", {}, el).textContent = line.title || `#${line.number}`;
  }
  axes.forEach((axis, i) => {
    const x = X(i);
    svgEl("line", {x1: x, y1: Y(0), x2: x, y2: Y(1), stroke: "#555", class: "axis"}, svg);
    const label = svgEl("text", {x, y: T - 14, "text-anchor": "middle", class: "axis-name"}, svg);
    label.textContent = axis.name + (axis.log ? " (log)" : "");
    for (const v of axisTicks(axis)) {
      const y = Y(axisPosition(axis, v));
      svgEl("line", {x1: x - 4, y1: y, x2: x, y2: y, stroke: "#555"}, svg);
      svgEl("text", {x: x - 6, y: y + 4, "text-anchor": "end"}, svg).textContent = tickLabel(v);
    }
  });
  if (opts.legend && done.length) {  // a colour bar under the objective's axis, low to high: opts.legend(low, high)
    const id = `ramp${Math.random().toString(36).slice(2, 8)}`, x0 = W - R - 150, y0 = H - 20;
    const gradient = svgEl("linearGradient", {id}, svgEl("defs", {}, svg));
    RAMP.forEach((_, k) => svgEl("stop", {offset: `${100 * k / (RAMP.length - 1)}%`,
                                          "stop-color": rampColor(k / (RAMP.length - 1))}, gradient));
    svgEl("rect", {x: x0, y: y0, width: 150, height: 8, fill: `url(#${id})`}, svg);
    svgEl("text", {x: x0 - 6, y: y0 + 8, "text-anchor": "end"}, svg).textContent = opts.legend(lo, hi);
  }
  return svg;
}

// items: [{label, value}] with values in 0..1 (shares), drawn as horizontal bars, the largest first as given
function barChart(items, opts = {}) {
  const W = opts.width || 480, row = 24, L = opts.labelWidth || 130, R = 56, T = 6;
  const H = T * 2 + row * items.length;
  const svg = svgEl("svg", {class: "chart bars", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img",
                            "aria-label": opts.title || "bar chart"});
  const top = Math.max(...items.map(it => it.value), 1e-12);
  items.forEach((it, i) => {
    const y = T + i * row, w = (W - L - R) * Math.max(0, it.value) / top;
    svgEl("text", {x: L - 8, y: y + row / 2 + 4, "text-anchor": "end"}, svg).textContent = it.label;
    const bar = svgEl("rect", {x: L, y: y + 4, width: Math.max(1, w).toFixed(1), height: row - 8, fill: "#1f4e8c",
                               class: "bar", "data-label": it.label}, svg);
    svgEl("title", {}, bar).textContent = `${it.label}: ${(100 * it.value).toFixed(1)}%`;
    svgEl("text", {x: L + w + 6, y: y + row / 2 + 4}, svg).textContent = `${(100 * it.value).toFixed(1)}%`;
  });
  return svg;
}
