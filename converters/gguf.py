"""Reading a GGUF file (llama.cpp's format) with F32, F16 or BF16 tensors as a Llama-family checkpoint.

``convert_hf_to_gguf.py --outtype f32/f16/bf16`` writes a Hugging Face checkpoint's tensors under
llama.cpp's names, dims reversed (``ne[0]`` is the fastest: a ``[out, in]`` matrix is stored with
``ne = [in, out]``, the same bytes), and, for the ``llama`` architecture (Llama, and Mistral, which
llama.cpp labels ``llama``), with the rows of q and k (weights and biases) permuted from
transformers' rotate-half layout to llama.cpp's interleaved rotary pairs::

    W_gguf = W.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)

(``n_head`` is the KV head count for k). This module maps the names back by the explicit table
below and undoes that permutation exactly (``W = W_gguf.reshape(n_head, head_dim // 2, 2, in)
.swapaxes(1, 2).reshape(out, in)``, as transformers' ``LlamaTensorProcessor._reverse_permute_weights``
does); ``qwen2`` is stored unpermuted. Files already quantized by llama.cpp (Q4_0, Q8_0, K-quants,
IQ...) are refused: edgelora quantizes from float weights.

The config comes from the GGUF metadata (``{arch}.block_count``, ``embedding_length``, ...; the
vocabulary size from ``token_embd``'s shape; a tied head where there is no ``output.weight``), and is
cross-checked against a ``config.json`` beside the file when there is one (which then becomes the
bundle's). Llama 3 rope scaling is stored by llama.cpp as a ``rope_freqs`` tensor of per-frequency
factors, not as metadata: it is checked against config.json's ``rope_scaling``, or, without one,
its parameters are recovered from it and accepted only if they reproduce every factor.

The tokenizer must be beside the file as ``tokenizer.json`` (GGUF embeds llama.cpp's vocabulary,
not the Hugging Face tokenizer edgelora runs). The header is walked with bounds checks before
``gguf.GGUFReader`` parses it, so a corrupt length can neither hang the reader nor make it allocate.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from pathlib import Path

import numpy as np

from edgelora.architectures import EMBED, HEAD, NORM, Llama, layer_index, layer_prefix
from edgelora.config import ModelArgs, read_json
from edgelora.converters.source import DerivedCheckpoint, SourceTensor, find_source_file
from edgelora.errors import FormatError, UnsupportedError, UsageError
from edgelora.safetensors_io import bf16_to_float32

#: GGML tensor types read here: safetensors-style name and the numpy type of the stored values
FLOAT_TYPES = {0: ("F32", np.float32), 1: ("F16", np.float16), 30: ("BF16", np.uint16)}
#: general.architecture -> Hugging Face model_type (a llama whose general.name says Mistral is mistral)
ARCHES = {"llama": "llama", "qwen2": "qwen2"}
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
#: llama.cpp tensor name -> Hugging Face name, outside the blocks and per block ``blk.N.``
GLOBAL_NAMES = {"token_embd.weight": f"{EMBED}.weight", "output_norm.weight": f"{NORM}.weight",
                "output.weight": f"{HEAD}.weight"}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight", "ffn_down.bias": "mlp.down_proj.bias",
}
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling factors, one per rotary pair
BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
GGML_MAX_DIMS = 4
#: GGUF value types: scalar sizes, 8 = string, 9 = array
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
UNQUANTIZED_HINT = ("edgelora quantizes from float weights: export the model unquantized with llama.cpp "
                    "(convert_hf_to_gguf.py --outtype f16, bf16 or f32), or convert its Hugging Face checkpoint")


def find_gguf(path) -> Path | None:
    """The GGUF file ``path`` names (itself, or the one ``*.gguf`` of a folder without safetensors)."""
    return find_source_file(path, ".gguf", "GGUF files", "a split model must be merged first: llama-gguf-split --merge")


def _scan_header(path: Path, size: int, quant_sizes: dict) -> None:
    """Walk the header (key/values and tensor infos) with every length checked against the file,
    so that ``GGUFReader`` never loops over, or slices for, counts the file cannot hold, and check
    that every tensor's data lies inside the file (``quant_sizes``: GGML type -> (block, bytes))."""
    if size < 24:
        raise FormatError(f"not a GGUF file ({size} bytes; a GGUF header alone is 24)", path)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise FormatError("not a GGUF file (no GGUF magic at the start)", path)
        version, = struct.unpack_from("<I", mm, 4)
        if version & 0xFFFF == 0:
            raise UnsupportedError("big-endian GGUF file; convert it on a little-endian machine", path)
        if version not in (2, 3):
            raise UnsupportedError(f"GGUF version {version} (versions 2 and 3 are read)", path)
        n_tensors, n_kv = struct.unpack_from("<QQ", mm, 8)
        pos = 24

        def take(n: int, what: str) -> int:
            nonlocal pos
            if n < 0 or n > size - pos:
                raise FormatError(f"truncated or corrupt GGUF header: {what} needs {n} bytes at offset {pos}, "
                                  f"the file has {size - pos} left", path)
            at, pos = pos, pos + n
            return at

        def u32(what):
            return struct.unpack_from("<I", mm, take(4, what))[0]

        def u64(what):
            return struct.unpack_from("<Q", mm, take(8, what))[0]

        def string(what):
            at = take(u64(what), what)
            return mm[at:pos]

        def value(t: int, what: str, depth: int = 0):
            if t in SCALAR_SIZES:
                take(SCALAR_SIZES[t], what)
            elif t == 8:
                string(what)
            elif t == 9 and depth < 4:
                it, n = u32(what), u64(what)
                if it in SCALAR_SIZES:
                    take(n * SCALAR_SIZES[it], what)
                elif it in (8, 9):
                    if n * (8 if it == 8 else 12) > size - pos:
                        raise FormatError(f"truncated or corrupt GGUF header: {what} claims {n} items", path)
                    for _ in range(n):
                        value(it, what, depth + 1)
                else:
                    raise FormatError(f"corrupt GGUF header: {what} has array item type {it}", path)
            else:
                raise FormatError(f"corrupt GGUF header: {what} has value type {t}", path)

        alignment = 32
        for i in range(n_kv):
            key = string(f"metadata key #{i}")
            name = key.decode("utf-8", "replace")[:80]
            t = u32(f"metadata {name!r}")
            if key == b"general.alignment" and t == 4:
                alignment = struct.unpack_from("<I", mm, pos)[0]
            value(t, f"metadata {name!r}")
        infos = []
        for i in range(n_tensors):
            name = string(f"tensor info #{i}").decode("utf-8", "replace")[:80]
            nd = u32(f"tensor {name!r}")
            if not 0 < nd <= GGML_MAX_DIMS:
                raise FormatError(f"corrupt GGUF header: tensor {name!r} has {nd} dimensions", path)
            dims = struct.unpack_from(f"<{nd}Q", mm, take(8 * nd, f"tensor {name!r}"))
            if any(d == 0 for d in dims) or math.prod(dims) > 8 * size:
                raise FormatError(f"tensor {name!r} has dims {list(dims)}, more elements than the file has bytes "
                                  f"(corrupt?)", path)
            kind, offset = struct.unpack_from("<IQ", mm, take(12, f"tensor {name!r}"))
            infos.append((name, dims, kind, offset))
        if alignment <= 0 or alignment & (alignment - 1):
            raise FormatError(f"corrupt GGUF header: general.alignment={alignment} is not a power of two", path)
        start = -(-pos // alignment) * alignment
        for name, dims, kind, offset in infos:
            if kind not in quant_sizes:
                raise FormatError(f"corrupt GGUF header: tensor {name!r} has unknown type {kind}", path)
            block, nbytes = quant_sizes[kind]
            need = math.prod(dims) * nbytes // block
            if start + offset + need > size:
                raise FormatError(f"truncated GGUF file: tensor {name!r} needs bytes {start + offset}.."
                                  f"{start + offset + need}, the file has {size}", path)


def _unpermute(a: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's ``LlamaModel.permute`` of q/k rows (weights ``[out, in]`` or biases)."""
    half = a.shape[0] // n_head // 2
    return np.ascontiguousarray(a.reshape(n_head, half, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape))


class _Reader:
    """Tensors of the GGUF file under their Hugging Face names, as the converter reads a shard."""

    def __init__(self, path: Path, tensors: dict, permuted: dict, mm):
        self.path = path
        self._t = tensors  # hf name -> gguf ReaderTensor
        self._perm = permuted  # hf name -> head count of its q/k permutation
        self._mm = mm  # the reader's mmap (for madvise), or None
        self.tensors = {}
        for n, t in tensors.items():
            dtype = FLOAT_TYPES[int(t.tensor_type)][0]
            self.tensors[n] = SourceTensor(dtype, tuple(int(d) for d in reversed(t.shape.tolist())))

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (bfloat16 as uint16 bit patterns), ``[out, in]``: a view of the memory map,
        or a copy for a permuted q/k."""
        t, info = self._t[name], self.tensors[name]
        a = t.data.view(np.uint16) if info.dtype == "BF16" else t.data
        a = a.reshape(info.shape)
        return _unpermute(a, self._perm[name]) if name in self._perm else a

    def release(self, name: str, first: int = 0, last: int | None = None) -> None:
        """Drop bytes ``[first, last)`` of a tensor's data from our resident set."""
        if self._mm is None or not hasattr(self._mm, "madvise"):
            return
        nbytes = self.tensors[name].nbytes
        if name in self._perm:  # rows of the copy are not byte ranges of the file: all at the end
            if last is not None and last < nbytes:
                return
            first, last = 0, nbytes
        base = int(self._t[name].data_offset)
        end = base + (nbytes if last is None else min(last, nbytes))
        start = (base + first) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):
                pass

    def float32(self, name: str) -> np.ndarray:
        raw = self.raw(name)
        x = bf16_to_float32(raw) if self.tensors[name].dtype == "BF16" else raw.astype(np.float32)
        return np.ascontiguousarray(x)


def _f32(x) -> float:
    """A float32 metadata value as the shortest decimal that reads back to it (1e-06, not 9.99e-07)."""
    return float(str(np.float32(x)))


def llama3_rope_factors(theta: float, head_dim: int, sc: dict) -> np.ndarray:
    """The per-pair factors convert_hf_to_gguf.py stores as ``rope_freqs`` for llama3 rope scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, low, high = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))


class GGUFCheckpoint(DerivedCheckpoint):
    """A GGUF file opened as a checkpoint: the interface the converter uses of
    :class:`~edgelora.converters.hf.HFCheckpoint` (llama.cpp's quantizations are refused, so there
    are no pre-quantized weights)."""

    def __init__(self, path, require_tokenizer: bool = True):
        p = Path(path)
        file = find_gguf(p)
        if file is None:
            raise FormatError("no GGUF file here (a .gguf file, or a folder holding one)", p)
        self.model_path = file
        self.path = file.parent  # the folder: tokenizer.json, config.json
        try:
            import gguf
        except ImportError:
            raise UsageError("reading GGUF files needs llama.cpp's gguf package: pip install 'edgelora[gguf]'",
                             file) from None
        size = file.stat().st_size
        _scan_header(file, size, {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()})
        if require_tokenizer and not (self.path / "tokenizer.json").is_file():
            raise FormatError(
                f"no tokenizer.json beside {file.name}: edgelora runs the Hugging Face tokenizer, which GGUF does "
                f"not hold. Copy the original model's tokenizer.json (and tokenizer_config.json) here, or write "
                f"them from the GGUF's own vocabulary: python -c \"from transformers import AutoTokenizer; "
                f"AutoTokenizer.from_pretrained('{self.path}', gguf_file='{file.name}')"
                f".save_pretrained('{self.path}')\"",
                self.path)
        try:
            self.reader = gguf.GGUFReader(file, "r")
        except Exception as e:  # the reader raises ValueError, KeyError, IndexError, UnicodeDecodeError ...
            raise FormatError(f"corrupt or truncated GGUF file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''})", file) from None
        self.shard_paths = [file]
        try:
            self._map(size)
        except BaseException:
            self.close()
            raise

    # -- metadata --------------------------------------------------------------------------------

    def _meta(self, key: str, kind=None, default=None, required: bool = False):
        f = self.reader.fields.get(key)
        if f is None:
            if required:
                raise FormatError(f"GGUF metadata lacks {key!r}", self.model_path)
            return default
        try:
            v = f.contents()
        except Exception:
            raise FormatError(f"GGUF metadata {key!r} cannot be read", self.model_path) from None
        if isinstance(v, list) and kind is int and v and all(x == v[0] for x in v):
            v = v[0]  # a per-layer array with one value
        ok = {int: lambda x: isinstance(x, int) and not isinstance(x, bool),
              float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
              str: lambda x: isinstance(x, str), None: lambda x: True}[kind]
        if not ok(v):
            raise UnsupportedError(f"GGUF metadata {key!r} = {str(v)[:60]} is not a single {kind.__name__}",
                                   self.model_path)
        return float(v) if kind is float else v

    # -- mapping ---------------------------------------------------------------------------------

    def _map(self, size: int) -> None:
        import gguf
        r, file = self.reader, self.model_path
        if r.byte_order != "I":
            raise UnsupportedError("big-endian GGUF file; convert it on a little-endian machine", file)
        if self._meta("split.count", int, 1) > 1:
            raise UnsupportedError("a split GGUF (one of several files); merge it first: llama-gguf-split --merge "
                                   "FIRST.gguf OUT.gguf", file)
        quantized = [(t.name, int(t.tensor_type)) for t in r.tensors if int(t.tensor_type) not in FLOAT_TYPES]
        if quantized:
            def tname(k):
                try:
                    return gguf.GGMLQuantizationType(k).name
                except ValueError:
                    return f"type {k}"
            kinds = sorted({tname(k) for _, k in quantized})
            raise UnsupportedError(f"this GGUF is already quantized by llama.cpp ({', '.join(kinds)}: "
                                   f"{len(quantized)} tensors, e.g. {quantized[0][0]}); " + UNQUANTIZED_HINT, file)
        for t in r.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise FormatError(f"tensor {t.name!r} needs bytes {t.data_offset}..{t.data_offset + t.n_bytes} but "
                                  f"the file has {size} (truncated?)", file)
        arch = self._meta("general.architecture", str, required=True)
        if arch not in ARCHES:
            raise UnsupportedError(f"GGUF architecture {arch!r} is not supported; supported: llama (Llama 2/3, "
                                   f"Mistral), qwen2", file)
        name = self._meta("general.name", str, "") or ""
        model_type = "mistral" if arch == "llama" and "mistral" in name.lower() else ARCHES[arch]

        by_name = {t.name: t for t in r.tensors}
        hf: dict = {}  # hf name -> ReaderTensor
        unknown, rope_freqs = [], by_name.get(ROPE_FREQS)
        for n, t in by_name.items():
            m = BLOCK.fullmatch(n)
            target = GLOBAL_NAMES.get(n) or (m and m.group(2) in LAYER_NAMES
                                             and layer_prefix(int(m.group(1))) + LAYER_NAMES[m.group(2)])
            if target:
                hf[target] = t
            elif n != ROPE_FREQS or arch != "llama":
                unknown.append(n)
        if unknown:
            raise UnsupportedError(f"GGUF tensor(s) with no place in a {arch} model: {unknown[:8]}"
                                   f"{' ...' if len(unknown) > 8 else ''}", file)
        if f"{EMBED}.weight" not in hf:
            raise FormatError("the GGUF has no token_embd.weight", file)
        emb = tuple(int(d) for d in reversed(hf[f"{EMBED}.weight"].shape.tolist()))
        if len(emb) != 2:
            raise FormatError(f"token_embd.weight has shape {list(emb)}, expected [vocab, hidden]", file)

        self.arch = arch
        cfg_path = self.path / "config.json"
        self.config_path = cfg_path if cfg_path.is_file() else None
        g = self._from_metadata(arch, model_type, emb, hf, rope_freqs, infer_rope=self.config_path is None)
        if self.config_path is not None:
            d = read_json(cfg_path)
            args = ModelArgs.from_dict(d, cfg_path)
            self._cross_check(args, ModelArgs.from_dict(g, file), arch, rope_freqs)
        else:
            d = g
            args = ModelArgs.from_dict(d, file)
        self.config_dict = d
        self.args = args
        specs = Llama.tensor_map(args)
        extra, missing = sorted(hf.keys() - specs.keys()), sorted(specs.keys() - hf.keys())
        if extra:
            raise UnsupportedError(f"unexpected tensor(s) for a {args.model_type} model with this config: "
                                   f"{extra[:5]}{' ...' if len(extra) > 5 else ''}", file)
        if missing:
            raise FormatError(f"the GGUF is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}", file)
        permuted = {}
        if arch == "llama":  # convert_hf_to_gguf.py's LlamaModel permutes q and k (weights and biases)
            for i in range(args.num_hidden_layers):
                for proj, heads in (("q", args.num_attention_heads), ("k", args.num_key_value_heads)):
                    for kind in ("weight", "bias"):
                        n = f"{Llama.module(i, proj)}.{kind}"
                        if n in specs:
                            permuted[n] = heads
        reader = _Reader(file, {n: hf[n] for n in specs}, permuted, getattr(r.data, "_mmap", None))
        for n, spec in specs.items():
            if reader.tensors[n].shape != spec.shape:
                gname = hf[n].name
                raise FormatError(f"tensor {gname!r} ({n}) has shape {list(reader.tensors[n].shape)} (GGUF dims "
                                  f"{hf[n].shape.tolist()}), the config implies {list(spec.shape)}", file)
        self.specs = specs
        self.where = dict.fromkeys(specs, reader)

    def _from_metadata(self, arch: str, model_type: str, emb: tuple, hf: dict, rope_freqs, infer_rope: bool) -> dict:
        """A config.json from the GGUF metadata and tensor shapes (llama3 rope scaling recovered from
        ``rope_freqs`` only if ``infer_rope``: with a config.json, that is checked against it instead)."""
        m = self._meta
        V, H = emb
        heads = m(f"{arch}.attention.head_count", int, required=True)
        hidden = m(f"{arch}.embedding_length", int, required=True)
        if hidden != H:
            raise FormatError(f"{arch}.embedding_length={hidden}, but token_embd.weight is {list(emb)}",
                              self.model_path)
        layers = m(f"{arch}.block_count", int, required=True)
        blocks = 1 + max((i for i in map(layer_index, hf) if i is not None), default=-1)
        if not isinstance(layers, int) or layers > blocks:  # before a tensor map is built for that many layers
            raise FormatError(f"{arch}.block_count={layers}, but the GGUF holds tensors of {blocks} blocks",
                              self.model_path)
        vocab = m(f"{arch}.vocab_size", int)
        if vocab is not None and vocab != V:
            raise FormatError(f"{arch}.vocab_size={vocab}, but token_embd.weight is {list(emb)}", self.model_path)
        head_dim = m(f"{arch}.attention.key_length", int) or m(f"{arch}.rope.dimension_count", int) \
            or (H // heads if heads else None)
        value_len = m(f"{arch}.attention.value_length", int)
        rot = m(f"{arch}.rope.dimension_count", int)
        if (value_len not in (None, head_dim)) or (rot not in (None, head_dim)):
            raise UnsupportedError(f"head_dim {head_dim} with value_length {value_len} and rope.dimension_count {rot}: "
                                   f"only equal key/value widths, rotated whole, are supported", self.model_path)
        d = {"architectures": [CLASSES[model_type]], "model_type": model_type,
             "hidden_size": H, "intermediate_size": m(f"{arch}.feed_forward_length", int, required=True),
             "num_hidden_layers": layers,
             "num_attention_heads": heads, "num_key_value_heads": m(f"{arch}.attention.head_count_kv", int, heads),
             "head_dim": head_dim, "vocab_size": V,
             "rms_norm_eps": _f32(m(f"{arch}.attention.layer_norm_rms_epsilon", float, required=True)),
             "rope_theta": _f32(m(f"{arch}.rope.freq_base", float, 10000.0)),
             "max_position_embeddings": m(f"{arch}.context_length", int, 2048),
             "hidden_act": "silu", "tie_word_embeddings": f"{HEAD}.weight" not in hf}
        if arch == "llama":
            d["attention_bias"] = f"{Llama.module(0, 'q')}.bias" in hf
            d["mlp_bias"] = f"{Llama.module(0, 'gate')}.bias" in hf
        for k in ("bos", "eos"):
            v = m(f"tokenizer.ggml.{k}_token_id", int)
            if v is not None:
                d[f"{k}_token_id"] = v
        kind = m(f"{arch}.rope.scaling.type", str, "none")
        if kind == "linear":
            d["rope_scaling"] = {"rope_type": "linear", "factor": _f32(m(f"{arch}.rope.scaling.factor", float,
                                                                         required=True))}
        elif kind != "none":
            raise UnsupportedError(f"rope scaling {kind!r} is not supported for {model_type} (linear, and llama3 "
                                   f"via rope_freqs, are)", self.model_path)
        if rope_freqs is not None and infer_rope:
            if kind != "none":
                raise FormatError(f"both {arch}.rope.scaling.type={kind!r} and a rope_freqs tensor", self.model_path)
            sc = self._llama3_from_factors(rope_freqs, d)
            if sc is not None:
                d["rope_scaling"] = sc
        return d

    def _factors(self, t, n: int) -> np.ndarray:
        dtype = FLOAT_TYPES[int(t.tensor_type)][0]
        a = t.data.view(np.uint16) if dtype == "BF16" else t.data
        a = bf16_to_float32(a) if dtype == "BF16" else np.asarray(a, np.float64)
        if a.size != n:
            raise FormatError(f"rope_freqs.weight has {a.size} values, one per rotary pair needs {n}", self.model_path)
        return np.asarray(a, np.float64).ravel()

    def _llama3_from_factors(self, t, d: dict) -> dict | None:
        """The llama3 rope_scaling whose factors ``rope_freqs`` holds (Llama 3.x's low_freq_factor=1 and
        high_freq_factor=4, the pretraining length solved from a factor between 1 and ``factor``), accepted
        only if it reproduces every stored factor; None when all factors are 1. Else refused."""
        hd = d["head_dim"]
        f = self._factors(t, hd // 2)
        factor = float(f.max())
        if np.allclose(f, 1.0, rtol=0, atol=1e-6):
            return None
        wavelen = 2 * math.pi * d["rope_theta"] ** (np.arange(0, hd, 2) / hd)
        low, high = 1.0, 4.0
        mid = np.flatnonzero((f > 1 + 1e-4) & (f < factor * (1 - 1e-4)))
        if mid.size:
            smooth = (1 / f[mid[0]] - 1 / factor) / (1 - 1 / factor)
            old = round(float(wavelen[mid[0]] * (smooth * (high - low) + low)))
            sc = {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": low, "high_freq_factor": high,
                  "original_max_position_embeddings": old}
            if old > 0 and np.allclose(llama3_rope_factors(d["rope_theta"], hd, sc), f, rtol=1e-4, atol=1e-6):
                return sc
        raise UnsupportedError("the GGUF holds llama3 rope scaling factors (rope_freqs) whose parameters cannot be "
                               "recovered; put the model's config.json beside it (its rope_scaling: factor, "
                               "low_freq_factor, high_freq_factor, original_max_position_embeddings)", self.model_path)

    def _cross_check(self, a: ModelArgs, g: ModelArgs, arch: str, rope_freqs) -> None:
        """config.json must describe the GGUF: the same sizes, head layout, epsilon, rope and tying."""
        cfg = self.config_path
        if ARCHES.get(arch) != a.model_type and not (arch == "llama" and a.model_type == "mistral"):
            raise FormatError(f"config.json says model_type={a.model_type!r}, the GGUF is {arch!r}", cfg)
        keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "tie_word_embeddings", "attention_bias", "mlp_bias"]
        wrong = [f"{k}={getattr(a, k)} in config.json, {getattr(g, k)} in the GGUF" for k in keys
                 if getattr(a, k) != getattr(g, k)]
        for k in ("rms_norm_eps", "rope_theta"):
            if np.float32(getattr(a, k)) != np.float32(getattr(g, k)):
                wrong.append(f"{k}={getattr(a, k)} in config.json, {getattr(g, k)} in the GGUF")
        if a.rope_type == "llama3":
            if rope_freqs is None:
                wrong.append("llama3 rope scaling in config.json, no rope_freqs tensor in the GGUF")
            elif not np.allclose(llama3_rope_factors(a.rope_theta, a.head_dim, a.rope_scaling),
                                 self._factors(rope_freqs, a.head_dim // 2), rtol=1e-4, atol=1e-6):
                wrong.append("the GGUF's rope_freqs are not the factors config.json's llama3 rope_scaling gives")
        elif rope_freqs is not None and not np.allclose(self._factors(rope_freqs, a.head_dim // 2), 1.0, atol=1e-6):
            wrong.append(f"rope scaling {a.rope_type!r} in config.json, llama3 factors (rope_freqs) in the GGUF")
        elif a.rope_type != g.rope_type or (a.rope_type == "linear" and np.float32(a.rope_scaling["factor"])
                                            != np.float32(g.rope_scaling["factor"])):
            wrong.append(f"rope_scaling {a.rope_scaling} in config.json, {g.rope_scaling} in the GGUF")
        if wrong:
            raise FormatError(f"config.json does not describe {self.model_path.name}: {'; '.join(wrong)}", cfg)

    # -- the rest of the converter's interface: DerivedCheckpoint's ----------------------------------

    @property
    def source_meta(self) -> dict:
        """What the bundle manifest's ``source`` records about this kind of source."""
        return {"format": "gguf", "gguf_architecture": self.arch,
                "config": "config.json" if self.config_path else "read from the GGUF metadata"}

    def close(self) -> None:
        self.reader = None  # the memory map closes when the last view of it goes
