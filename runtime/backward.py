"""LoRA gradients through the frozen NF4 base: forward, then backward, float32, on the CPU.

The maths of QLoRA training (Dettmers et al. 2023) as transformers + PEFT compute it, written out by
hand the way ``runtime/llama.py`` writes the forward: small pure functions with shape comments.
Only the adapters train: every projection is ``y = x W^T + b + s B(A(drop(x)))`` with ``W`` the
frozen base (NF4, float16 or float32, read through its :class:`~edgelora.runtime.linear.Linear`
object and never dequantized whole), and its backward, for ``dY [T, out]``::

    u  = drop(x) A^T                       [T, r]   (kept from the forward)
    dB = s dY^T u                          [out, r]
    dA = s (dY B)^T drop(x)                [r, in]
    dX = dY W + s ((dY B) A) * mask        [T, in]  (``dY W``: :func:`matmul_t`, a tile of W at a time)

Everything else gets its input gradient only: RMSNorm (``(1 + w)`` for Gemma), rotary embeddings
(the rotation by ``-angle``), grouped-query causal attention (sliding windows and Gemma 2's
soft-cap), SwiGLU / GELU-tanh, residuals, the final norm, the head (tied, float16 or NF4; its logits
soft-capped for Gemma 2) and the cross-entropy of transformers' causal-LM loss (``logits[t]``
predicts ``labels[t + 1]``, ``-100`` ignored). The embeddings get none (no adapter trains there).

Memory is bounded by recomputation (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
Cost"): the forward keeps only each layer's input [T, H]; the backward runs the layers last to
first, recomputing one layer's forward with its intermediate values kept, then its backward. The
attention's [T, T] probabilities are recomputed one key/value head at a time in the backward, so
they never exist for every head at once. The head runs on the rows whose next label counts only,
a chunk of rows at a time. ``checkpoint="projections"`` keeps the projections' outputs too, so the
backward recomputes only the cheap parts (norms, rotary, attention, activations) and runs no base
product twice; ``checkpoint="none"`` keeps every value of every layer (the reference the tests compare
with). All three give the same bits.

Dropout (PEFT's ``lora_dropout``, on the adapter's input only) draws its masks from a generator
seeded per layer from the caller's ``rng``, so a recomputed layer draws the same masks.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import numba
import numpy as np

from edgelora import architectures
from edgelora.config import ModelArgs
from edgelora.errors import UnsupportedError, UsageError
from edgelora.runtime.gemma import Gemma2Model, GemmaModel
from edgelora.runtime.llama import LlamaModel, rope, rope_attention_scaling, rope_inv_freq, rope_tables
from edgelora.runtime.lora import BASE
from edgelora.runtime.linear import exact_linear
from edgelora.runtime.phi3 import Phi3Model
from edgelora.runtime.threads import in_parallel

IGNORE_INDEX = -100  # labels not counted (transformers' / PyTorch's ignore_index)
HEAD = "lm_head"
#: float32 elements of a dequantized tile of the transposed product (4 MB), as the forward's tiles
TILE_ELEMENTS = 1 << 20
#: rows of W a tile has at least (a wide W's tiles get longer): each tile's product adds a [T, in]
#: partial sum to the thread's own, so a tile must carry enough rows to make that addition small
TILE_ROWS_MIN = 256
#: float32 elements of one chunk of logits [rows, V] (8 MB): the head runs this many at a time,
LOGIT_ELEMENTS = 1 << 21
#: and at least this many rows (a large vocabulary's chunk of 128 rows: 128 x 128256 x 4 = 66 MB)
HEAD_ROWS_MIN = 128
#: the decoders this module differentiates (exact classes: a new subclass must be added knowingly)
SUPPORTED = (LlamaModel, Phi3Model, GemmaModel, Gemma2Model)


# ---------------------------------------------------------------------------------------------
# the adapter being trained
# ---------------------------------------------------------------------------------------------

@dataclass
class LoraParams:
    """Trainable adapter state, keyed by the base module's name as Hugging Face / PEFT spell it
    (``model.layers.0.self_attn.q_proj``, ``lm_head``)."""

    A: dict = field(default_factory=dict)  # module -> float32 [r, in]
    B: dict = field(default_factory=dict)  # module -> float32 [out, r]
    scaling: dict = field(default_factory=dict)  # module -> alpha/r (alpha/sqrt(r) with rsLoRA)

    @property
    def modules(self) -> list[str]:
        return list(self.A)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.A.values()) + sum(b.nbytes for b in self.B.values())

    def copy(self) -> "LoraParams":
        return LoraParams({m: a.copy() for m, a in self.A.items()}, {m: b.copy() for m, b in self.B.items()},
                          dict(self.scaling))

    def peft_tensors(self) -> dict[str, np.ndarray]:
        """The tensors under PEFT's names (``base_model.model.<module>.lora_A.weight``, ``...lora_B.weight``),
        as ``adapter_model.safetensors`` holds them."""
        out = {}
        for m in self.A:
            out[f"base_model.model.{m}.lora_A.weight"] = self.A[m]
            out[f"base_model.model.{m}.lora_B.weight"] = self.B[m]
        return out

    def set_from_peft(self, tensors: dict) -> None:
        """Take A and B from PEFT's tensors: a ``state_dict()`` of a ``PeftModel`` (names with or
        without the adapter name, ``...lora_A.default.weight``) or of a saved adapter; torch tensors
        or arrays. Every module of this object must be found, with the same shapes."""
        found = {}
        for name, t in tensors.items():
            for part in ("lora_A", "lora_B"):
                if f".{part}." not in name:
                    continue
                module = name.split(f".{part}.")[0]
                module = module[len("base_model.model."):] if module.startswith("base_model.model.") else module
                value = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
                found[(module, part)] = np.ascontiguousarray(value, np.float32)
        for m in self.A:
            for part, mine in (("lora_A", self.A), ("lora_B", self.B)):
                got = found.get((m, part))
                if got is None or got.shape != mine[m].shape:
                    raise UsageError(f"{m}: no {part} tensor of shape {mine[m].shape} among the given tensors")
                mine[m] = got.copy()


def _net(model) -> LlamaModel:
    """The decoder of a loaded Model (or the decoder itself), checked to be one this module knows."""
    net = getattr(model, "net", model)
    if type(net) not in SUPPORTED:
        raise UnsupportedError(f"LoRA training does not support the {type(net).__name__} decoder "
                               f"(model_type {getattr(net.args, 'model_type', '?')!r})")
    return net


def linear_modules(model) -> dict[str, object]:
    """Every module an adapter may train, name -> Linear: each layer's projections, then ``lm_head``."""
    net = _net(model)
    out = {n: getattr(net.w.layers[i], k) for i, d in enumerate(net.names) for k, n in d.items()}
    out[HEAD] = net.w.head
    return out


def module_shapes(model) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every module an adapter may train, in the model's order (each layer's
    projections, then ``lm_head``), from a loaded Model, its decoder, or just its
    :class:`~edgelora.config.ModelArgs` (planning before anything is loaded)."""
    if isinstance(model, ModelArgs):
        arch = architectures.architecture(model)
        shapes = arch.projection_shapes(model)
        out = {arch.module(i, k): shapes[k] for i in range(model.num_hidden_layers) for k in arch.PROJECTIONS}
        out[HEAD] = (model.vocab_size, model.hidden_size)
        return out
    return {m: (lin.out_features, lin.in_features) for m, lin in linear_modules(model).items()}


def target_modules(model, targets) -> list[str]:
    """The module names ``targets`` selects, in the model's order: ``"all-linear"`` (every projection of
    every layer, not the head: PEFT's rule), or names matched as PEFT matches a list, a module whose
    name is the target or ends with ``.`` + target (``q_proj``, ``self_attn.q_proj``, ``lm_head``, or
    a full name). A target that matches nothing is a :class:`UsageError` naming it."""
    mods = module_shapes(model)
    if targets == "all-linear":
        return [m for m in mods if m != HEAD]
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise UsageError("no target modules given")
    chosen = []
    for t in targets:
        hit = [m for m in mods if m == t or m.endswith("." + t)]
        if not hit:
            short = sorted({m.rsplit(".", 1)[-1] for m in mods})
            raise UsageError(f"target module {t!r} matches no module of this model (its linear modules: "
                             f"{', '.join(short)})")
        chosen += hit
    return [m for m in mods if m in set(chosen)]


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def init_lora(model, targets="all-linear", rank: int = 16, alpha: float = 32.0, rslora: bool = False,
              seed: int = 0) -> LoraParams:
    """A new adapter as PEFT initialises one (``init_lora_weights=True``): ``A`` uniform in
    ``[-1/sqrt(in), 1/sqrt(in)]`` (torch.nn.Linear's ``kaiming_uniform_(a=sqrt(5))``), ``B`` zero, so
    the adapted model starts as the base. The numbers come from ``numpy.random.default_rng(seed)``,
    module by module in the model's order (not torch's generator: to start from PEFT's very tensors,
    use :meth:`LoraParams.set_from_peft`)."""
    if int(rank) != rank or rank < 1:
        raise UsageError(f"rank must be a positive integer, got {rank!r}")
    rank = int(rank)
    mods = linear_modules(model)
    rng = np.random.default_rng(seed)
    p = LoraParams()
    s = lora_scaling(rank, alpha, rslora)
    for m in target_modules(model, targets):
        lin = mods[m]
        bound = 1.0 / math.sqrt(lin.in_features)
        p.A[m] = rng.uniform(-bound, bound, (rank, lin.in_features)).astype(np.float32)
        p.B[m] = np.zeros((lin.out_features, rank), np.float32)
        p.scaling[m] = s
    return p


# ---------------------------------------------------------------------------------------------
# the transposed product dX = dY W, a tile of W at a time
# ---------------------------------------------------------------------------------------------

_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(n: int) -> ThreadPoolExecutor:
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="edgelora-backward")
    return _POOLS[n]


def _rows(lin, a: int, b: int, buf: np.ndarray) -> np.ndarray:
    """Rows [a, b) of ``lin``'s weight as float32, on the calling thread."""
    serial = getattr(lin, "dequantize_rows_serial", None)
    return serial(a, b, buf) if serial is not None else lin.dequantize_rows(a, b, buf)


def matmul_t(lin, dy: np.ndarray, threads: int | None = None) -> np.ndarray:
    """``dY W`` for a weight ``W [out, in]``: dy f32 [T, out] -> [T, in], the input gradient of
    ``y = x W^T``. The rows of W are split between the threads; each dequantizes a tile of its rows
    at a time and adds ``dY[:, tile] W[tile]`` (one BLAS product) to its own sum; the sums are added
    at the end. W is never held whole in float32 (the NumPy twin is :func:`matmul_t_reference`)."""
    n, k = lin.out_features, lin.in_features
    T = dy.shape[0]
    tile = max(1, TILE_ELEMENTS // k, min(n, TILE_ROWS_MIN))  # rows a tile
    threads = numba.get_num_threads() if threads is None else threads
    threads = max(1, min(threads, -(-n // tile)))  # no thread without a tile of its own
    step = -(-n // threads)

    def work(r0: int) -> np.ndarray:
        r1 = min(n, r0 + step)
        buf = np.empty((min(tile, r1 - r0), k), np.float32)
        acc = np.empty((T, k), np.float32)
        part = np.empty((T, k), np.float32)
        for a in range(r0, r1, tile):
            b = min(r1, a + tile)
            w = _rows(lin, a, b, buf)  # [b - a, in]
            if a == r0:
                np.matmul(dy[:, a:b], w, out=acc)
            else:
                np.matmul(dy[:, a:b], w, out=part)
                acc += part
        return acc

    if threads == 1:
        return work(0)
    parts = in_parallel(_pool(threads), work, range(0, n, step))
    out = parts[0]
    for p in parts[1:]:
        out += p
    return out  # [T, in]


def matmul_t_reference(weight: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`matmul_t`: the whole float32 weight [out, in], ``dy @ W`` in float64."""
    return (np.asarray(dy, np.float64) @ np.asarray(weight, np.float64)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# the pieces' backwards
# ---------------------------------------------------------------------------------------------

def rmsnorm_parts(x: np.ndarray, eps: float) -> np.ndarray:
    """1 / rms(x) per row [T, 1], as ``runtime/llama.py``'s ``rmsnorm`` computes it."""
    var = (x * x).sum(axis=-1, keepdims=True) / np.float32(x.shape[-1])  # [T, 1]
    return np.float32(1.0) / np.sqrt(var + np.float32(eps))


def rmsnorm_backward(x: np.ndarray, w: np.ndarray, eps: float, dy: np.ndarray) -> np.ndarray:
    """dx of ``y = w * x / rms(x)`` (w the effective weight: ``1 + w`` for Gemma). x, dy: [T, H].
    ``dx = r g - r^3 x (g . x) / H`` with ``g = dy * w`` and ``r = 1 / rms(x)``."""
    r = rmsnorm_parts(x, eps)  # [T, 1]
    g = dy * w  # [T, H]
    gx = (g * x).sum(axis=-1, keepdims=True) / np.float32(x.shape[-1])  # [T, 1]
    return r * g - (r * r * r * gx) * x  # [T, H]


def rope_backward(dy: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """dx of ``rope(x, cos, sin)``: the rotation is orthogonal, its transpose rotates by ``-angle``
    (cos and sin repeat over the two halves, so ``rotate_half`` commutes with the multiplication)."""
    return rope(dy, cos, -sin)  # [T, heads, hd]


def silu_and_grad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """silu(x) and its derivative ``sig(x) (1 + x (1 - sig(x)))``."""
    with np.errstate(over="ignore"):
        sig = np.float32(1.0) / (np.float32(1.0) + np.exp(-x))  # [T, I]
    return x * sig, sig * (np.float32(1.0) + x * (np.float32(1.0) - sig))


def gelu_tanh_and_grad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GELU (tanh approximation) and its derivative."""
    c = np.float32(math.sqrt(2.0 / math.pi))
    with np.errstate(over="ignore"):
        t = np.tanh(c * (x + np.float32(0.044715) * x * x * x))  # [T, I]
    half = np.float32(0.5)
    y = half * x * (np.float32(1.0) + t)
    dy = half * (np.float32(1.0) + t) + half * x * (np.float32(1.0) - t * t) * c * \
        (np.float32(1.0) + np.float32(3 * 0.044715) * x * x)
    return y, dy


def _scores(qh: np.ndarray, kh: np.ndarray, scale: float, cap: float | None, allowed: np.ndarray):
    """Probabilities [g, T, T] of one key/value head's group of queries qh [g, T, hd] over kh [T, hd],
    and the soft-capped scores' tanh (None without a cap)."""
    s = np.matmul(qh, kh.T) * np.float32(scale)  # [g, T, T]
    t = None
    if cap is not None:
        t = np.tanh(s / np.float32(cap))
        s = t * np.float32(cap)
    s = np.where(allowed, s, np.float32(-np.inf))
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return p, t


def attention_forward(q, k, v, scale: float, cap: float | None, window: int | None) -> np.ndarray:
    """Causal grouped-query attention of T positions 0..T-1 (q [T, nh, hd], k, v [T, nkv, hd]) ->
    [T, nh*hd], one key/value head at a time."""
    T, nh, hd = q.shape
    nkv = k.shape[1]
    g = nh // nkv
    allowed = _allowed(T, window)
    out = np.empty((T, nh, hd), np.float32)
    for j in range(nkv):
        qh = q[:, j * g:(j + 1) * g].transpose(1, 0, 2)  # [g, T, hd]
        p, _ = _scores(qh, k[:, j], scale, cap, allowed)  # [g, T, T]
        out[:, j * g:(j + 1) * g] = np.matmul(p, v[:, j]).transpose(1, 0, 2)  # [T, g, hd]
    return out.reshape(T, nh * hd)


def attention_backward(q, k, v, do: np.ndarray, scale: float, cap: float | None, window: int | None):
    """dq, dk, dv of :func:`attention_forward` given do [T, nh*hd]; the probabilities recomputed one
    key/value head at a time. ``dS = P (dP - rowsum(dP P))``, through the cap's ``1 - tanh^2``."""
    T, nh, hd = q.shape
    nkv = k.shape[1]
    g = nh // nkv
    allowed = _allowed(T, window)
    do = do.reshape(T, nh, hd)
    dq = np.empty_like(q)
    dk = np.empty_like(k)
    dv = np.empty_like(v)
    for j in range(nkv):
        qh = q[:, j * g:(j + 1) * g].transpose(1, 0, 2)  # [g, T, hd]
        doh = do[:, j * g:(j + 1) * g].transpose(1, 0, 2)  # [g, T, hd]
        p, t = _scores(qh, k[:, j], scale, cap, allowed)  # [g, T, T]
        dv[:, j] = np.matmul(p.transpose(0, 2, 1), doh).sum(axis=0)  # [T, hd]
        dp = np.matmul(doh, v[:, j].T)  # [g, T, T]
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # [g, T, T]
        if t is not None:
            ds *= np.float32(1.0) - t * t
        ds *= np.float32(scale)
        dq[:, j * g:(j + 1) * g] = np.matmul(ds, k[:, j]).transpose(1, 0, 2)  # [T, g, hd]
        dk[:, j] = np.matmul(ds.transpose(0, 2, 1), qh).sum(axis=0)  # [T, hd]
    return dq, dk, dv


def _allowed(T: int, window: int | None) -> np.ndarray:
    pos = np.arange(T)
    allowed = pos[None, :] <= pos[:, None]  # [T, T]
    if window is not None:
        allowed &= pos[None, :] > pos[:, None] - window
    return allowed


# ---------------------------------------------------------------------------------------------
# one projection with its adapter
# ---------------------------------------------------------------------------------------------

class _Proj:
    """The projections of one pass through one layer: ``y = x W^T + b + s B(A(drop(x)))``, keeping
    what each backward needs (``keep``) in ``saved[name]``."""

    def __init__(self, params: LoraParams, dropout: float, rng: np.random.Generator | None, keep: bool,
                 outputs: dict | None = None):
        self.params, self.dropout, self.rng, self.keep = params, dropout, rng, keep
        self.saved = {}
        self.outputs = outputs  # name -> (y, u) of an earlier forward: replayed, not recomputed

    def __call__(self, name: str, lin, x: np.ndarray, bias) -> np.ndarray:
        if self.outputs is not None and name in self.outputs:
            return self._replay(name, lin, x)
        y = exact_linear(lin).matmul(x)  # [T, out]: the exact product, whatever the model generates with
        if bias is not None:
            y += bias
        u = None
        if name in self.params.A:
            A, B, s = self.params.A[name], self.params.B[name], np.float32(self.params.scaling[name])
            m = None
            if self.dropout > 0.0:
                keep = self.rng.random(x.shape, np.float32) >= np.float32(self.dropout)
                m = keep.astype(np.float32) / np.float32(1.0 - self.dropout)  # [T, in]
                xd = x * m
            else:
                xd = x
            u = xd @ A.T  # [T, r]
            y += (u @ B.T) * s
            if self.keep:
                self.saved[name] = (lin, xd, u, m)
        elif self.keep:
            self.saved[name] = (lin, None, None, None)
        if self.outputs is not None:
            self.outputs[name] = (y, u)
        return y

    def _replay(self, name: str, lin, x: np.ndarray) -> np.ndarray:
        """The output kept by the first forward; the dropout mask drawn again, in the same order."""
        y, u = self.outputs.pop(name)
        m, xd = None, None
        if name in self.params.A:
            xd = x
            if self.dropout > 0.0:
                keep = self.rng.random(x.shape, np.float32) >= np.float32(self.dropout)
                m = keep.astype(np.float32) / np.float32(1.0 - self.dropout)
                xd = x * m
        self.saved[name] = (lin, xd, u, m)
        return y

    def backward(self, name: str, dy: np.ndarray, grads: dict, need_dx: bool = True) -> np.ndarray | None:
        """dx of projection ``name`` given dy [T, out] (None when not ``need_dx``); adds its dA, dB to
        ``grads``."""
        lin, xd, u, m = self.saved.pop(name)
        dx = matmul_t(lin, dy) if need_dx else None  # [T, in]
        if xd is not None:
            A, B, s = self.params.A[name], self.params.B[name], np.float32(self.params.scaling[name])
            dyb = dy @ B  # [T, r]
            dA, dB = grads[name]
            dB += (dy.T @ u) * s  # [out, r]
            dA += (dyb.T @ xd) * s  # [r, in]
            if need_dx:
                dxl = (dyb @ A) * s  # [T, in]
                dx += dxl if m is None else dxl * m
        return dx


# ---------------------------------------------------------------------------------------------
# a decoder layer, forward (optionally keeping its values) and backward
# ---------------------------------------------------------------------------------------------

def _layer_forward(net, i: int, x: np.ndarray, params, dropout, seed, cos, sin, keep: bool,
                   outputs: dict | None = None):
    """Layer ``i`` on x [T, H] -> (out [T, H], its kept values or None). ``outputs``: an empty dict
    to keep every projection's output in, or one filled by an earlier call to replay them from."""
    a, L, names = net.args, net.w.layers[i], net.names[i]
    rng = np.random.default_rng(seed) if dropout > 0.0 else None
    P = _Proj(params, dropout, rng, keep, outputs)

    def proj(k, inp):  # projection k, or a tuple of those reading the same inp (the forward's groups)
        if isinstance(k, tuple):
            return tuple(proj(j, inp) for j in k)
        return P(names[k], getattr(L, k), inp, L.biases.get(k))

    gemma = isinstance(net, GemmaModel)
    nw = (lambda w: np.float32(1.0) + w) if gemma else (lambda w: w)
    eps = a.rms_norm_eps
    norm = net.norm
    h1 = norm(x, L.attn_norm)  # [T, H]
    q, k, v = net.qkv(proj, h1)  # [T, nh, hd], [T, nkv, hd] x 2
    q, k, v = rope(q, cos, sin), rope(k, cos, sin), np.ascontiguousarray(v)
    scale = net.scale if net.scale is not None else a.head_dim ** -0.5
    window = net.window_of(i)
    att = attention_forward(q, k, v, scale, net.attn_cap, window)  # [T, nh*hd]
    o = proj("o", att)  # [T, H]
    post = isinstance(net, Gemma2Model)
    x2 = x + (norm(o, L.post_attn_norm) if post else o)  # [T, H]
    h2 = norm(x2, L.mlp_norm)  # [T, H]
    if isinstance(net, Phi3Model):
        fused = proj("gate_up", h2)  # [T, 2 I]
        gate, up = fused[:, :a.intermediate_size], fused[:, a.intermediate_size:]
    else:
        gate, up = proj("gate", h2), proj("up", h2)  # [T, I]
    f, df = (gelu_tanh_and_grad if gemma else silu_and_grad)(gate)
    act = f * up  # [T, I]
    d = proj("down", act)  # [T, H]
    out = x2 + (norm(d, L.post_mlp_norm) if post else d)  # [T, H]
    if not keep:
        return out, None
    kept = dict(P=P, x=x, q=q, k=k, v=v, scale=scale, window=window, o=o, x2=x2, gate=gate, up=up, f=f, df=df,
                d=d, nw=nw, eps=eps)
    return out, kept


def _layer_backward(net, i: int, kept: dict, dout: np.ndarray, cos, sin, grads: dict) -> np.ndarray | None:
    """dx [T, H] of layer ``i`` given dout [T, H] and its kept values; adds the adapters' gradients.
    The first layer's input is the embeddings, which train nothing: its dx is not computed (None)."""
    L, names = net.w.layers[i], net.names[i]
    P, nw, eps = kept["P"], kept["nw"], kept["eps"]
    post = isinstance(net, Gemma2Model)
    T = dout.shape[0]
    # the MLP
    dd = rmsnorm_backward(kept["d"], nw(L.post_mlp_norm), eps, dout) if post else dout  # [T, H]
    dact = P.backward(names["down"], dd, grads)  # [T, I]
    dup = dact * kept["f"]  # [T, I]
    dgate = dact * kept["up"] * kept["df"]  # [T, I]
    if isinstance(net, Phi3Model):
        dh2 = P.backward(names["gate_up"], np.concatenate([dgate, dup], axis=1), grads)  # [T, H]
    else:
        dh2 = P.backward(names["gate"], dgate, grads) + P.backward(names["up"], dup, grads)  # [T, H]
    dx2 = dout + rmsnorm_backward(kept["x2"], nw(L.mlp_norm), eps, dh2)  # [T, H]
    # the attention
    do = rmsnorm_backward(kept["o"], nw(L.post_attn_norm), eps, dx2) if post else dx2  # [T, H]
    datt = P.backward(names["o"], do, grads)  # [T, nh*hd]
    dq, dk, dv = attention_backward(kept["q"], kept["k"], kept["v"], datt, kept["scale"], net.attn_cap,
                                    kept["window"])
    dq, dk = rope_backward(dq, cos, sin), rope_backward(dk, cos, sin)
    need = i > 0
    if isinstance(net, Phi3Model):
        fused = np.concatenate([dq.reshape(T, -1), dk.reshape(T, -1), dv.reshape(T, -1)], axis=1)
        dh1 = P.backward(names["qkv"], fused, grads, need)  # [T, H]
    else:
        dh1 = P.backward(names["q"], dq.reshape(T, -1), grads, need)
        for k, d in (("k", dk), ("v", dv)):
            dk_ = P.backward(names[k], d.reshape(T, -1), grads, need)
            dh1 = None if dh1 is None else dh1 + dk_
    if not need:
        return None
    return dx2 + rmsnorm_backward(kept["x"], nw(L.attn_norm), eps, dh1)  # [T, H]


# ---------------------------------------------------------------------------------------------
# the head and the loss
# ---------------------------------------------------------------------------------------------

def _head_loss_backward(net, params: LoraParams, hn: np.ndarray, targets: np.ndarray, dropout, seed,
                        grads: dict) -> tuple[float, np.ndarray]:
    """Cross-entropy summed over rows hn [N, H] (the final norm's output at the counted positions)
    with ``targets`` [N]; returns the sum and its gradient w.r.t. hn. A chunk of rows at a time
    (:func:`head_rows`), each chunk's logits turned into their gradient in place."""
    head = net.w.head
    cap = getattr(net, "final_cap", None) if isinstance(net, Gemma2Model) else None
    rng = np.random.default_rng(seed) if dropout > 0.0 else None
    chunk = head_rows(head.out_features)
    total = 0.0
    dh = np.empty_like(hn)
    for r0 in range(0, hn.shape[0], chunk):
        r1 = min(hn.shape[0], r0 + chunk)
        P = _Proj(params, dropout, rng, True)
        z = P(HEAD, head, hn[r0:r1], None)  # [n, V]
        t = None
        if cap is not None:  # Gemma 2: z = cap tanh(z / cap), and dz gets 1 - tanh^2
            z /= np.float32(cap)
            t = np.tanh(z, out=z)
            z = t * np.float32(cap)
        rows = np.arange(r1 - r0)
        tgt = targets[r0:r1]
        picked = z[rows, tgt].astype(np.float64)  # [n]
        zmax = z.max(axis=-1, keepdims=True)  # [n, 1]
        z -= zmax
        e = np.exp(z, out=z)  # [n, V]
        se = e.sum(axis=-1, keepdims=True)  # [n, 1]
        total += float((np.log(se[:, 0].astype(np.float64)) + zmax[:, 0] - picked).sum())
        e /= se  # softmax
        e[rows, tgt] -= np.float32(1.0)  # dz
        if t is not None:
            t *= t
            np.subtract(np.float32(1.0), t, out=t)
            e *= t
        dh[r0:r1] = P.backward(HEAD, e, grads)
    return total, dh


def head_rows(vocab: int) -> int:
    """Rows of logits the head computes at a time: ``LOGIT_ELEMENTS`` of them, and at least
    ``HEAD_ROWS_MIN`` rows (fewer rows would make the head's products slow, per-row kernels)."""
    return max(1, LOGIT_ELEMENTS // vocab, HEAD_ROWS_MIN)


# ---------------------------------------------------------------------------------------------
# the whole model
# ---------------------------------------------------------------------------------------------

def _rope_for(net, T: int) -> tuple[np.ndarray, np.ndarray]:
    if net.cos.shape[0] >= T:
        return net.cos[:T], net.sin[:T]
    return rope_tables(rope_inv_freq(net.args), T, rope_attention_scaling(net.args))


def _check(net, params: LoraParams, input_ids: np.ndarray, labels: np.ndarray):
    ids = np.asarray(input_ids)
    lab = np.asarray(labels)
    if ids.ndim != 1 or lab.shape != ids.shape or not np.issubdtype(ids.dtype, np.integer) \
            or not np.issubdtype(lab.dtype, np.integer):
        raise UsageError(f"input_ids and labels must be integer arrays of the same shape [T], got "
                         f"{ids.dtype}{list(ids.shape)} and {lab.dtype}{list(lab.shape)}")
    V = net.args.vocab_size
    limit = net.context_limit(net.args)
    if len(ids) > limit:
        raise UsageError(f"a sequence of {len(ids)} tokens is longer than this model runs exactly ({limit} "
                         f"positions): shorten it (max_length)")
    if len(ids) and (ids.min() < 0 or ids.max() >= V):
        raise UsageError(f"input_ids outside the vocabulary (0..{V - 1})")
    bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= V))
    if bad.any():
        raise UsageError(f"label {int(lab[bad][0])} is neither {IGNORE_INDEX} nor a token id (0..{V - 1})")
    mods = linear_modules(net)
    for m in params.A:
        if m not in mods:
            raise UsageError(f"adapter module {m!r} is not a linear module of this model")
        lin = mods[m]
        r = params.A[m].shape[0]
        if params.A[m].shape != (r, lin.in_features) or params.B[m].shape != (lin.out_features, r):
            raise UsageError(f"{m}: lora_A {params.A[m].shape} / lora_B {params.B[m].shape} do not fit the "
                             f"module [{lin.out_features}, {lin.in_features}]")
    return ids.astype(np.int64), lab.astype(np.int64)


#: what the forward keeps for the backward (:func:`loss_and_grads`'s ``checkpoint``)
CHECKPOINTS = ("layer", "projections", "none")


def loss_and_grads(model, params: LoraParams, input_ids: np.ndarray, labels: np.ndarray, *, dropout: float = 0.0,
                   rng: np.random.Generator | None = None, checkpoint: str = "layer"):
    """The summed cross-entropy of one sequence and its gradients w.r.t. each adapter module's A, B.

    ``input_ids`` int [T]; ``labels`` int [T], ``-100`` where not counted, in transformers'
    convention: ``logits[t]`` predicts ``labels[t + 1]`` (the shift happens here). Returns
    ``(loss_sum, n_counted, {module: (dA [r, in], dB [out, r])})``, the gradients of the SUM (a
    batch's mean is the caller's: sum over the sequences, divide by the total count). ``dropout``:
    PEFT's ``lora_dropout`` on the adapters' inputs, its masks drawn from ``rng`` (required when
    ``dropout > 0``).

    ``checkpoint``: what the forward keeps for the backward, all giving the same bits:

    * ``"layer"``: each layer's input [T, H]; the backward recomputes the layer (one forward more,
      the least memory);
    * ``"projections"``: each layer's input and its projections' outputs; the backward recomputes
      only the norms, rotary embeddings, attention and activations (no base product twice);
    * ``"none"``: every value of every layer (the reference; the most memory).

    :func:`training_memory` says what each takes."""
    net = _net(model)
    ids, lab = _check(net, params, input_ids, labels)
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {dropout}")
    if checkpoint not in CHECKPOINTS:
        raise UsageError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    if dropout > 0.0 and rng is None:
        raise UsageError("dropout > 0 needs an rng (numpy.random.Generator) to draw its masks from")
    threads = getattr(model, "threads", None)
    from edgelora.runtime.threads import thread_count
    with thread_count(threads) if threads else nullcontext():
        return _loss_and_grads(net, params, ids, lab, dropout, rng, checkpoint)


def _loss_and_grads(net, params, ids, lab, dropout, rng, checkpoint):
    a = net.args
    T, nL = len(ids), a.num_hidden_layers
    grads = {m: (np.zeros_like(params.A[m]), np.zeros_like(params.B[m])) for m in params.A}
    shifted = np.concatenate([lab[1:], [IGNORE_INDEX]])  # [T]: the label logits[t] predicts
    rows = np.flatnonzero(shifted != IGNORE_INDEX)  # the positions whose logits count
    seeds = (rng.integers(0, 2 ** 63, nL + 1) if dropout > 0.0 else [None] * (nL + 1))
    if len(rows) == 0:
        return 0.0, 0, grads
    cos, sin = _rope_for(net, T)
    x = net.embed(ids, BASE)  # [T, H]
    inputs, kept, outputs = [], [], []
    for i in range(nL):
        inputs.append(x)
        outputs.append({} if checkpoint == "projections" else None)
        last = i == nL - 1  # the backward starts with it: its values are kept, whatever the policy
        x, k = _layer_forward(net, i, x, params, dropout, seeds[i], cos, sin, checkpoint == "none" or last,
                              None if last else outputs[i])
        kept.append(k)
    hn = net.norm(x[rows], net.w.norm)  # [N, H]
    loss, dhn = _head_loss_backward(net, params, hn, shifted[rows], dropout, seeds[nL], grads)
    nw = (np.float32(1.0) + net.w.norm) if isinstance(net, GemmaModel) else net.w.norm
    dx = np.zeros((T, a.hidden_size), np.float32)
    dx[rows] = rmsnorm_backward(x[rows], nw, a.rms_norm_eps, dhn)
    for i in reversed(range(nL)):
        k = kept[i]
        if k is None:
            _, k = _layer_forward(net, i, inputs[i], params, dropout, seeds[i], cos, sin, True, outputs[i])
        dx = _layer_backward(net, i, k, dx, cos, sin, grads)
        kept[i] = inputs[i] = outputs[i] = k = None
    return loss, int(len(rows)), grads


# ---------------------------------------------------------------------------------------------
# the memory a training step takes (``edgelora plan --train``)
# ---------------------------------------------------------------------------------------------

def training_memory(model, params, tokens: int, threads: int | None = None, checkpoint: str = "layer") -> dict:
    """Bytes a training step of ``tokens`` tokens (one sequence, or a batch run one sequence after
    another) holds beside the base weights, by part:

    * ``adapter``, ``grads``: A and B, and a gradient of each; ``optimizer``: AdamW's two moments;
    * ``checkpoints``: each layer's input [T, H] (the recomputation's checkpoints) and the last
      layer's output; with ``checkpoint="projections"`` also every projection's output, with
      ``"none"`` every layer's kept values;
    * ``layer``: one layer recomputed with its values kept and its backward's working arrays (the
      larger of its attention part and its MLP part), with the transposed product's per-thread sums
      and dequantized tiles;
    * ``head``: a chunk of logits with its softmax and gradient, and the final norm's rows.

    ``model``: a loaded Model, its decoder, or its :class:`~edgelora.config.ModelArgs`; ``params``: a
    :class:`LoraParams`, or ``(rank, targets)`` for an adapter not made yet."""
    a = model if isinstance(model, ModelArgs) else _net(model).args
    if not isinstance(params, LoraParams):
        rank, targets = params
        shapes = module_shapes(model)
        n = sum(rank * (shapes[m][0] + shapes[m][1]) * 4 for m in target_modules(model, targets))
    else:
        n = params.nbytes
    threads = threads or getattr(model, "threads", None) or numba.get_num_threads()
    T, H, I, L, V = tokens, a.hidden_size, a.intermediate_size, a.num_hidden_layers, a.vocab_size
    nh, nkv, hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
    f = 4  # float32
    q_dim, kv_dim = nh * hd, nkv * hd
    # kept by a recomputed layer: x, h1, q, k, v (and their rotated copies), attention output, o, x2,
    # h2, gate, up, f(gate), f'(gate), act, down; the adapters' inputs (h1, h2, att, act) and u
    kept = T * (6 * H + 2 * (q_dim + 2 * kv_dim) + q_dim + 6 * I) * f
    attn_work = (4 * (nh // nkv) * T * T + 3 * T * (q_dim + 2 * kv_dim)) * f  # p, dp, ds, mask; dq dk dv
    mlp_work = 4 * T * I * f  # dact, dup, dgate, a fused copy
    width = max(H, I, q_dim + 2 * kv_dim)
    tiles = threads * (2 * T * width + max(TILE_ELEMENTS, TILE_ROWS_MIN * width)) * f  # per-thread sums, a tile each
    layer = kept + max(attn_work, mlp_work) + tiles + 4 * T * H * f  # dx, dx2, dh, the norm backward's temporaries
    rows = min(T, head_rows(V))
    cap = 2 if a.family == "gemma2" else 1  # the tanh kept beside the logits
    head = cap * rows * V * f + 3 * T * H * f + threads * (2 * rows * H + max(TILE_ELEMENTS, TILE_ROWS_MIN * H)) * f
    ckpt = (L + 1) * T * H * f
    if checkpoint == "projections":
        ckpt += L * T * (2 * H + q_dim + 2 * kv_dim + 2 * I) * f
    elif checkpoint == "none":
        ckpt += L * kept
    elif checkpoint != "layer":
        raise UsageError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    parts = dict(adapter=n, grads=n, optimizer=2 * n, checkpoints=ckpt, layer=layer, head=head)
    parts["total"] = sum(parts.values())
    return parts
