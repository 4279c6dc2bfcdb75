"""Reading an ONNX decoder graph (``torch.onnx.export``, Optimum) as a Llama-family checkpoint.

Exporters rename weights (``onnx::MatMul_702``, ``val_43``), store MatMul weights transposed
(``[in, out]``) or behind a Transpose node, and fold tied heads into separate copies, so the
tensors are mapped by following the graph, not by their names:

* the token embedding is the ``Gather`` of a ``[vocab, hidden]`` weight by the input ids;
* a projection is a ``MatMul`` (or ``Gemm``) whose second operand is a 2-D weight, optionally
  followed by an ``Add`` of a 1-D bias;
* an RMSNorm is ``x * 1/sqrt(mean(x^2) + eps)`` (``Pow``/``ReduceMean``/``Sqrt`` ...) times a 1-D
  weight, or an ``RMSNormalization`` / ``SimplifiedLayerNormalization`` node;
* three projections reading one normalised input are attention q, k and v: told apart by where
  they enter the attention products (q the left and k the right operand of the scores product, v
  the right operand of the second, or the slots of a fused ``Attention`` node); the projection
  the attention output reaches is o_proj;
* two projections reading one normalised input are the MLP: the one that goes through a
  ``Sigmoid`` (SiLU) is gate, the other up, and the projection both reach is down;
* the decoder layers are these blocks in graph order, attention then MLP, each feeding the next;
  the projection left after the final norm is the output head (tied when its values are the
  embedding's).

Whatever cannot be placed this way (an unknown operator, a weight that belongs to no recognised
projection, a fused qkv projection, another activation) is listed in the refusal. The config
comes from a ``config.json`` beside the model, cross-checked against the graph's shapes, or, when
there is none, from the graph itself (sizes, head width from the Reshape constants, the RMSNorm
epsilon, rope_theta from the rotary ``inv_freq``); what cannot be read from the graph is named
with the config.json field to add.

Weights stored inline are read from the protobuf; external data (``location``/``offset``/
``length``) is memory-mapped, and must lie inside the model's folder.
"""

from __future__ import annotations

import math
import mmap
import re
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora.architectures import EMBED, HEAD, NORM, Llama, TensorSpec
from edgelora.config import ModelArgs, read_json
from edgelora.converters.source import DerivedCheckpoint, SourceTensor, find_source_file
from edgelora.errors import FormatError, UnsupportedError, UsageError
from edgelora.safetensors_io import bf16_to_float32

#: ONNX TensorProto data types the weights may have: safetensors-style name and the raw numpy type
FLOAT_TYPES = {1: ("F32", np.float32), 10: ("F16", np.float16), 16: ("BF16", np.uint16)}
#: model types whose layers this module maps (separate q/k/v and gate/up projections)
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
PASS = ("Identity", "Cast")  # ops that carry a value through unchanged for our purposes
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
NORM_OPS = ("RMSNormalization", "SimplifiedLayerNormalization")
#: operators a decoder export is made of; anything else is reported as not understood
KNOWN_OPS = frozenset("""
    Abs Add And Attention Cast CastLike Ceil Clip Concat Constant ConstantOfShape Cos CumSum Div Einsum
    Equal Expand Flatten Floor Gather GatherElements GatherND Gemm Greater GreaterOrEqual Identity IsInf
    IsNaN Less LessOrEqual MatMul Max Min Mod Mul Neg Not Or Pow Range Reciprocal ReduceMax ReduceMean
    Reshape RMSNormalization ScatterElements ScatterND Shape Sigmoid Sin Size Slice Softmax Split Sqrt
    Squeeze Sub Sum Swish Tile Transpose Trilu Unsqueeze Where Xor
    """.split())
MS_OPS = frozenset({"SimplifiedLayerNormalization", "MultiHeadAttention", "GroupQueryAttention"})
HF_NAME = re.compile(r"(model\.layers\.\d+\.[\w.]+\.(?:weight|bias)|model\.embed_tokens\.weight|model\.norm\.weight|"
                     r"lm_head\.weight)$")
EMBED_WEIGHT, HEAD_WEIGHT = f"{EMBED}.weight", f"{HEAD}.weight"


def find_model(path) -> Path | None:
    """The ONNX file ``path`` names (itself, or the one ``*.onnx`` of a folder without safetensors)."""
    return find_source_file(path, ".onnx", "ONNX models", "a decoder exported with or without past key values")


@dataclass
class _Linear:
    node: int  # index of the MatMul/Gemm
    weight: str  # constant holding the weight
    transpose: bool  # stored [in, out]: the [out, in] tensor is its transpose
    in_dim: int
    out_dim: int
    x: str  # activation read (through Identity/Cast)
    y: str  # output (after the bias Add, if any)
    bias: str | None


@dataclass
class _Norm:
    node: int  # the node applying the weight
    weight: str
    eps: float | None
    x: str  # the residual stream it normalises


class _Graph:
    """An ONNX graph with the indexes the mapping needs, and its constant tensors readable."""

    def __init__(self, model, path: Path):
        self.path = path
        self.folder = path.parent.resolve()
        g = model.graph
        self.nodes = list(g.node)
        self.consts: dict = {}  # name -> TensorProto (or a numpy array, for Constant's value_* forms)
        for t in g.initializer:
            self.consts[t.name] = t
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list] = defaultdict(list)
        for i, n in enumerate(self.nodes):
            for o in n.output:
                self.producer[o] = i
            for s, x in enumerate(n.input):
                if x:
                    self.consumers[x].append((i, s))
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                c = self._constant(n)
                if c is not None:
                    self.consts[n.output[0]] = c
        self.inputs = [i.name for i in g.input if i.name not in self.consts]
        self.outputs = [o.name for o in g.output]
        self._maps: dict[Path, tuple] = {}
        self._small: dict[str, np.ndarray] = {}
        self.files: set[Path] = set()  # external data files the weights come from

    @staticmethod
    def _constant(n):
        from onnx import helper
        for a in n.attribute:
            v = helper.get_attribute_value(a)
            if a.name == "value":
                return v
            if a.name in ("value_float", "value_int"):
                return np.array(v, np.float32 if a.name == "value_float" else np.int64)
            if a.name in ("value_floats", "value_ints"):
                return np.array(list(v), np.float32 if a.name == "value_floats" else np.int64)
        return None

    # -- constants -------------------------------------------------------------------------------

    def shape(self, name: str) -> tuple:
        c = self.consts[name]
        return tuple(c.shape) if isinstance(c, np.ndarray) else tuple(int(d) for d in c.dims)

    def is_float(self, name: str) -> bool:
        c = self.consts.get(name)
        if c is None:
            return False
        return c.dtype.kind == "f" if isinstance(c, np.ndarray) else c.data_type in FLOAT_TYPES

    def dtype(self, name: str) -> str:
        c = self.consts[name]
        return {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}.get(c.dtype, "F32") \
            if isinstance(c, np.ndarray) else FLOAT_TYPES[c.data_type][0]

    def array(self, name: str) -> np.ndarray:
        """A constant as stored (bfloat16 as uint16 bit patterns): a view of the memory-mapped external
        data or of the protobuf's bytes where possible."""
        c = self.consts[name]
        if isinstance(c, np.ndarray):
            return c
        from onnx import TensorProto, numpy_helper
        shape = tuple(int(d) for d in c.dims)
        numel = math.prod(shape)
        np_type = FLOAT_TYPES[c.data_type][1] if c.data_type in FLOAT_TYPES else None
        if c.data_location == TensorProto.EXTERNAL:
            if np_type is None:
                from onnx import helper
                np_type = helper.tensor_dtype_to_np_dtype(c.data_type)
            mm, offset = self._external(name, c, numel * np.dtype(np_type).itemsize)
            return np.frombuffer(mm, np_type, count=numel, offset=offset).reshape(shape)
        if np_type is not None and c.raw_data:
            raw = c.raw_data
            if len(raw) != numel * np.dtype(np_type).itemsize:
                raise FormatError(f"tensor {name!r} holds {len(raw)} bytes, its shape {list(shape)} needs "
                                  f"{numel * np.dtype(np_type).itemsize}", self.path)
            return np.frombuffer(raw, np_type).reshape(shape)
        try:
            a = numpy_helper.to_array(c)
        except Exception as e:
            raise FormatError(f"cannot read tensor {name!r} ({type(e).__name__}: {e})", self.path) from None
        if np_type is not None and a.dtype != np_type:
            a = a.view(np_type) if a.dtype.itemsize == np.dtype(np_type).itemsize else a.astype(np_type)
        return a.reshape(shape)

    def small(self, name: str) -> np.ndarray | None:
        """A small constant's value (shapes, epsilons, inv_freq), or None if not a constant."""
        if name not in self.consts:
            return None
        if name not in self._small:
            self._small[name] = np.array(self.array(name))
        return self._small[name]

    def _external(self, name, c, need: int):
        info = {e.key: e.value for e in c.external_data}
        loc = info.get("location")
        if not loc:
            raise FormatError(f"tensor {name!r} is stored as external data without a location", self.path)
        rel = Path(loc.replace("\\", "/"))
        target = (self.folder / rel).resolve()
        if rel.is_absolute() or ".." in rel.parts or "\0" in loc or not target.is_relative_to(self.folder):
            raise FormatError(f"tensor {name!r}: external data location {loc!r} points outside the model's "
                              f"folder; refusing to follow it", self.path)
        if not target.is_file():
            raise FormatError(f"external data file {loc!r} (tensor {name!r}) is missing; copy it next to "
                              f"{self.path.name}", self.path)
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise FormatError(f"tensor {name!r}: malformed external data offset/length", self.path) from None
        if target not in self._maps:
            fh = open(target, "rb")
            size = target.stat().st_size
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            self._maps[target] = (fh, mm, size)
        _, mm, size = self._maps[target]
        if offset < 0 or (length is not None and length != need):
            raise FormatError(f"tensor {name!r}: external data length {length} at offset {offset} does not fit "
                              f"its shape ({need} bytes)", target)
        if offset + need > size:
            raise FormatError(f"tensor {name!r} needs bytes {offset}..{offset + need} but the file has {size} "
                              f"(truncated?)", target)
        self.files.add(target)
        return mm, offset

    def release(self, name: str, first: int = 0, last: int | None = None) -> None:
        """Drop bytes ``[first, last)`` of an external tensor from our resident set."""
        c = self.consts.get(name)
        if c is None or isinstance(c, np.ndarray) or not c.external_data:
            return
        info = {e.key: e.value for e in c.external_data}
        target = (self.folder / Path(info["location"].replace("\\", "/"))).resolve()
        entry = self._maps.get(target)
        if entry is None or not hasattr(entry[1], "madvise"):
            return
        nbytes = math.prod(self.shape(name)) * np.dtype(FLOAT_TYPES[c.data_type][1]).itemsize
        base = int(info.get("offset", 0))
        end = base + (nbytes if last is None else min(last, nbytes))
        start = (base + first) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            entry[1].madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        for fh, _, _ in self._maps.values():
            fh.close()  # views handed out keep their mappings alive
        self._maps.clear()

    # -- structure -------------------------------------------------------------------------------

    def node_name(self, i: int) -> str:
        n = self.nodes[i]
        return f"{n.op_type} {n.name!r}" if n.name else f"{n.op_type} #{i}"

    def act(self, name: str) -> str:
        """The tensor ``name`` carries, looking through Identity and Cast."""
        for _ in range(16):
            i = self.producer.get(name)
            if i is None or self.nodes[i].op_type not in PASS:
                break
            name = self.nodes[i].input[0]
        return name

    def weight(self, name: str) -> tuple[str, bool] | None:
        """``(constant, transposed)`` if ``name`` is a constant seen through Identity/Cast/2-D Transpose."""
        transposed = False
        for _ in range(16):
            if name in self.consts:
                return name, transposed
            i = self.producer.get(name)
            if i is None:
                return None
            n = self.nodes[i]
            if n.op_type == "Transpose":
                perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), [1, 0])
                if perm != [1, 0]:
                    return None
                transposed = not transposed
            elif n.op_type not in PASS:
                return None
            name = n.input[0]
        return None

    def attr(self, i: int, key: str, default):
        from onnx import helper
        for a in self.nodes[i].attribute:
            if a.name == key:
                return helper.get_attribute_value(a)
        return default

    def ancestors(self, name: str, depth: int) -> list[int]:
        seen, out, frontier = set(), [], [name]
        for _ in range(depth):
            nxt = []
            for t in frontier:
                i = self.producer.get(t)
                if i is not None and i not in seen:
                    seen.add(i)
                    out.append(i)
                    nxt += [x for x in self.nodes[i].input if x]
            frontier = nxt
        return out

    def reach(self, name: str, stop: set, limit: int = 1 << 30, target: int | None = None) -> dict[int, set]:
        """Nodes downstream of tensor ``name`` -> the input slots they were entered by. Nodes in
        ``stop`` (the weight projections) are recorded but not gone through; the walk ends early
        once node ``target`` is found."""
        hit: dict[int, set] = {}
        queue = deque([name])
        seen_t = {name}
        while queue and len(hit) < limit:
            t = queue.popleft()
            for i, s in self.consumers.get(t, ()):
                first = i not in hit
                hit.setdefault(i, set()).add(s)
                if i == target:
                    return hit
                if first and i not in stop:
                    for o in self.nodes[i].output:
                        if o and o not in seen_t:
                            seen_t.add(o)
                            queue.append(o)
        return hit


class _Mapper:
    """Finds the Llama-family structure in a graph; collects what it does not understand."""

    def __init__(self, g: _Graph):
        self.g = g
        self.problems: list[str] = []
        self.eps: float | None = None
        self.head_dim: int | None = None
        self.inv_freq: np.ndarray | None = None

    def fail(self, what: str) -> None:
        self.problems.append(what)

    # projections -------------------------------------------------------------------------------

    def linears(self) -> dict[int, _Linear]:
        g, out = self.g, {}
        for i, n in enumerate(g.nodes):
            if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
                continue
            w = g.weight(n.input[1])
            if w is None:
                if g.weight(n.input[0]) is not None and len(g.shape(g.weight(n.input[0])[0])) == 2:
                    self.fail(f"{g.node_name(i)} multiplies a weight from the left")
                continue
            name, transposed = w
            shape = g.shape(name)
            if len(shape) != 2 or not g.is_float(name):
                self.fail(f"{g.node_name(i)} has a weight {name!r} of shape {list(shape)}"
                          f"{'' if g.is_float(name) else ' that is not float16/bfloat16/float32'}")
                continue
            bias = None
            if n.op_type == "Gemm":
                if g.attr(i, "transA", 0) or g.attr(i, "alpha", 1.0) != 1.0 or g.attr(i, "beta", 1.0) != 1.0:
                    self.fail(f"{g.node_name(i)} with transA/alpha/beta")
                    continue
                transposed ^= bool(g.attr(i, "transB", 0))
                stored_in_out = not transposed
                if len(n.input) > 2 and n.input[2]:
                    bias = n.input[2]
            else:
                stored_in_out = not transposed
            in_dim, out_dim = shape if stored_in_out else shape[::-1]
            y = n.output[0]
            if bias is None:
                users = g.consumers.get(y, [])
                if len(users) == 1 and g.nodes[users[0][0]].op_type == "Add":
                    j, s = users[0]
                    other = g.nodes[j].input[1 - s]
                    b = g.weight(other)
                    if b is not None and not b[1] and g.is_float(b[0]) and \
                            math.prod(g.shape(b[0])) == out_dim and g.shape(b[0])[-1] == out_dim:
                        bias, y = b[0], g.nodes[j].output[0]
            elif g.weight(bias) is None or math.prod(g.shape(g.weight(bias)[0])) != out_dim:
                self.fail(f"{g.node_name(i)} has a bias that is not a {out_dim}-vector")
                continue
            else:
                bias = g.weight(bias)[0]
            out[i] = _Linear(i, name, stored_in_out, in_dim, out_dim, g.act(n.input[0]), y, bias)
        return out

    # normalisation -----------------------------------------------------------------------------

    def norm(self, t: str) -> _Norm | None:
        """The RMSNorm producing tensor ``t``, if that is what produces it."""
        g = self.g
        i = g.producer.get(g.act(t))
        if i is None:
            return None
        n = g.nodes[i]
        if n.op_type in NORM_OPS:
            w = g.weight(n.input[1]) if len(n.input) > 1 else None
            if w is None or w[1]:
                return None
            return _Norm(i, w[0], float(g.attr(i, "epsilon", 1e-5)), g.act(n.input[0]))
        if n.op_type != "Mul":
            return None
        ws = [(s, g.weight(x)) for s, x in enumerate(n.input)]
        ws = [(s, w) for s, w in ws if w is not None and not w[1] and g.is_float(w[0])
              and len([d for d in g.shape(w[0]) if d != 1]) == 1]
        if len(ws) != 1:
            return None
        slot, (wname, _) = ws[0]
        u = n.input[1 - slot]
        up = g.ancestors(u, 7)
        ops = [g.nodes[j].op_type for j in up]
        if "ReduceMean" not in ops or "Sub" in ops or not ({"Sqrt", "Reciprocal", "Div"} & set(ops)):
            return None
        rm = next(j for j in up if g.nodes[j].op_type == "ReduceMean")
        sq = g.producer.get(g.act(g.nodes[rm].input[0]))
        if sq is None:
            return None
        s = g.nodes[sq]
        if s.op_type == "Pow":
            e = g.small(s.input[1])
            if e is None or e.size != 1 or float(e.ravel()[0]) != 2.0:
                return None
            x = g.act(s.input[0])
        elif s.op_type == "Mul" and g.act(s.input[0]) == g.act(s.input[1]):
            x = g.act(s.input[0])
        else:
            return None
        eps = None
        for j, _ in g.consumers.get(g.nodes[rm].output[0], []):
            if g.nodes[j].op_type == "Add":
                for y in g.nodes[j].input:
                    v = g.small(y)
                    if v is not None and v.size == 1:
                        eps = float(v.ravel()[0])
        return _Norm(i, wname, eps, x)

    # the whole model ---------------------------------------------------------------------------

    def run(self) -> dict | None:
        g = self.g
        unknown = sorted({(f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type
                          for n in g.nodes
                          if not ((n.domain in ("", "ai.onnx") and n.op_type in KNOWN_OPS)
                                  or (n.domain == "com.microsoft" and n.op_type in MS_OPS))})
        if unknown:
            flow = {"If", "Loop", "Scan"} & set(unknown)
            self.fail(f"operators {', '.join(unknown)}" + (
                " (control flow: export the decoder unmerged, e.g. optimum-cli export onnx --no-post-process)"
                if flow else ""))
        lin = self.lin = self.linears()
        stop = set(lin)
        emb = self.embedding()
        # projections grouped by the normalised input they read
        groups: dict[str, list[_Linear]] = defaultdict(list)
        for l in lin.values():
            groups[l.x].append(l)
        attn, mlp, singles = [], [], []
        norms: dict[str, _Norm] = {}
        for x, ls in groups.items():
            nm = self.norm(x)
            if nm is None:
                continue
            norms[x] = nm
            if len(ls) == 3:
                attn.append(ls)
            elif len(ls) == 2:
                mlp.append(ls)
            elif len(ls) == 1:
                singles.append(ls[0])
            else:
                self.fail(f"{len(ls)} projections reading the normalised output of {g.node_name(nm.node)} "
                          f"(expected 3: attention q/k/v, or 2: MLP gate/up)")
        for x, ls in groups.items():
            if x not in norms and len(ls) > 1:
                self.fail(f"{len(ls)} projections reading one un-normalised input "
                          f"({', '.join(g.node_name(l.node) for l in ls)})")
        for ls in (attn, mlp):
            ls.sort(key=lambda grp: min(l.node for l in grp))
        layers = []
        for k, grp in enumerate(attn):
            layers.append({"attn": self.attention(grp, stop, k)})
        for k, grp in enumerate(mlp):
            if k < len(layers):
                layers[k]["mlp"] = self.mlp_block(grp, stop, k)
        if len(attn) != len(mlp):
            self.fail(f"{len(attn)} attention blocks (q/k/v after an RMSNorm) but {len(mlp)} MLP blocks "
                      f"(gate/up after an RMSNorm)")
        if not attn:
            self.fail("no attention block: no three projections (q, k, v) reading one RMSNorm's output")
        used = {l.node for L in layers for blk in L.values() if blk for l in blk.values()}
        ends = [l for l in singles if l.node not in used]
        head = None
        if len(ends) == 1:
            head = ends[0]
        elif len(ends) > 1:
            self.fail(f"{len(ends)} projections after an RMSNorm belong to no block: "
                      f"{', '.join(g.node_name(l.node) for l in ends)}")
        else:
            self.fail("no output head: no projection after the final RMSNorm")
        used |= {head.node} if head else set()
        left = [l for i, l in lin.items() if i not in used]
        if left:
            self.fail(f"{len(left)} MatMul/Gemm weight(s) that belong to no recognised projection: "
                      + ", ".join(f"{g.node_name(l.node)} ({l.weight} {list(g.shape(l.weight))})" for l in left[:6])
                      + (" ..." if len(left) > 6 else ""))
        if self.problems or emb is None:
            return None
        # order and wiring: embedding -> (attention -> MLP) x L -> final norm -> head
        order, prev = [], None
        for k, L in enumerate(layers):
            a, m = L["attn"], L.get("mlp")
            if a is None or m is None:
                return None
            na, nm = norms[a["q"].x], norms[m["gate"].x]
            start = emb[2] if prev is None else prev.y
            if na.node not in g.reach(start, stop, target=na.node):
                self.fail(f"layer {k}: the attention's RMSNorm does not read the "
                          f"{'embedding' if prev is None else 'previous MLP'}'s output")
            if nm.node not in g.reach(a["o"].y, stop, target=nm.node):
                self.fail(f"layer {k}: the MLP's RMSNorm does not follow the attention output "
                          f"(parallel attention/MLP blocks are not supported)")
            order.append((na, a, nm, m))
            prev = m["down"]
        fn = norms.get(head.x) if head else None
        if head is not None and prev is not None and fn is not None and fn.node not in g.reach(prev.y, stop, target=fn.node):
            self.fail("the output head's RMSNorm does not follow the last layer")
        out_reach = g.reach(head.y, stop) if head else {}
        if head and head.y not in g.outputs and not any(o in g.outputs for i in out_reach
                                                         for o in g.nodes[i].output):
            self.fail("the output head does not reach a graph output")
        if self.problems:
            return None
        self.eps = next((n.eps for n in [o[0] for o in order] if n.eps is not None), None)
        self.head_dim = self.find_head_dim(order[0][1]["q"], order[0][1]["k"]) if order else None
        self.inv_freq = self.find_inv_freq()
        return {"embedding": emb[0], "layers": order, "final_norm": fn, "head": head}

    def embedding(self):
        g, found = self.g, []
        for i, n in enumerate(g.nodes):
            if n.op_type != "Gather" or g.attr(i, "axis", 0) != 0:
                continue
            w = g.weight(n.input[0])
            if w is None or w[1] or not g.is_float(w[0]) or len(g.shape(w[0])) != 2:
                continue
            src = g.act(n.input[1])
            found.append((w[0], src, n.output[0], i))
        ids = [f for f in found if f[1] in g.inputs]
        if len(ids) != 1:
            self.fail("no token embedding (a Gather of a [vocab, hidden] weight by the input ids)" if not ids else
                      f"{len(ids)} embedding lookups on the graph inputs ({', '.join(f[0] for f in ids)})")
            return None
        for f in found:
            if f is not ids[0] and g.shape(f[0])[1] == g.shape(ids[0][0])[1]:
                self.fail(f"another [.., hidden] lookup table {f[0]!r} read by {g.node_name(f[3])}")
        return ids[0][0], ids[0][1], ids[0][2]

    def attention(self, grp: list[_Linear], stop: set, k: int) -> dict | None:
        g = self.g
        reach = {l.node: g.reach(l.y, stop) for l in grp}
        sinks = {}
        for l in grp:
            for i, slots in reach[l.node].items():
                n = g.nodes[i]
                if n.op_type in ATTENTION_OPS or (n.op_type == "MatMul" and i not in stop):
                    sinks.setdefault(i, {})[l.node] = slots
        roles: dict[str, _Linear] = {}
        fused = sorted(i for i in sinks if g.nodes[i].op_type in ATTENTION_OPS)
        if fused:
            for l in grp:
                slot = min(sinks[fused[0]].get(l.node, {9}))
                if slot < 3:
                    roles[("q", "k", "v")[slot]] = l
        elif sinks:
            s = min(sinks)
            for l in grp:
                slots = sinks[s].get(l.node)
                role = "v" if slots is None else "q" if slots == {0} else "k" if slots == {1} else None
                if role is not None and role not in roles:
                    roles[role] = l
        if len(roles) != 3:
            self.fail(f"layer {k}: cannot tell attention q, k and v apart at "
                      f"{', '.join(g.node_name(l.node) for l in grp)} (they do not meet in a Q·Kᵀ and a "
                      f"weights·V product)")
            return None
        outs = {i for i in reach[roles["v"].node] if i in stop}
        if len(outs) != 1:
            self.fail(f"layer {k}: the attention output reaches {len(outs)} projections (expected o_proj alone)")
            return None
        o = next(i for i in outs)
        linears = {l.node: l for l in grp}
        roles["o"] = self._linear_at(o, linears)
        kk, v = roles["k"], roles["v"]
        if kk.out_dim != v.out_dim:
            self.fail(f"layer {k}: k and v widths differ ({kk.out_dim} vs {v.out_dim})")
        return roles

    def _linear_at(self, i: int, known: dict) -> _Linear:
        return known[i] if i in known else self.lin[i]

    def mlp_block(self, grp: list[_Linear], stop: set, k: int) -> dict | None:
        g = self.g
        reach = {l.node: g.reach(l.y, stop) for l in grp}
        acts = {l.node: {g.nodes[i].op_type for i in reach[l.node]} for l in grp}
        gate = [l for l in grp if {"Sigmoid", "Swish"} & acts[l.node]]
        if len(gate) != 1:
            other = set().union(*acts.values()) & {"Erf", "Tanh", "Relu", "Gelu", "FastGelu", "BiasGelu",
                                                    "HardSigmoid", "Exp"}
            self.fail(f"layer {k}: the MLP at {', '.join(g.node_name(l.node) for l in grp)} has "
                      + (f"an activation other than SiLU ({', '.join(sorted(other))})" if other else
                         "no SiLU (x·sigmoid(x)) on exactly one of its two projections"))
            return None
        up = next(l for l in grp if l is not gate[0])
        downs = {i for i in reach[up.node] if i in stop}
        downs_g = {i for i in reach[gate[0].node] if i in stop}
        if len(downs) != 1 or downs != downs_g:
            self.fail(f"layer {k}: gate and up do not meet in one down projection")
            return None
        return {"gate": gate[0], "up": up, "down": self._linear_at(next(iter(downs)), {})}

    # config clues --------------------------------------------------------------------------------

    def find_head_dim(self, q: _Linear, k: _Linear) -> int | None:
        """The head width: the last entry of the shape q's (and k's) first Reshape splits it into."""
        g, dims = self.g, []
        for l in (q, k):
            reach = g.reach(l.y, set(), limit=64)
            rs = sorted(i for i in reach if g.nodes[i].op_type == "Reshape" and 0 in reach[i])
            if not rs:
                return None
            shp = g.nodes[rs[0]].input[1]
            v = g.small(shp)
            if v is None:
                i = g.producer.get(shp)
                if i is None or g.nodes[i].op_type != "Concat":
                    return None
                v = g.small(g.nodes[i].input[-1])
            if v is None or v.size < 1 or int(v.ravel()[-1]) <= 0:
                return None
            dims.append(int(v.ravel()[-1]))
        if dims[0] != dims[1] or q.out_dim % dims[0] or k.out_dim % dims[0]:
            return None
        return dims[0]

    def find_inv_freq(self) -> np.ndarray | None:
        """The rotary inverse frequencies: the float constant a little above the Cos node."""
        g = self.g
        for i, n in enumerate(g.nodes):
            if n.op_type != "Cos":
                continue
            for j in g.ancestors(n.input[0], 6):
                for x in g.nodes[j].input:
                    w = g.weight(x)
                    if w is not None and g.is_float(w[0]) and 1 < math.prod(g.shape(w[0])) <= 4096:
                        v = g.small(w[0]).astype(np.float32).ravel()
                        if v.size > 1 and np.all(v > 0) and np.all(np.diff(v) < 0):
                            return v
        return None


def _rope_theta(inv_freq: np.ndarray | None, head_dim: int | None) -> float | None:
    """rope_theta if ``inv_freq`` is plain RoPE's ``theta ** (-2i/d)`` (no scaling), else None."""
    if inv_freq is None or head_dim is None or inv_freq.size != head_dim // 2 or inv_freq.size < 2:
        return None
    estimate = float(inv_freq[1]) ** (-head_dim / 2)
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    for digits in (3, 4, 5, 6, 8):  # the round number the float32 frequencies came from
        theta = float(f"{estimate:.{digits}g}")
        if np.allclose(inv_freq, (1.0 / theta ** exponents.astype(np.float64)).astype(np.float32), rtol=2e-6, atol=0):
            return theta
    return None


class _Reader:
    """The surface of a SafetensorsFile ``_convert_tensor`` uses, over the ONNX constants: ``raw``
    gives each tensor in Hugging Face layout ``[out, in]`` (a transposed view where the graph stores
    ``[in, out]``), ``release`` drops external-data pages."""

    def __init__(self, g: _Graph, sources: dict, specs: dict):
        self.path = g.path
        self.g = g
        self.sources = sources  # hf name -> (constant, transpose)
        self.tensors = {n: SourceTensor(g.dtype(c), specs[n].shape) for n, (c, _) in sources.items()}

    def raw(self, name: str) -> np.ndarray:
        const, transpose = self.sources[name]
        a = self.g.array(const)
        shape = self.tensors[name].shape
        return a.reshape(shape[::-1]).T if transpose else a.reshape(shape)

    def release(self, name: str, first: int = 0, last: int | None = None) -> None:
        const, transpose = self.sources[name]
        if transpose:  # row ranges of the transpose are not byte ranges of the file: all at the end
            if last is None or last >= self.tensors[name].nbytes:
                self.g.release(const)
        else:
            self.g.release(const, first, last)

    def float32(self, name: str) -> np.ndarray:
        raw = self.raw(name)
        x = bf16_to_float32(raw) if self.tensors[name].dtype == "BF16" else raw.astype(np.float32)
        return np.ascontiguousarray(x)


class ONNXCheckpoint(DerivedCheckpoint):
    """An ONNX decoder model file opened as a checkpoint: the same interface the converter uses of
    :class:`~edgelora.converters.hf.HFCheckpoint`."""

    def __init__(self, path):
        p = Path(path)
        model_path = find_model(p)
        if model_path is None:
            raise FormatError("no ONNX model here (a .onnx file, or a folder holding one)", p)
        try:
            import onnx
        except ImportError:  # a converter-only dependency (the runtime never needs it)
            raise UsageError("reading ONNX models needs the onnx package: pip install 'edgelora[onnx]'",
                             model_path) from None
        self.model_path = model_path
        self.path = model_path.parent  # the folder: config.json, tokenizer.json, external data
        size = model_path.stat().st_size
        if size >= 2**31:
            raise UnsupportedError("ONNX file of 2 GiB or more: protobuf cannot hold it; save the weights as "
                                   "external data (onnx.save(..., save_as_external_data=True))", model_path)
        try:
            model = onnx.load(str(model_path), load_external_data=False)
        except Exception as e:
            raise FormatError(f"not an ONNX model, or truncated: the protobuf does not parse "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})",
                              model_path) from None
        if not model.HasField("graph") or not model.graph.node or model.ir_version <= 0:
            raise FormatError("not an ONNX model (no graph), or truncated", model_path)
        self.g = _Graph(model, model_path)
        try:
            self._map()
        except BaseException:
            self.g.close()
            raise

    def _map(self) -> None:
        g = self.g
        m = _Mapper(g)
        found = m.run()
        if found is None:
            probs = m.problems or ["the decoder structure"]
            raise UnsupportedError(
                "cannot map this ONNX graph to a Llama-family decoder (llama, mistral, qwen2); not understood: "
                + "; ".join(probs[:10]) + (f"; ... ({len(probs) - 10} more)" if len(probs) > 10 else ""),
                self.model_path)
        src: dict[str, tuple[str, bool]] = {EMBED_WEIGHT: (found["embedding"], False),
                                            f"{NORM}.weight": (found["final_norm"].weight, False)}
        biases = {"attn": set(), "mlp": set()}
        for k, (na, a, nm, mm) in enumerate(found["layers"]):
            src[f"{Llama.module(k, 'attn_norm')}.weight"] = (na.weight, False)
            src[f"{Llama.module(k, 'mlp_norm')}.weight"] = (nm.weight, False)
            for role, l in [*((r, a[r]) for r in "qkvo"), *((r, mm[r]) for r in ("gate", "up", "down"))]:
                mod = Llama.module(k, role)
                src[mod + ".weight"] = (l.weight, l.transpose)
                if l.bias is not None:
                    src[mod + ".bias"] = (l.bias, False)
                    biases["attn" if role in "qkvo" else "mlp"].add(role)
        head = found["head"]
        E = g.shape(found["embedding"])
        head_is_embedding = head.weight == found["embedding"] and head.transpose is False
        if head.bias is not None:
            raise UnsupportedError("the output head has a bias; Llama-family heads have none", self.model_path)
        graph = {"hidden_size": E[1], "vocab_size": E[0], "num_hidden_layers": len(found["layers"]),
                 "intermediate_size": found["layers"][0][3]["gate"].out_dim}
        a0 = found["layers"][0][1]
        q_dim, kv_dim = a0["q"].out_dim, a0["k"].out_dim
        if (head.in_dim, head.out_dim) != (E[1], E[0]):
            raise FormatError(f"the output head is [{head.out_dim}, {head.in_dim}], the embedding {list(E)}",
                              self.model_path)

        cfg_path = self.path / "config.json"
        self.config_path = cfg_path if cfg_path.is_file() else None
        if self.config_path is not None:
            d = read_json(cfg_path)
            args = ModelArgs.from_dict(d, cfg_path)
            if args.model_type not in MODEL_TYPES:
                raise UnsupportedError(f"ONNX import maps {', '.join(MODEL_TYPES)} decoders; config.json says "
                                       f"model_type={args.model_type!r}", cfg_path)
            said = {"hidden_size": args.hidden_size, "vocab_size": args.vocab_size,
                    "num_hidden_layers": args.num_hidden_layers, "intermediate_size": args.intermediate_size}
            wrong = [f"{k}={said[k]} in config.json, {v} in the graph" for k, v in graph.items() if said[k] != v]
            if args.num_attention_heads * args.head_dim != q_dim:
                wrong.append(f"num_attention_heads*head_dim={args.num_attention_heads * args.head_dim} in "
                             f"config.json, q width {q_dim} in the graph")
            if args.num_key_value_heads * args.head_dim != kv_dim:
                wrong.append(f"num_key_value_heads*head_dim={args.num_key_value_heads * args.head_dim} in "
                             f"config.json, k/v width {kv_dim} in the graph")
            if wrong:
                raise FormatError(f"config.json does not describe this graph: {'; '.join(wrong)}", cfg_path)
            if head_is_embedding and not args.tie_word_embeddings:
                raise FormatError("the graph's output head is its embedding matrix, but config.json says "
                                  "tie_word_embeddings=false", cfg_path)
            tied = args.tie_word_embeddings
            if tied and not head_is_embedding and not self._same(found["embedding"], head):
                raise FormatError("config.json ties the output head to the embeddings, but the graph's head "
                                  "weight differs from its embedding matrix", cfg_path)
            self.config_dict = d
        else:
            tied = head_is_embedding or self._same(found["embedding"], head)
            d, missing = self._infer(m, graph, q_dim, kv_dim, biases, tied)
            if missing:
                raise UnsupportedError(
                    "no config.json beside the model, and the graph does not tell " + "; ".join(t for t, _ in missing)
                    + ". Put the model's Hugging Face config.json next to it, or add these fields to one: "
                    + ", ".join(f for _, fs in missing for f in fs), self.model_path)
            args = ModelArgs.from_dict(d, self.model_path)
            self.config_dict = d
        self.args = args
        if not tied:
            src[HEAD_WEIGHT] = (head.weight, head.transpose)
        specs = Llama.tensor_map(args)
        self._check(src, specs)
        self.sources = src
        self.specs = specs
        self.where = dict.fromkeys(specs, _Reader(g, src, specs))
        self.shard_paths = [self.model_path] + sorted(g.files)  # files touched while mapping

    def _same(self, emb: str, head: _Linear) -> bool:
        """Whether the head's [out, in] values equal the embedding matrix (a tied head exported as a copy)."""
        g = self.g
        e = g.array(emb)
        h = g.array(head.weight)
        h = h.T if head.transpose else h
        if h.shape != e.shape or g.dtype(emb) != g.dtype(head.weight):
            return False
        step = max(1, (1 << 22) // max(e.shape[1], 1))
        return all(np.array_equal(e[r:r + step], h[r:r + step]) for r in range(0, e.shape[0], step))

    def _infer(self, m: _Mapper, graph: dict, q_dim: int, kv_dim: int, biases: dict, tied: bool):
        """A config.json from the graph alone; the fields it cannot tell."""
        missing = []
        attn_b = biases["attn"]
        if attn_b and attn_b != {"q", "k", "v"} and attn_b != {"q", "k", "v", "o"}:
            missing.append((f"model_type (attention biases on {sorted(attn_b)} only)", ["model_type"]))
        model_type = "qwen2" if attn_b == {"q", "k", "v"} and not biases["mlp"] else "llama"
        d = {"architectures": [MODEL_TYPES[model_type]], "model_type": model_type, **graph,
             "hidden_act": "silu", "tie_word_embeddings": bool(tied)}
        if model_type == "llama":
            d["attention_bias"] = bool(attn_b)
            d["mlp_bias"] = bool(biases["mlp"])
        hd = m.head_dim
        if hd is None:
            missing.append(("the number of heads", ["num_attention_heads", "num_key_value_heads", "head_dim"]))
        else:
            d.update(head_dim=hd, num_attention_heads=q_dim // hd, num_key_value_heads=kv_dim // hd)
        if m.eps is None:
            missing.append(("the RMSNorm epsilon", ["rms_norm_eps"]))
        else:
            d["rms_norm_eps"] = float(f"{m.eps:.6g}")
        theta = _rope_theta(m.inv_freq, hd)
        if theta is None:
            missing.append(("the rotary embedding's base and scaling (its inv_freq is not plain RoPE's, or "
                            "was not found)", ["rope_theta", "rope_scaling"]))
        else:
            d["rope_theta"] = theta
        return d, missing

    def _check(self, src: dict, specs: dict[str, TensorSpec]) -> None:
        g = self.g
        extra, missing = sorted(src.keys() - specs.keys()), sorted(specs.keys() - src.keys())
        if extra or missing:
            raise FormatError(f"the graph and config.json disagree: the graph has {extra[:5]} which the config "
                              f"does not imply, and lacks {missing[:5]} (check attention_bias / mlp_bias / "
                              f"model_type)", self.config_path or self.model_path)
        for name, spec in specs.items():
            const, transpose = src[name]
            shape = g.shape(const)
            n = math.prod(shape)
            ok = (len(shape) == 2 and (shape[::-1] if transpose else shape) == spec.shape) if len(spec.shape) == 2 \
                else n == math.prod(spec.shape)
            if not ok:
                raise FormatError(f"weight {const!r} mapped to {name} has shape {list(shape)}, the config implies "
                                  f"{list(spec.shape)}", self.model_path)
            c = g.consts[const]
            if not isinstance(c, np.ndarray) and c.external_data:
                g.array(const)  # its external data exists, inside the folder, and is long enough
            # where an initializer still carries a Hugging Face name, it must agree with the structure
            said = HF_NAME.search(const)
            if said and said.group(1) != name and not ({said.group(1), name} <= {EMBED_WEIGHT, HEAD_WEIGHT}):
                raise UnsupportedError(f"the graph's structure maps {const!r} to {name}, but its name says "
                                       f"{said.group(1)}; refusing to guess", self.model_path)

    # -- the rest of the converter's interface: DerivedCheckpoint's ----------------------------------

    @property
    def dtypes(self) -> set[str]:
        return {self.g.dtype(c) for c, _ in self.sources.values()}

    @property
    def source_meta(self) -> dict:
        """What the bundle manifest's ``source`` records about this kind of source."""
        return {"format": "onnx", "config": "config.json" if self.config_path else "inferred from the ONNX graph"}

    def close(self) -> None:
        self.g.close()
