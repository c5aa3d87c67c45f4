"""Tiny random-weight checkpoints that ComfyUI's CheckpointLoaderSimple detects as the real family.

Two steps, so the caller's process never imports ComfyUI:

1. Layout ("spec"): the tensor names and shapes, built from the host's own classes on the `meta`
   device (UNetModel with a shrunken config, the family's CLIP model, TAESD) and laid out with
   the model config's `process_*_state_dict_for_saving` (via `BaseModel.state_dict_for_saving`).
   This needs ComfyUI, so it runs once per (arch, clip, host tree) in a subprocess
   (`.venv/bin/python -m harness.checkpoints --_spec ...`) and is cached as JSON.
2. Values: plain torch + safetensors in this process. Every tensor is drawn from its own CPU
   `torch.Generator`, seeded from (seed, tensor name): the file is a pure function of the options
   and the layout, so the same arguments give the same bytes, and a tensor's value does not depend
   on which other tensors exist.

Value rules (float tensors; `sigma` is the tensor's reference std):
- weights with 2+ dims: N(0, sigma^2); UNet and TAESD sigma = 1/sqrt(fan_in) (the TAESD decoder's
  output conv: 0.25/sqrt(fan_in), rows centred to sum 0), CLIP sigma = 0.02 (position embeddings
  0.01).
- 1-d `.weight` (GroupNorm/LayerNorm scales): 1; 1-d `.bias`: N(0, 0.01^2).
- CLIP position_ids: arange(77) (int64); CLIP-G logit_scale ln(100); TAESD vae_scale 1/32 (see
  VAE_SCALE), vae_shift 0; the decoder's last bias 0.5 (else images come out near black).
Options, applied to the UNet and CLIP (the VAE is always the base model's, unscaled):
- base_seed None:  w = scale * init(seed) + offset * sigma
- base_seed B:     w = init(B) + scale * noise * sigma * N(seed) + offset * sigma
  (norm scales use sigma = 0.02 for the noise and offset terms). Same B, different seeds and a
  small noise: fine-tunes of one base. scale=50: an outlier.
Storage dtype: `dtype` for the UNet (fp8 = float8_e4m3fn); CLIP and VAE are fp32 for fp32, bf16 for
bf16, else fp16.

Files are cached under .cache/checkpoints/ (LoRAs under .cache/loras/) with the options in the name
plus a hash of the layout (so snapshot and current ComfyUI share files when their layouts agree),
written atomically (tmp + rename, under a lock file).

Also: `lora()` writes a small kohya-style LoRA (`lora_unet_<ldm key with _>.lora_up/lora_down/
alpha`) for the tiny UNet, and `load_state_dict()` reads a safetensors file (no pickle).

CLI: `python -m harness.checkpoints sd15 --seed 3 --clip`, `python -m harness.checkpoints lora`.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .paths import CACHE, REPO_ROOT, VENV_PYTHON

GEN_VERSION = 4
CHECKPOINTS = CACHE / "checkpoints"  # registered as a checkpoints folder by the test server
LORAS = CACHE / "loras"  # registered as a loras folder

ARCHS = ("sd15", "sdxl", "sd15_full")
DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
}
FP8_MAX = 448.0
# TAESD: the decoder sees (latent - vae_shift) * vae_scale through tanh(x/3)*3. A random UNet never
# removes the noise, so sampled latents have std ~ sigma_max / latent scale factor (~96 for SD1.5,
# ~112 for SDXL); vae_scale 1/32 brings that to ~3 instead of saturating the clamp. The decoder's
# output conv gets a quarter of the usual std so the image is mid grey (last bias 0.5) +- ~0.2.
VAE_SCALE = 1.0 / 32.0
DECODER_OUT_GAIN = 0.25

# Shrunken UNets. Fixed by detection (comfy/supported_models.py): model_channels 320, SD1.5
# context 768 / no linear proj / no adm / 8 heads; SDXL context 2048 / linear proj / adm 2816 /
# input transformer depth exactly [0,0,2,2,10,10] ([0,0,1,1,2,2] would be Segmind Vega).
# Output and middle depths and channel_mult are free.
SD15_UNET = {
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
}
SDXL_UNET = {
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 1, 1],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 0, 0, 0, 1, 1, 1],
    "transformer_depth_middle": 1,
}
# The real SD1.5 UNet (860M parameters): for benchmarks at real shapes, not for tests.
SD15_FULL_UNET = {
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
}
EXPECTED_CONFIG = {"sd15": "SD15", "sdxl": "SDXL", "sd15_full": "SD15"}

# Files of a host tree whose content decides the layout; their sizes/mtimes key the spec cache.
_LAYOUT_FILES = (
    "comfy/supported_models.py", "comfy/supported_models_base.py", "comfy/model_base.py",
    "comfy/model_detection.py", "comfy/ldm/modules/diffusionmodules/openaimodel.py",
    "comfy/ldm/modules/attention.py", "comfy/sd1_clip.py", "comfy/sdxl_clip.py",
    "comfy/clip_model.py", "comfy/sd1_clip_config.json", "comfy/clip_config_bigg.json",
    "comfy/taesd/taesd.py", "comfy/diffusers_convert.py", "comfy/utils.py",
)


# ----------------------------------------------------------------------------------------------
# layout (needs ComfyUI: runs in a subprocess)
# ----------------------------------------------------------------------------------------------

def _build_spec_in_process(arch: str, clip: bool) -> dict:
    """Names/shapes of a tiny checkpoint, from the host's classes. ComfyUI must be importable."""
    import comfy.model_detection as model_detection
    import comfy.supported_models as supported_models
    import comfy.taesd.taesd as taesd

    if arch == "sd15":
        family, shrink = supported_models.SD15, SD15_UNET
    elif arch == "sdxl":
        family, shrink = supported_models.SDXL, SDXL_UNET
    elif arch == "sd15_full":
        family, shrink = supported_models.SD15, SD15_FULL_UNET
    else:
        raise ValueError(f"unknown arch {arch!r}")
    unet_config = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": 4, "out_channels": 4, "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }
    unet_config.update(family.unet_config)
    if unet_config.get("adm_in_channels") is not None:
        unet_config["num_classes"] = "sequential"
    unet_config.update(shrink)
    model_config = family(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device="meta")

    clip_sd = None
    if clip:
        try:
            target = model_config.clip_target(state_dict={})
        except TypeError:  # snapshot: clip_target() takes no state_dict
            target = model_config.clip_target()
        clip_sd = target.clip(device="meta", dtype=torch.float32).state_dict()
    vae_sd = taesd.TAESD().state_dict()
    sd = model.state_dict_for_saving(clip_sd, vae_sd)
    # vae_shift exists only in newer TAESD; write both so neither host warns about a missing key
    # (an extra key is only a debug line in the snapshot).
    sd.setdefault("first_stage_model.vae_scale", torch.tensor(1.0))
    sd.setdefault("first_stage_model.vae_shift", torch.tensor(0.0))

    # Detection check on shapes only (works on meta tensors).
    detected = model_detection.model_config_from_unet_config(
        model_detection.detect_unet_config(sd, "model.diffusion_model."))
    detected_name = type(detected).__name__ if detected is not None else None
    if detected_name != EXPECTED_CONFIG[arch]:
        raise RuntimeError(f"layout for {arch} is detected as {detected_name}")

    tensors = []
    for name in sorted(sd):
        t = sd[name]
        tensors.append([name, list(t.shape), "int" if not t.dtype.is_floating_point else "float"])
    return {"arch": arch, "clip": clip, "detected": detected_name, "tensors": tensors,
            "unet_config": {k: shrink[k] for k in shrink}}


def _host_fingerprint(tree: Path) -> str:
    h = hashlib.sha1(str(tree.resolve()).encode())
    for rel in _LAYOUT_FILES:
        p = tree / rel
        if p.exists():
            st = p.stat()
            h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


def _resolve_host(host):
    from .host import Host, ensure_host

    if host is None:
        return ensure_host()
    if isinstance(host, Host):
        return host
    if isinstance(host, (str, Path)):
        if str(host) == "snapshot":
            old = os.environ.pop("COMFYUI_DIR", None)
            try:
                return ensure_host()
            finally:
                if old is not None:
                    os.environ["COMFYUI_DIR"] = old
        tree = Path(host).expanduser().resolve()
        from .host import SNAPSHOT_NAME
        return Host(tree, "snapshot" if tree.name == SNAPSHOT_NAME else "current")
    raise TypeError(f"host must be None, a Host, 'snapshot' or a path, not {host!r}")


def layout(arch: str, clip: bool = False, host=None) -> dict:
    """The cached layout (names, shapes) of `arch` in `host`; computed in a subprocess once."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")
    h = _resolve_host(host)
    specs = CHECKPOINTS / "specs"
    path = specs / f"{arch}{'-clip' if clip else ''}-{h.kind}-{_host_fingerprint(h.tree)}-v{GEN_VERSION}.json"
    if path.is_file():
        return json.loads(path.read_text())
    specs.mkdir(parents=True, exist_ok=True)
    python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    env = dict(os.environ)
    env.pop("COMFYUI_DIR", None)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    cmd = [python, "-m", "harness.checkpoints", "--_spec", arch, "--tree", str(h.tree), "--out", str(tmp)]
    if clip:
        cmd.append("--clip")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"layout for {arch} (clip={clip}) in {h.tree} failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, path)
    return json.loads(path.read_text())


def _layout_hash(spec: dict) -> str:
    h = hashlib.sha1(f"v{GEN_VERSION}".encode())
    for name, shape, kind in spec["tensors"]:
        h.update(f"{name}:{shape}:{kind};".encode())
    return h.hexdigest()[:8]


# ----------------------------------------------------------------------------------------------
# values (plain torch)
# ----------------------------------------------------------------------------------------------

def _part(name: str) -> str:
    if name.startswith("model.diffusion_model."):
        return "unet"
    if name.startswith("first_stage_model."):
        return "vae"
    return "clip"


def _generator(seed: int, stream: str, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{GEN_VERSION}|{stream}|{seed}|{name}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def _randn(shape, seed: int, stream: str, name: str) -> torch.Tensor:
    return torch.randn(shape, generator=_generator(seed, stream, name), dtype=torch.float32)


def _rule(name: str, shape: list[int], decoder_last: str | None):
    """(kind, value, sigma): kind 'const' (value) or 'normal' (std sigma). sigma also scales noise."""
    part = _part(name)
    if decoder_last is not None and name == decoder_last + ".bias":
        return "const", 0.5, 0.0
    if name.endswith("vae_scale"):
        return "const", VAE_SCALE, 0.0
    if name.endswith("vae_shift"):
        return "const", 0.0, 0.0
    if name.endswith("logit_scale"):  # CLIP-G's; ln(100) as in trained CLIPs, unused by ComfyUI
        return "const", math.log(100.0), 0.0
    if len(shape) <= 1:
        if name.endswith(".weight"):  # norm scale
            return "const", 1.0, 0.02
        return "normal", 0.0, 0.01  # bias (and any other vector)
    if part == "clip":
        if "position_embedding" in name or "positional_embedding" in name:
            return "normal", 0.0, 0.01
        return "normal", 0.0, 0.02
    fan_in = math.prod(shape[1:])
    if decoder_last is not None and name == decoder_last + ".weight":
        # rows with zero sum: the ReLU features it reads are all >= 0, so a random row would give
        # each colour channel a random offset (images from near black to near white by seed)
        return "centered", 0.0, DECODER_OUT_GAIN / math.sqrt(fan_in)
    return "normal", 0.0, 1.0 / math.sqrt(fan_in)


def _init(name, shape, seed, rule) -> torch.Tensor:
    kind, value, sigma = rule
    if kind == "const":
        return torch.full(shape, float(value), dtype=torch.float32)
    w = _randn(shape, seed, "init", name)
    if kind == "centered":
        w -= w.mean(dim=tuple(range(1, w.dim())), keepdim=True)
    return w.mul_(sigma).add_(value)


def _storage_dtypes(dtype: str) -> tuple[torch.dtype, torch.dtype]:
    unet = DTYPES[dtype]
    other = unet if dtype in ("fp32", "bf16") else torch.float16
    return unet, other


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float8_e4m3fn:
        t = t.clamp(-FP8_MAX, FP8_MAX)
    return t.to(dtype).contiguous()


def _options_tag(arch, seed, clip, dtype, base_seed, noise, scale, offset) -> str:
    parts = [arch + ("-clip" if clip else ""), dtype, f"s{seed}"]
    if base_seed is not None:
        parts += [f"b{base_seed}", f"n{noise:g}"]
    if scale != 1.0:
        parts.append(f"x{scale:g}")
    if offset != 0.0:
        parts.append(f"o{offset:g}")
    return "-".join(parts)


def generate_state_dict(spec: dict, *, seed=0, dtype="fp16", base_seed=None, noise=0.0, scale=1.0,
                        offset=0.0) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint with `spec`'s layout (see the module docstring for the rules)."""
    unet_dtype, other_dtype = _storage_dtypes(dtype)
    names = [t[0] for t in spec["tensors"]]
    dec = [n[: -len(".bias")] for n, shape, _ in spec["tensors"]
           if n.startswith("first_stage_model.taesd_decoder.") and n.endswith(".bias") and shape == [3]]
    decoder_last = max(dec, key=lambda n: int(n.split(".")[2])) if dec else None
    vae_seed = seed if base_seed is None else base_seed
    out: dict[str, torch.Tensor] = {}
    for name, shape, kind in spec["tensors"]:
        part = _part(name)
        if kind == "int":  # CLIP position_ids
            out[name] = torch.arange(shape[-1], dtype=torch.int64).expand(shape).contiguous()
            continue
        rule = _rule(name, shape, decoder_last)
        if part == "vae":
            out[name] = _cast(_init(name, shape, vae_seed, rule), other_dtype)
            continue
        sigma = rule[2]
        if base_seed is None:
            w = _init(name, shape, seed, rule)
            if scale != 1.0:
                w.mul_(scale)
        else:
            w = _init(name, shape, base_seed, rule)
            if noise != 0.0 and sigma > 0:
                w.add_(_randn(shape, seed, "noise", name), alpha=scale * noise * sigma)
        if offset != 0.0 and sigma > 0:
            w.add_(offset * sigma)
        out[name] = _cast(w, unet_dtype if part == "unet" else other_dtype)
    assert len(out) == len(names)
    return out


@contextlib.contextmanager
def _lock(path: Path):
    locks = path.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / (path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _metadata(options: dict, **extra) -> dict[str, str]:
    # ONE metadata key: safetensors keeps __metadata__ in a hash map, so with several keys their
    # order in the header (and the file's bytes) changes from process to process.
    info = {"generator": f"harness.checkpoints v{GEN_VERSION}", "options": options, **extra}
    return {"barycenter": json.dumps(info, sort_keys=True)}


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint(arch: str, *, seed: int = 0, clip: bool = False, dtype: str = "fp16",
               base_seed: int | None = None, noise: float = 0.0, scale: float = 1.0,
               offset: float = 0.0, host=None) -> Path:
    """Path of a cached tiny checkpoint of `arch` ("sd15" or "sdxl"), generating it if needed.

    host: None (COMFYUI_DIR or the snapshot, as harness.host.ensure_host), "snapshot", a path to a
    ComfyUI tree, or a harness.host.Host. It only decides the layout; files are shared between
    hosts whose layouts agree.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    if base_seed is None and noise != 0.0:
        raise ValueError("noise needs base_seed (weights = base(base_seed) + noise * N(seed))")
    seed, noise, scale, offset = int(seed), float(noise), float(scale), float(offset)
    base_seed = None if base_seed is None else int(base_seed)
    spec = layout(arch, clip, host)
    tag = _options_tag(arch, seed, clip, dtype, base_seed, noise, scale, offset)
    path = CHECKPOINTS / f"{tag}-L{_layout_hash(spec)}.safetensors"
    if path.is_file():
        return path
    with _lock(path):
        if path.is_file():
            return path
        options = {"arch": arch, "seed": seed, "clip": clip, "dtype": dtype, "base_seed": base_seed,
                   "noise": noise, "scale": scale, "offset": offset}
        write_checkpoint(path, spec, options)
    return path


def write_checkpoint(path, spec: dict, options: dict) -> None:
    """Generate the checkpoint for `options` (checkpoint()'s keywords) and write it atomically."""
    kw = {k: options[k] for k in ("seed", "dtype", "base_seed", "noise", "scale", "offset")}
    sd = generate_state_dict(spec, **kw)
    _write_atomic(Path(path), sd, _metadata(options, unet_config=spec["unet_config"]))


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------

_LORA_TARGETS = (
    ".proj_in.weight", ".proj_out.weight",
    ".attn1.to_q.weight", ".attn1.to_k.weight", ".attn1.to_v.weight", ".attn1.to_out.0.weight",
    ".attn2.to_q.weight", ".attn2.to_k.weight", ".attn2.to_v.weight", ".attn2.to_out.0.weight",
    ".ff.net.0.proj.weight", ".ff.net.2.weight",
)
# plus the convolutions of the first ResBlock (a LoCon-style 3x3 conv LoRA) and its emb linear
_LORA_EXTRA = ("input_blocks.1.0.in_layers.2.weight", "input_blocks.1.0.out_layers.3.weight",
               "input_blocks.1.0.emb_layers.1.weight")


def lora_targets(spec: dict) -> list[tuple[str, list[int]]]:
    """(UNet key without 'model.diffusion_model.', weight shape) of every layer the LoRA patches."""
    prefix = "model.diffusion_model."
    out = []
    for name, shape, _ in spec["tensors"]:
        if not name.startswith(prefix):
            continue
        key = name[len(prefix):]
        if key.endswith(_LORA_TARGETS) or key in _LORA_EXTRA:
            out.append((key, shape))
    return out


def lora(arch: str = "sd15", *, seed: int = 0, rank: int = 4, host=None) -> Path:
    """Path of a cached kohya-style LoRA for the tiny `arch` UNet.

    Keys `lora_unet_<ldm key, dots as _>.lora_down.weight` [rank, in(, kh, kw)],
    `.lora_up.weight` [out, rank(, 1, 1)], `.alpha` (= rank, so the scale is 1). down ~ N(0, 1/fan_in),
    up ~ N(0, 0.25/rank): the patch up@down has std 0.5/sqrt(fan_in), half the weight's own std.
    """
    rank = int(rank)
    spec = layout(arch, False, host)
    path = LORAS / f"lora-{arch}-r{rank}-s{int(seed)}-L{_layout_hash(spec)}.safetensors"
    if path.is_file():
        return path
    with _lock(path):
        if path.is_file():
            return path
        sd = {}
        for key, shape in lora_targets(spec):
            base = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            out_f, fan_in = shape[0], math.prod(shape[1:])
            down_shape = [rank, shape[1], *shape[2:]]
            up_shape = [out_f, rank] + [1] * (len(shape) - 2)
            down = _randn(down_shape, seed, "lora_down", key).mul_(1.0 / math.sqrt(fan_in))
            up = _randn(up_shape, seed, "lora_up", key).mul_(0.5 / math.sqrt(rank))
            sd[base + ".lora_down.weight"] = down.to(torch.float16).contiguous()
            sd[base + ".lora_up.weight"] = up.to(torch.float16).contiguous()
            sd[base + ".alpha"] = torch.tensor(float(rank), dtype=torch.float32)
        _write_atomic(path, sd, _metadata({"arch": arch, "seed": int(seed), "rank": rank}))
    return path


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def load_state_dict(path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file (CPU). Refuses anything else: no pickle anywhere."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"only .safetensors files are read, not {path.name}")
    return load_file(str(path), device="cpu")


def read_options(path) -> dict:
    """The options a checkpoint()/lora() file was made with (from its safetensors metadata)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("barycenter", "{}")).get("options", {})


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _spec_main(args) -> int:
    from .host import Host, import_in_process

    import_in_process(Host(Path(args.tree), "current"))
    with torch.inference_mode():
        spec = _build_spec_in_process(args._spec, args.clip)
    Path(args.out).write_text(json.dumps(spec))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.checkpoints",
                                description="Make (or find cached) tiny random-weight checkpoints; prints the path.")
    p.add_argument("arch", nargs="?", choices=[*ARCHS, "lora"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", action="store_true", help="include the text encoder(s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--base-seed", type=int, default=None)
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--offset", type=float, default=0.0)
    p.add_argument("--lora-arch", choices=ARCHS, default="sd15", help="for `lora`")
    p.add_argument("--rank", type=int, default=4, help="for `lora`")
    p.add_argument("--host", default=None, help="'snapshot' or a ComfyUI tree (default: COMFYUI_DIR or snapshot)")
    p.add_argument("--_spec", choices=ARCHS, help=argparse.SUPPRESS)
    p.add_argument("--tree", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._spec:
        return _spec_main(args)
    if args.arch is None:
        p.error("arch is required")
    t0 = time.perf_counter()
    if args.arch == "lora":
        path = lora(args.lora_arch, seed=args.seed, rank=args.rank, host=args.host)
    else:
        path = checkpoint(args.arch, seed=args.seed, clip=args.clip, dtype=args.dtype,
                          base_seed=args.base_seed, noise=args.noise, scale=args.scale,
                          offset=args.offset, host=args.host)
    print(path)
    print(f"{path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
