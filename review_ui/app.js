// segloop review UI: OpenSeadragon deep-zoom viewer over the review server's tile API,
// segmentation overlay, brush/eraser/polygon/fill tools, server-side undo, review queue.
"use strict";

const state = {
  token: null, user: null, image: null, meta: null, viewer: null, seg: null,
  tool: "pan", label: 1, versions: {}, lease: null, drawing: null,
  acks: [],  // ms from mouse-up to the server's ack, per stroke (benchmarks read it)
  firstTileMs: null,  // ms from navigation start to the first tile loaded
  posts: [],  // ms of the POST alone, per stroke
};

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
function imagePath() {
  return `/api/images/${encodeURIComponent(state.image)}`;
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

function status(text) { document.getElementById("status").textContent = text; }

// --- tiles: OpenSeadragon level L ↔ store level maxLevel − L -----------------------------
function tileSource(layer) {
  const m = state.meta;
  const [h, w] = m.shape;
  const maxLevel = Math.ceil(Math.log2(Math.max(w, h)));
  return {
    width: w, height: h, tileSize: m.tile, tileOverlap: 0,
    minLevel: maxLevel - (m.levels - 1), maxLevel,
    getTileUrl(level, x, y) {
      const k = maxLevel - level;
      const v = layer === "segmentation" ? state.versions[`${k}/${y}/${x}`] : 0;
      const q = v === undefined ? "" : `?v=${v}`;
      return `${imagePath()}/tiles/${layer}/${k}/${y}/${x}${q}`;
    },
  };
}

// A new version of some chunks: open the overlay again (its tile URLs now carry the new
// versions; unchanged tiles come from the browser cache), then drop the old one, so the
// overlay never blinks.
function refreshOverlay(versions) {
  const changed = Object.keys(versions).filter((k) => state.versions[k] !== versions[k]);
  Object.assign(state.versions, versions);
  if (!state.seg || !changed.length) return;  // e.g. the live echo of our own edit
  const old = state.seg;
  state.viewer.addTiledImage({
    tileSource: tileSource("segmentation"), opacity: old.getOpacity(),
    success: (e) => {
      state.seg = e.item;
      e.item.addOnceHandler("fully-loaded-change", () => state.viewer.world.removeItem(old));
      if (e.item.getFullyLoaded()) state.viewer.world.removeItem(old);
    },
  });
}

// --- drawing ---------------------------------------------------------------------------
// coordinates through the image layer itself (the viewport's are ambiguous with 2 layers)
function base() { return state.viewer.world.getItemAt(0); }

// (x, y) in level-0 pixels, clamped to the image: a stroke may run past its edge
function imagePoint(event) {
  const p = base().viewerElementToImageCoordinates(
    new OpenSeadragon.Point(event.offsetX, event.offsetY));
  const [h, w] = state.meta.shape;
  return [Math.min(w - 1, Math.max(0, Math.round(p.x))), Math.min(h - 1, Math.max(0, Math.round(p.y)))];
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
  const size = Number(document.getElementById("size").value);
  const a = base().imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
  const b = base().imageToViewerElementCoordinates(new OpenSeadragon.Point(size, 0));
  return Math.max(1, b.x - a.x);
}

function colour(label) {
  const [r, g, b] = state.meta.colors[label];
  return `rgba(${r},${g},${b},0.6)`;
}

// --- outbox: every edit is kept in IndexedDB until the server acknowledges it, so a
// reload or a lost connection never loses a stroke; it is re-sent with the same
// client_id (the server answers a re-send with the edit it already made) -----------------
const outbox = {
  db: null,
  open() {
    return new Promise((resolve, reject) => {
      const req = indexedDB.open("segloop", 1);
      req.onupgradeneeded = () => req.result.createObjectStore("outbox", { keyPath: "cid" });
      req.onsuccess = () => { this.db = req.result; resolve(); };
      req.onerror = () => reject(req.error);
    });
  },
  run(mode, fn) {
    return new Promise((resolve, reject) => {
      const tx = this.db.transaction("outbox", mode);
      const req = fn(tx.objectStore("outbox"));
      tx.oncomplete = () => resolve(req.result);
      tx.onerror = () => reject(tx.error);
    });
  },
  put(entry) { return this.run("readwrite", (s) => s.put(entry)); },
  remove(cid) { return this.run("readwrite", (s) => s.delete(cid)); },
  async all() {
    const rows = await this.run("readonly", (s) => s.getAll());
    return rows.filter((r) => r.image === state.image && r.user === state.user.name)
      .sort((a, b) => a.created - b.created);
  },
};

function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`.slice(0, 64);
}

// the level-0 chunks a stroke or polygon can touch, with the versions this client drew on
function baseFor(edit) {
  if (edit.op === "fill" || edit.op === "relabel") return undefined;  // extent unknown
  const r = edit.op === "polygon" ? 0 : edit.radius + 1;
  const xs = edit.points.map((p) => p[0]), ys = edit.points.map((p) => p[1]);
  const [h, w] = state.meta.shape, t = state.meta.tile;
  const base = {};
  for (let cy = Math.max(0, Math.floor((Math.min(...ys) - r) / t));
    cy <= Math.min(Math.ceil(h / t) - 1, Math.floor((Math.max(...ys) + r) / t)); cy++) {
    for (let cx = Math.max(0, Math.floor((Math.min(...xs) - r) / t));
      cx <= Math.min(Math.ceil(w / t) - 1, Math.floor((Math.max(...xs) + r) / t)); cx++) {
      base[`${cy}/${cx}`] = state.versions[`0/${cy}/${cx}`] || 0;
    }
  }
  return base;
}

async function sendEdit(edit, released) {
  const cid = newId();
  const entry = { cid, image: state.image, user: state.user.name, created: Date.now(),
                  edit: { ...edit, client_id: cid } };
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
    sketch();  // clears the optimistic drawing once the overlay reloads
  }
}

async function flushOutbox() {
  if (!outbox.db || !state.user) return;
  for (const entry of await outbox.all()) await deliver(entry);
}

function onPress(event) {
  if (state.tool === "pan" || event.button !== 0) return;
  const p = imagePoint(event);
  if (state.tool === "fill") {
    sendEdit({ op: "fill", points: [p], label: state.label }, performance.now());
    return;
  }
  if (state.tool === "polygon") {
    state.drawing = state.drawing || { op: "polygon", points: [], screen: [] };
    state.drawing.points.push(p);
    state.drawing.screen.push([event.offsetX, event.offsetY]);
    const ctx = sketch();
    ctx.fillStyle = colour(state.label);
    ctx.beginPath();
    state.drawing.screen.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.fill();
    return;
  }
  state.drawing = { op: state.tool, points: [p], ctx: sketch(), r: screenRadius() };
  dab(event);
}

function dab(event) {
  const d = state.drawing;
  d.ctx.fillStyle = d.op === "erase" ? "rgba(255,255,255,0.5)" : colour(state.label);
  d.ctx.beginPath();
  d.ctx.arc(event.offsetX, event.offsetY, d.r, 0, 2 * Math.PI);
  d.ctx.fill();
}

function onMove(event) {
  const d = state.drawing;
  if (!d || d.op === "polygon" || !(event.buttons & 1)) return;
  const p = imagePoint(event);
  const last = d.points[d.points.length - 1];
  if (p[0] !== last[0] || p[1] !== last[1]) d.points.push(p);
  dab(event);
}

function onRelease() {
  const d = state.drawing;
  if (!d || d.op === "polygon") return;
  state.drawing = null;
  const size = Number(document.getElementById("size").value);
  sendEdit({ op: d.op, points: d.points.slice(0, 10000), label: d.op === "erase" ? 0 : state.label,
             radius: size }, performance.now());
}

function onDoubleClick() {
  const d = state.drawing;
  if (!d || d.op !== "polygon") return;
  state.drawing = null;
  if (d.points.length >= 3) {
    sendEdit({ op: "polygon", points: d.points, label: state.label }, performance.now());
  }
}

function setTool(tool) {
  state.tool = tool;
  state.drawing = null;
  state.viewer.setMouseNavEnabled(tool === "pan");
  for (const b of document.querySelectorAll("[data-tool]")) {
    b.classList.toggle("active", b.dataset.tool === tool);
  }
}

// --- review ----------------------------------------------------------------------------
async function nextTile() {
  const out = await api("POST", `${imagePath()}/queue/next`);
  if (!out.tile) { status("queue empty"); return; }
  state.lease = out.tile;
  const [ty, tx] = out.tile;
  const t = state.meta.tile;
  const rect = base().imageToViewportRectangle(tx * t, ty * t, t, t);
  state.viewer.viewport.fitBounds(rect);
  status(`tile ${ty},${tx} (uncertainty ${out.uncertainty})`);
}

async function review(stateName, extra = {}) {
  if (!state.lease) { status("take a tile first (N)"); return; }
  const [ty, tx] = state.lease;
  await api("PUT", `${imagePath()}/review/${ty}/${tx}`, { state: stateName, ...extra });
  status(`tile ${ty},${tx}: ${stateName}`);
  loadCoverage();
}

// --- overview: the whole image (its coarsest tile), review state per tile and the part in
// view; click to go there. It stands in for OpenSeadragon's navigator, a second viewer
// whose start-up cost the first tile ~70 ms here ------------------------------------------
const STATE_COLOURS = {
  unseen: "rgba(0,0,0,0)", in_review: "#d69e2e", accepted: "#38a169",
  corrected: "#3182ce", flagged: "#e53e3e", correction_proposed: "#90cdf4",
};

async function loadCoverage() {
  const cov = await api("GET", `${imagePath()}/coverage`);
  const canvas = document.getElementById("coverage");
  const [ny, nx] = [cov.grid.length, cov.grid[0].length];
  const cell = Math.max(1, Math.floor(160 / Math.max(ny, nx)));
  state.coverage = { ...cov, cell };
  canvas.width = nx * cell;
  canvas.height = ny * cell;
  canvas.dataset.counts = JSON.stringify(cov.counts);
  canvas.onclick = (e) => {
    const t = state.meta.tile;
    const [tx, ty] = [Math.floor(e.offsetX / cell), Math.floor(e.offsetY / cell)];
    state.viewer.viewport.fitBounds(base().imageToViewportRectangle(tx * t, ty * t, t, t));
  };
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
    const cov = state.coverage, canvas = document.getElementById("coverage");
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
    const item = state.viewer && base();
    if (item) {  // the part in view
      const r = item.viewportToImageRectangle(state.viewer.viewport.getBounds(true));
      ctx.strokeStyle = "#f6e05e";
      ctx.lineWidth = 1.5;
      ctx.strokeRect(r.x * scale, r.y * scale, r.width * scale, r.height * scale);
    }
  });
}

// --- recent edits: who did what; reviewers approve or reject annotators' proposals -------
let editsTimer = null;
function loadEdits() {
  clearTimeout(editsTimer);
  editsTimer = setTimeout(async () => {
    const rows = await api("GET", `${imagePath()}/edits?limit=25`);
    const list = document.getElementById("edit-list");
    list.replaceChildren();
    const expert = ["reviewer", "admin"].includes(state.user.role);
    for (const r of rows) {
      const li = document.createElement("li");
      li.dataset.testid = `edit-${r.id}`;
      const when = new Date(r.created * 1000).toLocaleTimeString();
      li.textContent = `#${r.id} ${r.user} ${r.op}${r.label == null ? "" : ` → ${state.meta.classes[r.label]}`} ${when}${r.undone ? " (undone)" : ""} `;
      if (r.status !== "applied") li.append(Object.assign(document.createElement("em"), { textContent: r.status }));
      if (expert && r.status === "proposed") {
        for (const decision of ["approve", "reject"]) {
          const b = document.createElement("button");
          b.textContent = decision;
          b.dataset.testid = `${decision}-${r.id}`;
          b.onclick = async () => {
            const out = await api("POST", `${imagePath()}/edits/${r.id}/decision`, { decision });
            refreshOverlay(out.revert?.pyramid || {});
            status(`edit ${r.id} ${out.status}`);
            loadEdits();
          };
          li.append(" ", b);
        }
      }
      list.append(li);
    }
  }, 200);
}

async function undoRedo(op) {
  try {
    const out = await api("POST", `${imagePath()}/${op}`);
    refreshOverlay(out.pyramid || {});
    status(`${op} done`);
  } catch (e) { status(e.message); }
}

// --- live updates ------------------------------------------------------------------------
function listen() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}${imagePath()}/live?token=${encodeURIComponent(state.token)}`);
  ws.onopen = () => flushOutbox();  // (re)connected: send what a lost connection held back
  ws.onmessage = (m) => {
    const event = JSON.parse(m.data);
    if (event.type === "chunks") { refreshOverlay(event.versions); loadEdits(); }
    if (event.type === "review") loadCoverage();
  };
  ws.onclose = () => setTimeout(listen, 2000);
  state.ws = ws;
}

// --- start -------------------------------------------------------------------------------
async function start() {
  state.token = takeToken();
  if (!state.token) {
    document.getElementById("login").hidden = false;
    document.getElementById("login-button").onclick = () => {
      sessionStorage.setItem("segloop-token", document.getElementById("token-input").value.trim());
      location.reload();
    };
    return;
  }
  // the requests go out while the viewer's script still loads (this script comes first);
  // a store nobody edited has no chunk versions to ask for
  const user = api("GET", "/api/me"), opened = outbox.open();
  const images = await api("GET", "/api/images");
  const wanted = new URL(location.href).searchParams.get("image");
  state.meta = images.find((i) => i.name === wanted) || images[0];
  state.image = state.meta.name;
  const versions = state.meta.versions.edited_chunks
    ? api("GET", `${imagePath()}/versions`) : {};
  const parsed = new Promise((resolve) => (document.readyState === "loading"
    ? document.addEventListener("DOMContentLoaded", resolve) : resolve()));
  [state.user, state.versions] = await Promise.all([user, versions, opened, parsed]);
  document.getElementById("image-name").textContent = `${state.image} — ${state.user.name} (${state.user.role})`;
  const select = document.getElementById("class");
  state.meta.classes.forEach((c, i) => select.add(new Option(`${i} ${c}`, i)));
  select.value = state.label;
  select.onchange = () => { state.label = Number(select.value); };
  if (state.user.role === "viewer") document.getElementById("tools").remove();

  state.viewer = OpenSeadragon({
    element: document.getElementById("viewer"),
    prefixUrl: "/vendor/openseadragon/images/",
    tileSources: tileSource("image"),
    loadTilesWithAjax: true,
    ajaxHeaders: { Authorization: `Bearer ${state.token}` },
    showNavigator: false,  // the overview in the side panel does its work
    immediateRender: false,
    blendTime: 0,
    imageLoaderLimit: 8,
    drawer: "canvas",
    gestureSettingsMouse: { clickToZoom: false },
  });
  const firstTile = new Promise((resolve) => state.viewer.addOnceHandler("tile-loaded", () => {
    state.firstTileMs = performance.now();
    resolve();
  }));
  state.viewer.addHandler("viewport-change", drawOverview);
  state.viewer.addTiledImage({
    tileSource: tileSource("segmentation"), opacity: 0.5,
    success: (e) => { state.seg = e.item; },
  });
  document.getElementById("opacity").oninput = (e) => state.seg?.setOpacity(Number(e.target.value));
  const el = state.viewer.element;
  el.addEventListener("pointerdown", onPress, true);
  el.addEventListener("pointermove", onMove, true);
  el.addEventListener("pointerup", onRelease, true);
  el.addEventListener("dblclick", onDoubleClick, true);
  for (const b of document.querySelectorAll("[data-tool]")) b.onclick = () => setTool(b.dataset.tool);
  document.getElementById("undo")?.addEventListener("click", () => undoRedo("undo"));
  document.getElementById("redo")?.addEventListener("click", () => undoRedo("redo"));
  document.getElementById("next").onclick = nextTile;
  document.getElementById("accept").onclick = () => review("accepted");
  document.getElementById("flag").onclick = () => review("flagged", { reason: "unsure" });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT") return;
    const size = document.getElementById("size");
    if (e.key === "z" && (e.ctrlKey || e.metaKey)) undoRedo(e.shiftKey ? "redo" : "undo");
    else if (e.key === "[") size.value = Math.max(1, Number(size.value) - 2);
    else if (e.key === "]") size.value = Math.min(256, Number(size.value) + 2);
    else if (/^[0-9]$/.test(e.key) && Number(e.key) < state.meta.classes.length) {
      state.label = Number(e.key); select.value = e.key;
    } else if (e.key === "n") nextTile();
    else if (e.key === "a") review("accepted");
    else if (e.key === "h") state.seg?.setOpacity(state.seg.getOpacity() ? 0 : 0.5);
    else if ({ b: 1, e: 1, p: 1, f: 1 }[e.key]) {
      setTool({ b: "brush", e: "erase", p: "polygon", f: "fill" }[e.key]);
    }
  });
  window.addEventListener("online", flushOutbox);
  status("ready");
  // the side panel and live updates wait for the first tile (1 s at most): their requests
  // would otherwise queue with the tiles' for the browser's six connections
  await Promise.race([firstTile, new Promise((resolve) => setTimeout(resolve, 1000))]);
  loadCoverage();
  loadEdits();
  listen();
  loadOverviewImage();
}

start().catch((e) => status(`error: ${e.message}`));
