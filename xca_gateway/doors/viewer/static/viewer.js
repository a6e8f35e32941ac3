// A small zero-footprint viewer over the gateway's own DICOMweb (PS3.18): QIDO-RS for the
// series and instances, WADO-RS thumbnails, and lossless PNG renderings (/rendered) drawn on a
// canvas. Window/level is re-rendered by the server at the new window (PNG, so lossless at every
// window); zoom and pan are done here. No build step, no dependency: served as it is.
"use strict";

(() => {
  const root = "/dicomweb";
  const params = new URLSearchParams(location.search);
  const study = params.get("study");
  const canvas = document.getElementById("image");
  const ctx = canvas.getContext("2d");
  const status = document.getElementById("status");
  const state = {
    series: null, stack: [], index: 0, window: null, defaultWindow: null,
    zoom: 1, panX: 0, panY: 0, tool: "window", bitmap: null, drawn: 0,
  };
  window.viewerState = state; // for tests and the curious
  const cache = new Map(); // url -> Promise<ImageBitmap>
  const CACHE_MAX = 96;

  function say(text) { status.textContent = text || ""; }

  async function fetchJson(url) {
    const response = await fetch(url, { headers: { accept: "application/dicom+json" } });
    if (response.status === 401) {
      location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
      throw new Error("not logged in");
    }
    if (!response.ok) {
      let message = response.statusText;
      try { message = (await response.json()).message || message; } catch (e) { /* not JSON */ }
      throw new Error(`${response.status}: ${message}`);
    }
    return response.json();
  }

  const value = (item, tag) => (item[tag] && item[tag].Value ? item[tag].Value[0] : undefined);
  const text = (item, tag) => {
    const v = value(item, tag);
    return v === undefined ? "" : typeof v === "object" ? (v.Alphabetic || "") : String(v);
  };

  function imageUrl(i) {
    const item = state.stack[i];
    let url = item.frame
      ? `${item.base}/frames/${item.frame}/rendered`
      : `${item.base}/rendered`;
    if (state.window) {
      url += `?window=${state.window.center.toFixed(1)},${state.window.width.toFixed(1)},linear`;
    }
    return url;
  }

  function load(url) {
    if (!cache.has(url)) {
      const promise = fetch(url, { headers: { accept: "image/png" } }).then(async (r) => {
        if (!r.ok) throw new Error(`${r.status} for an image`);
        return createImageBitmap(await r.blob());
      });
      promise.catch(() => cache.delete(url));
      cache.set(url, promise);
      while (cache.size > CACHE_MAX) cache.delete(cache.keys().next().value);
    }
    return cache.get(url);
  }

  function draw() {
    const ratio = window.devicePixelRatio || 1;
    const width = Math.round(canvas.clientWidth * ratio);
    const height = Math.round(canvas.clientHeight * ratio);
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, width, height);
    const bitmap = state.bitmap;
    if (!bitmap) return;
    const fit = Math.min(width / bitmap.width, height / bitmap.height);
    const scale = fit * state.zoom;
    ctx.imageSmoothingEnabled = scale < 1;
    ctx.setTransform(scale, 0, 0, scale,
      width / 2 + state.panX * ratio - (bitmap.width * scale) / 2,
      height / 2 + state.panY * ratio - (bitmap.height * scale) / 2);
    ctx.drawImage(bitmap, 0, 0);
    document.getElementById("position").textContent =
      `Image ${state.index + 1} / ${state.stack.length}`;
    const w = state.window || state.defaultWindow;
    document.getElementById("window").textContent =
      w ? `W ${Math.round(w.width)} L ${Math.round(w.center)}` : "";
    document.getElementById("zoom").textContent = `Zoom ${state.zoom.toFixed(2)}×`;
  }

  async function show(i) {
    if (!state.stack.length) return;
    state.index = Math.max(0, Math.min(state.stack.length - 1, i));
    const index = state.index;
    const url = imageUrl(index);
    try {
      const bitmap = await load(url);
      if (index !== state.index || url !== imageUrl(state.index)) return; // moved on meanwhile
      state.bitmap = bitmap;
      state.drawn += 1;
      canvas.dataset.drawn = String(state.drawn);
      draw();
      say("");
    } catch (error) {
      say(String(error.message || error));
    }
    for (let k = 1; k <= 4; k += 1) { // the next images, so that scrolling does not wait
      if (index + k < state.stack.length) load(imageUrl(index + k)).catch(() => {});
    }
  }

  function number(item, tag) {
    const v = value(item, tag);
    const n = Array.isArray(v) ? Number(v[0]) : Number(v);
    return Number.isFinite(n) ? n : undefined;
  }

  async function selectSeries(uid, button) {
    document.querySelectorAll(".series").forEach((b) => b.classList.toggle("active", b === button));
    say("Loading series…");
    const base = `${root}/studies/${study}/series/${uid}`;
    const instances = await fetchJson(`${base}/instances`);
    const stack = [];
    let first = null;
    for (const item of instances) {
      const sop = value(item, "00080018");
      if (!sop) continue;
      stack.push({ base: `${base}/instances/${sop}`, frame: null });
    }
    if (stack.length) {
      [first] = await fetchJson(`${stack[0].base}/metadata`);
      const frames = number(first, "00280008") || 1;
      if (stack.length === 1 && frames > 1) { // a multi-frame instance: scroll its frames
        const single = stack[0].base;
        stack.length = 0;
        for (let f = 1; f <= frames; f += 1) stack.push({ base: single, frame: f });
      }
      const center = number(first, "00281050");
      const width = number(first, "00281051");
      state.defaultWindow = center !== undefined && width ? { center, width } : null;
      document.getElementById("study-title").textContent = [
        text(first, "00100010").replace(/\^/g, " "),
        text(first, "00080020").replace(/(\d{4})(\d{2})(\d{2})/, "$1-$2-$3"),
        text(first, "00081030"),
        text(first, "0008103E"),
      ].filter(Boolean).join(" · ");
    }
    Object.assign(state, { series: uid, stack, window: null, zoom: 1, panX: 0, panY: 0 });
    await show(0);
  }

  async function start() {
    if (!study) { say("No study given (?study=<Study Instance UID>)."); return; }
    let series;
    try {
      series = await fetchJson(`${root}/studies/${study}/series`);
    } catch (error) {
      say(`The study cannot be shown: ${error.message}`);
      return;
    }
    const list = document.getElementById("series");
    let firstButton = null;
    for (const item of series) {
      const uid = value(item, "0020000E");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "series";
      const img = document.createElement("img");
      img.alt = "series thumbnail";
      img.loading = "lazy";
      img.src = `${root}/studies/${study}/series/${uid}/thumbnail`;
      const label = document.createElement("span");
      label.textContent = `${text(item, "00080060") || "?"} · ${number(item, "00201209") || 0} images`;
      button.append(img, label);
      button.addEventListener("click", () => selectSeries(uid, button).catch((e) => say(e.message)));
      list.append(button);
      firstButton = firstButton || { uid, button };
    }
    if (firstButton) await selectSeries(firstButton.uid, firstButton.button);
    else say("This study has no series to show.");
  }

  // -- interaction: wheel scrolls the stack, a drag applies the active tool
  canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    show(state.index + (event.deltaY > 0 ? 1 : -1));
  }, { passive: false });
  document.addEventListener("keydown", (event) => {
    if (event.key === "ArrowDown" || event.key === "ArrowRight") show(state.index + 1);
    if (event.key === "ArrowUp" || event.key === "ArrowLeft") show(state.index - 1);
  });
  let drag = null;
  let rerender = null;
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    const w = state.window || state.defaultWindow || { center: 128, width: 256 };
    drag = { x: event.clientX, y: event.clientY, zoom: state.zoom, panX: state.panX,
      panY: state.panY, window: { ...w } };
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drag) return;
    const dx = event.clientX - drag.x;
    const dy = event.clientY - drag.y;
    if (state.tool === "zoom") {
      state.zoom = Math.max(0.1, Math.min(20, drag.zoom * Math.exp(-dy / 200)));
      draw();
    } else if (state.tool === "pan") {
      state.panX = drag.panX + dx;
      state.panY = drag.panY + dy;
      draw();
    } else {
      const step = Math.max(drag.window.width / 256, 1);
      state.window = {
        width: Math.max(1, drag.window.width + dx * step),
        center: drag.window.center + dy * step,
      };
      draw();
      clearTimeout(rerender); // re-rendered by the server once the drag pauses
      rerender = setTimeout(() => show(state.index), 120);
    }
  });
  const stop = () => { drag = null; };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
  document.querySelectorAll("#tools button[data-tool]").forEach((button) => {
    button.addEventListener("click", () => {
      state.tool = button.dataset.tool;
      document.querySelectorAll("#tools button[data-tool]")
        .forEach((b) => b.classList.toggle("active", b === button));
    });
  });
  document.getElementById("reset").addEventListener("click", () => {
    Object.assign(state, { window: null, zoom: 1, panX: 0, panY: 0 });
    show(state.index);
  });
  window.addEventListener("resize", draw);
  start();
})();
