// comfyui-barycenter front end (MIT).
//
// 1. Growing model inputs: on every Barycenter merge node (node types starting with "Barycenter"
//    whose definition has model_1 or clip_1), model_1..model_m are shown, where m is one more than
//    the highest connected input (at least 2, at most what the node supports, 12). Connecting model_k
//    shows model_k+1; unconnected extra inputs go away again. Saved workflows keep their links.
// 2. Merge Report node: shows the text summary it sends back in the node itself.
//
// Works with the legacy LiteGraph UI (ComfyUI of March 2024) and with the current frontend (1.27.x):
// only hooks both have are used (beforeRegisterNodeDef, nodeCreated, prototype onConnectionsChange /
// configure / onExecuted, node.addInput/removeInput) and links are looked up in graph._links (Map,
// current) or graph.links (legacy).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const INPUT = 1; // LiteGraph.INPUT and NodeSlotType.INPUT in both frontends
const STATE = Symbol("barycenterInputs");
const SPEC = Symbol("barycenterSpec");

function dynamicSpec(nodeData) {
  const name = nodeData?.name ?? "";
  if (!name.startsWith("Barycenter")) return null;
  const required = nodeData?.input?.required ?? {};
  const optional = nodeData?.input?.optional ?? {};
  const prefix = "model_1" in required ? "model_" : "clip_1" in required ? "clip_" : null;
  if (!prefix) return null;
  const all = { ...required, ...optional };
  let max = 0;
  while (`${prefix}${max + 1}` in all) max++;
  const spec = all[`${prefix}1`];
  const type = Array.isArray(spec) ? spec[0] : prefix === "model_" ? "MODEL" : "CLIP";
  return { prefix, max, type, min: 2 };
}

function indexOf(spec, name) {
  if (typeof name !== "string" || !name.startsWith(spec.prefix)) return 0;
  const rest = name.slice(spec.prefix.length);
  return /^[0-9]+$/.test(rest) ? Number(rest) : 0;
}

function getLink(graph, id) {
  if (id == null || !graph) return null;
  if (graph._links instanceof Map) return graph._links.get(id) ?? null;
  const links = graph.links;
  if (links instanceof Map) return links.get(id) ?? null;
  return links ? links[id] ?? null : null;
}

function connected(input) {
  return input != null && input.link != null;
}

function slotExtras(input) {
  // what a removed slot carried that addInput should give back (shape, label, ...)
  const keep = {};
  for (const k of ["shape", "localized_name", "label", "tooltip", "color_on", "color_off"]) {
    if (input?.[k] !== undefined) keep[k] = input[k];
  }
  return keep;
}

function remember(node, input) {
  const st = node[STATE];
  if (st && input?.name) st.spare[input.name] = slotExtras(input);
}

function resize(node, before) {
  const size = node.computeSize();
  const width = Math.max(before?.[0] ?? 0, size[0]);
  node.setSize([width, size[1]]);
}

// Bring the node's model inputs to model_1..model_want; never touches a connected input.
export function normalizeInputs(node) {
  const st = node[STATE];
  if (!st || !node.inputs) return false;
  const spec = st.spec;
  let last = 0;
  for (const input of node.inputs) {
    const k = indexOf(spec, input?.name);
    if (k && connected(input)) last = Math.max(last, k);
  }
  const want = Math.min(spec.max, Math.max(spec.min, last + 1));
  const before = node.size ? [node.size[0], node.size[1]] : null;
  let changed = false;
  for (let i = node.inputs.length - 1; i >= 0; i--) {
    const input = node.inputs[i];
    const k = indexOf(spec, input?.name);
    if (k > want && !connected(input)) {
      remember(node, input);
      node.removeInput(i);
      changed = true;
    }
  }
  for (let k = 1; k <= want; k++) {
    const name = `${spec.prefix}${k}`;
    if (node.inputs.some((input) => input?.name === name)) continue;
    // insert after the highest model input below k (or first)
    let at = 0;
    node.inputs.forEach((input, i) => {
      const j = indexOf(spec, input?.name);
      if (j && j < k) at = i + 1;
    });
    node.addInput(name, spec.type, st.spare[name] ?? {});
    const added = node.inputs.pop();
    node.inputs.splice(at, 0, added);
    changed = true;
  }
  if (changed) {
    // slots moved: links point at slots by index
    node.inputs.forEach((input, i) => {
      const link = getLink(node.graph, input?.link);
      if (link) link.target_slot = i;
    });
    resize(node, before);
    node.setDirtyCanvas?.(true, true);
  }
  return changed;
}

function schedule(node) {
  const st = node[STATE];
  if (!st || st.pending) return;
  st.pending = true;
  // after the current connect / configure / paste finishes: never reshape a node mid-operation
  setTimeout(() => {
    st.pending = false;
    if (node.graph) normalizeInputs(node);
  }, 0);
}

function setupDynamicInputs(nodeType, spec) {
  const proto = nodeType.prototype;
  proto[SPEC] = spec;

  const onNodeCreated = proto.onNodeCreated;
  proto.onNodeCreated = function () {
    const r = onNodeCreated?.apply(this, arguments);
    ensureState(this, spec);
    schedule(this);
    return r;
  };

  const onConnectionsChange = proto.onConnectionsChange;
  proto.onConnectionsChange = function (type, index, isConnected, linkInfo, slot) {
    const r = onConnectionsChange?.apply(this, arguments);
    const input = slot ?? this.inputs?.[index];
    if (type === INPUT && indexOf(spec, input?.name)) {
      ensureState(this, spec);
      schedule(this);
    }
    return r;
  };

  // Loading a workflow: the node was built with every input of its definition; drop the model
  // inputs the saved node did not have BEFORE the saved slots are applied, so slot indices (which
  // the saved links refer to) line up in both frontends.
  const configure = proto.configure;
  proto.configure = function (data) {
    ensureState(this, spec);
    try {
      if (Array.isArray(data?.inputs) && Array.isArray(this.inputs)) {
        const saved = new Set(data.inputs.map((input) => input?.name));
        for (let i = this.inputs.length - 1; i >= 0; i--) {
          const input = this.inputs[i];
          const k = indexOf(spec, input?.name);
          if (k > spec.min && !saved.has(input.name) && !connected(input)) {
            remember(this, input);
            this.inputs.splice(i, 1);
          }
        }
      }
    } catch (e) {
      console.warn("[barycenter] could not match the saved inputs", e);
    }
    // legacy LiteGraph copies LGraphNode's methods onto the class only when it is registered
    const base = configure ?? globalThis.LiteGraph?.LGraphNode?.prototype?.configure ?? globalThis.LGraphNode?.prototype?.configure;
    const r = base.apply(this, arguments);
    schedule(this);
    return r;
  };
}

function ensureState(node, spec) {
  if (!node[STATE]) node[STATE] = { spec, spare: {}, pending: false };
  return node[STATE];
}

function setupReportNode(nodeType) {
  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    const r = onNodeCreated?.apply(this, arguments);
    if (this.size?.[0] < 220) this.setSize([220, this.size[1]]); // room for the title
    return r;
  };
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message) {
    const r = onExecuted?.apply(this, arguments);
    const text = message?.text;
    if (text != null) showSummary(this, Array.isArray(text) ? text.join("\n") : String(text));
    return r;
  };
}

function showSummary(node, text) {
  let widget = node.widgets?.find((w) => w.name === "summary_text");
  if (!widget) {
    const before = [node.size[0], node.size[1]];
    widget = ComfyWidgets.STRING(node, "summary_text", ["STRING", { multiline: true }], app).widget;
    // display only: not sent to the server, not saved with the workflow
    widget.serialize = false;
    widget.options ??= {};
    widget.options.serialize = false;
    const el = widget.inputEl ?? widget.element;
    if (el) {
      el.readOnly = true;
      el.style.opacity = 0.85;
    }
    node.setSize([Math.max(before[0], 480), Math.max(before[1], 220)]);
  }
  widget.value = text;
  const el = widget.inputEl ?? widget.element;
  if (el && "value" in el) el.value = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "barycenter.nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const spec = dynamicSpec(nodeData);
    if (spec && spec.max > spec.min) setupDynamicInputs(nodeType, spec);
    if (nodeData?.name === "BarycenterMergeReport") setupReportNode(nodeType);
  },
  nodeCreated(node) {
    // a new node has every input of its definition: bring it down to two (after any configure)
    if (node[SPEC]) {
      ensureState(node, node[SPEC]);
      schedule(node);
    }
  },
});
