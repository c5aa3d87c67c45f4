// Drives headless Chromium (Debian's /usr/bin/chromium) through a ComfyUI page with playwright-core.
// Called by tests/browser/test_frontend.py:  node driver.mjs <config.json>
// Writes observations (not verdicts) as JSON to config.result; the pytest side asserts on them.
// Works with the March-2024 built-in UI and with the current frontend (1.27.x): it only uses
// window.app, window.LiteGraph, node.inputs / getConnectionPos and the canvas's DragAndScale.
import { createRequire } from "node:module";
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import path from "node:path";

const cfg = JSON.parse(readFileSync(process.argv[2], "utf8"));
const require = createRequire(path.join(cfg.nodeModules, "noop.js"));
const { chromium } = require("playwright-core");

const out = { steps: [], console: [], pageErrors: [], screenshots: {} };
const log = (step, data) => {
  out.steps.push({ step, ...data });
  process.stderr.write(`[driver] ${step} ${JSON.stringify(data).slice(0, 400)}\n`);
};
const save = () => writeFileSync(cfg.result, JSON.stringify(out, null, 1));
mkdirSync(cfg.artifacts, { recursive: true });

const browser = await chromium.launch({
  executablePath: cfg.chromium,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
});
let page;
try {
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 }, deviceScaleFactor: 1 });
  page = await context.newPage();
  page.on("console", (m) => out.console.push(`${m.type()}: ${m.text()}`.slice(0, 500)));
  page.on("pageerror", (e) => out.pageErrors.push(String(e?.stack ?? e).slice(0, 800)));

  await page.goto(cfg.url, { waitUntil: "load", timeout: 60000 });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph && window.app.canvas, null,
    { timeout: 60000 });
  // extensions are registered before the graph exists; give the UI a moment to settle
  await page.waitForTimeout(1500);
  out.frontend = await page.evaluate(() => ({
    version: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
    legacy: !window.comfyAPI,
    extension: (window.app.extensions ?? []).some?.((e) => e.name === "barycenter.nodes") ?? null,
  }));
  log("loaded", out.frontend);
  await page.keyboard.press("Escape"); // any welcome dialog

  // ---- helpers in the page
  await page.evaluate(() => {
    window.__bc = {
      node: (id) => window.app.graph.getNodeById(id),
      inputs: (id) => (window.app.graph.getNodeById(id)?.inputs ?? []).map((i) => ({
        name: i.name, link: i.link ?? null, widget: !!i.widget,
      })),
      modelInputs(id) {
        return this.inputs(id).filter((i) => /^(model|clip)_[0-9]+$/.test(i.name));
      },
      getLink(id) {
        const g = window.app.graph;
        if (g._links instanceof Map) return g._links.get(id);
        return g.links instanceof Map ? g.links.get(id) : g.links?.[id];
      },
      // every input link points back at its slot, and the link's origin is as expected
      linkReport(id) {
        const n = this.node(id);
        return (n.inputs ?? []).filter((i) => i.link != null).map((i, _, __) => {
          const l = this.getLink(i.link);
          return { name: i.name, slot: n.inputs.indexOf(i), link: i.link, origin: l?.origin_id ?? null,
            originSlot: l?.origin_slot ?? null, targetSlot: l?.target_slot ?? null, target: l?.target_id ?? null };
        });
      },
      // page coordinates of a slot centre
      slotXY(id, isInput, slot) {
        const c = window.app.canvas;
        const n = this.node(id);
        const p = n.getConnectionPos(isInput, slot);
        const q = c.ds.convertOffsetToCanvas([p[0], p[1]]);
        const r = c.canvas.getBoundingClientRect();
        // LiteGraph's canvas coordinates are CSS pixels from the canvas's corner
        return [r.left + q[0], r.top + q[1]];
      },
      // page rectangle of some nodes (for cropped screenshots)
      rect(ids, pad = 12) {
        const c = window.app.canvas;
        const r = c.canvas.getBoundingClientRect();
        let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
        for (const id of ids) {
          const n = this.node(id);
          const title = window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
          const a = c.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - title]);
          const b = c.ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
          x0 = Math.min(x0, a[0]); y0 = Math.min(y0, a[1]); x1 = Math.max(x1, b[0]); y1 = Math.max(y1, b[1]);
        }
        const top = pad + 14; // the current frontend's source badge sits above the title
        return { x: Math.max(0, r.left + x0 - pad), y: Math.max(0, r.top + y0 - top),
          width: x1 - x0 + 2 * pad, height: y1 - y0 + pad + top };
      },
      redraw() {
        window.app.graph.setDirtyCanvas(true, true);
        window.app.canvas.draw(true, true);
      },
    };
  });

  const settle = (ms = 250) => page.waitForTimeout(ms);
  const modelInputs = (id) => page.evaluate((id) => window.__bc.modelInputs(id), id);
  // floating menus and toolbars of both UIs, hidden for the cropped (README) pictures
  const OVERLAYS = ".comfy-menu, .p-buttongroup-vertical, .graph-canvas-panel .pointer-events-auto, .litegraph .dialog";
  const shot = async (name, ids) => {
    await page.evaluate(() => window.__bc.redraw());
    await settle(150);
    const file = path.join(cfg.artifacts, `${name}.png`);
    const clip = ids ? await page.evaluate((ids) => window.__bc.rect(ids), ids) : undefined;
    const style = ids ? await page.addStyleTag({ content: `${OVERLAYS} { visibility: hidden !important; }` }) : null;
    await page.screenshot({ path: file, clip });
    if (style) await style.evaluate((el) => el.remove());
    out.screenshots[name] = file;
  };
  const drag = async (fromId, fromSlot, toId, toSlot) => {
    const a = await page.evaluate(([i, s]) => window.__bc.slotXY(i, false, s), [fromId, fromSlot]);
    const b = await page.evaluate(([i, s]) => window.__bc.slotXY(i, true, s), [toId, toSlot]);
    await page.mouse.move(a[0], a[1]);
    await page.mouse.down();
    await page.mouse.move((a[0] + b[0]) / 2, (a[1] + b[1]) / 2, { steps: 8 });
    await page.mouse.move(b[0], b[1], { steps: 8 });
    await page.mouse.up();
    await page.mouse.move(cfg.restMouse?.[0] ?? 700, cfg.restMouse?.[1] ?? 860, { steps: 4 }); // no hover tooltip
    await settle();
    return { from: a, to: b };
  };
  const slotIndex = (id, name) => page.evaluate(([id, name]) =>
    window.__bc.node(id).inputs.findIndex((i) => i.name === name), [id, name]);

  // ---- 1. fresh node from the node registry: two model inputs
  const fresh = await page.evaluate(async (types) => {
    const res = {};
    for (const t of types) {
      const n = window.LiteGraph.createNode(t);
      if (!n) { res[t] = null; continue; }
      window.app.graph.add(n);
      await new Promise((r) => setTimeout(r, 50));
      res[t] = window.__bc.modelInputs(n.id).map((i) => i.name);
      window.app.graph.remove(n);
    }
    return res;
  }, cfg.mergeTypes);
  log("fresh", { fresh });
  out.fresh = fresh;

  // ---- 2. load the example workflow
  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, cfg.workflow);
  await settle(500);
  const M = cfg.mergeNode;
  out.loaded = await modelInputs(M);
  log("workflow loaded", { inputs: out.loaded });
  // settings by widget name (the file's widgets_values are positional)
  out.widgets = await page.evaluate(([id, values]) => {
    const n = window.__bc.node(id);
    const seen = {};
    for (const w of n.widgets ?? []) {
      if (w.name in values) { w.value = values[w.name]; seen[w.name] = w.value; }
    }
    return seen;
  }, [M, cfg.widgetValues ?? {}]);
  await shot("01_loaded");

  // ---- 3. connect model_4 by dragging a link from loader 4's MODEL output
  const [src, srcSlot] = cfg.dragFrom;
  const nextName = cfg.dragTo;
  const to = await slotIndex(M, nextName);
  out.dragTarget = { name: nextName, slot: to };
  if (to >= 0) {
    out.drag = await drag(src, srcSlot, M, to);
    await settle(300);
  }
  out.afterDrag = await modelInputs(M);
  log("after drag", { inputs: out.afterDrag });
  await shot("02_connected", [M]);

  // ---- 4. disconnect it: the extra free input goes away again; reconnect
  out.afterDisconnect = await page.evaluate(async ([id, name]) => {
    const n = window.__bc.node(id);
    n.disconnectInput(n.inputs.findIndex((i) => i.name === name));
    await new Promise((r) => setTimeout(r, 100));
    return window.__bc.modelInputs(id);
  }, [M, nextName]);
  log("after disconnect", { inputs: out.afterDisconnect });
  const again = await slotIndex(M, nextName);
  if (again >= 0) await drag(src, srcSlot, M, again);
  await settle(300);
  out.afterReconnect = await modelInputs(M);
  log("after reconnect", { inputs: out.afterReconnect });

  // ---- 5. fill up to the node's maximum programmatically (same onConnectionsChange path)
  out.fill = await page.evaluate(async ([id, src, srcSlot]) => {
    const n = window.__bc.node(id);
    const s = window.__bc.node(src);
    const seen = [];
    for (let guard = 0; guard < 20; guard++) {
      const free = n.inputs.findIndex((i) => /^(model|clip)_[0-9]+$/.test(i.name) && i.link == null);
      if (free < 0) break;
      s.connect(srcSlot, n, free);
      await new Promise((r) => setTimeout(r, 30));
      seen.push(window.__bc.modelInputs(id).length);
    }
    const full = window.__bc.modelInputs(id);
    // then take them off again, back to the state before
    for (let k = full.length; k > 4; k--) {
      n.disconnectInput(n.inputs.findIndex((i) => i.name.endsWith(`_${k}`)));
    }
    await new Promise((r) => setTimeout(r, 60));
    return { counts: seen, full, back: window.__bc.modelInputs(id) };
  }, [M, src, srcSlot]);
  log("fill", { counts: out.fill.counts, back: out.fill.back.length });

  // ---- 6. CLIP variant: same behaviour with clip_k
  if (cfg.clipType) {
    out.clip = await page.evaluate(async ([type, src]) => {
      const n = window.LiteGraph.createNode(type);
      window.app.graph.add(n);
      n.pos = [60, 620];
      await new Promise((r) => setTimeout(r, 50));
      const start = window.__bc.modelInputs(n.id).map((i) => i.name);
      const s = window.__bc.node(src);
      for (let k = 1; k <= 3; k++) {
        s.connect(1, n, n.inputs.findIndex((i) => i.name === `clip_${k}`));
        await new Promise((r) => setTimeout(r, 30));
      }
      const after = window.__bc.modelInputs(n.id);
      window.app.graph.remove(n);
      return { start, after };
    }, [cfg.clipType, src]);
    log("clip", out.clip);
  }

  // ---- 7. save and reload: links intact, one free slot after the connected ones
  out.reload = await page.evaluate(async ([id, extraFrom]) => {
    const n = window.__bc.node(id);
    const extra = n.inputs.findIndex((i) => /^(model|clip)_[0-9]+$/.test(i.name) && i.link == null);
    window.__bc.node(extraFrom).connect(0, n, extra);   // one more: model_5
    await new Promise((r) => setTimeout(r, 60));
    const before = { inputs: window.__bc.modelInputs(id), links: window.__bc.linkReport(id) };
    const saved = JSON.parse(JSON.stringify(window.app.graph.serialize()));
    await window.app.loadGraphData(saved);
    await new Promise((r) => setTimeout(r, 200));
    const after = { inputs: window.__bc.modelInputs(id), links: window.__bc.linkReport(id) };
    const savedNode = saved.nodes.find((x) => x.id === id);
    // take model_5 off again for the run (4 models)
    const m = window.__bc.node(id);
    m.disconnectInput(m.inputs.findIndex((i) => i.link != null && i.name.endsWith("_5")));
    await new Promise((r) => setTimeout(r, 60));
    return { before, after, savedInputs: savedNode.inputs.map((i) => i.name), restored: window.__bc.modelInputs(id) };
  }, [M, cfg.reloadExtraFrom]);
  log("reload", { after: out.reload.after.inputs.map((i) => i.name + (i.link != null ? "*" : "")) });
  await shot("03_reloaded", [M]);

  // ---- 8. queue the prompt; the report image must appear in the page
  const P = cfg.previewNode;
  const R = cfg.reportNode;
  out.queued = await page.evaluate(async () => {
    try { await window.app.queuePrompt(0, 1); return true; } catch (e) { return String(e); }
  });
  log("queued", { queued: out.queued });
  const t0 = Date.now();
  let state = null;
  while (Date.now() - t0 < cfg.runTimeoutMs) {
    state = await page.evaluate(([P, R]) => {
      const p = window.__bc.node(P);
      const r = window.__bc.node(R);
      const outputs = window.app.nodeOutputs ?? {};
      const imgs = (p?.imgs ?? []).map((im) => ({ src: im.src, w: im.naturalWidth, h: im.naturalHeight,
        complete: im.complete }));
      const domImgs = [...document.querySelectorAll("img")].filter((im) => /\/view\?/.test(im.src))
        .map((im) => ({ src: im.src, w: im.naturalWidth, h: im.naturalHeight, complete: im.complete }));
      const summary = r?.widgets?.find((w) => w.name === "summary_text")?.value ?? null;
      const errorDialog = [...document.querySelectorAll(".comfy-modal, .p-dialog, .p-toast-message")]
        .map((e) => e.innerText).filter((t) => t && /error|failed|exception/i.test(t)).slice(0, 3);
      return { imgs, domImgs, outputs: outputs[P] ?? outputs[String(P)] ?? null, summary, errorDialog };
    }, [P, R]);
    const ok = [...state.imgs, ...state.domImgs].some((im) => im.complete && im.w > 0);
    if (ok && state.summary) break;
    if (state.errorDialog.length) break;
    await settle(500);
  }
  out.run = { ...state, seconds: (Date.now() - t0) / 1000 };
  log("run", { seconds: out.run.seconds, imgs: state?.imgs, domImgs: state?.domImgs?.length,
    error: state?.errorDialog });
  await settle(500);
  await shot("04_report_page");
  await shot("05_report_nodes", [R, P]);
  await shot("06_merge_node", [...(cfg.loaderNodes ?? []), M]);
  // every node of the pack side by side, fresh, for the README
  await page.setViewportSize({ width: 1600, height: 1000 });
  await page.evaluate(async (types) => {
    const g = window.app.graph;
    window.app.clean?.(); // forget the run's outputs (keyed by node id, which the new nodes reuse)
    g.clear();
    const nodes = [];
    for (const t of types) {
      const n = window.LiteGraph.createNode(t);
      if (n) { g.add(n); nodes.push(n); }
    }
    await new Promise((r) => setTimeout(r, 100)); // inputs trimmed to two
    const perRow = 4, gap = 30, title = window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
    let x = 0, y = title, rowH = 0, width = 0;
    nodes.forEach((n, i) => {
      if (i && i % perRow === 0) { x = 0; y += rowH + gap + title; rowH = 0; }
      n.pos = [x, y];
      x += n.size[0] + gap; rowH = Math.max(rowH, n.size[1]); width = Math.max(width, x);
    });
    const height = y + rowH;
    const c = window.app.canvas;
    const r = c.canvas.getBoundingClientRect();
    const scale = Math.min(1, (r.width - 140) / width, (r.height - 140) / height);
    c.ds.scale = scale;
    c.ds.offset = [70 / scale, 70 / scale];
  }, cfg.allTypes ?? cfg.mergeTypes);
  await settle(300);
  out.allIds = await page.evaluate(() => window.app.graph._nodes.map((n) => n.id));
  await shot("07_all_nodes", out.allIds);
} catch (e) {
  out.fatal = String(e?.stack ?? e);
  process.stderr.write(`[driver] FATAL ${out.fatal}\n`);
  try { if (page) await page.screenshot({ path: path.join(cfg.artifacts, "fatal.png") }); } catch {}
} finally {
  save();
  await browser.close();
}
