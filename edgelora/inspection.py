"""``edgelora inspect``: what a bundle, a deploy folder, a source checkpoint (Hugging Face, ONNX or GGUF) or a
LoRA adapter folder holds."""

from __future__ import annotations

import os
import math
from pathlib import Path

from edgelora.bundle import MANIFEST, Bundle, file_table, is_bundle, manifest_digest
from edgelora.errors import ChecksumError, FormatError
from edgelora.products import UNPLANNED_KV_CACHE


def _args_dict(a) -> dict:
    return {"model_type": a.model_type, "layers": a.num_hidden_layers, "hidden_size": a.hidden_size,
            "intermediate_size": a.intermediate_size, "heads": a.num_attention_heads,
            "kv_heads": a.num_key_value_heads, "head_dim": a.head_dim, "vocab_size": a.vocab_size,
            "tie_word_embeddings": a.tie_word_embeddings, "rope_theta": a.rope_theta,
            "rope_scaling": a.rope_scaling, "max_position_embeddings": a.max_position_embeddings}


def _get(d, *keys):
    """``d[k0][k1]...``, or None where a level is missing or not an object: optional manifest fields
    describe, they are not trusted to be well formed."""
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _inspect_deploy(path: Path) -> dict:
    from edgelora.deployment import open_deploy
    from edgelora.errors import PlanError
    try:
        dep = open_deploy(path, verify="full", device_check=False)
        checksums = "ok"
    except ChecksumError as e:
        dep = open_deploy(path, verify=False, device_check=False)
        checksums = f"FAILED: {e}"
    try:
        open_deploy(path, verify=False, device_check=True)
        runs_here = "yes"
    except PlanError as e:
        runs_here = f"no: {e}"
    m = dep.manifest
    model = inspect(dep.bundle_path)
    return {"kind": "deploy", "path": str(path), "format": m["format"], "format_version": m["format_version"],
            "edgelora_version": m.get("edgelora_version"), "created": m.get("created"), "device": m["device"],
            "plan": m["plan"], "adapters": m["adapters"], "architecture": model["architecture"],
            "quantization": model["quantization"], "files": m["files"], "checksums": checksums,
            "manifest_sha256": manifest_digest(path / MANIFEST), "runs_here": runs_here}


def _describe_source(kind: str, ckpt, path: Path) -> dict:
    """A source ``convert`` reads (a Hugging Face folder, an ONNX model, a GGUF file), checked."""
    with ckpt as c:
        params = sum(math.prod(s.shape) for s in c.specs.values())
        config = [c.config_path] if c.config_path else []
        files = file_table(c.shard_paths + c.tokenizer_files() + config)
        meta = {k: v for k, v in c.source_meta.items() if k != "format"}
        return {"kind": kind, "path": str(path), "architecture": _args_dict(c.args), "parameters": params,
                "dtypes": sorted(c.dtypes), "bytes": c.source_bytes(),
                "bits_per_weight": round(8 * c.source_bytes() / params, 3), **meta, "files": files}


def inspect(path: str | os.PathLike) -> dict:
    """A JSON-ready description of a bundle or a deploy folder (checksums verified), a Hugging
    Face checkpoint or a PEFT adapter folder."""
    from edgelora.deployment import is_deploy
    path = Path(path)
    if is_deploy(path):
        return _inspect_deploy(path)
    if is_bundle(path):
        b = Bundle(path, verify=False)
        try:
            try:
                b.verify()
                checksums = "ok"
            except ChecksumError as e:
                checksums = f"FAILED: {e}"
            m = b.manifest
            counts: dict[str, int] = {}
            for e in b.entries.values():
                counts[e.storage] = counts.get(e.storage, 0) + math.prod(e.shape)
            return {"kind": "bundle", "path": str(path), "format": m["format"],
                    "format_version": m["format_version"], "edgelora_version": m.get("edgelora_version"),
                    "architecture": _args_dict(b.args), "quantization": m["quantization"],
                    "source": m.get("source"), "stats": m.get("stats"), "parameters_by_storage": counts,
                    "files": m["files"], "checksums": checksums, "manifest_sha256": manifest_digest(path / MANIFEST)}
        finally:
            b.close()
    if (path / "adapter_config.json").is_file():
        from edgelora.adapters import describe_adapter
        return describe_adapter(path)
    from edgelora.converters.gguf import GGUFCheckpoint, find_gguf
    from edgelora.converters.onnx import ONNXCheckpoint, find_model
    if find_gguf(path) is not None:
        return _describe_source("gguf", GGUFCheckpoint(path, require_tokenizer=False), path)
    if find_model(path) is not None:
        return _describe_source("onnx", ONNXCheckpoint(path), path)
    if (path / "config.json").is_file():
        from edgelora.converters.hf import HFCheckpoint
        return _describe_source("checkpoint", HFCheckpoint(path), path)
    raise FormatError("neither an edgelora bundle (manifest.json), a Hugging Face checkpoint (config.json), an "
                      "ONNX model (.onnx), a GGUF file (.gguf) nor a PEFT adapter (adapter_config.json)", path)


def format_inspect(info: dict) -> str:
    if info["kind"] == "adapter":
        from edgelora.adapters import format_adapter
        return format_adapter(info)
    a = info["architecture"]
    lines = [f"{info['kind']}: {info['path']}",
             f"  architecture  {a['model_type']}: {a['layers']} layers, hidden {a['hidden_size']}, "
             f"MLP {a['intermediate_size']}, {a['heads']} heads / {a['kv_heads']} KV heads (head_dim {a['head_dim']}), "
             f"vocab {a['vocab_size']}, {'tied' if a['tie_word_embeddings'] else 'separate'} head"]
    if info["kind"] == "deploy":
        d, p = info["device"], info["plan"]
        q = info["quantization"]
        budget = _get(d, "budget_bytes")
        lines += [f"  format        {info['format']} v{info['format_version']} (edgelora {info['edgelora_version']}, "
                  f"{info['created']})",
                  f"  quantization  NF4, blocks of {q['block_size']}, embeddings {_get(q, 'embeddings')}, "
                  f"head {_get(q, 'lm_head')}",
                  f"  device        {_get(d, 'name')} ({_get(d, 'arch')}, {_get(d, 'cores')} cores, "
                  f"{_get(d, 'ram_mib')} MiB RAM, budget "
                  f"{f'{budget / 1e6:.1f} MB' if isinstance(budget, (int, float)) else None})",
                  f"  plan          context {p['context']} ({p.get('kv_cache', UNPLANNED_KV_CACHE)} KV cache), "
                  f"{p['threads']} thread{'s' * (p['threads'] != 1)}, "
                  f"{p['total_bytes'] / 1e6:.1f} MB "
                  f"(adapters {p['adapter_bytes'] / 1e6:.1f} MB)",
                  f"  adapters      {', '.join(info['adapters']) or 'none'}",
                  f"  checksums     {info['checksums']}",
                  f"  manifest      sha256 {info['manifest_sha256']}",
                  f"  runs here     {info['runs_here']}"]
    elif info["kind"] == "bundle":
        q = info["quantization"]
        params, dtypes = _get(info, "stats", "parameters"), _get(info, "source", "dtypes")
        lines += [f"  format        {info['format']} v{info['format_version']} (edgelora {info['edgelora_version']})",
                  f"  quantization  NF4, blocks of {q['block_size']}, double quant "
                  f"{'on' if _get(q, 'double_quant') else 'off'}, embeddings {_get(q, 'embeddings')}, "
                  f"head {_get(q, 'lm_head')}",
                  f"  parameters    {params if isinstance(params, int) else 0:,} "
                  f"({', '.join(f'{k} {v:,}' for k, v in info['parameters_by_storage'].items())})",
                  f"  bits/weight   {_get(info, 'stats', 'bits_per_weight')}",
                  f"  source        {_get(info, 'source', 'name')} "
                  f"({', '.join(map(str, dtypes)) if isinstance(dtypes, list) else None})"]
        merged = _get(info, "source", "merged_adapter")
        if isinstance(merged, dict):
            lines.append(f"  merged        LoRA adapter {_get(merged, 'path')} (rank "
                         f"{','.join(map(str, _get(merged, 'ranks') or []))}, {_get(merged, 'modules')} modules, "
                         f"sha256 {str(_get(merged, 'sha256'))[:16]}…) folded into the weights")
        lines += [f"  checksums     {info['checksums']}",
                  f"  manifest      sha256 {info['manifest_sha256']}"]
    else:
        lines += [f"  parameters    {info['parameters']:,} in {', '.join(info['dtypes'])} "
                  f"({info['bytes'] / 1e6:,.1f} MB, {info['bits_per_weight']} bits/weight)"]
        if "config" in info:  # ONNX and GGUF sources: where the configuration came from
            lines.append(f"  config        {info['config']}")
    lines.append("  files")
    width = max([28, *map(len, info["files"])])
    for name, f in info["files"].items():
        lines.append(f"    {name:<{width}} {f['size']:>14,} B  sha256 {f['sha256'][:16]}…")
    return "\n".join(lines)
