// AIGC Studio's pages: plain JavaScript over the /v1 API (docs/studio.md). Every action is an API call that
// any application can make too; the pages only ask, show and explain.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = {models: [], key: localStorage.getItem("aigc.key") || ""};
let uid = 0;

// ------------------------------------------------------------------ elements

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else if ((k === "src" || k === "href") && apiFile(v)) serverFile(el, k, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

function apiFile(url) {  // a URL of this server's API, relative or absolute
  try {
    const u = new URL(url, location.href);
    return u.origin === location.origin && u.pathname.startsWith("/v1/");
  } catch { return false; }
}

// An <img>, <audio> or link sends no header of ours: on a server with API keys, a file of its API comes through
// fetch with the key and is shown (played, downloaded) from a blob URL; without a key, the URL itself.
function serverFile(el, attr, url) {
  if (!state.key || !apiFile(url)) { el.setAttribute(attr, url); return; }
  fetch(url, {headers: headers(false)})
    .then(r => r.ok ? r.blob() : Promise.reject(new Error(`HTTP ${r.status}`)))
    .then(blob => el.setAttribute(attr, URL.createObjectURL(blob)))
    .catch(() => el.setAttribute(attr, url));
}

function field(labelKey, control, help) {  // a control with its label and a place for its error
  const id = control.id || (control.id = `f${++uid}`);
  const error = h("span", {class: "error", id: `${id}-error`, role: "alert"});
  control.setAttribute("aria-describedby", `${id}-error`);
  return h("div", {class: "field"}, h("label", {for: id, text: t(labelKey)}), control,
           help ? h("span", {class: "help", text: help}) : null, error);
}

function showError(control, message) {
  const box = document.getElementById(`${control.id}-error`);
  if (box) box.textContent = message || "";
}

function toast(message) {
  const box = $("#toast");
  box.textContent = message;
  box.style.display = "block";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.style.display = "none"; }, 3500);
}

function fmt(v) {
  if (typeof v !== "number") return v === null || v === undefined ? "—" : String(v);
  return Math.abs(v) >= 100 ? v.toFixed(1) : v.toFixed(3);
}

// ------------------------------------------------------------------ the API

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.param = err.param;
  }
}

function headers(json = true) {
  const out = {"X-AIGC-Source": "studio"};
  if (json) out["Content-Type"] = "application/json";
  if (state.key) out.Authorization = `Bearer ${state.key}`;
  return out;
}

async function api(path, options = {}) {
  const init = {method: options.method || (options.body !== undefined ? "POST" : "GET"),
                headers: headers(!options.raw), signal: options.signal};
  if (options.body !== undefined) init.body = options.raw ? options.body : JSON.stringify(options.body);
  if (options.raw && options.body) init.headers["Content-Type"] = "application/octet-stream";
  const response = await fetch(path, init);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401) toast(t("needkey"));
    throw new ApiError(response.status, body);
  }
  return body;
}

// a streamed completion: POST with fetch (EventSource cannot POST), read `data:` events as they come
async function stream(path, body, onText, signal) {
  const response = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify({...body, stream: true}),
                                      signal});
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "", id = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/^data: /, "");
      buffer = buffer.slice(cut + 2);
      if (line === "[DONE]") return id;
      const event = JSON.parse(line);
      if (event.error) throw new ApiError(500, event);
      id = event.generation_id || id;
      for (const choice of event.choices || []) onText(choice.text || (choice.delta && choice.delta.content) || "");
    }
  }
  return id;
}

async function models(force = false) {
  if (force || !state.models.length) state.models = (await api("/v1/models")).data;
  return state.models;
}

// ------------------------------------------------------------------ shared pieces

function rating(generationId, index) {  // thumbs up / down and a comment, for any stored result
  const comment = h("input", {type: "text", "aria-label": t("rate.comment"), placeholder: t("rate.comment")});
  const note = h("span", {class: "ok", role: "status"});
  const send = score => async () => {
    try {
      await api(`/v1/generations/${generationId}/ratings`,
                {body: {score, comment: comment.value || null, ...(index !== undefined ? {index} : {})}});
      note.textContent = t("rate.saved");
    } catch (e) { note.textContent = e.message; note.className = "error"; }
  };
  return h("div", {class: "rate", "data-generation": generationId},
           h("button", {type: "button", onclick: send(1), title: t("rate.up")}, `✓ ${t("rate.up")}`),
           h("button", {type: "button", onclick: send(-1), title: t("rate.down")}, `✗ ${t("rate.down")}`),
           comment, note);
}

function modelSelect(list, labelKey = "model") {
  const select = h("select", {}, list.map(m => h("option", {value: m.id, text: `${m.id} (${m.family}, ${m.modality})`})));
  return [select, field(labelKey, select)];
}

function curveChart(curves, opts = {}) {  // curves: [{name, curve: [{step, loss, val_loss}]}]
  const series = [];
  curves.forEach((c, i) => {
    const color = PALETTE[i % PALETTE.length];
    series.push({name: `${c.name} loss`, color, points: c.curve.filter(r => r.loss !== undefined).map(r => [r.step, r.loss])});
    series.push({name: `${c.name} val`, color, dash: "4 3",
                 points: c.curve.filter(r => r.val_loss !== undefined).map(r => [r.step, r.val_loss])});
  });
  const legend = h("div", {class: "legend"}, curves.map((c, i) => h("span", {},
    h("i", {style: `background:${PALETTE[i % PALETTE.length]}`}), c.name)), h("span", {text: t("curve.legend")}));
  return h("div", {}, lineChart(series, {xlabel: t("curve.step"), ylabel: t("curve.loss"), ...opts}), legend);
}

function imageGrid(urls, ids) {
  return h("div", {class: "grid"}, urls.map((url, i) => h("figure", {},
    h("img", {src: url, alt: t("image.alt", {i: i + 1})}), ids ? rating(ids[i]) : null)));
}

function musicPieces(pieces, generationId) {  // each piece: a player on its WAV, its piano roll (a sound: its
  // spectrogram), its MIDI file
  return h("div", {class: "pieces"}, pieces.map((p, i) => h("figure", {class: "piece", "data-piece": i},
    h("audio", {controls: true, preload: "metadata", src: p.wav, "aria-label": t(p.sound ? "sound.play" : "music.play", {i: i + 1})}),
    h("img", {class: "roll", src: p.roll, alt: t(p.sound ? "sound.spectrogram" : "music.roll", {i: i + 1})}),
    h("figcaption", {class: "meta"}, p.sound ? t("sound.about", {cls: p.cls ?? "-"}) : t("music.about", {bars: p.bars, notes: p.notes}),
      p.midi ? [" · ", h("a", {href: p.midi, download: `piece-${i + 1}.mid`, text: t("music.midi")})] : null),
    generationId ? rating(generationId, i) : null)));
}

function storedPieces(g) {  // a stored music generation's pieces (or sounds), from the files the server kept
  const file = name => `/v1/generations/${g.id}/files/${name}`;
  return (g.output || []).map((o, i) => {
    const stem = String(i).padStart(3, "0");
    if (g.modality === "sound") return {wav: file(`${stem}.wav`), roll: file(`${stem}.png`), sound: true, cls: o.class_name};
    return {wav: file(`${stem}.wav`), roll: file(`${stem}.png`), midi: file(`${stem}.mid`), bars: o.bars, notes: o.notes};
  });
}

function videoClips(v, generationId) {  // each clip: its GIF (the browser plays it, looping), its MP4 in a player
  // (H.264, which the browser decodes; controls to play, pause and step), its seed; the frame sheet
  return h("div", {class: "clips"},
    h("div", {class: "clip-row"}, v.clips.map((c, i) => h("figure", {class: "clip", "data-clip": i},
      h("img", {class: "gif", src: c.gif, alt: t("video.clip", {i: i + 1})}),
      c.mp4 ? h("video", {class: "mp4", src: c.mp4, controls: true, muted: true, playsinline: true, preload: "auto",
                          "aria-label": t("video.player", {i: i + 1})}) : null,
      h("figcaption", {class: "meta"}, c.seed !== undefined && c.seed !== null ? t("video.seed", {seed: c.seed}) : "",
        " · ", h("a", {href: c.gif, download: `clip-${i + 1}.gif`, text: t("video.gif")}),
        c.mp4 ? [" · ", h("a", {href: c.mp4, download: `clip-${i + 1}.mp4`, text: t("video.mp4")})] : null),
      generationId ? rating(generationId, i) : null))),
    v.sheet ? h("figure", {class: "sheet"}, h("img", {class: "sheet", src: v.sheet, alt: t("video.sheet")}),
                h("figcaption", {class: "meta", text: t(v.job === "predict" ? "video.sheetpredict" : "video.sheethelp")}))
      : null);
}

function storedClips(g) {  // a stored video generation's clips, from the files the server kept
  const file = name => `/v1/generations/${g.id}/files/${name}`;
  const stem = i => String(i).padStart(3, "0");
  return {clips: (g.output || []).map((o, i) => ({gif: file(`${stem(i)}.gif`), mp4: file(`${stem(i)}.mp4`), seed: o.seed})),
          sheet: file("sheet.png"), job: (g.output || []).some(o => o.context) ? "predict" : "generate"};
}

function madeSounds(made) {  // the sounds of an /v1/audio/generations answer for a sound run
  return made.data.map(d => ({wav: d.wav_url, roll: d.png_url, sound: true, cls: d.record.class_name}));
}

function headline(score) {
  return score ? `${score.metric} ${fmt(score.value)}` : t("models.noscore");
}

// ------------------------------------------------------------------ pages

const pages = {};

pages.models = async (main, params) => {
  main.append(h("h1", {text: t("nav.models")}));
  let list = await models(true);
  if (!list.length) { main.append(h("p", {text: t("models.none")})); return; }
  const only = params.get("model");  // one run's page: its card alone (a sweep's trial links here)
  if (only) {
    list = list.filter(m => m.id === only);
    main.append(h("p", {}, h("a", {href: "#/models", text: t("models.all")})));
    if (!list.length) { main.append(h("p", {class: "error", role: "alert", text: t("models.missing", {run: only})})); return; }
  }
  const cards = h("div", {class: only ? "cards single" : "cards"});
  main.append(cards);
  for (const m of list) {
    const body = h("div", {class: "preview", text: t("loading")});
    const card = h("article", {class: "card", "data-model": m.id},
      h("h2", {text: m.id}),
      h("div", {class: "meta", text: `${m.family} · ${m.modality} · ${m.data || ""} · ${m.status || ""}`}),
      h("p", {}, h("strong", {text: headline(m.headline)})), body);
    cards.append(card);
    if (m.family === "hf") { body.textContent = ""; continue; }
    api(`/v1/models/${m.id}/details`).then(d => {
      body.textContent = "";
      const made = d.lineage && lineage(d.lineage);
      if (made) body.append(made);
      if (d.lineage && d.lineage.optimized) body.append(beforeAfter(d.metrics));
      if (d.baseline) body.append(h("p", {class: "meta", text: d.baseline.run
        ? t("models.baseline", {run: d.baseline.run, value: fmt(d.baseline.val_bpc)}) : d.baseline.hint}));
      if (d.curve.length) body.append(curveChart([{name: m.id, curve: d.curve}], {width: 300, height: 150}));
      const links = h("p", {}, h("a", {href: `#/generate?model=${encodeURIComponent(m.id)}`, text: t("models.use")}));
      if (d.report) links.append(" · ", h("a", {href: `/v1/models/${m.id}/files/report.html`, target: "_blank",
                                                 text: t("models.report")}));
      const shown = h("div");
      body.append(links, shown);
      if (m.status === "done" && ["text", "image", "music", "series", "video", "sound"].includes(m.modality)) body.append(improvePanel(m.id, !!only));
      if (m.status === "done") return api(`/v1/models/${m.id}/preview`).then(p => shown.append(showOutputs(p)));
    }).catch(e => { body.append(h("p", {class: "error", text: e.message})); });
  }
};

// a translated sentence whose {placeholders} may be elements (links) as well as text
function tNodes(key, vars) {
  return t(key).split(/(\{\w+\})/).filter(Boolean).map(part => {
    const name = part.match(/^\{(\w+)\}$/);
    return name && name[1] in vars ? vars[name[1]] : part;
  });
}

function runLink(run, here, attrs = {}) {  // a link to a run's page where this server serves it, else its name
  return here ? h("a", {href: `#/models?model=${encodeURIComponent(run)}`, ...attrs, text: run})
    : h("span", {title: t("sweeps.elsewhere"), ...attrs, text: run});
}

function lineage(l) {  // where a run came from: optimized from a parent, continued from weights, a sweep's trial
  const box = h("div", {class: "lineage meta", "data-testid": "lineage"});
  if (l.optimized) {
    const o = l.optimized;
    box.append(h("p", {}, tNodes("lineage.made", {parent: runLink(o.parent, o.here, {class: "parent"}),
      method: h("strong", {text: o.method}), liked: o.liked ?? 0, disliked: o.disliked ?? 0, pairs: o.pairs ?? 0})));
  }
  if (l.continued) {
    const c = l.continued;
    const from = c.run ? runLink(c.run, c.here, {class: "parent"})
      : h("span", {title: c.path, text: c.path.split("/").filter(Boolean).pop() || c.path});
    box.append(h("p", {}, tNodes("lineage.continued", {from})));
  }
  if (l.sweep) {
    const s = l.sweep;
    box.append(h("p", {}, tNodes(s.best ? "lineage.trialbest" : "lineage.trial", {trial: s.trial,
      sweep: h("a", {href: `#/sweeps?name=${encodeURIComponent(s.study)}`, class: "sweep", text: s.study})})));
  }
  return box.childNodes.length ? box : null;
}

// ------------------------------------------------------------------ improving a run from people's feedback

const METHOD_WORDS = {  // each method of aigc optimize: its button and its one-line explanation
  sft: ["improve.sft", "improve.sfthelp"],
  dpo: ["improve.dpo", "improve.dpohelp"],
  rerank: ["improve.rerank", "improve.rerankhelp"],
};

function improvePanel(model, open) {  // the counts of a run's feedback, a button per method, then the job
  const summary = h("summary", {text: t("improve.title")});
  const body = h("div", {}, t("loading"));
  const box = h("details", {class: "improve", "data-testid": "improve", open}, summary, body);
  api(`/v1/models/${encodeURIComponent(model)}/feedback`).then(f => {
    body.textContent = "";
    const counts = t("improve.counts", {liked: f.liked, disliked: f.disliked, pairs: f.pairs});
    summary.textContent = t("improve.titlecounts", {counts});
    body.append(h("p", {"data-testid": "feedback-counts"}, h("strong", {text: counts}), " ",
                  h("span", {class: "meta", text: t("improve.from", {ratings: f.ratings, votes: f.votes})})));
    if (!f.ratings && !f.votes) body.append(h("p", {class: "meta", text: t("improve.none")}));
    const name = h("input", {type: "text", name: "name", pattern: "[A-Za-z0-9][A-Za-z0-9._-]*"});
    const error = h("p", {class: "error", role: "alert"}), jobs = h("div", {class: "improve-jobs"});
    body.append(field("improve.name", name, t("improve.namehelp", {model})));
    for (const m of f.methods) {
      const [label, help] = METHOD_WORDS[m.method];
      const go = h("button", {type: "button", class: "primary", "data-method": m.method, disabled: !m.available,
                              text: t(label)});
      go.addEventListener("click", async () => {
        error.textContent = ""; showError(name, "");
        go.disabled = true;
        try {
          const job = await api("/v1/optimizations", {body: {model, method: m.method, ...(name.value ? {name: name.value} : {})}});
          jobs.prepend(jobCard(job));
        } catch (e) {
          if (e.param === "name") showError(name, e.message); else error.textContent = e.message;
        } finally { go.disabled = !m.available; }
      });
      body.append(h("div", {class: "method", "data-method": m.method}, go, h("span", {class: "help", text: ` ${t(help)}`}),
        m.available ? null : h("p", {class: "meta reason", "data-testid": "reason", text: m.reason})));
    }
    body.append(error, jobs);
  }).catch(e => { body.textContent = ""; body.append(h("p", {class: "error", text: e.message})); });
  return box;
}

function percent(v) {
  return typeof v === "number" ? `${(100 * v).toFixed(1)}%` : "—";
}

function share(metrics, side) {  // "31.0% (25.2–36.8%)": the judged share of liked outputs and its 95% interval
  const ci = metrics[`liked_share_${side}_ci95`];
  return `${percent(metrics[`liked_share_${side}`])}${ci ? ` (${percent(ci[0])}–${percent(ci[1])})` : ""}`;
}

function beforeAfter(metrics) {  // an optimized run against its parent: liked share, bits/char or FID
  const box = h("div", {class: "before-after", "data-testid": "before-after"});
  const rows = [];
  if (typeof metrics.liked_share_before === "number")
    rows.push(["improve.liked", share(metrics, "before"), share(metrics, "after")]);
  if (typeof metrics.parent_val_bpc === "number" && typeof metrics.val_bpc === "number")
    rows.push(["improve.bpc", fmt(metrics.parent_val_bpc), fmt(metrics.val_bpc)]);
  if (typeof metrics.parent_val_loss === "number" && typeof metrics.val_loss === "number")  // music
    rows.push(["improve.nll", fmt(metrics.parent_val_loss), fmt(metrics.val_loss)]);
  if (typeof metrics.fid_before === "number" && typeof metrics.fid_after === "number")
    rows.push(["improve.fid", fmt(metrics.fid_before), fmt(metrics.fid_after)]);
  if (!rows.length) { box.append(h("p", {class: "meta", text: t("improve.notjudged")})); return box; }
  box.append(h("table", {}, h("thead", {}, h("tr", {}, h("th", {text: ""}), h("th", {text: t("improve.before")}),
    h("th", {text: t("improve.after")}))), h("tbody", {}, rows.map(([key, before, after]) =>
    h("tr", {"data-metric": key.split(".")[1]}, h("th", {text: t(key)}), h("td", {text: before}), h("td", {text: after}))))));
  if (typeof metrics.liked_share_before === "number") {
    const accuracy = typeof metrics.judge_heldout_accuracy === "number"
      ? t("improve.accuracy", {acc: percent(metrics.judge_heldout_accuracy), n: metrics.judge_heldout_n})
      : t("improve.noaccuracy");
    box.append(h("p", {class: "meta", text: `${t("improve.judged", {n: metrics.judged_samples})} ${accuracy}`}));
  }
  return box;
}

function showOutputs(p) {  // a preview or a battle side: texts, images or a forecast
  if (p.texts) return h("div", {}, p.texts.map(text => h("div", {class: "output", text: (p.prompt || "") + text})));
  if (p.images) return imageGrid(p.images);
  if (p.forecast) return fanChart(p.forecast, {width: 300, height: 160});
  if (p.pieces) return musicPieces(p.pieces);
  if (p.clips) return videoClips(p);
  return h("span");
}

pages.generate = async (main, params) => {
  main.append(h("h1", {text: t("nav.generate")}));
  const list = (await models()).filter(m => m.status === "done");
  if (!list.length) { main.append(h("p", {text: t("models.none")})); return; }
  const [select, selectField] = modelSelect(list);
  if (params.get("model")) select.value = params.get("model");
  const form = h("form", {class: "generate"}), out = h("section", {"aria-live": "polite"});
  main.append(selectField, form, out);
  const build = async () => {
    form.textContent = ""; out.textContent = "";
    const spec = await api(`/v1/models/${select.value}/controls`);
    buildGenerateForm(form, out, spec);
  };
  select.addEventListener("change", build);
  await build();
};

function controlInput(c) {  // an input made from the API's declaration of the field (range, default, help)
  let input;
  if (c.type === "choice") {
    input = h("select", {}, c.choices.map(v => h("option", {value: v, text: v})));
    if (c.default !== null && c.default !== undefined) input.value = c.default;
  } else if (c.type === "boolean") {  // a switch, e.g. music's grammar-constrained sampling
    input = h("input", {type: "checkbox"});
    input.checked = Boolean(c.default);
  } else {
    input = h("input", {type: "number", step: c.type === "integer" ? 1 : "any",
                        min: c.minimum ?? c.exclusiveMinimum, max: c.maximum ?? c.exclusiveMaximum,
                        value: c.default ?? ""});
  }
  input.name = c.name;
  input.dataset.type = c.type;
  return input;
}

function readControls(form, controls) {
  const body = {};
  for (const c of controls) {
    const input = form.elements[c.name];
    showError(input, "");
    if (c.type === "boolean") {
      body[c.name] = input.checked;
      continue;
    }
    if (input.value === "") continue;
    body[c.name] = c.type === "integer" ? parseInt(input.value, 10) : c.type === "number" ? parseFloat(input.value)
      : input.value;
  }
  return body;
}

function placeError(form, e) {  // an API error next to the field it names, else at the top of the form
  const input = e.param && form.elements[e.param.split(".")[0]];
  if (input) showError(input, e.message);
  else showError($(".form-error", form) || form, e.message);
  const box = $(".form-error-box", form);
  if (box && !input) box.textContent = e.message;
}

async function fileBase64(file) {  // a chosen file's bytes as base64, for a JSON request
  const bytes = new Uint8Array(await file.arrayBuffer());
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function buildGenerateForm(form, out, spec) {
  const basic = h("div", {class: "row"}), advanced = h("div", {class: "row"});
  let prompt = null, classPick = null;
  if (spec.modality === "text") {
    prompt = h("textarea", {name: "prompt"});
    form.append(field("gen.prompt", prompt, t("gen.prompthelp")));
  }
  if ((spec.modality === "image" || spec.modality === "video" || spec.modality === "sound") && spec.classes) {
    classPick = h("select", {name: "prompt"}, spec.classes.map(c => h("option", {value: c, text: c})));
    form.append(field("gen.class", classPick));
  }
  let opening = null, openingBars = null, harmony = null, openingFile = null, melodyFile = null;
  if (spec.modality === "music") {
    // an opening continued: a held-out piece's first bars, or a MIDI file of one's own; or a melody harmonised: a
    // held-out piece's soprano, or a MIDI file's top voice, kept as the top voice (an opening or a melody, not both)
    const pieces = spec.openings || [];
    opening = h("select", {name: "prompt_piece"}, h("option", {value: "", text: t("music.nothing")}),
                pieces.map(name => h("option", {value: name, text: name})));
    openingFile = h("input", {type: "file", name: "prompt_midi", accept: ".mid,.midi,audio/midi"});
    openingBars = h("input", {type: "number", name: "prompt_bars", min: 1, max: 16, step: 1, value: 2, disabled: true});
    harmony = h("select", {name: "harmonise_piece"}, h("option", {value: "", text: t("music.noharmony")}),
                pieces.map(name => h("option", {value: name, text: name})));
    melodyFile = h("input", {type: "file", name: "harmonise_midi", accept: ".mid,.midi,audio/midi"});
    const sync = () => {
      const continuing = !!opening.value || openingFile.files.length > 0;
      const harmonising = !!harmony.value || melodyFile.files.length > 0;
      openingBars.disabled = !continuing || harmonising;
      opening.disabled = harmonising || openingFile.files.length > 0;
      openingFile.disabled = harmonising;
      harmony.disabled = continuing || melodyFile.files.length > 0;
      melodyFile.disabled = continuing;
    };
    for (const control of [opening, openingFile, harmony, melodyFile]) control.addEventListener("change", sync);
    form.append(h("div", {class: "row"}, field("music.opening", opening, t("music.openinghelp")),
                  field("music.openingfile", openingFile, t("music.filehelp")), field("music.openingbars", openingBars)),
                h("div", {class: "row"}, field("music.harmonise", harmony, t("music.harmonisehelp")),
                  field("music.harmonisefile", melodyFile, t("music.filehelp"))));
  }
  for (const c of spec.controls) (c.advanced ? advanced : basic).append(field(`opt.${c.name}`, controlInput(c),
    c.name === "best_of" ? t("gen.bestofhelp", {k: c.default}) : c.help));
  const seed = h("input", {type: "number", name: "seed", min: 0, step: 1});
  advanced.append(field("opt.seed", seed, t("gen.seedhelp")));
  form.append(basic, h("details", {}, h("summary", {text: t("gen.advanced")}), advanced));
  const go = h("button", {type: "submit", class: "primary", text: t("gen.go")});
  const stop = h("button", {type: "button", text: t("gen.stop"), disabled: true});
  form.append(h("div", {class: "row"}, go, stop), h("p", {class: "error form-error-box", role: "alert"}));
  let controller = null;
  stop.addEventListener("click", () => controller && controller.abort());
  form.onsubmit = async event => {
    event.preventDefault();
    $(".form-error-box", form).textContent = "";
    const body = {model: spec.model, ...readControls(form, spec.controls)};
    if (seed.value !== "") body.seed = parseInt(seed.value, 10);
    go.disabled = true;
    out.textContent = "";
    try {
      if (spec.modality === "text") {
        body.prompt = prompt.value;
        const box = h("div", {class: "output", "data-testid": "text-output"}, h("strong", {text: prompt.value}));
        out.append(box);
        controller = new AbortController();
        stop.disabled = false;
        if ((body.n || 1) > 1) {
          const made = await api("/v1/completions", {body, signal: controller.signal});
          box.remove();
          made.choices.forEach((c, i) => out.append(h("div", {class: "output", "data-testid": "text-output"},
            h("strong", {text: prompt.value}), c.text), rating(made.generation_id, i)));
        } else {
          const id = await stream("/v1/completions", body, text => box.append(text), controller.signal);
          out.append(rating(id));
        }
      } else if (spec.modality === "image") {
        body.prompt = classPick ? classPick.value : "";
        const made = await api("/v1/images/generations", {body});
        out.append(imageGrid(made.data.map(d => d.url), made.data.map(d => d.generation_id)));
      } else if (spec.modality === "sound") {
        if (classPick) body.instrument = classPick.value;
        const made = await api("/v1/audio/generations", {body});
        out.append(musicPieces(madeSounds(made), made.generation_id),
                   h("p", {class: "meta", text: `${t("gen.seedwas", {seed: made.seed})} · ${t("music.rendered", {how: made.rendered_with})}`}));
      } else if (spec.modality === "music") {
        let continued = null, harmonised = null;  // what the piece begins with, or keeps on top: a name to show
        if (openingFile.files.length) {
          body.prompt_midi_b64 = await fileBase64(openingFile.files[0]);
          continued = openingFile.files[0].name;
        } else if (opening.value) {
          body.prompt_piece = continued = opening.value;
        }
        if (continued) body.prompt_bars = parseInt(openingBars.value, 10);
        if (melodyFile.files.length) {
          body.harmonise_midi_b64 = await fileBase64(melodyFile.files[0]);
          harmonised = melodyFile.files[0].name;
        } else if (harmony.value) {
          body.harmonise_piece = harmonised = harmony.value;
        }
        if (harmonised) delete body.bars;  // the piece is as long as the melody
        const made = await api("/v1/audio/generations", {body});
        if (harmonised) out.append(h("p", {class: "meta", "data-testid": "harmonised",
                                           text: t(body.harmonise_midi_b64 ? "music.harmonisedfile" : "music.harmonised",
                                                   {name: harmonised})}));
        if (continued) out.append(h("p", {class: "meta", "data-testid": "continued",
                                          text: t("music.continued", {bars: body.prompt_bars, name: continued})}));
        out.append(musicPieces(made.data.map(d => ({wav: d.wav_url, roll: d.png_url, midi: d.midi_url, bars: d.bars,
                                                     notes: d.notes})), made.generation_id),
                   h("p", {class: "meta", text: `${t("gen.seedwas", {seed: made.seed})} · ${t("music.rendered", {how: made.rendered_with})}`}));
      } else if (spec.modality === "video") {
        body.prompt = classPick ? classPick.value : "";
        const made = await api("/v1/videos/generations", {body});
        out.append(videoClips({clips: made.data.map(d => ({gif: d.gif_url, mp4: d.mp4_url, seed: d.record.seed})), sheet: made.sheet_url,
                               job: made.job}, made.generation_id),
                   h("p", {class: "meta", text: t("gen.seedwas", {seed: made.seed})}));
      } else {
        const made = await api("/v1/forecasts", {body});
        out.append(fanChart(made.forecast, {width: 640, height: 280}), rating(made.generation_id));
        out.append(h("p", {class: "meta", text: t("gen.seedwas", {seed: made.seed})}));
      }
    } catch (e) {
      if (e.name === "AbortError") out.append(h("p", {class: "meta", text: t("gen.stopped")}));
      else placeError(form, e);
    } finally {
      go.disabled = false; stop.disabled = true; controller = null;
    }
  };
}

pages.history = async main => {
  main.append(h("h1", {text: t("nav.history")}));
  const query = h("input", {type: "search", name: "q"});
  const model = h("select", {name: "model"}, h("option", {value: "", text: t("all")}),
                  (await models()).map(m => h("option", {value: m.id, text: m.id})));
  const modality = h("select", {name: "modality"}, ["", "text", "image", "series", "music", "video", "sound"].map(v =>
    h("option", {value: v, text: v ? t(`modality.${v}`) : t("all")})));
  const rated = h("select", {name: "rated"}, [["", t("all")], ["true", t("hist.rated")], ["false", t("hist.unrated")]]
    .map(([v, label]) => h("option", {value: v, text: label})));
  const form = h("form", {class: "row", role: "search"}, field("hist.search", query), field("model", model),
                 field("hist.modality", modality), field("hist.rating", rated),
                 h("button", {type: "submit", class: "primary", text: t("hist.find")}));
  const table = h("div"), detail = h("section", {"aria-live": "polite"});
  main.append(form, table, detail);
  const load = async () => {
    const params = new URLSearchParams({limit: 50});
    for (const [k, el] of [["q", query], ["model", model], ["modality", modality], ["rated", rated]])
      if (el.value) params.set(k, el.value);
    const found = await api(`/v1/generations?${params}`);
    table.textContent = "";
    table.append(h("p", {class: "meta", text: t("hist.count", {n: found.total})}), h("table", {},
      h("thead", {}, h("tr", {}, ["hist.when", "model", "hist.modality", "hist.source", "hist.what", "hist.rating"]
        .map(k => h("th", {text: t(k)})))),
      h("tbody", {}, found.data.map(g => h("tr", {},
        h("td", {}, h("button", {type: "button", class: "open", onclick: () => openGeneration(detail, g.id),
                                 text: g.created.replace("T", " ").slice(0, 19)})),
        h("td", {text: g.run}), h("td", {text: t(`modality.${g.modality}`)}), h("td", {text: g.source}),
        h("td", {text: summary(g)}), h("td", {text: g.ratings.map(r => r.score > 0 ? "✓" : r.score < 0 ? "✗" : "·").join("")}))))));
  };
  form.onsubmit = e => { e.preventDefault(); load().catch(err => toast(err.message)); };
  await load();
};

function summary(g) {
  if (g.modality === "text") return ((g.output || [])[0] || "").slice(0, 60);
  if (g.modality === "image") return `${t("modality.image")} ${g.output && g.output.class !== null ? g.output.class : ""}`;
  if (g.modality === "music") return (g.output || []).map(o => t("music.about", {bars: o.bars, notes: o.notes})).join("; ");
  if (g.modality === "video") return t("video.about", {n: (g.output || []).length, seed: g.seed});
  if (g.modality === "sound") return (g.output || []).map(o => t("sound.about", {cls: o.class_name ?? "-"})).join("; ");
  return `${t("modality.series")} h=${g.request.horizon}`;
}

function outputOf(g) {
  if (g.modality === "text") return h("div", {}, (g.output || []).map(text => h("div", {class: "output", text})));
  if (g.modality === "image") return imageGrid([`/v1/generations/${g.id}/file`]);
  if (g.modality === "music" || g.modality === "sound") return musicPieces(storedPieces(g));
  if (g.modality === "video") return videoClips(storedClips(g));
  return fanChart(g.output, {width: 560, height: 240});
}

async function openGeneration(box, id) {
  const g = await api(`/v1/generations/${id}`);
  box.textContent = "";
  const several = g.modality === "music" || g.modality === "video" || g.modality === "sound";  // rated one piece, clip or sound at a time
  box.append(h("h2", {text: `${g.id} · ${g.run}`}), outputOf(g), several ? null : rating(g.id));
  if (several) box.querySelectorAll(".piece, .clip").forEach((one, i) => one.append(rating(g.id, i)));
  if (g.rerank) box.append(h("p", {class: "meta", "data-testid": "rerank", text: t("hist.rerank", {
    k: g.rerank.best_of, chosen: g.rerank.chosen.map(i => i + 1).join(", "), candidates: g.rerank.candidates,
    scores: g.rerank.scores.map(fmt).join(", ")})}));
  const again = h("div", {"data-testid": "regenerated"});
  try {
    const replay = await api(`/v1/generations/${id}/replay`);
    const copy = text => () => navigator.clipboard.writeText(text).then(() => toast(t("copied")), () => toast(text));
    box.append(h("h2", {text: t("hist.again")}),
      h("p", {}, h("button", {type: "button", class: "primary", text: t("hist.regenerate"), onclick: async () => {
        again.textContent = t("loading");
        const made = await api(replay.endpoint, {body: {...replay.body, ...(g.modality === "text" ? {n: 1} : {})}});
        again.textContent = "";
        again.append(regenerated(g, made));
      }})), again,
      h("p", {}, t("hist.cli")), h("pre", {text: replay.cli}), h("button", {type: "button", onclick: copy(replay.cli), text: t("copy")}),
      h("p", {}, t("hist.curl")), h("pre", {text: replay.curl}), h("button", {type: "button", onclick: copy(replay.curl), text: t("copy")}));
  } catch (e) { box.append(h("p", {class: "meta", text: e.message})); }
  const blob = new Blob([JSON.stringify(g, null, 2)], {type: "application/json"});
  box.append(h("p", {}, h("a", {href: URL.createObjectURL(blob), download: `${g.id}.json`, text: t("hist.download")}),
             g.file ? [" · ", h("a", {href: `/v1/generations/${g.id}/file`, download: `${g.id}.png`, text: "PNG"})] : null),
             h("details", {}, h("summary", {text: t("hist.record")}), h("pre", {text: JSON.stringify(g, null, 2)})));
}

function regenerated(g, made) {  // the result made again, and whether it is the same as the stored one
  let same, shown;
  if (g.modality === "text") {
    const text = made.choices[0].text, stored = (g.output || [])[0] || "";
    same = stored.endsWith(text) && text.length > 0 || stored === text;
    shown = h("div", {class: "output", text});
  } else if (g.modality === "image") {
    const url = `data:image/png;base64,${made.data[0].b64_json}`;
    shown = imageGrid([url]);
    same = null;
    comparePixels(url, `/v1/generations/${g.id}/file`).then(ok => { verdict.textContent = ok ? t("hist.same") : t("hist.differs"); });
  } else if (g.modality === "sound") {  // the same seed and class: the same WAV bytes
    shown = musicPieces(madeSounds(made));
    same = null;
    Promise.all((g.output || []).map((o, i) => fetch(`/v1/generations/${g.id}/files/${String(i).padStart(3, "0")}.wav`)
      .then(r => r.arrayBuffer()).then(b => {
        let bytes = "";
        for (const x of new Uint8Array(b)) bytes += String.fromCharCode(x);
        return btoa(bytes) === made.data[i].wav_b64;
      })))
      .then(oks => { verdict.textContent = oks.length && oks.every(Boolean) ? t("hist.same") : t("hist.differs"); });
  } else if (g.modality === "music") {  // the same tokens: the same notes, hence the same MIDI and audio
    same = JSON.stringify(made.data.map(d => d.record.tokens)) === JSON.stringify((g.output || []).map(o => o.tokens));
    shown = musicPieces(made.data.map(d => ({wav: d.wav_url, roll: d.png_url, midi: d.midi_url, bars: d.bars, notes: d.notes})));
  } else if (g.modality === "video") {  // the same run, seed and options: the same GIF bytes
    shown = videoClips({clips: made.data.map(d => ({gif: d.gif_url, mp4: d.mp4_url, seed: d.record.seed})), sheet: made.sheet_url,
                        job: made.job});
    same = null;
    compareFiles(made.data.map(d => d.gif_url), storedClips(g).clips.map(c => c.gif))
      .then(ok => { verdict.textContent = ok ? t("hist.same") : t("hist.differs"); });
  } else {
    same = JSON.stringify(made.forecast.forecast) === JSON.stringify(g.output.forecast);
    shown = fanChart(made.forecast, {width: 560, height: 240});
  }
  const verdict = h("p", {class: "ok", "data-testid": "same", text: same === null ? "…" : same ? t("hist.same") : t("hist.differs")});
  return h("div", {}, shown, verdict);
}

async function comparePixels(a, b) {
  const read = url => new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      const c = document.createElement("canvas");
      c.width = img.width; c.height = img.height;
      const ctx = c.getContext("2d");
      ctx.drawImage(img, 0, 0);
      resolve(ctx.getImageData(0, 0, c.width, c.height).data.join(","));
    };
    img.onerror = reject;
    serverFile(img, "src", url);
  });
  const [x, y] = await Promise.all([read(a), read(b)]);
  return x === y;
}

async function compareFiles(a, b) {  // whether two lists of URLs hold the same bytes, file by file
  if (a.length !== b.length) return false;
  const read = url => fetch(url, {headers: headers(false)}).then(r => r.arrayBuffer()).then(x => new Uint8Array(x).join(","));
  const [x, y] = await Promise.all([Promise.all(a.map(read)), Promise.all(b.map(read))]);
  return x.every((bytes, i) => bytes === y[i]);
}

pages.arena = async main => {
  main.append(h("h1", {text: t("nav.arena")}), h("p", {class: "meta", text: t("arena.intro")}));
  const modality = h("select", {name: "modality"}, ["text", "image", "music", "video", "sound"].map(v => h("option", {value: v, text: t(`modality.${v}`)})));
  const prompt = h("input", {type: "text", name: "prompt", size: 40});
  const form = h("form", {class: "row"}, field("hist.modality", modality), field("arena.prompt", prompt, t("arena.prompthelp")),
                 h("button", {type: "submit", class: "primary", text: t("arena.go")}));
  const error = h("p", {class: "error", role: "alert"}), battle = h("section", {"aria-live": "polite"});
  const board = h("section");
  main.append(form, error, battle, h("h2", {text: t("arena.board")}), board);
  const showBoard = async () => {
    const lb = await api(`/v1/arena/leaderboard?modality=${modality.value}`);
    board.textContent = "";
    if (!lb.data.length) { board.append(h("p", {text: t("arena.novotes")})); return; }
    board.append(h("p", {class: "meta", text: t("arena.explain", {n: lb.votes})}), h("table", {"data-testid": "leaderboard"},
      h("thead", {}, h("tr", {}, ["arena.rank", "model", "arena.rating", "arena.ci", "arena.votes", "arena.metric"]
        .map(k => h("th", {text: t(k)})))),
      h("tbody", {}, lb.data.map(r => h("tr", {}, h("td", {text: r.rank}), h("td", {text: r.run}),
        h("td", {text: r.rating.toFixed(0)}), h("td", {text: `${r.lower.toFixed(0)} – ${r.upper.toFixed(0)}`}),
        h("td", {text: r.votes}), h("td", {text: headline(r.metric)}))))));
  };
  modality.addEventListener("change", () => {
    prompt.disabled = modality.value === "music";  // both runs compose from nothing
    showBoard().catch(e => toast(e.message));
  });
  form.onsubmit = async event => {
    event.preventDefault();
    error.textContent = ""; battle.textContent = t("loading");
    try {
      const b = await api("/v1/arena/battles", {body: {modality: modality.value, prompt: (!prompt.disabled && prompt.value) || null}});
      battle.textContent = "";
      const sides = h("div", {class: "sides"}, ["left", "right"].map(side => h("div", {class: "card", "data-side": side},
        h("h2", {text: t(`arena.${side}`)}), showOutputs({...b[side], prompt: b.prompt || ""}), h("p", {class: "who"}))));
      const buttons = h("div", {class: "row"}, ["left", "right", "tie", "both_bad"].map(w =>
        h("button", {type: "button", class: "vote", "data-winner": w, text: t(`arena.${w}`), onclick: async () => {
          const done = await api(`/v1/arena/battles/${b.id}/vote`, {body: {winner: w}});
          buttons.querySelectorAll("button").forEach(x => { x.disabled = true; });
          for (const side of ["left", "right"])
            $(`[data-side=${side}] .who`, sides).textContent = t("arena.was", {run: done[side].run, family: done[side].family});
          await showBoard();
        }})));
      battle.append(sides, buttons);
    } catch (e) { battle.textContent = ""; error.textContent = e.message; }
  };
  await showBoard();
};

const FAMILIES = {text: ["ngram", "rnn", "gpt"], image: ["vae", "dcgan", "diffusion"], series: ["ar", "rnn"],
                  music: ["ngram", "rnn", "gpt"], sound: ["vae", "dcgan", "diffusion"], video: ["vae", "diffusion", "simvp"]};
const UPLOAD_KINDS = {image: "images", sound: "sounds"};  // a modality's upload kind where the names differ

pages.train = async main => {
  main.append(h("h1", {text: t("nav.train")}));
  const sets = await api("/v1/datasets");
  const kind = h("select", {name: "kind"}, Object.keys(FAMILIES).map(v => h("option", {value: v, text: t(`modality.${v}`)})));
  const file = h("input", {type: "file", name: "file"});
  const uploadBtn = h("button", {type: "button", text: t("train.upload")});
  const data = h("select", {name: "data"}), family = h("select", {name: "family"});
  const preset = h("select", {name: "preset"}, ["quick", "good", "custom"].map(v => h("option", {value: v, text: t(`train.${v}`)})));
  const minutes = h("input", {type: "number", name: "minutes", min: 0.05, max: 600, step: "any", value: 2});
  const name = h("input", {type: "text", name: "name", pattern: "[A-Za-z0-9][A-Za-z0-9._-]*"});
  const conditional = h("input", {type: "checkbox", name: "conditional"});
  const start = h("button", {type: "submit", class: "primary", text: t("train.start")});
  const formError = h("p", {class: "error", role: "alert"});
  const uploaded = [...sets.uploads];
  const fill = () => {
    const m = kind.value, upKind = UPLOAD_KINDS[m] || m;
    data.textContent = "";
    for (const u of uploaded.filter(u => u.kind === upKind))
      data.append(h("option", {value: u.id, text: `${t("train.yours")}: ${u.filename}`}));
    for (const d of sets.data.filter(d => d.modality === m))
      data.append(h("option", {value: d.name, disabled: !d.installed,
                               text: `${d.name}${d.installed ? "" : ` (${t("train.missing", {pkg: d.package})})`}`}));
    family.textContent = "";
    for (const f of FAMILIES[m]) family.append(h("option", {value: f, text: f}));
    conditional.closest(".field").style.display = ["image", "sound", "video"].includes(m) ? "" : "none";
  };
  const form = h("form", {},
    h("div", {class: "row"}, field("train.kind", kind), field("train.file", file, t("train.filehelp")), uploadBtn),
    h("div", {class: "row"}, field("train.data", data), field("train.family", family), field("train.preset", preset),
      field("train.minutes", minutes), field("train.name", name, t("train.namehelp")), field("train.conditional", conditional)),
    start, formError);
  const jobsBox = h("section");
  main.append(form, h("h2", {text: t("train.jobs")}), jobsBox);
  fill();
  kind.addEventListener("change", fill);
  preset.addEventListener("change", () => { minutes.disabled = preset.value !== "custom"; });
  minutes.disabled = true;
  uploadBtn.addEventListener("click", async () => {
    showError(file, "");
    if (!file.files.length) { showError(file, t("train.nofile")); return; }
    const f = file.files[0], upKind = UPLOAD_KINDS[kind.value] || kind.value;
    uploadBtn.disabled = true;
    try {
      const u = await api(`/v1/uploads?kind=${upKind}&filename=${encodeURIComponent(f.name)}`, {body: f, raw: true});
      uploaded.unshift(u);
      fill();
      data.value = u.id;
      toast(t("train.uploaded", {name: f.name}));
    } catch (e) { showError(file, e.message); } finally { uploadBtn.disabled = false; }
  });
  form.onsubmit = async event => {
    event.preventDefault();
    formError.textContent = "";
    [data, family, minutes, name].forEach(x => showError(x, ""));
    const body = {family: family.value, data: data.value};
    if (preset.value === "custom") body.minutes = parseFloat(minutes.value); else body.preset = preset.value;
    if (name.value) body.name = name.value;
    if (["image", "sound", "video"].includes(kind.value)) body.conditional = conditional.checked;
    try {
      await api("/v1/training", {body});
      await showJobs(jobsBox);
    } catch (e) {
      const target = {name, data, family, minutes, preset}[e.param];
      if (target) showError(target, e.message); else formError.textContent = e.message;
    }
  };
  await showJobs(jobsBox);
};

async function showJobs(box) {
  const list = (await api("/v1/jobs")).data;
  box.textContent = "";
  if (!list.length) { box.append(h("p", {text: t("train.nojobs")})); return; }
  for (const job of list.slice(0, 20)) box.append(jobCard(job));
}

function jobCard(job) {
  const bar = h("div", {class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
                        "aria-label": t("train.progress")}, h("div"));
  const status = h("p", {class: "status"}), chart = h("div"), actions = h("div", {class: "row"});
  const title = {eval: "train.evaljob", optimize: "train.optimizejob"}[job.kind] || "train.trainjob";
  const card = h("article", {class: "card", "data-job": job.id, "data-run": job.run, "data-kind": job.kind},
                 h("h2", {text: `${t(title)}: ${job.run}`}), bar, status, chart, actions);
  const render = j => {
    const pct = Math.round(100 * (j.progress || (j.status === "done" ? 1 : 0)));
    bar.firstChild.style.width = `${pct}%`;
    bar.setAttribute("aria-valuenow", pct);
    card.dataset.status = j.status;
    const eta = j.eta_s !== null && j.eta_s !== undefined && j.status === "running" ? ` · ${t("train.eta")} ${Math.ceil(j.eta_s)} s` : "";
    const step = j.step ? ` · ${t("curve.step")} ${j.step}${j.steps_goal ? `/${j.steps_goal}` : ""}` : "";
    const staged = j.stage_total !== null && j.stage_total !== undefined;  // counting, scoring, judging (aigc optimize)
    const rate = j.step && j.elapsed_s && j.status === "running" && !staged ? ` · ${t("train.rate", {rate: (j.step / j.elapsed_s).toFixed(1)})}` : "";
    const stage = j.stage && j.status === "running" ? ` · ${t(`stage.${j.stage}`)}${staged ? ` ${j.stage_done}/${j.stage_total}` : ""}` : "";
    card.dataset.stage = j.stage || "";
    status.textContent = `${t(`status.${j.status}`)}${stage} · ${pct}%${staged ? "" : step}${rate}${eta}`;
    if (j.error) status.append(h("span", {class: "error", text: ` ${j.error}`}));
    if (j.curve && j.curve.length) { chart.textContent = ""; chart.append(curveChart([{name: j.run, curve: j.curve}], {width: 380, height: 160})); }
    actions.textContent = "";
    if (j.status === "running") actions.append(h("button", {type: "button", text: t("train.stop"), onclick: async () => {
      render(await api(`/v1/jobs/${j.id}/stop`, {method: "POST", body: {}}));
    }}));
    if (j.status === "done" && j.kind === "train") actions.append(h("button", {type: "button", class: "evaluate", text: t("train.evaluate"),
      onclick: async () => {
        const e = await api("/v1/evaluations", {body: {model: j.run}});
        card.after(jobCard(e));
      }}));
    if (j.status === "done" && j.kind === "eval") actions.append(h("a", {href: `/v1/models/${j.run}/files/report.html`,
      target: "_blank", text: t("models.report")}), h("a", {href: `#/compare?models=${j.run}`, text: t("nav.compare")}));
    if (j.status === "done" && j.kind === "optimize") {
      actions.append(h("a", {href: `#/models?model=${encodeURIComponent(j.run)}`, class: "new-run",
                             text: t("improve.newrun", {run: j.run})}));
      if (j.result && j.result.metrics && !card.querySelector(".before-after")) card.append(beforeAfter(j.result.metrics));
    }
    if (j.status === "done") actions.append(h("a", {href: `#/generate?model=${encodeURIComponent(j.run)}`, text: t("models.use")}));
  };
  render(job);
  if (job.status === "running") {
    const timer = setInterval(async () => {
      if (!card.isConnected) { clearInterval(timer); return; }
      try {
        const j = await api(`/v1/jobs/${job.id}`);
        render(j);
        if (j.status !== "running") { clearInterval(timer); state.models = []; }
      } catch (e) { clearInterval(timer); }
    }, 1000);
  }
  return card;
}

pages.sweeps = async (main, params) => {
  main.append(h("h1", {text: t("nav.sweeps")}));
  if (params.get("name")) { await showSweep(main, params.get("name")); return; }
  const list = (await api("/v1/sweeps")).data;
  if (!list.length) {
    main.append(h("p", {text: t("sweeps.none")}),
                h("pre", {"data-testid": "sweep-command"}, "aigc sweep --family ngram --data tang300 --trials 7"),
                h("p", {class: "meta", text: t("sweeps.nonehelp")}));
    return;
  }
  main.append(h("p", {class: "meta", text: t("sweeps.intro")}), h("table", {"data-testid": "sweeps"},
    h("thead", {}, h("tr", {}, ["sweeps.name", "train.family", "train.data", "sweeps.objective", "sweeps.trials",
                                "sweeps.best", "sweeps.bestrun"].map(k => h("th", {text: t(k)})))),
    h("tbody", {}, list.map(s => h("tr", {"data-sweep": s.name},
      h("td", {}, h("a", {href: `#/sweeps?name=${encodeURIComponent(s.name)}`, text: s.name})),
      h("td", {text: s.family}), h("td", {text: s.data}), h("td", {text: s.objective}),
      h("td", {text: stateCounts(s.states)}), h("td", {text: s.best ? fmt(s.best.value) : "—"}),
      h("td", {}, s.best && s.best.run ? runLink(s.best.run, s.best.here) : "—"))))));
};

function stateWord(state) {
  return {complete: t("sweeps.complete"), pruned: t("sweeps.pruned"), fail: t("sweeps.fail"),
          running: t("sweeps.running"), waiting: t("sweeps.waiting")}[state] || state;
}

function stateCounts(states) {
  return Object.entries(states).filter(([, n]) => n).map(([s, n]) => `${n} ${stateWord(s)}`).join(" · ") || "0";
}

function paramText(v) {
  return typeof v === "number" && !Number.isInteger(v) ? tickLabel(v) : String(v);
}

async function showSweep(main, name) {
  const s = await api(`/v1/sweeps/${encodeURIComponent(name)}`);
  main.append(h("p", {}, h("a", {href: "#/sweeps", text: t("sweeps.all")})),
    h("h2", {text: s.name}),
    h("p", {class: "meta", text: t("sweeps.about", {family: s.family, data: s.data, objective: s.objective})
      + (s.budget_minutes ? ` · ${t("sweeps.budget", {minutes: s.budget_minutes})}` : "")}),
    h("p", {text: stateCounts(s.states)}));
  if (s.best) main.append(h("p", {"data-testid": "sweep-best"}, tNodes("sweeps.bestis", {
    trial: h("strong", {text: `#${s.best.number}`}), objective: s.objective, value: h("strong", {text: fmt(s.best.value)}),
    run: runLink(s.best.run, s.best.here)})));
  const keys = Object.keys(s.space);
  if (s.importance) keys.sort((a, b) => (s.importance[b] ?? 0) - (s.importance[a] ?? 0));

  // parallel coordinates: the parameters (most important first) and the objective
  const values = s.trials.map(tr => tr.value).filter(v => typeof v === "number" && isFinite(v));
  if (keys.length && values.length) {
    const lo = Math.min(...values), hi = Math.max(...values);
    const axes = [...keys.map(k => ({name: k, ...s.space[k]})), {name: s.objective, type: "float", low: lo, high: hi, log: false}];
    const lines = s.trials.map(tr => ({number: tr.number, state: tr.state, best: tr.best,
      values: {...tr.params, [s.objective]: tr.value},
      title: `#${tr.number} (${stateWord(tr.state)}): ${Object.entries(tr.params).map(([k, v]) => `${k}=${paramText(v)}`).join(" ")}`
        + (tr.value !== null ? ` → ${s.objective} ${fmt(tr.value)}` : "")}));
    main.append(h("h2", {text: t("sweeps.parallel")}), h("p", {class: "meta", text: t("sweeps.parallelhelp")}),
      h("div", {class: "scroll", "data-testid": "parallel"}, parallelCoordinates(axes, lines, {title: t("sweeps.parallel"),
        legend: (low, high) => t("sweeps.colour", {objective: s.objective, low: fmt(low), high: fmt(high)})})));
  }

  // importances
  main.append(h("h2", {text: t("sweeps.importance")}));
  if (s.importance) {
    main.append(h("p", {class: "meta", text: t("sweeps.importancehelp")}),
      h("div", {"data-testid": "importance"}, barChart(keys.filter(k => k in s.importance)
        .map(k => ({label: k, value: s.importance[k]})), {title: t("sweeps.importance")})));
  } else {
    main.append(h("p", {class: "meta", text: t("sweeps.noimportance")}));
  }

  // the trials
  main.append(h("h2", {text: t("sweeps.trialsof")}), h("table", {"data-testid": "trials"},
    h("thead", {}, h("tr", {}, h("th", {text: "#"}), ["sweeps.state", "sweeps.value", "sweeps.params", "sweeps.run",
      "sweeps.status", "sweeps.duration", "sweeps.error"].map(k => h("th", {text: t(k)})))),
    h("tbody", {}, s.trials.map(tr => h("tr", {"data-trial": tr.number, "data-state": tr.state, class: tr.best ? "best" : null},
      h("td", {}, `${tr.number}`, tr.best ? h("span", {class: "badge", text: ` ★ ${t("sweeps.bestmark")}`}) : null),
      h("td", {text: stateWord(tr.state)}), h("td", {text: fmt(tr.value)}),
      h("td", {text: Object.entries(tr.params).map(([k, v]) => `${k}=${paramText(v)}`).join(", ")}),
      h("td", {}, tr.run ? runLink(tr.run, tr.here) : "—"), h("td", {text: tr.status ? t(`status.${tr.status}`) : "—"}),
      h("td", {text: tr.duration_s !== null ? `${tr.duration_s.toFixed(1)} s` : "—"}),
      h("td", {class: "error", text: tr.error || ""}))))));
  main.append(h("h2", {text: t("sweeps.more")}), h("pre", {"data-testid": "sweep-command"}, s.command));
}

pages.compare = async (main, params) => {
  main.append(h("h1", {text: t("nav.compare")}), h("p", {class: "meta", text: t("compare.intro")}));
  const list = (await models(true)).filter(m => m.family !== "hf");
  const chosen = new Set((params.get("models") || "").split(",").filter(Boolean));
  const boxes = h("fieldset", {}, h("legend", {text: t("compare.pick")}), list.map(m => {
    const box = h("input", {type: "checkbox", value: m.id, id: `cmp-${m.id}`, checked: chosen.has(m.id)});
    return h("label", {for: box.id, style: "margin-right:1rem"}, box, ` ${m.id}`);
  }));
  const go = h("button", {type: "button", class: "primary", text: t("compare.go")});
  const error = h("p", {class: "error", role: "alert"}), out = h("section");
  main.append(boxes, go, error, out);
  go.addEventListener("click", async () => {
    const names = [...boxes.querySelectorAll("input:checked")].map(b => b.value);
    error.textContent = ""; out.textContent = "";
    if (names.length < 2 || names.length > 4) { error.textContent = t("compare.count"); return; }
    const details = await Promise.all(names.map(n => api(`/v1/models/${n}/details`)));
    const keys = [...new Set(details.flatMap(d => Object.keys({...d.metrics, ...(d.eval || {})})))]
      .filter(k => details.some(d => typeof ({...d.metrics, ...(d.eval || {})})[k] === "number")).sort();
    out.append(h("table", {"data-testid": "compare"}, h("thead", {}, h("tr", {}, h("th", {text: t("compare.metric")}),
      names.map(n => h("th", {text: n})))), h("tbody", {}, keys.map(k => h("tr", {}, h("td", {text: k}),
      details.map(d => h("td", {text: fmt(({...d.metrics, ...(d.eval || {})})[k])})))))));
    out.append(h("p", {class: "meta", text: t("compare.split")}));
    out.append(h("h2", {text: t("compare.curves")}), curveChart(details.map((d, i) => ({name: names[i], curve: d.curve})), {width: 640, height: 260}));
    const samples = h("div", {class: "sides", style: `grid-template-columns: repeat(${names.length}, 1fr)`});
    out.append(h("h2", {text: t("compare.samples")}), samples);
    for (const n of names) {
      const cell = h("div", {class: "card"}, h("h2", {text: n}), t("loading"));
      samples.append(cell);
      api(`/v1/models/${n}/preview`).then(p => { cell.lastChild.remove(); cell.append(showOutputs(p)); })
        .catch(e => { cell.append(h("p", {class: "error", text: e.message})); });
    }
  });
  if (chosen.size >= 2) go.click();
};

// ------------------------------------------------------------------ routing and start

async function route() {
  const [path, query] = (location.hash.replace(/^#\/?/, "") || "models").split("?");
  const page = pages[path] ? path : "models";
  // a fresh view per visit: what a page still fetches for an earlier visit lands in its own, detached view
  const main = h("div", {class: "view"});
  $("#main").replaceChildren(main);
  document.querySelectorAll("#nav a").forEach(a => a.toggleAttribute("aria-current", a.dataset.page === page));
  document.querySelectorAll("#nav a[aria-current]").forEach(a => a.setAttribute("aria-current", "page"));
  document.title = `${t(`nav.${page}`)} · AIGC Studio`;
  try {
    await pages[page](main, new URLSearchParams(query || ""));
  } catch (e) {
    main.append(h("p", {class: "error", role: "alert", text: e.message}));
  }
}

function start() {
  const lang = $("#lang");
  lang.value = currentLanguage();
  lang.addEventListener("change", () => { setLanguage(lang.value); route(); });
  const key = $("#apikey");
  key.value = state.key;
  key.addEventListener("change", () => { state.key = key.value.trim(); localStorage.setItem("aigc.key", state.key); route(); });
  setLanguage(lang.value);
  window.addEventListener("hashchange", route);
  route();
}

start();
