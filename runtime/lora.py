"""LoRA adapters applied unmerged at the matmul, resident side by side, switched in an instant.

For a module with resident adapter pairs the runtime computes ``y = W x + sum_i c_i B_i (A_i x)``
(``c_i`` = the adapter's alpha/r or alpha/sqrt(r), times the weight the user gives it): the NF4
base product is untouched and each low-rank product is two small float32 matrix products. This
is llama.cpp's ``build_lora_mm`` and mlx-lm's ``LoRALinear`` (``y + scale * (x @ A.T) @ B.T``),
with the adapters kept as data keyed by module name as in ``llama_set_adapter_lora``: switching
adapters swaps one immutable :class:`Selection` object for another, nothing is copied.

* A :class:`Selection` is what one generation runs with: a mapping from module name to the
  deltas that apply there, the biases the adapters trained, and the modules they replace
  (``modules_to_save``). It is built once when the user picks it and never changes, so a
  generation holds on to the one it started with while other threads switch (the pinning that
  makes hot swaps safe); an unloaded adapter's memory is returned once the last generation
  holding it ends. ``Selection.apply`` is the one path of every projection, adapters or none (the
  plain base is the selection ``BASE``, with no members: ``x W^T + b``); ``apply_batch`` is the
  same for one decode step of many sequences.
* A weighted mix ``{"a": 0.7, "b": 0.3}`` is exact: each adapter's delta with its weight, the
  same as PEFT's ``add_weighted_adapter(..., combination_type="cat")``, which concatenates the
  weighted ``A`` matrices and the ``B`` matrices. A replaced module mixes the same way:
  ``(1 - sum w) W x + sum w_i M_i x``; trained biases likewise.
* DoRA (Liu et al. 2024, PEFT's ``DoraLinearLayer``): ``y = m / ||W + s B A||_row * (W x + s B A x)
  + bias``. The norms of the dequantized base plus the LoRA product are computed once at load,
  tile by tile, so the base is never held in float32. A DoRA adapter is used alone at weight 1
  (its normalisation is not additive, so it cannot be mixed).
* Decode applies each delta with Numba kernels (:func:`stack_down`, :func:`stack_up`, NumPy twin
  ``lora_delta_reference``; a DoRA delta ``lora_matvec_add``); prefill uses two BLAS products. A
  sequence's decode step gives the same bits alone or in a batch, because each sequence's delta
  is computed by the same kernel on its own row (the batch gathers each sequence's adapter, as in
  Punica's BGMV / S-LoRA). A sequence of one selection (not DoRA, no replaced projection) runs
  its deltas inside the one-call decode step (``runtime/decode.py``): the same plan, the same
  compiled kernel, the same bits, without the Python and dispatch of some 150 calls a token (an
  r=16 all-linear adapter on TinyLlama went from 0.75x to 0.93x of the base's decode speed).
* At the memory bound: a decode step's adapter product reads ``r (in + out)`` floats for as many
  multiply-adds, so it costs what its bytes cost plus what each call costs. The projections
  that read the same input (q, k, v; gate, up: :data:`SHARED_INPUT`) have their A matrices
  stacked at load into one :class:`Stack` (the deltas keep views: nothing is copied), so the
  model asks for the group (``Selection.apply_group``, ``apply_batch_group``) and each adapter
  adds its deltas of the group in one call (``lora_stack_add``): one pass over x for the A
  products, the B products after it; a lone module's delta is a stack of one. Above ``LORA_PARALLEL_MIN`` weights the product runs on
  the model's threads (the rows of A split between them, then the slices of the outputs), as the
  base kernels around it do; the threaded kernels give the serial ones' bits (the tests check it).
* Held in float16: with the default int8 products a LoRA pair is rounded to float16 at load
  (``AdapterSet.load(dtype="float16")``, ``adapters.read_adapter(held="float16")``; as ``deploy``
  writes it), so it takes half the memory and a decode step reads half the bytes of a float32
  file's; with ``dtype="float32"`` (the exact products' default) only a pair whose every value
  float16 holds exactly (a float16 file's always) is, and nothing is rounded that the file did
  not round. The kernels take a float16 pair's bits (:func:`kernel_array`) and widen each value
  exactly (:func:`_widen`), so the arithmetic is the float32 arithmetic on the held values; a
  prompt's products widen the arrays for BLAS. A pair with a value beyond float16's range, and
  DoRA's, stay float32.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from edgelora.adapters import EMBED, HEAD, Adapter, BaseModules, min_resident_bytes, read_adapter
from edgelora.errors import UsageError, PlanError
from edgelora.products import check_adapter_dtype
from edgelora.runtime.linear import Linear, make_linear, matmul_shared

_FM = {"reassoc", "contract", "nsz"}


@intrinsic
def _widen(typingctx, v):
    """An adapter weight as float32: a float32 as it is; a float16 held as its bits (uint16: Numba
    has no float16 type) widened exactly by ``fpext half`` (F16C ``vcvtph2ps`` on x86-64, ``fcvtl``
    on aarch64, vectorized with the loop around it). So each kernel here is compiled for both
    kinds of adapter arrays from one source."""
    if v == types.float32:
        return types.float32(v), lambda context, builder, sig, args: args[0]
    if v == types.uint16:
        def codegen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(v), codegen
    return None


def kernel_array(a: np.ndarray) -> np.ndarray:
    """An adapter array as the kernels take it: float32 as it is, float16 as its bits (uint16)."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


@njit(cache=True)
def _widen_into(bits, out):
    """``out`` f32 = the float16 values whose bits are ``bits`` (both 1-D, one size)."""
    for i in range(bits.size):
        out[i] = _widen(bits[i])


def widened(a: np.ndarray) -> np.ndarray:
    """An adapter array (or a float16 KV cache's keys or values) in float32: itself when not float16,
    a float16 one widened exactly into a new array, by :func:`_widen` in a vectorized loop (NumPy's
    own float16 cast is some 10x slower), for a prompt's BLAS products."""
    if a.dtype != np.float16:
        return a
    out = np.empty(a.shape, np.float32)
    _widen_into(np.ascontiguousarray(a).view(np.uint16).reshape(-1), out.reshape(-1))
    return out


@njit(cache=True, fastmath=_FM)
def lora_matvec_add(x, A, Bt, coef, y, u):
    """``y += coef * B (A x)`` for one token. x: [in], A: [r, in], Bt: [r, out] (B transposed; both
    float32, or float16 as :func:`kernel_array` gives them), y: [out], u: scratch [r]."""
    for j in range(A.shape[0]):
        _lora_down(x, A, coef, u, j)
    _lora_up(u, Bt, y, 0, y.size)


LORA_PARALLEL_MIN = 1 << 15  # adapter weights (r * (in + out)) from which a delta's decode product is threaded
LORA_CHUNK = 16  # the output slices of the threaded product start at multiples of this many floats


@njit(cache=True, fastmath=_FM, inline="always")
def _lora_down(x, A, coef, u, j):
    """``u[j] = coef * (A[j] . x)``."""
    acc = np.float32(0.0)
    a = A[j]
    for i in range(A.shape[1]):
        acc += _widen(a[i]) * x[i]
    u[j] = acc * coef


@njit(cache=True, fastmath=_FM, inline="always")
def _lora_up(u, Bt, y, o0, o1):
    """``y[o0:o1] += sum_j u[j] Bt[j, o0:o1]``, j in order (the slice stays in L1 across the r passes)."""
    for j in range(Bt.shape[0]):
        uj = u[j]
        b = Bt[j]
        for o in range(o0, o1):
            y[o] += uj * _widen(b[o])


@njit(cache=True, fastmath=_FM, parallel=True)
def lora_matvec_add_parallel(x, A, Bt, coef, y, u, chunks):
    """:func:`lora_matvec_add` on the model's threads: the ``r`` rows of ``A`` split between them,
    then the outputs, in ``chunks`` slices (each starting at a multiple of :data:`LORA_CHUNK`).
    An adapter's decode product is memory-bound (it reads ``r * (in + out)`` floats for
    ``2 r (in + out)`` flops), so one thread leaves the other core's share of the bandwidth unused
    while the base kernels around it use both."""
    r = A.shape[0]
    for j in prange(r):
        _lora_down(x, A, coef, u, j)
    n = y.size
    step = ((n + chunks - 1) // chunks + LORA_CHUNK - 1) // LORA_CHUNK * LORA_CHUNK
    for c in prange(chunks):
        o0 = c * step
        _lora_up(u, Bt, y, o0, min(n, o0 + step))


@njit(cache=True, fastmath=_FM)
def stack_down(x, A, coef, u, j0, j1):
    """``u[j] = coef[j] * (A[j] . x)`` for the rows ``j0 .. j1`` of a stack's ``A``. Compiled on its
    own (never inlined), so every caller, the one-call decode step (``runtime/decode.py``)
    included, runs the same machine code: ``u[j]`` has the same bits whichever thread makes it."""
    for j in range(j0, j1):
        _lora_down(x, A, coef[j], u, j)


@njit(cache=True, fastmath=_FM)
def stack_up(u, Bt, rows, b_off, y_off, Y, o0, o1):
    """The outputs ``o0 .. o1`` of the requested modules' concatenation ``Y``: ``Y[y_off[m] + o] +=
    sum_j u[j] Bt_m[j, o]`` over module m's rows j, in order (compiled on its own, as
    :func:`stack_down`)."""
    for m in range(rows.size - 1):
        if y_off[m] < 0:
            continue
        n = (b_off[m + 1] - b_off[m]) // (rows[m + 1] - rows[m])  # the module's outputs
        lo, hi = max(o0, y_off[m]) - y_off[m], min(o1, y_off[m] + n) - y_off[m]  # of the module's outputs
        if hi <= lo:
            continue
        # unsigned indices: no negative-index wraparound in the loop, which then vectorizes
        ys, lo_u, hi_u = np.uint64(y_off[m]), np.uint64(lo), np.uint64(hi)
        for j in range(rows[m], rows[m + 1]):
            uj = u[j]
            bs = np.uint64(b_off[m] + (j - rows[m]) * n)  # B^T row j - rows[m]
            for o in range(lo_u, hi_u):
                Y[ys + o] += uj * _widen(Bt[bs + o])


@njit(cache=True, fastmath=_FM)
def lora_stack_add(x, A, Bt, coef, rows, b_off, y_off, Y, u):
    """``Y[y_off[m]:][:n_m] += B_m (coef * A_m x)`` for the modules m of one adapter that read the same
    input ``x`` (q, k and v; gate and up), their A matrices stacked: ``A`` [R, in] (module m's rows
    ``rows[m] .. rows[m+1]``), ``coef`` [R], ``Bt`` every module's ``B^T`` [r_m, n_m] flat, module m's
    from ``b_off[m]``; ``y_off[m]`` where its outputs start in ``Y`` (-1: not requested); ``A`` and
    ``Bt`` float32, or float16 as their bits (:func:`kernel_array`). One pass over x for all the A
    products, one call for the layer's group. ``u`` [R] scratch."""
    stack_down(x, A, coef, u, 0, A.shape[0])
    stack_up(u, Bt, rows, b_off, y_off, Y, 0, Y.size)


@njit(cache=True, fastmath=_FM, parallel=True)
def lora_stack_add_parallel(x, A, Bt, coef, rows, b_off, y_off, Y, u, chunks):
    """:func:`lora_stack_add` on ``chunks`` threads: the rows of ``A`` split between them, then the
    outputs (slices starting at multiples of :data:`LORA_CHUNK`), the same bits. (The one-call
    decode step, ``runtime/decode.py``, runs the same two kernels, its A products in the base
    products' parallel region.)"""
    R, n = A.shape[0], Y.size
    for c in prange(chunks):
        stack_down(x, A, coef, u, c * R // chunks, (c + 1) * R // chunks)
    step = ((n + chunks - 1) // chunks + LORA_CHUNK - 1) // LORA_CHUNK * LORA_CHUNK
    for c in prange(chunks):
        o0 = c * step
        stack_up(u, Bt, rows, b_off, y_off, Y, o0, min(n, o0 + step))


def lora_delta_reference(x: np.ndarray, A: np.ndarray, B: np.ndarray, coef: float) -> np.ndarray:
    """NumPy twin of :func:`lora_matvec_add`: ``coef * B (A x)`` for x [T, in] -> [T, out]."""
    return np.float32(coef) * ((x @ A.T) @ B.T)


@dataclass(frozen=True)
class Delta:
    """One adapter's contribution at one module: ``coef * (B (A x) + bias)``, DoRA-scaled by ``g``."""

    A: np.ndarray  # [r, in] float32, or float16 (``adapters.read_adapter``'s held)
    Bt: np.ndarray  # [r, out] as A
    coef: float
    bias: np.ndarray | None = None  # [out], already multiplied by coef
    g: np.ndarray | None = None  # [out] DoRA: magnitude / ||W + s B A||

    def with_weight(self, w: float) -> "Delta":
        return Delta(self.A, self.Bt, self.coef * w, None if self.bias is None else self.bias * np.float32(w),
                     self.g)

    def apply(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """x [T, in], y [T, out] (the base product, changed in place) -> y with the delta."""
        if self.g is not None:
            y *= self.g  # DoRA: g * W x here, and Bt holds g * B, so the sum is g * (W x + s B A x)
        if x.shape[0] == 1:
            r, k = self.A.shape
            u = np.empty(r, np.float32)
            threads = numba.get_num_threads()
            A, Bt = kernel_array(self.A), kernel_array(self.Bt)
            if threads > 1 and r * (k + y.shape[1]) >= LORA_PARALLEL_MIN:  # by shape: a batch row is threaded alike
                lora_matvec_add_parallel(x[0], A, Bt, np.float32(self.coef), y[0], u, threads)
            else:
                lora_matvec_add(x[0], A, Bt, np.float32(self.coef), y[0], u)
        else:
            y += (x @ widened(self.A).T) @ (widened(self.Bt) * np.float32(self.coef))
        if self.bias is not None:
            y += self.bias
        return y


#: projections that read the same input, by the last part of their module names (every
#: architecture edgelora runs names them so): an adapter's A matrices of each group are stacked
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class Stack:
    """One adapter's deltas of the modules of a layer that read the same input, in one place: the
    A matrices stacked ``A`` [R, in] and the ``B^T`` matrices back to back in ``Bt`` (flat); the
    adapter's :class:`Delta` objects of these modules hold views of them (nothing is copied)."""

    modules: tuple  # module names, in the order of their rows
    A: np.ndarray  # [R, in] float32, or float16 when every member's is
    Bt: np.ndarray  # [sum r_m * n_m] as A
    rows: np.ndarray  # int64 [modules + 1]: module m's rows of A are rows[m] .. rows[m + 1]
    b_off: np.ndarray  # int64 [modules + 1]: module m's B^T is Bt[b_off[m]:b_off[m + 1]] ([r_m, n_m])


def stack_deltas(deltas: dict) -> tuple[dict, dict]:
    """``(deltas, stacks)``: the deltas with those of each :data:`SHARED_INPUT` group of a layer
    (plain LoRA, two or more modules) moved into one :class:`Stack`, and module -> its stack."""
    groups: dict = {}
    for module, d in deltas.items():
        parent, _, leaf = module.rpartition(".")
        for g, names in enumerate(SHARED_INPUT):
            if leaf in names and d.g is None:
                groups.setdefault((parent, g), []).append((names.index(leaf), module))
    deltas, stacks = dict(deltas), {}
    for members in groups.values():
        if len(members) < 2:
            continue
        modules = tuple(m for _, m in sorted(members))
        ds = [deltas[m] for m in modules]
        A = np.concatenate([d.A for d in ds])  # [R, in]
        Bt = np.concatenate([d.Bt.ravel() for d in ds])
        rows = np.cumsum([0] + [d.A.shape[0] for d in ds]).astype(np.int64)
        b_off = np.cumsum([0] + [d.Bt.size for d in ds]).astype(np.int64)
        st = Stack(modules, A, Bt, rows, b_off)
        for i, (m, d) in enumerate(zip(modules, ds)):
            deltas[m] = Delta(A[rows[i]:rows[i + 1]], Bt[b_off[i]:b_off[i + 1]].reshape(d.Bt.shape), d.coef, d.bias, d.g)
            stacks[m] = st
    return deltas, stacks


@dataclass(frozen=True)
class Selection:
    """The adapters one generation runs with (immutable). ``BASE`` is the plain base model."""

    members: tuple = ()  # ((name, weight), ...)
    deltas: dict = field(default_factory=dict)  # module -> tuple[Delta]
    biases: dict = field(default_factory=dict)  # module -> float32 [out]: the bias to use instead
    replaced: dict = field(default_factory=dict)  # module -> (base weight, ((w, linear), ...))
    adapters: tuple = ()  # the Resident objects, held so their memory lives as long as this
    _plans: dict = field(default_factory=dict, compare=False, repr=False)  # apply_group's plans, by group

    @property
    def is_base(self) -> bool:
        """Whether this selection changes nothing of the base: no deltas, biases or replaced modules."""
        return not (self.deltas or self.biases or self.replaced)

    @property
    def label(self) -> str:
        if not self.members:
            return "base"
        if len(self.members) == 1 and self.members[0][1] == 1.0:
            return self.members[0][0]
        return ",".join(f"{n}={w:g}" for n, w in self.members)

    def apply(self, module: str, layer: Linear, x: np.ndarray, bias: np.ndarray | None = None,
              base: np.ndarray | None = None) -> np.ndarray:
        """Projection ``module`` of rows x [T, in] with this selection's adapters -> [T, out]:
        ``x W^T + sum_i c_i B_i (A_i x) + b``, a replaced module's weights mixed in for ``W``, a
        trained bias for ``b``. ``layer`` is the base weight ``W`` and ``bias`` its own ``b``.
        ``base``: the base product ``x W^T`` when the caller has it already (a batched decode step
        computes it for every row at once, :meth:`apply_group` a group's for prompt rows); changed
        in place."""
        rep = self.replaced.get(module)
        if rep is not None:
            y = _mixed(rep, layer, x, base)  # [T, out]
        else:
            y = layer.matmul(x) if base is None else base  # [T, out]
            if x.shape[0] == 1 and module in self.deltas:  # a decode row: a group of one module
                return self._finish_group((module,), x, y[0], (0, y.shape[1]), (bias,))[0]
        for d in self.deltas.get(module, ()):
            y = d.apply(x, y)  # y + c_i B_i (A_i x)
        b = self.biases.get(module, bias)
        return y if b is None else y + b

    def apply_group(self, modules, layers, x: np.ndarray, biases) -> list:
        """Projections ``modules`` (names, their base ``layers`` and own ``biases``) that read the
        same rows x [T, in] -> their outputs [T, out_m], each what :meth:`apply` gives up to float
        rounding. A decode step (T = 1) writes the base products side by side and adds each
        adapter's deltas of the group (a :class:`Stack`: q, k and v; gate and up) in one call:
        one pass over x for the stacked A products, the B products of the group after it, on the
        model's threads. Longer rows go module by module through :meth:`apply`, their base
        products made together first (``linear.matmul_shared``: one quantization of x for the
        int8 GEMMs)."""
        if x.shape[0] != 1:
            need = [m not in self.replaced or self.replaced[m][0] != 0 for m in modules]  # base weight 0: no product
            shared = iter(matmul_shared([lin for lin, n in zip(layers, need) if n], x))
            bases = [next(shared) if n else None for n in need]
            return [self.apply(m, lin, x, b, base) for m, lin, b, base in zip(modules, layers, biases, bases)]
        if any(m in self.replaced for m in modules):
            return [self.apply(m, lin, x, b) for m, lin, b in zip(modules, layers, biases)]
        sizes = [lin.out_features for lin in layers]
        off = np.cumsum([0] + sizes)
        Y = np.empty(off[-1], np.float32)  # [sum out]: the modules' outputs side by side
        for lin, o0, o1 in zip(layers, off, off[1:]):
            lin.matvec(x[0], Y[o0:o1])
        return self._finish_group(tuple(modules), x, Y, off, biases)

    def _finish_group(self, modules: tuple, x: np.ndarray, Y: np.ndarray, off, biases) -> list:
        """The outputs of :meth:`apply_group` from the base products ``Y`` [sum out] (changed in place)
        of one row x [1, in]."""
        ys = [Y[o0:o1].reshape(1, -1) for o0, o1 in zip(off, off[1:])]  # views of Y
        for kind, item, extra in self._group_plan(modules, off):
            if kind == "stack":
                st, coef, y_off = item, extra[0], extra[1]
                threads = numba.get_num_threads()
                u = np.empty(st.A.shape[0], np.float32)
                A, Bt = kernel_array(st.A), kernel_array(st.Bt)
                if threads > 1 and st.A.shape[0] * (st.A.shape[1] + Y.size) >= LORA_PARALLEL_MIN:
                    lora_stack_add_parallel(x[0], A, Bt, coef, st.rows, st.b_off, y_off, Y, u, threads)
                else:
                    lora_stack_add(x[0], A, Bt, coef, st.rows, st.b_off, y_off, Y, u)
            elif kind == "delta":  # a delta of no stack (DoRA, a lone module): in place
                ys[item] = extra.apply(x, ys[item])
            else:  # "bias": a stacked delta's trained bias
                ys[item] += extra
        out = []
        for m, b, y in zip(modules, biases, ys):
            b = self.biases.get(m, b)
            out.append(y if b is None else y + b)
        return out

    def _group_plan(self, modules: tuple, off) -> list:
        """What :meth:`_finish_group` does for ``modules``, member after member: ``("stack", Stack,
        (coef [R], y_off))`` for a member's stacked deltas (coef per row: the member's weight in) and
        for a plain delta of module i in no stack (a stack of one module, :func:`_loose`), ``("delta",
        i, Delta)`` for a DoRA delta, ``("bias", i, bias)``. Made once per selection and group (the
        selection never changes); the one-call decode step (``runtime/decode.py``) runs the same plan."""
        key = (modules, tuple(int(o) for o in off))
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        plan = []
        index = {m: i for i, m in enumerate(modules)}
        residents = self.adapters if len(self.adapters) == len(self.members) else None
        if residents is None:  # a selection built by hand: its deltas module by module
            for i, m in enumerate(modules):
                for d in self.deltas.get(m, ()):
                    plan += _loose(m, i, d, off)
        else:
            seen = {m: 0 for m in modules}  # how many of module m's deltas (one a member) are placed
            for r, (_, w) in zip(residents, self.members):
                stacks, loose, trained = [], [], []
                for i, m in enumerate(modules):
                    if m not in r.deltas:
                        continue
                    d = self.deltas[m][seen[m]]  # this member's delta (its weight in)
                    seen[m] += 1
                    st = r.stacks.get(m)
                    if st is None:
                        loose += _loose(m, i, d, off)
                        continue
                    if d.bias is not None:
                        trained.append(("bias", i, d.bias))
                    if all(s is not st for _, s, _ in stacks):
                        coef = np.concatenate([np.full(st.rows[k + 1] - st.rows[k], self._coef(r, sm, w), np.float32)
                                               for k, sm in enumerate(st.modules)])
                        y_off = np.array([off[index[sm]] if sm in index else -1 for sm in st.modules], np.int64)
                        stacks.append(("stack", st, (coef, y_off)))
                plan += stacks + loose + trained
        self._plans[key] = plan
        return plan

    @staticmethod
    def _coef(r, module: str, w: float) -> np.float32:
        """The float32 coefficient of member r's delta at ``module`` with weight w (as ``Delta.with_weight``)."""
        d = r.deltas[module]
        return np.float32(d.coef if w == 1.0 else d.coef * w)

    def embed(self, layer: Linear, ids: np.ndarray) -> np.ndarray:
        """The embeddings of token ids ``ids`` [T] -> [T, H] (a saved embedding mixed in)."""
        rep = self.replaced.get(EMBED)
        if rep is None:
            return layer.rows(ids).astype(np.float32)
        base_w, terms = rep
        x = layer.rows(ids).astype(np.float32) * np.float32(base_w) if base_w else None
        for w, lin in terms:
            part = lin.rows(ids).astype(np.float32) * np.float32(w)
            x = part if x is None else x + part
        return x


def _loose(module: str, i: int, d: Delta, off) -> list:
    """Plan items (:meth:`Selection._group_plan`) of a delta of module i in no stack: a plain LoRA
    delta as a stack of one module, so that a decode row runs it through the kernel of the stacks
    (threaded alike), then its trained bias; a DoRA delta (or one on arrays not contiguous) as itself."""
    if d.g is not None or not (d.A.flags.c_contiguous and d.Bt.flags.c_contiguous):
        return [("delta", i, d)]
    r = d.A.shape[0]
    st = Stack((module,), d.A, d.Bt.reshape(-1), np.array([0, r], np.int64), np.array([0, d.Bt.size], np.int64))
    items = [("stack", st, (np.full(r, d.coef, np.float32), np.array([off[i]], np.int64)))]
    return items + ([("bias", i, d.bias)] if d.bias is not None else [])


def _mixed(rep, layer: Linear, x: np.ndarray, base: np.ndarray | None) -> np.ndarray:
    """A replaced module's product: ``(1 - sum w) x W^T + sum w_i x M_i^T``, the base product (given
    or computed) only when its weight is not 0."""
    base_w, terms = rep
    out = None
    if base_w:
        out = layer.matmul(x) if base is None else base
        if base_w != 1.0:
            out = out * np.float32(base_w)
    for w, lin in terms:
        part = lin.matmul(x)
        part = part * np.float32(w) if w != 1.0 else part
        out = part if out is None else out + part
    return out


BASE = Selection()


def apply_batch(selections: list, module: str, layer: Linear, X: np.ndarray,
                bias: np.ndarray | None = None) -> np.ndarray:
    """Projection ``module`` of one decode step of B sequences, X [B, in] -> [B, out]: the base
    product once for all rows (``matvec_batch``: each row the same bits as the sequence alone),
    then each sequence's own selection finishes its row from it."""
    Y = layer.matvec_batch(X)  # [B, out]
    for b, sel in enumerate(selections):
        y = Y[b:b + 1]  # [1, out]
        out = sel.apply(module, layer, X[b:b + 1], bias, y)
        if out is not y:  # (a row finished in place is already there)
            Y[b] = out[0]
    return Y


def apply_batch_group(selections: list, modules, layers, X: np.ndarray, biases) -> list:
    """:func:`apply_batch` for projections that read the same rows X [B, in] (as
    :meth:`Selection.apply_group`): the base products once for all rows, then each row finished
    by its own selection's group step, on the same side-by-side outputs as a decode step alone,
    so a row's bits are its step's alone. -> the modules' outputs [B, out_m]."""
    outs = [lin.matvec_batch(X) for lin in layers]  # [B, out_m] each
    off = np.cumsum([0] + [lin.out_features for lin in layers])
    modules = tuple(modules)
    for b, sel in enumerate(selections):
        if not sel.members and not any(sel.biases.get(m) is not None for m in modules):
            if any(bias is not None for bias in biases):
                for y, bias in zip(outs, biases):
                    if bias is not None:
                        y[b] += bias
            continue
        if any(m in sel.replaced for m in modules):
            for i, (m, lin, bias) in enumerate(zip(modules, layers, biases)):
                outs[i][b] = sel.apply(m, lin, X[b:b + 1], bias, outs[i][b:b + 1].copy())[0]
            continue
        Y = np.concatenate([y[b] for y in outs])  # [sum out]
        for y, r in zip(outs, sel._finish_group(modules, X[b:b + 1], Y, off, biases)):
            y[b] = r[0]
    return outs


@dataclass
class Resident:
    """An adapter held by a model: its deltas, trained biases and replaced modules, ready to use."""

    name: str
    adapter: Adapter
    scale: float
    deltas: dict  # module -> Delta (coef includes the user scale)
    biases: dict  # module -> float32 trained bias
    saved: dict  # module -> linear object
    load_seconds: float = 0.0
    selection: Selection | None = None
    stacks: dict = field(default_factory=dict)  # module -> the Stack holding its delta (q, k, v; gate, up)

    @property
    def nbytes(self) -> int:
        arrays = [a for d in self.deltas.values() for a in (d.A, d.Bt, d.bias, d.g) if a is not None]
        return sum(a.nbytes for a in arrays) + sum(b.nbytes for b in self.biases.values()) + \
            sum(s.nbytes for s in self.saved.values())

    @property
    def is_dora(self) -> bool:
        return self.adapter.is_dora

    @property
    def held(self) -> str:
        """The dtype its LoRA pairs are held in: ``float16``, ``float32``, or both (``float16+float32``)."""
        return "+".join(sorted({str(a.dtype) for d in self.deltas.values() for a in (d.A, d.Bt)})) or "none"

    def info(self) -> dict:
        s = self.adapter.summary()
        s.update(name=self.name, scale=self.scale, bytes=self.nbytes, held=self.held, load_seconds=self.load_seconds)
        return s


def dora_norms(layer, A: np.ndarray, B: np.ndarray, scale: float, tile_elements: int = 1 << 20) -> np.ndarray:
    """``||W + scale * B A||`` per output row, dequantizing ``W`` one tile of rows at a time."""
    n, k = layer.out_features, layer.in_features
    norms = np.empty(n, np.float32)
    step = max(1, tile_elements // k)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        w = layer.dequantize_rows(r0, r1) + np.float32(scale) * (B[r0:r1] @ A)  # [t, in]
        norms[r0:r1] = np.sqrt(np.einsum("ij,ij->i", w, w, dtype=np.float32))
    return norms


def make_resident(name: str, adapter: Adapter, scale: float, modules) -> Resident:
    """``modules(name)`` returns the base model's linear object for a module name."""
    deltas = {}
    for module, p in adapter.pairs.items():
        coef = p.scale * scale
        if p.magnitude is not None:  # DoRA: its norms and g * B in float32
            p.A, p.B = p.A.astype(np.float32), p.B.astype(np.float32)
        Bt = np.ascontiguousarray(p.B.T)  # [r, out]: the decode kernel's layout
        p.B = Bt.T  # the adapter keeps a view, not a second copy
        g = None
        if p.magnitude is not None:
            g = (p.magnitude / dora_norms(modules(module), p.A, p.B, p.scale)).astype(np.float32)
            Bt = np.ascontiguousarray(Bt * g[None, :])
        bias = None if p.bias is None else (p.bias * np.float32(coef)).astype(np.float32)
        deltas[module] = Delta(p.A, Bt, float(coef), bias, g)
    deltas, stacks = stack_deltas(deltas)
    for module in stacks:  # the adapter's pairs keep views of the stacks, not the first copies
        p = adapter.pairs[module]
        p.A, p.B = deltas[module].A, deltas[module].Bt.T
    saved = {m: make_linear(arr) for m, arr in adapter.saved.items()}
    return Resident(name, adapter, float(scale), deltas, dict(adapter.biases), saved, stacks=stacks)


def build_selection(members: list[tuple[Resident, float]], base_biases) -> Selection:
    """The selection for resident adapters with weights (exact weighted sum of their deltas)."""
    members = [(r, float(w)) for r, w in members if w != 0.0]
    if not members:
        return BASE
    if len(members) > 1 and any(r.is_dora for r, _ in members):
        dora = next(r.name for r, _ in members if r.is_dora)
        raise UsageError(f"adapter {dora!r} is a DoRA adapter: DoRA's normalisation is not additive, so it "
                         f"cannot be mixed with other adapters; use it alone")
    for r, w in members:
        if r.is_dora and w != 1.0:
            raise UsageError(f"DoRA adapter {r.name!r} can only be used at weight 1 (got {w:g})")
    deltas: dict = {}
    for r, w in members:
        for module, d in r.deltas.items():
            deltas.setdefault(module, []).append(d if w == 1.0 else d.with_weight(w))
    biases: dict = {}
    for module in sorted({m for r, _ in members for m in r.biases}):
        if len(members) == 1 and members[0][1] == 1.0:
            biases[module] = members[0][0].biases[module]
            continue
        base = base_biases(module)
        total = np.array(base, np.float32, copy=True)
        for r, w in members:
            if module in r.biases:
                total += np.float32(w) * (r.biases[module] - base)
        biases[module] = total
    replaced: dict = {}
    for module in (EMBED, HEAD):
        terms = tuple((w * 1.0, r.saved[module]) for r, w in members if module in r.saved)
        if terms:
            replaced[module] = (1.0 - sum(w for w, _ in terms), terms)
    return Selection(tuple((r.name, w) for r, w in members), {m: tuple(v) for m, v in deltas.items()},
                     biases, replaced, tuple(r for r, _ in members))


class AdapterSet:
    """The adapters resident beside one base model: ``model.adapters``.

    ``net``: the base network the adapters are checked against and applied to (its config, its
    modules' linear layers and biases). ``on_unload(resident)``: called under the set's lock for
    each adapter unloaded, so that the model decides what that means for the selection it is
    using (``Model`` goes back to the base and warns). ``budget_bytes``: the bytes adapters may
    take in all (a deploy folder's memory plan), None: no limit. ``dtype``: how :meth:`load` holds
    an adapter that names none (``edgelora.products.ADAPTER_DTYPES``)."""

    def __init__(self, net, on_unload, budget_bytes: int | None = None, dtype: str = "float32"):
        self.dtype = check_adapter_dtype(dtype)
        self._net = net
        self._on_unload = on_unload
        self._resident: dict[str, Resident] = {}
        self._lock = threading.Lock()
        self.base = BaseModules.from_args(net.args)
        self.budget_bytes = budget_bytes

    @property
    def names(self) -> list[str]:
        return list(self._resident)

    def __contains__(self, name) -> bool:
        return name in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def __iter__(self):
        return iter(list(self._resident))

    def __getitem__(self, name: str) -> Resident:
        try:
            return self._resident[name]
        except KeyError:
            raise UsageError(f"no adapter named {name!r} is loaded (loaded: {self.names or 'none'})") from None

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._resident.values())

    def _check_budget(self, name: str, nbytes: int) -> None:
        if self.nbytes + nbytes > self.budget_bytes:
            raise PlanError(
                f"adapter {name!r} needs {nbytes / 1e6:.1f} MB but the memory plan leaves "
                f"{(self.budget_bytes - self.nbytes) / 1e6:.1f} MB of its {self.budget_bytes / 1e6:.1f} MB "
                f"for adapters ({len(self._resident)} loaded: {', '.join(self._resident) or 'none'}); unload one, "
                f"or plan and deploy again with this adapter (edgelora deploy ... --adapter {name}=PATH)")

    def load(self, name: str, path, scale: float = 1.0, dtype: str | None = None) -> Resident:
        """Read the PEFT adapter at ``path``, check it against the base, and keep it resident as ``name``.
        ``dtype``: how its A and B are held, ``"float32"`` (the file's values exactly) or
        ``"float16"`` (each rounded once, half the bytes; ``edgelora.products``); None: the set's
        :attr:`dtype`, the load's ``adapter_dtype``."""
        if not isinstance(name, str) or not name or any(c in name for c in ",=/\\") or name.strip() != name:
            raise UsageError(f"adapter name {name!r}: use a non-empty name without ',', '=', '/' or spaces")
        if name in self._resident:
            raise UsageError(f"an adapter named {name!r} is already loaded; unload it first")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not np.isfinite(scale):
            raise UsageError(f"scale must be a finite number, got {scale!r}")
        dtype = self.dtype if dtype is None else check_adapter_dtype(dtype)
        t0 = time.perf_counter()
        if self.budget_bytes is not None:  # sized from its header first: nothing is read beyond the budget
            self._check_budget(name, min_resident_bytes(Path(path)))
        adapter = read_adapter(Path(path), self.base, held=dtype)
        if adapter.is_dora and scale != 1.0:
            raise UsageError(f"DoRA adapter {name!r} can only be loaded with scale 1.0 (got {scale:g})")
        res = make_resident(name, adapter, scale, self._net.module)
        res.selection = build_selection([(res, 1.0)], self._net.base_bias)
        res.load_seconds = time.perf_counter() - t0
        with self._lock:
            if name in self._resident:
                raise UsageError(f"an adapter named {name!r} is already loaded; unload it first")
            if self.budget_bytes is not None:
                self._check_budget(name, res.nbytes)
            self._resident[name] = res
        return res

    def holds(self, res: Resident) -> bool:
        """Whether ``res`` is still resident (not unloaded, nor replaced by another of its name)."""
        return self._resident.get(res.name) is res

    def unload(self, name: str) -> None:
        """Forget adapter ``name``. The model is told: if its current selection uses the adapter
        (alone or in a mix), it goes back to the base and says so with a ``UserWarning``.
        The memory is returned once no running generation still holds it."""
        with self._lock:
            res = self[name]
            del self._resident[name]
            self._on_unload(res)

    def select(self, spec) -> Selection:
        """A selection from ``None`` (base), a name, or ``{name: weight}``; also text as
        :func:`parse_mix` reads it (``"a"``, ``"a=0.5,b=0.5"``, ``"base"``), parsed here only."""
        if isinstance(spec, Selection):
            return spec
        if isinstance(spec, str):
            spec = parse_mix(spec)  # a name, a {name: weight} mix, or None
        if spec is None:
            return BASE
        if isinstance(spec, str):
            return self[spec].selection
        if isinstance(spec, dict):
            members = []
            for n, w in spec.items():
                if not isinstance(w, (int, float)) or isinstance(w, bool) or not np.isfinite(w):
                    raise UsageError(f"weight of adapter {n!r} must be a finite number, got {w!r}")
                members.append((self[n], float(w)))
            return build_selection(members, self._net.base_bias)
        raise UsageError(f"adapter must be None, a name or a {{name: weight}} dict, got {spec!r}")


def parse_mix(text: str):
    """``"a"`` -> ``"a"``; ``"a=0.7,b=0.3"`` -> ``{"a": 0.7, "b": 0.3}``; ``"base"``/``""`` -> None."""
    text = text.strip()
    if text in ("", "base", "none"):
        return None
    if "=" not in text and "," not in text:
        return text
    mix = {}
    for part in text.split(","):
        name, sep, w = part.partition("=")
        name = name.strip()
        try:
            mix[name] = float(w) if sep else 1.0
        except ValueError:
            raise UsageError(f"bad adapter weight in {part!r}: expected NAME=NUMBER") from None
        if not name:
            raise UsageError(f"bad adapter mix {text!r}: expected NAME=WEIGHT,NAME=WEIGHT")
    return mix
