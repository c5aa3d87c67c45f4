"""Convert API-format graphs into the editor's (LiteGraph) workflow format, using /object_info.

`python -m harness.workflows` regenerates example_workflows/*.json (UI format) from the *_api.json
files against a running host, so both formats always describe the same graph.
"""
from __future__ import annotations

import json
import sys

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SEED_NAMES = {"seed", "noise_seed"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES or kind == "COMBO"


def api_to_ui(prompt: dict, object_info: dict) -> dict:
    ids = {k: i + 1 for i, k in enumerate(prompt)}
    depth: dict[str, int] = {}

    def level(k):
        if k not in depth:
            ups = [v[0] for v in prompt[k]["inputs"].values() if isinstance(v, list)]
            depth[k] = 1 + max((level(u) for u in ups), default=-1)
        return depth[k]

    for k in prompt:
        level(k)
    rows: dict[int, int] = {}
    nodes, links = [], []
    out_links: dict[tuple, list] = {}
    link_id = 0
    for k, node in prompt.items():
        info = object_info[node["class_type"]]
        specs = list(info["input"]["required"].items()) + list(info["input"].get("optional", {}).items())
        inputs, widgets = [], []
        for name, spec in specs:
            value = node["inputs"].get(name)
            if _is_widget(spec):
                if value is None:
                    value = spec[1].get("default") if len(spec) > 1 and isinstance(spec[1], dict) else None
                    if value is None and isinstance(spec[0], list):
                        value = spec[0][0]
                widgets.append(value)
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if name in SEED_NAMES or opts.get("control_after_generate"):
                    widgets.append("fixed")
                continue
            entry = {"name": name, "type": spec[0], "link": None}
            if isinstance(value, list):
                link_id += 1
                src = value[0]
                src_type = object_info[prompt[src]["class_type"]]["output"][value[1]]
                links.append([link_id, ids[src], value[1], ids[k], len(inputs), src_type])
                out_links.setdefault((src, value[1]), []).append(link_id)
                entry["link"] = link_id
            inputs.append(entry)
        col = depth[k]
        row = rows.get(col, 0)
        rows[col] = row + 1
        nodes.append({
            "id": ids[k], "type": node["class_type"], "pos": [40 + 360 * col, 40 + 260 * row],
            "size": [320, 120 + 24 * len(widgets)], "flags": {}, "order": 0, "mode": 0,
            "inputs": inputs, "outputs": [], "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets, "_api_id": k,
        })
    order = sorted(prompt, key=lambda k: depth[k])
    for n in nodes:
        k = n.pop("_api_id")
        n["order"] = order.index(k)
        info = object_info[prompt[k]["class_type"]]
        names = info.get("output_name") or info["output"]
        n["outputs"] = [{"name": names[i], "type": t, "links": out_links.get((k, i), []), "slot_index": i}
                        for i, t in enumerate(info["output"])]
    return {"last_node_id": len(nodes), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main() -> int:
    from .paths import REPO_ROOT
    from .server import ComfyServer, default_run_dir

    server = ComfyServer(default_run_dir("workflows"))
    client = server.start()
    try:
        info = client.object_info()
        for api in sorted((REPO_ROOT / "example_workflows").glob("*_api.json")):
            ui = api_to_ui(json.loads(api.read_text()), info)
            out = api.with_name(api.name.replace("_api.json", ".json"))
            out.write_text(json.dumps(ui, indent=1) + "\n")
            print(f"wrote {out.relative_to(REPO_ROOT)}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
