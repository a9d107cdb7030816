// segloop review UI: OpenSeadragon deep-zoom viewer over the review server's tile API,
// segmentation overlay (coloured in the browser: per-class colour and visibility, fill or
// outline), uncertainty heatmap, brush/eraser/polygon/fill/eyedropper tools, the copilot,
// server-side undo, review queue, slide worklist, model versions (serve --learn).
"use strict";

const state = {
  token: null, user: null, image: null, meta: null, images: [], viewer: null, seg: null,
  heat: null, tool: "pan", label: 1, versions: {}, confVersions: {}, lease: null, drawing: null,
  proposal: null, before: null, spacePan: false, ws: null, coverage: null, overview: null,
  style: null,  // {colors, visible, outline}: this reviewer's overlay style, per image
  acks: [],  // ms from mouse-up to the server's ack, per stroke (benchmarks read it)
  firstTileMs: null,  // ms from navigation start to the first tile loaded
  posts: [],  // ms of the POST alone, per stroke
  model: null,  // GET …/model: the served version, its score, the round running
};

// class colours that stand out on H&E (pink and purple): cyan, yellow, green, orange, …
const DEFAULT_COLOURS = ["#000000", "#00e5ff", "#ffdd00", "#00ff6e", "#ff5000", "#be50ff", "#ffffff"];
const $ = (id) => document.getElementById(id);

// --- login: token from ?token=… (then removed from the address bar) or sessionStorage ---
function takeToken() {
  const url = new URL(location.href);
  const fromUrl = url.searchParams.get("token");
  if (fromUrl) {
    sessionStorage.setItem("segloop-token", fromUrl);
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search);
  }
  return sessionStorage.getItem("segloop-token");
}

// the image's API prefix: its name URL-encoded (a store folder may be named "a#b" or "x?y")
function imagePath(name = state.image) {
  return `/api/images/${encodeURIComponent(name)}`;
}

async function api(method, path, body) {
  const r = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${state.token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = r.headers.get("Content-Type")?.includes("json") ? await r.json() : null;
  if (!r.ok) throw Object.assign(new Error(data?.error || r.statusText), { status: r.status, data });
  return data;
}

function status(text) { $("status").textContent = text; }

// an action of a button or key: its failure is said in the status line, never thrown
function guarded(fn) {
  return (...args) => Promise.resolve().then(() => fn(...args)).catch((e) => status(e.message));
}

// --- tiles: OpenSeadragon level L ↔ store level maxLevel − L -----------------------------
function tileUrl(layer, level, x, y, maxLevel) {
  const k = maxLevel - level;
  const key = `${k}/${y}/${x}`;
  const v = layer === "segmentation" ? state.versions[key] : state.confVersions[key] ?? 0;
  const q = v === undefined ? "" : `?v=${v}`;
  return `${imagePath()}/tiles/${layer}/${k}/${y}/${x}${q}`;
}

function tileSource(layer) {
  const m = state.meta;
  const [h, w] = m.shape;
  const maxLevel = Math.ceil(Math.log2(Math.max(w, h)));
  return {
    width: w, height: h, tileSize: m.tile, tileOverlap: 0,
    minLevel: maxLevel - (m.levels - 1), maxLevel,
    getTileUrl: (level, x, y) => tileUrl(layer, level, x, y, maxLevel),
  };
}

// The overlays (labels, confidence) are decoded and coloured here: each tile keeps its
// values, so a new colour, a hidden class or the outline mode repaints the tiles in place.
const painted = new Set();

function overlaySource(layer) {
  const opts = tileSource(layer);
  const src = new OpenSeadragon.TileSource(opts);
  src.getTileUrl = opts.getTileUrl;
  src.hasTransparency = () => true;
  src.downloadTileStart = (job) => {
    const ctrl = new AbortController();
    const once = (data, error) => {
      if (job.userData.done) return;
      job.userData.done = true;
      job.finish(data, null, error);
    };
    job.userData.ctrl = ctrl;
    fetch(job.src, { headers: { Authorization: `Bearer ${state.token}` }, signal: ctrl.signal })
      .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(`tile ${r.status}`))))
      .then((b) => createImageBitmap(b, { colorSpaceConversion: "none", premultiplyAlpha: "none" }))
      .then((bmp) => once(decodeTile(layer, bmp, job.src)))
      .catch((e) => once(null, String(e)));
  };
  src.downloadTileAbort = (job) => { job.userData.done = true; job.userData.ctrl?.abort(); };
  src.createTileCache = (cache, data) => { cache._data = data; painted.add(data); };
  src.destroyTileCache = (cache) => { painted.delete(cache._data); cache._data = null; };
  src.getTileCacheData = (cache) => cache._data;
  src.getTileCacheDataAsImage = (cache) => cache._data.ctx.canvas;
  src.getTileCacheDataAsContext2D = (cache) => cache._data.ctx;
  return src;
}

// a tile's values: class per pixel (its colour in the store's palette; clear = 0) or
// confidence (grey level)
function decodeTile(layer, bmp, url) {
  const c = document.createElement("canvas");
  [c.width, c.height] = [bmp.width, bmp.height];
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bmp, 0, 0);
  bmp.close();
  const image = ctx.getImageData(0, 0, c.width, c.height), d = image.data;
  const values = new Uint8Array(c.width * c.height);
  for (let i = 0; i < values.length; i++) {
    values[i] = layer === "confidence" ? d[4 * i] : d[4 * i + 3] ? classOf(d[4 * i], d[4 * i + 1], d[4 * i + 2]) : 0;
  }
  const [, level, cy, cx] = url.match(/\/(\d+)\/(\d+)\/(\d+)(\?|$)/).map(Number);
  const tile = { layer, ctx, values, image, key: level === 0 ? `${cy}/${cx}` : null };
  if (state.before) rewindTile(tile);
  paint(tile);
  return tile;
}

// --- before/after: a proposal's level-0 tiles shown as they were before it -------------
function rewindTile(tile) {
  const part = tile.layer === "segmentation" && state.before.chunks[tile.key];
  if (!part || tile.orig) return;
  tile.orig = tile.values.slice();
  part.idx.forEach((i, k) => { tile.values[i] = part.before[k]; });
}

async function toggleBefore(id) {
  const was = state.before?.id;
  if (state.before) {
    for (const t of painted) if (t.orig) { t.values.set(t.orig); t.orig = null; paint(t); }
    state.before = null;
  }
  if (was !== id) {
    const out = await api("GET", `${imagePath()}/edits/${id}/delta`);
    const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const chunks = {};
    for (const [key, p] of Object.entries(out.chunks)) {
      chunks[key] = { idx: new Uint32Array(bytes(p.idx).buffer), before: bytes(p.before) };
    }
    state.before = { id, chunks };
    for (const t of painted) if (t.key) { rewindTile(t); if (t.orig) paint(t); }
  }
  state.viewer.forceRedraw();
  for (const b of document.querySelectorAll("[data-testid^=before-after-]")) {
    b.textContent = b.dataset.testid === `before-after-${state.before?.id}` ? "after" : "before";
  }
  showViewState();
}

// the class of a decoded colour: the store's palette entry, else the nearest one (a
// translucent class colour may come back off by a rounding step)
function classOf(r, g, b) {
  const key = (r << 16) | (g << 8) | b;
  let c = state.rgbToClass.get(key);
  if (c === undefined) {
    const d = state.meta.colors.map(([cr, cg, cb, ca]) => (ca ? (cr - r) ** 2 + (cg - g) ** 2 + (cb - b) ** 2 : Infinity));
    c = d.indexOf(Math.min(...d));
    state.rgbToClass.set(key, c);
  }
  return c;
}

function paint(tile) {
  const { width: w, height: h } = tile.ctx.canvas, v = tile.values, d = tile.image.data;
  if (tile.layer === "confidence") {  // uncertainty 1 − confidence: clear → yellow → red
    for (let i = 0; i < v.length; i++) {
      const t = Math.min(1, Math.sqrt((255 - v[i]) / 128));  // √: the first percent shows
      d[4 * i] = 255;
      d[4 * i + 1] = 230 * (1 - t);
      d[4 * i + 2] = 0;
      d[4 * i + 3] = v[i] > 253 ? 0 : 60 + 170 * t;
    }
  } else {
    const pal = state.palette, outline = state.style.outline;
    for (let y = 0, i = 0; y < h; y++) {
      for (let x = 0; x < w; x++, i++) {
        const c = v[i];
        let on = c !== 0 && pal[4 * c + 3] !== 0;
        if (on && outline) {
          on = (x > 0 && v[i - 1] !== c) || (x < w - 1 && v[i + 1] !== c)
            || (y > 0 && v[i - w] !== c) || (y < h - 1 && v[i + w] !== c);
        }
        if (on) d.set(pal.subarray(4 * c, 4 * c + 4), 4 * i); else d[4 * i + 3] = 0;
      }
    }
  }
  tile.ctx.putImageData(tile.image, 0, 0);
}

// --- overlay style: colours, visibility, outline; kept per image in localStorage ---------
function loadStyle() {
  const n = state.meta.classes.length;
  const saved = JSON.parse(localStorage.getItem(`segloop-style-${state.image}`) || "null");
  const colour = (i) => DEFAULT_COLOURS[i] || `hsl(${(i * 137) % 360} 90% 60%)`;
  state.style = {
    colors: Array.from({ length: n }, (_, i) => saved?.colors?.[i] || colour(i)),
    visible: Array.from({ length: n }, (_, i) => saved?.visible?.[i] ?? true),
    outline: !!saved?.outline,
  };
  state.rgbToClass = new Map(state.meta.colors.map(([r, g, b, a], i) => [a === 0 ? -1 : (r << 16) | (g << 8) | b, i]));
}

function rgb(hex) {
  const c = document.createElement("canvas").getContext("2d");
  c.fillStyle = hex;  // any CSS colour → #rrggbb
  const s = c.fillStyle;
  return [1, 3, 5].map((k) => parseInt(s.slice(k, k + 2), 16));
}

function restyle() {
  const s = state.style;
  state.palette = new Uint8ClampedArray(4 * 256);
  s.colors.forEach((c, i) => state.palette.set([...rgb(c), s.visible[i] && i ? 255 : 0], 4 * i));
  localStorage.setItem(`segloop-style-${state.image}`, JSON.stringify(s));
  for (const t of painted) if (t.layer === "segmentation") paint(t);
  state.viewer?.forceRedraw();
  $("outline").checked = s.outline;
  for (const li of $("class-list").children) li.classList.toggle("hidden-class", !s.visible[li.dataset.cls]);
  showViewState();
}

function buildClassList() {
  const list = $("class-list");
  list.replaceChildren();
  state.meta.classes.forEach((name, i) => {
    if (i === 0) return;  // background is never drawn
    const li = document.createElement("li");
    li.dataset.cls = i;
    const vis = Object.assign(document.createElement("input"), { type: "checkbox", checked: state.style.visible[i] });
    vis.dataset.testid = `class-visible-${i}`;
    vis.onchange = () => { state.style.visible[i] = vis.checked; restyle(); };
    const col = Object.assign(document.createElement("input"), { type: "color", value: rgbHex(state.style.colors[i]) });
    col.dataset.testid = `class-colour-${i}`;
    col.oninput = () => { state.style.colors[i] = col.value; restyle(); };
    li.append(vis, col, Object.assign(document.createElement("span"), { textContent: `${i} ${name}` }));
    list.append(li);
  });
}

function rgbHex(c) { return `#${rgb(c).map((v) => v.toString(16).padStart(2, "0")).join("")}`; }

// what is hidden or changed in the view, said on top of it
function showViewState() {
  const s = state.style, parts = [];
  if (state.seg && state.seg.getOpacity() === 0) parts.push("overlay hidden (H)");
  const hidden = state.meta.classes.filter((_, i) => i && !s.visible[i]);
  if (hidden.length) parts.push(`hidden: ${hidden.join(", ")}`);
  if (s.outline) parts.push("outlines");
  if (state.heat) parts.push("uncertainty heatmap");
  if (state.before) parts.push(`before edit #${state.before.id} (full resolution only)`);
  $("view-state").textContent = parts.join(" · ");
}

function setOpacity(value) {
  state.seg?.setOpacity(value);
  $("opacity").value = value;
  showViewState();
}

function toggleHeat(on = !state.heat) {
  $("confidence").checked = on;
  if (!on) {
    const world = state.viewer.world;  // ("loading": its success handler drops it)
    for (const item of [state.heat, ...staleHeat.splice(0)]) {
      if (item?.source && world.getIndexOfItem(item) >= 0) world.removeItem(item);
    }
    state.heat = null;
    showViewState();
    return;
  }
  state.heat = "loading";
  state.viewer.addTiledImage({
    tileSource: overlaySource("confidence"), opacity: 0.7,
    success: (e) => {
      if (state.heat === "loading") state.heat = e.item; else state.viewer.world.removeItem(e.item);
      showViewState();
    },
  });
}

// A new version of some chunks: open the overlay again (its tile URLs now carry the new
// versions; unchanged tiles come from OpenSeadragon's cache), then drop the old ones once
// the newest is fully loaded, so the overlay never blinks. Refreshes may overlap (live
// updates): only the newest is kept.
let overlayGen = 0;
const staleOverlays = [];

function refreshOverlay(versions) {
  const changed = Object.keys(versions).filter((k) => state.versions[k] !== versions[k]);
  Object.assign(state.versions, versions);
  if (!state.seg || !changed.length) return;  // e.g. the live echo of our own edit
  const gen = ++overlayGen, world = state.viewer.world;
  state.viewer.addTiledImage({
    tileSource: overlaySource("segmentation"), opacity: state.seg.getOpacity(), index: 1,
    success: (e) => {
      if (gen !== overlayGen) { world.removeItem(e.item); return; }  // a newer one is coming
      staleOverlays.push(state.seg);
      state.seg = e.item;
      const drop = () => {
        if (state.seg !== e.item) return;
        for (const old of staleOverlays.splice(0)) if (world.getIndexOfItem(old) >= 0) world.removeItem(old);
      };
      if (e.item.getFullyLoaded()) drop(); else e.item.addOnceHandler("fully-loaded-change", drop);
    },
  });
}

// New confidence chunks (a model version re-predicted tiles): the heatmap, when shown,
// opens again with their versions in its URLs; the old one goes once the new one is drawn.
let heatGen = 0;
const staleHeat = [];

function refreshHeat(versions) {
  const changed = Object.keys(versions).filter((k) => state.confVersions[k] !== versions[k]);
  Object.assign(state.confVersions, versions);
  const old = state.heat, world = state.viewer?.world;
  if (!changed.length || !old || old === "loading") return;
  const gen = ++heatGen;
  state.viewer.addTiledImage({
    tileSource: overlaySource("confidence"), opacity: old.getOpacity(),
    success: (e) => {
      if (gen !== heatGen || state.heat !== old) { world.removeItem(e.item); return; }
      staleHeat.push(old);
      state.heat = e.item;
      const drop = () => {
        if (state.heat !== e.item) return;
        for (const item of staleHeat.splice(0)) if (world.getIndexOfItem(item) >= 0) world.removeItem(item);
      };
      if (e.item.getFullyLoaded()) drop(); else e.item.addOnceHandler("fully-loaded-change", drop);
    },
  });
}

// --- drawing ---------------------------------------------------------------------------
// coordinates through the image layer itself (the viewport's are ambiguous with 2 layers)
function base() { return state.viewer.world.getItemAt(0); }

// the pointer in viewer-element pixels (offsetX would be relative to whatever it is over)
function screenPoint(event) {
  const r = state.viewer.element.getBoundingClientRect();
  return [event.clientX - r.left, event.clientY - r.top];
}

// (x, y) in level-0 pixels, clamped to the image: a stroke may run past its edge
function imagePoint(event) {
  const [sx, sy] = screenPoint(event);
  const p = base().viewerElementToImageCoordinates(new OpenSeadragon.Point(sx, sy));
  const [h, w] = state.meta.shape;
  return [Math.min(w - 1, Math.max(0, Math.floor(p.x))), Math.min(h - 1, Math.max(0, Math.floor(p.y)))];
}

function toScreen(x, y) {
  const p = base().imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
  return [p.x, p.y];
}

function sketch() {
  let c = document.querySelector("canvas.sketch");
  if (!c) {
    c = document.createElement("canvas");
    c.className = "sketch";
    state.viewer.element.appendChild(c);
  }
  c.width = state.viewer.element.clientWidth;
  c.height = state.viewer.element.clientHeight;
  return c.getContext("2d");
}

function screenRadius() {
  const size = Number($("size").value);
  return Math.max(1, toScreen(size, 0)[0] - toScreen(0, 0)[0]);
}

function colour(label, alpha = 0.6) {
  const [r, g, b] = state.palette.subarray(4 * label, 4 * label + 3);
  return `rgba(${r},${g},${b},${alpha})`;
}

function onlyOver() {
  const v = $("paint-over").value;
  return v === "" ? undefined : Number(v);
}

// --- outbox: every edit is kept in IndexedDB until the server acknowledges it, so a
// reload or a lost connection never loses a stroke; it is re-sent with the same
// client_id (the server answers a re-send with the edit it already made) -----------------
const outbox = {
  db: null,  // a promise of the database, opened at start but never waited for there
  open() {
    this.db = new Promise((resolve, reject) => {
      const req = indexedDB.open("segloop", 1);
      req.onupgradeneeded = () => req.result.createObjectStore("outbox", { keyPath: "cid" });
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
    this.db.catch((e) => status(`offline edits cannot be kept: ${e.message}`));
  },
  async run(mode, fn) {
    const db = await this.db.catch(() => null);
    if (!db) return undefined;  // no IndexedDB here (said once, at open): strokes still go out
    return new Promise((resolve, reject) => {
      const tx = db.transaction("outbox", mode);
      const req = fn(tx.objectStore("outbox"));
      tx.oncomplete = () => resolve(req.result);
      tx.onerror = () => reject(tx.error);
    });
  },
  put(entry) { return this.run("readwrite", (s) => s.put(entry)); },
  remove(cid) { return this.run("readwrite", (s) => s.delete(cid)); },
  async all() {
    const rows = (await this.run("readonly", (s) => s.getAll())) || [];
    return rows.filter((r) => r.image === state.image && r.user === state.user.name)
      .sort((a, b) => a.created - b.created);
  },
};

function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`.slice(0, 64);
}

// the level-0 chunks a stroke or polygon can touch, with the versions this client drew on
function baseFor(edit) {
  if (["fill", "relabel", "assist"].includes(edit.op)) return undefined;  // extent unknown
  const r = edit.op === "polygon" ? 0 : edit.radius + 1;
  const xs = edit.points.map((p) => p[0]), ys = edit.points.map((p) => p[1]);
  const [h, w] = state.meta.shape, t = state.meta.tile;
  const out = {};
  for (let cy = Math.max(0, Math.floor((Math.min(...ys) - r) / t));
    cy <= Math.min(Math.ceil(h / t) - 1, Math.floor((Math.max(...ys) + r) / t)); cy++) {
    for (let cx = Math.max(0, Math.floor((Math.min(...xs) - r) / t));
      cx <= Math.min(Math.ceil(w / t) - 1, Math.floor((Math.max(...xs) + r) / t)); cx++) {
      out[`${cy}/${cx}`] = state.versions[`0/${cy}/${cx}`] || 0;
    }
  }
  return out;
}

async function sendEdit(edit, released) {
  const cid = newId();
  const only = edit.op === "erase" ? undefined : onlyOver();
  const entry = { cid, image: state.image, user: state.user.name, created: Date.now(),
                  edit: { ...edit, only, client_id: cid } };
  // stored and sent at once: a crash before the put ends loses only a stroke the server
  // may already hold; the entry leaves the outbox only after both
  const stored = outbox.put(entry);
  await deliver(entry, released, stored);
}

// POST one outbox entry; a 409 (someone changed the chunks) is rebased: take the
// current versions and send the same stroke again on top of their edit.
async function deliver(entry, released, stored = Promise.resolve()) {
  status("saving…");
  try {
    for (let attempt = 0; attempt < 5; attempt++) {
      const edit = { ...entry.edit, base: baseFor(entry.edit) };
      try {
        const t0 = performance.now();
        const out = await api("POST", `${imagePath()}/edits`, edit);
        if (released !== undefined) {
          state.acks.push(performance.now() - released);
          state.posts.push(performance.now() - t0);
        }
        refreshOverlay(out.pyramid || {});  // new versions of every level's touched chunks
        await stored;
        await outbox.remove(entry.cid);
        status(out.edit_id ? `saved edit ${out.edit_id}` : "nothing changed");
        loadEdits();
        return;
      } catch (e) {
        if (e.status !== 409) throw e;
        for (const [k, v] of Object.entries(e.data.versions)) state.versions[`0/${k}`] = v;
      }
    }
    throw new Error("the chunks keep changing; try again");
  } catch (e) {
    await stored;
    if (e.status >= 400 && e.status < 500) {  // refused for good: do not re-send
      await outbox.remove(entry.cid);
      status(`edit failed: ${e.message}`);
    } else {
      status("offline: edit kept, will be re-sent");
    }
  } finally {
    drawSketch();  // clears the optimistic drawing once the overlay reloads
  }
}

async function flushOutbox() {
  if (!outbox.db || !state.user) return;
  for (const entry of await outbox.all()) await deliver(entry);
}

// what the sketch layer shows: the polygon being drawn, the copilot's box or proposal
function drawSketch() {
  const ctx = sketch(), d = state.drawing;
  if (d?.op === "polygon") {
    ctx.fillStyle = colour(state.label);
    ctx.beginPath();
    d.points.forEach(([x, y], i) => (i ? ctx.lineTo(...toScreen(x, y)) : ctx.moveTo(...toScreen(x, y))));
    ctx.fill();
  }
  if (d?.op === "assist" && d.box) {
    const [a, b] = [toScreen(...d.points[0]), toScreen(...d.box)];
    ctx.strokeStyle = "#fff";
    ctx.setLineDash([4, 3]);
    ctx.strokeRect(a[0], a[1], b[0] - a[0], b[1] - a[1]);
  }
  const p = state.proposal;
  if (p?.canvas) {
    const [x, y, w, h] = p.box, [sx, sy] = toScreen(x, y), [ex, ey] = toScreen(x + w, y + h);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(p.canvas, sx, sy, ex - sx, ey - sy);
  }
  return ctx;
}

function moved(d, event) {
  return Math.hypot(event.clientX - d.start[0], event.clientY - d.start[1]) > 4;
}

function onPress(event) {
  // only presses on the image itself: never on the zoom buttons, never while space pans
  if (state.tool === "pan" || state.spacePan || event.button !== 0) return;
  if (!state.viewer.canvas.contains(event.target)) return;
  const p = imagePoint(event), start = [event.clientX, event.clientY];
  if (state.tool === "polygon") {
    state.drawing = state.drawing || { op: "polygon", points: [] };
    state.drawing.points.push(p);
    drawSketch();
    return;
  }
  if (["fill", "pick", "assist"].includes(state.tool)) {  // a click (assist: or a box)
    state.drawing = { op: state.tool, points: [p], start };
    return;
  }
  state.drawing = { op: state.tool, points: [p], ctx: sketch(), r: screenRadius(), start };
  dab(event);
}

function dab(event) {
  const d = state.drawing, [x, y] = screenPoint(event);
  d.ctx.fillStyle = d.op === "erase" ? "rgba(255,255,255,0.5)" : colour(state.label);
  d.ctx.beginPath();
  d.ctx.arc(x, y, d.r, 0, 2 * Math.PI);
  d.ctx.fill();
}

function onMove(event) {
  moveCursor(event);
  const d = state.drawing;
  if (!d || d.op === "polygon" || !(event.buttons & 1)) return;
  if (d.op === "assist") {
    if (moved(d, event)) { d.box = imagePoint(event); drawSketch(); }
    return;
  }
  if (d.op === "fill" || d.op === "pick") return;
  const p = imagePoint(event);
  const last = d.points[d.points.length - 1];
  if (p[0] !== last[0] || p[1] !== last[1]) d.points.push(p);
  dab(event);
}

function onRelease(event) {
  const d = state.drawing;
  if (!d || d.op === "polygon") return;
  state.drawing = null;
  if (d.op === "fill") {  // a drag is no fill
    if (!moved(d, event)) sendEdit({ op: "fill", points: d.points, label: state.label }, performance.now());
    return;
  }
  if (d.op === "pick") { if (!moved(d, event)) pick(d.points[0]); return; }
  if (d.op === "assist") { propose(d.box ? [d.points[0], d.box] : d.points); return; }
  const size = Number($("size").value);
  sendEdit({ op: d.op, points: d.points.slice(0, 10000), label: d.op === "erase" ? 0 : state.label,
             radius: size }, performance.now());
}

function onDoubleClick() {
  const d = state.drawing;
  if (!d || d.op !== "polygon") return;
  state.drawing = null;
  d.points.pop();  // the double-click's second press added its point again
  if (d.points.length >= 3) {
    sendEdit({ op: "polygon", points: d.points, label: state.label }, performance.now());
  } else drawSketch();
}

// drop whatever is half drawn or proposed (Escape, another tool, another slide)
function cancelDrawing() {
  const had = state.drawing || state.proposal;
  state.drawing = null;
  state.proposal = null;
  if (state.viewer) drawSketch();
  return had;
}

function setTool(tool) {
  state.tool = tool;
  cancelDrawing();
  state.viewer.setMouseNavEnabled(tool === "pan");
  for (const b of document.querySelectorAll("[data-tool]")) {
    b.classList.toggle("active", b.dataset.tool === tool);
  }
  $("threshold-box").hidden = tool !== "assist";
  $("brush-cursor").hidden = true;
}

// the brush's outline under the pointer, at its size on screen
function moveCursor(event) {
  const c = $("brush-cursor");
  const show = ["brush", "erase"].includes(state.tool) && !state.spacePan
    && state.viewer.canvas.contains(event.target);
  c.hidden = !show;
  if (!show) return;
  const [x, y] = screenPoint(event), d = 2 * screenRadius();
  Object.assign(c.style, { left: `${x}px`, top: `${y}px`, width: `${d}px`, height: `${d}px` });
}

function setLabel(label) {
  state.label = label;
  $("class").value = String(label);
}

async function pick([x, y]) {
  const out = await api("GET", `${imagePath()}/pixels/${y}/${x}`);
  if (out.label) setLabel(out.label);
  status(`picked ${out.class} (confidence ${out.confidence.toFixed(2)})`);
}

// --- the copilot: the server proposes a mask from the model's output; Enter accepts it
// as an ordinary edit (op "assist", recomputed there the same way), Escape drops it ------
async function propose(points) {
  const threshold = Number($("threshold").value);
  const ask = { points, label: state.label, threshold };
  state.proposal = { ...ask, pending: true };
  status("copilot: thinking…");
  const out = await api("POST", `${imagePath()}/assist`, ask);
  if (state.proposal?.points !== points || state.proposal.threshold !== threshold) return;  // superseded
  const [, , w, h] = out.box;
  const bits = Uint8Array.from(atob(out.mask), (ch) => ch.charCodeAt(0));
  const canvas = Object.assign(document.createElement("canvas"), { width: w, height: h });
  const ctx = canvas.getContext("2d"), img = ctx.createImageData(w, h);
  const [r, g, b] = state.palette.subarray(4 * state.label, 4 * state.label + 3);
  for (let i = 0; i < w * h; i++) {
    if ((bits[i >> 3] >> (7 - (i & 7))) & 1) img.data.set([r, g, b, 170], 4 * i);
  }
  ctx.putImageData(img, 0, 0);
  state.proposal = { ...ask, box: out.box, canvas, pixels: out.pixels };
  drawSketch();
  status(out.pixels ? `proposal: ${out.pixels} px, ${out.changed_px} would change — Enter accepts, Esc drops`
    : "no region at this threshold: lower it or click elsewhere");
}

function acceptProposal() {
  const p = state.proposal;
  if (!p?.pixels) return false;
  state.proposal = null;
  sendEdit({ op: "assist", points: p.points, label: p.label, threshold: p.threshold }, performance.now());
  return true;
}

// --- review ----------------------------------------------------------------------------
function expert() { return ["reviewer", "admin"].includes(state.user.role); }

async function nextTile(suffix = "") {
  const out = await api("POST", `${imagePath()}/queue/next`);
  if (!out.tile) { state.lease = null; showLease(); status(`queue empty${suffix}`); return; }
  state.lease = out.tile;
  const [ty, tx] = out.tile;
  state.viewer.viewport.fitBounds(tileRect(ty, tx, 0.1 * state.meta.tile));  // the outline in view
  showLease();
  status(`tile ${ty},${tx} (uncertainty ${out.uncertainty})${suffix}`);
}

// the leased tile, outlined in the main view
function showLease() {
  const old = $("lease-outline");
  if (old) state.viewer.removeOverlay(old);
  if (!state.lease) return;
  const el = Object.assign(document.createElement("div"), { id: "lease-outline", className: "lease-outline" });
  el.dataset.testid = "lease-outline";
  state.viewer.addOverlay(el, tileRect(...state.lease));
}

// a level-0 tile's viewport rectangle (tiles at the image's edge are smaller), ± margin px
function tileRect(ty, tx, margin = 0) {
  const t = state.meta.tile, [h, w] = state.meta.shape;
  const [x, y] = [tx * t, ty * t], [tw, th] = [Math.min(t, w - x), Math.min(t, h - y)];
  return base().imageToViewportRectangle(x - margin, y - margin, tw + 2 * margin, th + 2 * margin);
}

async function review(stateName, extra = {}) {
  if (!state.lease) { status("take a tile first (N)"); return; }
  const [ty, tx] = state.lease;
  const out = await api("PUT", `${imagePath()}/review/${ty}/${tx}`, { state: stateName, ...extra });
  loadCoverage();
  const said = ` · ${ty},${tx} ${out.state.replace("_", " ")}`;
  if (stateName === "flagged") { status(`tile ${ty},${tx}: flagged (${extra.reason})`); return; }
  await nextTile(said);  // a verdict moves on to the next uncertain tile
}

function openFlagForm() {
  if (!state.lease) { status("take a tile first (N)"); return; }
  $("flag-form").hidden = false;
  $("flag-reason").focus();
}

// --- overview: the whole image (its coarsest tile), review state per tile and the part in
// view; click to go there. It stands in for OpenSeadragon's navigator, a second viewer
// whose start-up cost the first tile ~70 ms here ------------------------------------------
const STATE_COLOURS = {
  unseen: "rgba(0,0,0,0)", in_review: "#d69e2e", accepted: "#38a169",
  corrected: "#3182ce", flagged: "#e53e3e", correction_proposed: "#90cdf4",
};
const REVIEWED = ["accepted", "corrected", "flagged", "correction_proposed"];

function reviewed(counts) { return REVIEWED.reduce((n, s) => n + (counts[s] || 0), 0); }

async function loadCoverage() {
  const cov = await api("GET", `${imagePath()}/coverage`);
  const canvas = $("coverage");
  const [ny, nx] = [cov.grid.length, cov.grid[0].length];
  const cell = Math.max(1, Math.floor(160 / Math.max(ny, nx)));
  state.coverage = { ...cov, cell };
  canvas.width = nx * cell;
  canvas.height = ny * cell;
  canvas.dataset.counts = JSON.stringify(cov.counts);
  canvas.onclick = (e) => {
    const [tx, ty] = [Math.floor(e.offsetX / cell), Math.floor(e.offsetY / cell)];
    if (ty < ny && tx < nx) state.viewer.viewport.fitBounds(tileRect(ty, tx));
  };
  if (!$("flag-reason").options.length) {
    for (const r of cov.reasons) $("flag-reason").add(new Option(r.replaceAll("_", " "), r));
  }
  const n = reviewed(cov.counts), total = nx * ny;
  $("progress").textContent = `${n} of ${total} tiles reviewed · ${Math.round(cov.seconds / 60)} min spent`;
  const mine = $("worklist").querySelector(".current .count");
  if (mine) mine.textContent = `${n}/${total}`;
  drawOverview();
}

// the coarsest image tile, fetched once the view shows its first tile (off the critical path)
async function loadOverviewImage() {
  const top = state.meta.levels - 1;
  const r = await fetch(`${imagePath()}/tiles/image/${top}/0/0?v=0`,
    { headers: { Authorization: `Bearer ${state.token}` } });
  if (r.ok) state.overview = await createImageBitmap(await r.blob());
  drawOverview();
}

let overviewFrame = 0;
function drawOverview() {
  cancelAnimationFrame(overviewFrame);
  overviewFrame = requestAnimationFrame(() => {
    const cov = state.coverage, canvas = $("coverage");
    if (!cov) return;
    const ctx = canvas.getContext("2d"), cell = cov.cell;
    const [h, w] = state.meta.shape, t = state.meta.tile;
    const scale = cell / t;  // overview px per level-0 px
    ctx.fillStyle = "rgba(255,255,255,0.08)";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (state.overview) ctx.drawImage(state.overview, 0, 0, w * scale, h * scale);
    ctx.globalAlpha = 0.6;
    cov.grid.forEach((row, y) => row.forEach((k, x) => {
      ctx.fillStyle = STATE_COLOURS[cov.states[k]];
      ctx.fillRect(x * cell, y * cell, cell, cell);
    }));
    ctx.globalAlpha = 1;
    ctx.fillStyle = MARK;  // tiles re-predicted since last looked at: a corner square
    const dot = Math.max(1, Math.ceil(cell / 3));
    for (const k of updates.marks.keys()) {
      const [y, x] = k.split("/").map(Number);
      ctx.fillRect((x + 1) * cell - dot, y * cell, dot, dot);
    }
    const item = state.viewer && base();
    if (item) {  // the part in view
      const r = item.viewportToImageRectangle(state.viewer.viewport.getBounds(true));
      ctx.strokeStyle = "#f6e05e";
      ctx.lineWidth = 1.5;
      ctx.strokeRect(r.x * scale, r.y * scale, r.width * scale, r.height * scale);
    }
  });
}

// --- slides: every store the server serves, with its review progress -------------------
async function loadWorklist() {
  const list = $("worklist");
  list.replaceChildren();
  for (const img of state.images) {
    const li = document.createElement("li");
    li.dataset.testid = `slide-${img.name}`;
    li.classList.toggle("current", img.name === state.image);
    const count = Object.assign(document.createElement("span"), { className: "count" });
    li.append(`${img.name} `, count);
    li.onclick = guarded(() => switchImage(img.name));
    list.append(li);
    api("GET", `${imagePath(img.name)}/coverage`).then((cov) => {
      count.textContent = `${reviewed(cov.counts)}/${cov.grid.length * cov.grid[0].length}`;
    });
  }
}

// --- recent edits: who did what, click to fly there; undo/redo folded into the edits they
// revert; reviewers approve or reject annotators' proposals ------------------------------
const REVERTS = ["undo", "redo", "reject"];
let editsTimer = null;
function loadEdits() {
  clearTimeout(editsTimer);
  editsTimer = setTimeout(async () => {
    const rows = await api("GET", `${imagePath()}/edits?limit=50`);
    const list = $("edit-list");
    list.replaceChildren();
    const folded = rows.filter((r) => REVERTS.includes(r.op)).length;
    for (const r of rows.filter((row) => !REVERTS.includes(row.op)).slice(0, 25)) {
      const li = document.createElement("li");
      li.dataset.testid = `edit-${r.id}`;
      li.title = "click to go there";
      const when = new Date(r.created * 1000).toLocaleTimeString();
      li.textContent = `#${r.id} ${r.user} ${r.op}${r.label == null ? "" : ` → ${state.meta.classes[r.label]}`} ${when}${r.undone ? " (undone)" : ""} `;
      li.onclick = (e) => { if (e.target === li) flyTo(r.chunks); };
      if (r.status !== "applied") li.append(Object.assign(document.createElement("em"), { textContent: r.status }));
      if (r.status === "proposed") {  // its before and after, in place
        const b = Object.assign(document.createElement("button"), {
          textContent: state.before?.id === r.id ? "after" : "before", title: "show the labels before / after this edit" });
        b.dataset.testid = `before-after-${r.id}`;
        b.onclick = guarded(() => toggleBefore(r.id));
        li.append(" ", b);
      }
      if (expert() && r.status === "proposed") {
        for (const decision of ["approve", "reject"]) {
          const b = document.createElement("button");
          b.textContent = decision;
          b.dataset.testid = `${decision}-${r.id}`;
          b.onclick = guarded(async () => {
            if (state.before?.id === r.id) await toggleBefore(r.id);  // decided: after
            const out = await api("POST", `${imagePath()}/edits/${r.id}/decision`, { decision });
            refreshOverlay(out.revert?.pyramid || {});
            status(`edit ${r.id} ${out.status}`);
            loadEdits();
          });
          li.append(" ", b);
        }
      }
      list.append(li);
    }
    if (folded) {
      const li = Object.assign(document.createElement("li"), { className: "folded",
        textContent: `${folded} undo/redo folded into the edits above` });
      li.dataset.testid = "edits-folded";
      list.append(li);
    }
  }, 200);
}

function flyTo(chunks) {
  const t = state.meta.tile, keys = chunks.map((k) => k.split("/").map(Number));
  const ys = keys.map((k) => k[0]), xs = keys.map((k) => k[1]);
  const [y0, x0] = [Math.min(...ys) * t, Math.min(...xs) * t];
  const [y1, x1] = [(Math.max(...ys) + 1) * t, (Math.max(...xs) + 1) * t];
  state.viewer.viewport.fitBounds(base().imageToViewportRectangle(x0, y0, x1 - x0, y1 - y0));
}

async function undoRedo(op) {
  try {
    const out = await api("POST", `${imagePath()}/${op}`);
    refreshOverlay(out.pyramid || {});
    status(`${op} done`);
    loadEdits();
  } catch (e) { status(e.message); }
}

// --- navigation: scale bar, magnification, the view kept per image across reloads -------
function showScale() {
  const item = base();
  if (!item) return;
  const ratio = item.viewportToImageZoom(state.viewer.viewport.getZoom(true));  // screen px per image px
  if (state.smooth !== ratio < 1) {  // pixel-exact past 1:1
    state.smooth = ratio < 1;
    state.viewer.drawer.setImageSmoothingEnabled(state.smooth);
  }
  const um = state.meta.pixel_size_um, bar = $("scale-bar");
  const zoom = `zoom ${ratio >= 1 ? ratio.toFixed(1) : ratio.toFixed(2)}×`;  // screen px per image px
  if (!um) {
    bar.hidden = true;
    $("scale-readout").textContent = `pixel size unknown · ${zoom}`;
    return;
  }
  const perPx = um / ratio;  // µm per screen px
  const nice = [1, 2, 5].flatMap((m) => [-2, -1, 0, 1, 2, 3, 4].map((e) => m * 10 ** e)).sort((a, b) => a - b);
  const length = nice.find((l) => l / perPx >= 80) ?? nice[nice.length - 1];
  bar.hidden = false;
  bar.style.width = `${Math.round(length / perPx)}px`;
  const label = length >= 1000 ? `${length / 1000} mm` : `${length} µm`;
  $("scale-readout").textContent = `${label} · ${(10 / perPx).toPrecision(3)}× magnification · ${zoom}`;
}

function viewKey() { return `segloop-view-${state.image}`; }

let viewTimer = 0;
function keepView() {
  clearTimeout(viewTimer);
  viewTimer = setTimeout(() => {
    const vp = state.viewer.viewport, c = vp.getCenter(true);
    localStorage.setItem(viewKey(), JSON.stringify({ x: c.x, y: c.y, zoom: vp.getZoom(true) }));
    tellFocus(base().viewportToImageCoordinates(c));
  }, 250);
}

// serve --learn re-predicts the tiles nearest to where reviewers look first: tell it the
// level-0 tile at the centre of the view when that changes
let focusTile = "";
function tellFocus(p) {
  if (!state.model?.learning) return;
  const t = state.meta.tile, [ny, nx] = state.meta.tiles;
  const tile = [Math.floor(p.y / t), Math.floor(p.x / t)];
  if (tile[0] < 0 || tile[1] < 0 || tile[0] >= ny || tile[1] >= nx) return;
  if (String(tile) === focusTile) return;
  focusTile = String(tile);
  api("POST", `${imagePath()}/model/focus`, { tile }).catch(() => {});  // a hint only
}

function restoreView() {
  const v = JSON.parse(localStorage.getItem(viewKey()) || "null");
  if (!v) return;
  state.viewer.viewport.zoomTo(v.zoom, null, true);
  state.viewer.viewport.panTo(new OpenSeadragon.Point(v.x, v.y), true);
}

// --- model versions (serve --learn): the version served and its score in the header, a
// round's progress, a notice of each update with its tiles, marks on the tiles re-predicted
// since this reviewer last looked at them; reviewers roll back -------------------------
const MARK = "#ff4fd8";
// marks: "ty/tx" → id of the newest update that re-predicted the tile (not viewed since);
// seen (localStorage, per image and user): updates up to `after` are acknowledged, and
// `viewed` a tile → the update it was viewed after (none kept: a first visit, nothing to
// mark); fetched: the newest update id known
const updates = {
  marks: new Map(), seen: null, fetched: 0, notice: null, chain: Promise.resolve(),
};

function seenKey() { return `segloop-seen-${state.image}-${state.user.name}`; }

function saveSeen() {
  if (!updates.marks.size) updates.seen = { after: updates.fetched, viewed: {} };  // all seen
  localStorage.setItem(seenKey(), JSON.stringify(updates.seen));
}

function score(x) { return typeof x === "number" ? x.toFixed(2) : "–"; }

function plural(n, word) { return `${n} ${word}${n === 1 ? "" : "s"}`; }

// GET …/model soon after a model event, and every 2 s while a round runs (its end sends
// no event of its own); an answer overtaken by a newer request is dropped
let modelTimer = null, modelSeq = 0;
function loadModel(delay = 100) {
  clearTimeout(modelTimer);
  modelTimer = setTimeout(guarded(async () => {
    const seq = ++modelSeq, image = state.image, m = await api("GET", `${imagePath()}/model`);
    if (seq !== modelSeq || image !== state.image) return;
    showModel(m);
    if (m.round) loadModel(2000);
  }), delay);
}

function showModel(m) {
  state.model = m;
  const s = m.served, r = m.round, el = $("model");
  let text = `model v${s.version ?? "?"}`;
  if (r) {  // first: a narrow header cuts the end off (the tooltip holds all of it)
    const what = r.kind === "rollback" ? "predicting" : "learning";
    text += ` · ${what}${r.version == null ? "" : ` v${r.version}`}…`;
    text += r.progress ? ` ${r.progress[0]}/${r.progress[1]}` : ` ${r.state}`;
  }
  if (s.score) {
    text += ` · IoU ${score(s.score.corrections_mean_iou)}`;
    const nucleus = s.score.in_distribution?.nucleus;
    if (nucleus != null) text += ` · nucleus ${score(nucleus)}`;
  }
  el.textContent = text;
  el.title = `${text}\n(IoU: on the corrections held out of training; nucleus: on the synthetic set)`;
  el.classList.toggle("learning", !!r);
  $("model-panel").hidden = !m.learning;
  if (!m.learning) return;
  const detail = [`${m.pending_verdicts} of ${m.every} verdicts toward the next round`];
  if (s.trained_on != null) detail.unshift(`v${s.version}: trained on ${plural(s.trained_on, "tile")}`);
  const failed = m.versions.filter((v) => ["rejected", "failed"].includes(v.status)).pop();
  if (failed && failed.version > s.version) detail.push(`v${failed.version} ${failed.status}: ${failed.why || "?"}`);
  $("model-detail").textContent = detail.join(" · ");
  const select = $("rollback-version");
  if (!select) return;  // viewers and annotators roll nothing back
  const older = m.versions.filter((v) => v.status === "kept" && v.version < s.version).reverse();
  const was = select.value;
  select.replaceChildren(...older.map((v) => new Option(
    `v${v.version}${v.score ? ` (IoU ${score(v.score.corrections_mean_iou)})` : ""}`, v.version)));
  if (older.some((v) => String(v.version) === was)) select.value = was;
  $("rollback-box").hidden = !older.length;
}

async function rollback() {
  const v = Number($("rollback-version").value);
  const served = state.model.served.version;
  if (!confirm(`Serve model v${v} again instead of v${served}? The newer versions are retired `
    + `and the tiles they predicted get v${v}'s predictions back.`)) return;
  try {
    const out = await api("POST", `${imagePath()}/model/rollback`, { version: v });
    const retired = out.retired.map((r) => `v${r}`).join(", ") || "nothing";
    status(`rolled back to v${out.served}: ${retired} retired, ${out.restored} tiles restored`
      + (out.predicting ? `, ${out.predicting} to predict` : ""));
  } catch (e) { status(`rollback failed: ${e.message}`); }
  loadModel();
}

// the updates after the last one fetched (one request at a time); live: show them in
// the notice as they come, else (on opening the image) sum up what was not seen yet
function loadUpdates(live) {
  const image = state.image;
  updates.chain = updates.chain.then(async () => {
    const out = await api("GET", `${imagePath()}/model/updates?after=${updates.fetched}`);
    if (image !== state.image) return;
    const first = !updates.seen;  // this user never opened the image: all seen
    if (first) updates.seen = { after: 0, viewed: {} };
    const viewed = updates.seen.viewed;
    for (const u of out.updates) {
      if (u.id <= updates.fetched) continue;
      updates.fetched = u.id;
      if (first) continue;
      const keys = u.tiles.map(([ty, tx]) => `${ty}/${tx}`);
      for (const k of keys) if (!(viewed[k] >= u.id)) updates.marks.set(k, u.id);
      if (live) notice(u.version, u.kind, keys);
    }
    if (first) saveSeen();
    if (!live && updates.marks.size) notice(null, "since", [...updates.marks.keys()]);
    drawMarks();
  }).catch((e) => status(e.message));
}

// the notice: one per version and kind (a round's batches add up), its tiles one by one
function notice(version, kind, keys) {
  const n = updates.notice;
  if (n && n.version === version && n.kind === kind) for (const k of keys) n.tiles.add(k);
  else updates.notice = { version, kind, tiles: new Set(keys), at: -1 };
  const { tiles } = updates.notice, count = plural(tiles.size, "tile");
  $("update-text").textContent = kind === "since" ? `${count} updated since you last looked`
    : kind === "rollback" ? `rolled back to v${version}: ${count} restored`
    : `model v${version} updated ${count}`;
  $("update-text").dataset.tiles = tiles.size;
  $("update-next").hidden = true;
  $("update-notice").hidden = false;
}

function showUpdated(at) {
  const n = updates.notice, tiles = [...n.tiles];
  n.at = at % tiles.length;
  const [ty, tx] = tiles[n.at].split("/").map(Number);
  state.viewer.viewport.fitBounds(tileRect(ty, tx, 0.1 * state.meta.tile));
  $("update-next").hidden = tiles.length < 2;
  $("update-next").textContent = `next (${n.at + 1}/${tiles.length})`;
}

function dismissUpdates() {
  $("update-notice").hidden = true;
  updates.notice = null;
  updates.marks.clear();  // acknowledged, every one
  saveSeen();
  drawMarks();
}

// the marked tiles in view at full resolution (level 0) lose their mark: seen
let viewedTimer = 0;
function checkViewed() {
  clearTimeout(viewedTimer);
  viewedTimer = setTimeout(() => {
    const item = base(), vp = state.viewer.viewport, t = state.meta.tile;
    if (!updates.marks.size || !item || item.viewportToImageZoom(vp.getZoom(true)) < 0.5) return;
    const r = item.viewportToImageRectangle(vp.getBounds(true));
    let seen = 0;
    for (const [k, id] of updates.marks) {
      const [ty, tx] = k.split("/").map(Number), [cy, cx] = [(ty + 0.5) * t, (tx + 0.5) * t];
      if (cx < r.x || cx > r.x + r.width || cy < r.y || cy > r.y + r.height) continue;
      updates.seen.viewed[k] = id;
      updates.marks.delete(k);
      seen++;
    }
    if (seen) { saveSeen(); drawMarks(); }
  }, 300);
}

// a dashed outline on each marked tile of the main view (a layer like the sketch's), and
// a corner square on the overview
let marksFrame = 0;
function drawMarks() {
  cancelAnimationFrame(marksFrame);
  marksFrame = requestAnimationFrame(() => {
    const el = state.viewer?.element;
    if (!el || !base()) return;
    let c = el.querySelector("canvas.marks");
    if (!c) {
      c = Object.assign(document.createElement("canvas"), { className: "marks" });
      c.dataset.testid = "update-marks";
      el.appendChild(c);
    }
    [c.width, c.height] = [el.clientWidth, el.clientHeight];
    c.dataset.tiles = updates.marks.size;
    const ctx = c.getContext("2d"), t = state.meta.tile, [h, w] = state.meta.shape;
    const [ox, oy] = toScreen(0, 0), f = (toScreen(t, 0)[0] - ox) / t;  // screen px per image px
    ctx.strokeStyle = ctx.fillStyle = MARK;
    ctx.lineWidth = 2;
    ctx.setLineDash([6, 4]);
    for (const k of updates.marks.keys()) {
      const [ty, tx] = k.split("/").map(Number);
      const [x0, y0] = [ox + tx * t * f, oy + ty * t * f];
      const [x1, y1] = [ox + Math.min(w, (tx + 1) * t) * f, oy + Math.min(h, (ty + 1) * t) * f];
      if (x1 < 0 || y1 < 0 || x0 > c.width || y0 > c.height) continue;
      if (t * f < 12) ctx.fillRect(x0, y0, Math.max(1, x1 - x0), Math.max(1, y1 - y0));  // far out
      else ctx.strokeRect(x0 + 2, y0 + 2, Math.max(1, x1 - x0 - 4), Math.max(1, y1 - y0 - 4));
    }
    drawOverview();
  });
}

// an image opened: its model, and the updates since this user last looked
function openModel() {
  updates.marks.clear();
  updates.notice = null;
  $("update-notice").hidden = true;
  updates.seen = JSON.parse(localStorage.getItem(seenKey()) || "null");
  updates.fetched = updates.seen?.after || 0;
  loadModel();
  loadUpdates(false);
}

// --- live updates ------------------------------------------------------------------------
function listen() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}${imagePath()}/live?token=${encodeURIComponent(state.token)}`);
  ws.onopen = () => {  // (re)connected: send what a lost connection held back, hear what it missed
    flushOutbox();
    if (updates.seen) { loadModel(); loadUpdates(true); }
  };
  ws.onmessage = (m) => {
    const event = JSON.parse(m.data);
    if (event.type === "chunks" && event.layer === "confidence") refreshHeat(event.versions);
    else if (event.type === "chunks") { refreshOverlay(event.versions); loadEdits(); }
    if (event.type === "review") loadCoverage();
    if (event.type === "model") {
      loadModel();
      if (event.event === "updated") loadUpdates(true);
    }
  };
  ws.onclose = () => { if (state.ws === ws) setTimeout(() => state.ws === ws && listen(), 2000); };
  state.ws = ws;
}

// --- keys --------------------------------------------------------------------------------
const TOOL_KEYS = { v: "pan", b: "brush", e: "erase", p: "polygon", f: "fill", i: "pick", g: "assist" };

// keys typed into a field are the field's (checkboxes and sliders let shortcuts through)
function typing(e) {
  const t = e.target;
  return ["TEXTAREA", "SELECT"].includes(t.tagName)
    || (t.tagName === "INPUT" && !["checkbox", "range", "color"].includes(t.type));
}

function onKey(e) {
  if (typing(e)) return;
  const size = $("size"), vp = state.viewer.viewport, k = e.key;
  if (k === " ") {  // hold space: pan with any tool
    e.preventDefault();  // no page scroll, no click on a focused button
    if (!state.spacePan) {
      state.spacePan = true;
      state.viewer.setMouseNavEnabled(true);
      $("viewer").style.cursor = "grab";
      $("brush-cursor").hidden = true;
    }
    return;
  }
  const pan = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] }[k];
  if (pan) {
    e.preventDefault();
    const b = vp.getBounds(), f = e.shiftKey ? 0.5 : 0.15;
    vp.panBy(new OpenSeadragon.Point(pan[0] * b.width * f, pan[1] * b.height * f));
  } else if (k === "Escape") {
    if (!$("help").hidden) $("help").hidden = true;
    else if (!$("flag-form").hidden) $("flag-form").hidden = true;
    else if (cancelDrawing()) status("cancelled");
  } else if (k === "Enter") {
    if (acceptProposal()) e.preventDefault();
  } else if (k === "?") $("help").hidden = !$("help").hidden;
  else if (k === "+" || k === "=") vp.zoomBy(1.5);
  else if (k === "-") vp.zoomBy(1 / 1.5);
  else if (!$("tools")) {  // a viewer: navigation only
    if (k === "h") setOpacity(state.seg?.getOpacity() ? 0 : 0.5);
  } else if (k.toLowerCase() === "z" && (e.ctrlKey || e.metaKey)) undoRedo(e.shiftKey ? "redo" : "undo");
  else if (k === "y" && (e.ctrlKey || e.metaKey)) undoRedo("redo");
  else if (e.ctrlKey || e.metaKey || e.altKey) return;
  else if (k === "[") size.value = Math.max(1, Number(size.value) - 2);
  else if (k === "]") size.value = Math.min(256, Number(size.value) + 2);
  else if (/^[0-9]$/.test(k) && Number(k) < state.meta.classes.length) setLabel(Number(k));
  else if (k === "n") guarded(nextTile)();
  else if (k === "a") guarded(() => review(expert() ? "accepted" : "corrected"))();
  else if (k === "h") setOpacity(state.seg?.getOpacity() ? 0 : 0.5);
  else if (k === "o") { state.style.outline = !state.style.outline; restyle(); }
  else if (k === "u") toggleHeat();
  else if (TOOL_KEYS[k]) setTool(TOOL_KEYS[k]);
}

function onKeyUp(e) {
  if (e.key !== " " || !state.spacePan) return;
  e.preventDefault();
  state.spacePan = false;
  state.viewer.setMouseNavEnabled(state.tool === "pan");
  $("viewer").style.cursor = "";
}

// --- opening an image (first load, or another slide from the worklist) -------------------
function showImage() {
  if ($("tools")) {  // viewers have none
    const select = $("class"), over = $("paint-over");
    select.replaceChildren();
    state.meta.classes.forEach((c, i) => select.add(new Option(`${i} ${c}`, i)));
    while (over.options.length > 2) over.remove(2);
    state.meta.classes.forEach((c, i) => { if (i) over.add(new Option(`${c} only`, i)); });
    setLabel(Math.min(state.label, state.meta.classes.length - 1));
  }
  loadStyle();
  buildClassList();
  restyle();
  $("who").textContent = `${state.image} — ${state.user.name} (${state.user.role})`;
}

function addOverlay() {
  state.viewer.addTiledImage({
    tileSource: overlaySource("segmentation"), opacity: Number($("opacity").value), index: 1,
    success: (e) => { state.seg = e.item; showViewState(); },
  });
}

async function switchImage(name) {
  if (name === state.image) return;
  cancelDrawing();
  state.before = null;
  const ws = state.ws;
  state.ws = null;
  ws?.close();
  state.meta = state.images.find((i) => i.name === name);
  state.image = name;
  state.lease = null;
  state.versions = state.meta.versions.edited_chunks ? await api("GET", `${imagePath()}/versions`) : {};
  state.confVersions = state.meta.versions.confidence_chunks
    ? await api("GET", `${imagePath()}/versions?layer=confidence`) : {};
  history.replaceState(null, "", `?image=${encodeURIComponent(name)}`);
  state.seg = null;
  overlayGen++;  // a refresh of the other slide still on its way is dropped
  staleOverlays.length = 0;
  state.heat = null;
  heatGen++;
  staleHeat.length = 0;
  $("confidence").checked = false;
  state.overview = null;
  state.viewer.addOnceHandler("open", () => {
    restoreView();
    showScale();
    addOverlay();
    loadOverviewImage();
  });
  state.viewer.open(tileSource("image"));
  showImage();
  for (const li of $("worklist").children) li.classList.toggle("current", li.dataset.testid === `slide-${name}`);
  loadCoverage();
  loadEdits();
  listen();
  openModel();
  status(`opened ${name}`);
}

// --- start -------------------------------------------------------------------------------
async function start() {
  state.token = takeToken();
  if (!state.token) {
    $("login").hidden = false;
    $("login-button").onclick = () => {
      sessionStorage.setItem("segloop-token", $("token-input").value.trim());
      location.reload();
    };
    return;
  }
  // the requests go out while the viewer's script still loads (this script comes first);
  // a store nobody edited has no chunk versions to ask for
  outbox.open();  // off the first tile's path: only a stroke or a re-send needs it
  const user = api("GET", "/api/me");
  state.images = await api("GET", "/api/images");
  const wanted = new URL(location.href).searchParams.get("image");
  state.meta = state.images.find((i) => i.name === wanted) || state.images[0];
  state.image = state.meta.name;
  const versions = state.meta.versions.edited_chunks
    ? api("GET", `${imagePath()}/versions`) : {};
  const confVersions = state.meta.versions.confidence_chunks  // re-predicted by --learn
    ? api("GET", `${imagePath()}/versions?layer=confidence`) : {};
  const parsed = new Promise((resolve) => (document.readyState === "loading"
    ? document.addEventListener("DOMContentLoaded", resolve) : resolve()));
  [state.user, state.versions, state.confVersions] = await Promise.all(
    [user, versions, confVersions, parsed]);
  if (state.user.role === "viewer") { $("tools").remove(); $("review").remove(); }
  else if (!expert()) {  // annotators propose "corrected"; a reviewer accepts
    $("accept").remove();
    Object.assign($("corrected"), { textContent: "propose corrected", title: "propose the tile corrected (A): a reviewer decides" });
    $("corrected").dataset.testid = "propose-corrected";
  }
  if (!expert()) $("rollback-box").remove();  // reviewers and admins roll back

  state.viewer = OpenSeadragon({
    element: $("viewer"),
    prefixUrl: "/vendor/openseadragon/images/",
    tileSources: tileSource("image"),
    loadTilesWithAjax: true,
    ajaxHeaders: { Authorization: `Bearer ${state.token}` },
    showNavigator: false,  // the overview in the side panel does its work
    showNavigationControl: false,  // #nav instead: its 16 button images would queue with the first tiles
    immediateRender: false,
    blendTime: 0,
    imageLoaderLimit: 8,
    drawer: "canvas",
    maxZoomPixelRatio: 16,  // past 1:1, for pixel-exact painting
    gestureSettingsMouse: { clickToZoom: false },
  });
  showImage();
  const firstTile = new Promise((resolve) => state.viewer.addOnceHandler("tile-loaded", () => {
    state.firstTileMs = performance.now();
    resolve();
  }));
  // the page's shortcuts only: OpenSeadragon's own (F flips, R rotates, W A S D pan) would
  // fire with them whenever the canvas has the focus
  state.viewer.addHandler("canvas-key", (e) => { e.preventDefaultAction = true; });
  state.viewer.addOnceHandler("open", restoreView);
  state.viewer.addHandler("viewport-change", () => {
    drawOverview();
    showScale();
    keepView();
    if (updates.marks.size) { drawMarks(); checkViewed(); }
    if (state.proposal?.canvas || state.drawing?.op === "polygon") drawSketch();
  });
  firstTile.then(addOverlay);  // the image first: overlay tiles are decoded on this thread
  $("opacity").oninput = (e) => setOpacity(Number(e.target.value));
  $("outline").onchange = (e) => { state.style.outline = e.target.checked; restyle(); };
  $("confidence").onchange = (e) => toggleHeat(e.target.checked);
  const el = state.viewer.element;
  el.addEventListener("pointerdown", onPress, true);
  el.addEventListener("pointermove", onMove, true);
  el.addEventListener("pointerup", onRelease, true);
  el.addEventListener("pointerleave", () => { $("brush-cursor").hidden = true; });
  el.addEventListener("dblclick", onDoubleClick, true);
  for (const b of document.querySelectorAll("[data-tool]")) b.onclick = () => setTool(b.dataset.tool);
  if ($("tools")) {
    $("class").onchange = () => { state.label = Number($("class").value); };
    $("threshold").oninput = () => {
      const p = state.proposal;
      if (p) guarded(propose)(p.points);
    };
  }
  $("undo")?.addEventListener("click", () => undoRedo("undo"));
  $("redo")?.addEventListener("click", () => undoRedo("redo"));
  $("zoom-in").onclick = () => state.viewer.viewport.zoomBy(1.5);
  $("zoom-out").onclick = () => state.viewer.viewport.zoomBy(1 / 1.5);
  $("zoom-home").onclick = () => state.viewer.viewport.goHome();
  // the viewer alone on the page (OpenSeadragon's own full page takes the page's other
  // elements out of the document, and the side panel's code with them)
  $("full-page").onclick = () => document.body.classList.toggle("full-page");
  $("help-button").onclick = () => { $("help").hidden = !$("help").hidden; };
  $("rollback")?.addEventListener("click", guarded(rollback));
  $("update-show").onclick = () => showUpdated(0);
  $("update-next").onclick = () => showUpdated(updates.notice.at + 1);
  $("update-dismiss").onclick = dismissUpdates;
  if ($("review")) {
    $("next").onclick = guarded(() => nextTile());
    $("accept")?.addEventListener("click", guarded(() => review("accepted")));
    $("corrected").onclick = guarded(() => review("corrected"));
    $("flag").onclick = openFlagForm;
    $("flag-cancel").onclick = () => { $("flag-form").hidden = true; };
    $("flag-form").onsubmit = guarded(async (e) => {
      e.preventDefault();
      $("flag-form").hidden = true;
      await review("flagged", { reason: $("flag-reason").value, comment: $("flag-comment").value.trim() || null });
      $("flag-comment").value = "";
    });
  }
  document.addEventListener("keydown", onKey);
  document.addEventListener("keyup", onKeyUp);
  window.addEventListener("online", flushOutbox);
  status("ready");
  // the side panel and live updates wait for the first tile (1 s at most): their requests
  // would otherwise queue with the tiles' for the browser's six connections
  await Promise.race([firstTile, new Promise((resolve) => setTimeout(resolve, 1000))]);
  showScale();
  loadCoverage();
  loadEdits();
  listen();
  openModel();
  loadOverviewImage();
  loadWorklist();
}

start().catch((e) => status(`error: ${e.message}`));
