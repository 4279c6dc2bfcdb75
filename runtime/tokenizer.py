"""Tokenizer of a bundle: ``tokenizer.json`` run by Hugging Face ``tokenizers``, configured the way
``transformers.AutoTokenizer.from_pretrained`` configures it, plus chat templates and streaming decode.

What ``AutoTokenizer`` (transformers 5) really does with a model folder, and therefore what this module
reproduces (sources: transformers ``tokenization_utils_tokenizers.py`` — ``TokenizersBackend``, the
class behind ``PreTrainedTokenizerFast`` —, ``tokenization_utils_base.py``, ``models/llama/
tokenization_llama.py``, ``models/auto/tokenization_auto.py``, ``utils/chat_template_utils.py``; and the
``tokenizers`` library's pre-tokenizers, decoders and added-token vocabulary):

* **The pipeline is tokenizer.json's**, with one family exception: when ``tokenizer_class`` is
  ``LlamaTokenizer`` (or ``LlamaTokenizerFast``) and ``tokenizer.json`` is not byte-level, transformers
  rebuilds the tokenizer from the file's BPE vocabulary and merges with its own SentencePiece-style
  pipeline: no normalizer, a ``Metaspace`` pre-tokenizer whose ``prepend_scheme`` is ``"first"`` (``"always"``
  with ``legacy: true``, ``"never"`` with ``add_prefix_space: false``) — so no ``▁`` is prepended to
  text that follows a special token —, byte fallback, and the decoder ``Replace("▁", " ")``,
  ``ByteFallback``, ``Fuse``, ``Strip(1 leading space)``. The post-processor stays the file's.
  Models of type ``qwen2`` always get ``Qwen2Tokenizer``, which likewise rebuilds the BPE with its own
  pipeline (NFC, the Qwen2 split regex, byte-level; what Qwen2's own files hold anyway); models of
  type ``mistral`` always get ``TokenizersBackend`` (the file as it is). Other tokenizer classes are
  taken from ``tokenizer.json`` as it is, and so is a non-BPE file under either rebuilding class
  (where transformers would build a BPE from a vocabulary that is not one).
* **add_bos_token / add_eos_token in tokenizer_config.json are ignored** when ``tokenizer.json`` exists
  (``PreTrainedTokenizerBase.from_pretrained`` drops them): whether ``<s>`` is prepended is decided by the
  file's post-processor alone.
* **Special tokens named in tokenizer_config.json** (``bos_token``, ``eos_token``, ``unk_token``,
  ``pad_token``, ..., any other ``*_token`` key, ``extra_special_tokens`` / ``additional_special_tokens``,
  ``added_tokens_decoder``) that the backend does not already hold as added tokens are added, so that
  they match as whole tokens in text; ``LlamaTokenizer`` defaults to ``<unk>``, ``<s>``, ``</s>`` and
  ``Qwen2Tokenizer`` to ``<|endoftext|>`` for those it does not name. Without ``added_tokens_decoder``
  the legacy ``special_tokens_map.json`` overrides the config, as in transformers.
* ``encode`` never truncates or pads; ``decode`` is the backend's decode (transformers skips its
  ``clean_up_tokenization`` for BPE models; for other models it applies it when
  ``clean_up_tokenization_spaces`` is set).
* **Chat templates** are rendered like ``PreTrainedTokenizerBase.apply_chat_template(..., tokenize=False)``:
  jinja2's ``ImmutableSandboxedEnvironment`` with ``trim_blocks``, ``lstrip_blocks``, the
  ``loopcontrols`` extension and a no-op ``{% generation %}`` block, a ``tojson`` filter that does not
  escape HTML, the globals ``raise_exception``, ``strftime_now``, a restricted ``dict`` and ``namespace``,
  and the variables ``messages`` (``None`` values dropped), ``tools``, ``documents``,
  ``add_generation_prompt``, every named special token (``bos_token``, ``eos_token``, ...) and the
  caller's extra keyword arguments. A ``chat_template.jinja`` file (and ``additional_chat_templates/
  *.jinja``) takes priority over ``chat_template`` in tokenizer_config.json, which may be a string or a
  list of ``{"name", "template"}``; with several, ``"tool_use"`` is used when tools are given, else
  ``"default"``. Rendering has limits a hostile template cannot pass (:func:`_render_limited`): at most
  :data:`TEMPLATE_OUTPUT` characters out, no operator, format width or call argument that would build
  more, at most :data:`TEMPLATE_STEPS` executed lines (loops) and :data:`TEMPLATE_SECONDS` seconds;
  beyond them rendering stops with a ``FormatError`` naming the template's file.
* **Streaming** (:class:`StreamDecoder`) follows the prefix/read-offset scheme of text-generation-
  inference and ``tokenizers.decoders.DecodeStream``: decode the last emitted piece's tokens with and
  without the new ones and emit the difference once it does not end in U+FFFD (an incomplete UTF-8
  character, e.g. one byte-fallback token ``<0xE2>`` of three).
"""

from __future__ import annotations

import functools
import json
import re
import string
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from edgelora.config import read_bounded, read_json
from edgelora.errors import FormatError, UnsupportedError, UsageError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

#: the named special tokens of ``PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES``
SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                            "mask_token")
#: the ``__init__`` defaults of the tokenizer classes whose defaults apply when the config omits a token
_CLASS_DEFAULT_TOKENS = {
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}
_MAX_TOKENIZER_BYTES = 512 * 1024 * 1024
_REPLACEMENT_CHAR = "\ufffd"
#: the most characters a chat template may render (a prompt, not a book)
TEMPLATE_OUTPUT = 1 << 24
#: the most Python lines one rendering may execute (a nested loop of 10^5 x 10^5 stops here)
TEMPLATE_STEPS = 20_000_000
#: the longest one rendering may take
TEMPLATE_SECONDS = 10.0
#: names a message's reasoning is passed under (transformers' ``_REASONING_FIELDS``)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _read_text(path: Path, limit: int = _MAX_TOKENIZER_BYTES) -> str:
    raw = read_bounded(path, limit)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"not UTF-8 text ({e})", path) from None


def _optional_json(path: Path, listed=None) -> dict:
    return read_json(path) if _present(path, listed) else {}


def _present(path: Path, listed) -> bool:
    """Whether the folder's file ``path`` is to be read: it exists and, when the folder has a manifest
    (``listed``: the names it lists and checksums), is listed; an unlisted file is never read."""
    return (listed is None or path.name in listed) and path.is_file()


def _added_token(value: Any, path: Path, what: str) -> AddedToken | str | None:
    """A special-token value as transformers reads it: a string, or an ``AddedToken`` serialized as a dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in _ADDED_TOKEN_FLAGS if k in value}
        return AddedToken(value["content"], **flags)
    raise FormatError(f"{what} must be a string or an AddedToken object, got {value!r}", path)


def _transformers_class(tok_cfg: dict, model_cfg: dict, tokenizer_json_text: str) -> str:
    """The tokenizer class ``AutoTokenizer.from_pretrained`` instantiates for a local folder, for the
    cases that matter here (``models/auto/tokenization_auto.py``)."""
    model_type = model_cfg.get("model_type")
    if model_type == "qwen2":  # registered class wins: qwen2 is in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
        return "Qwen2Tokenizer"
    if model_type == "mistral":  # registered TokenizersBackend wins over any other declared class
        return "TokenizersBackend"
    declared = tok_cfg.get("tokenizer_class") or model_cfg.get("tokenizer_class")
    if not isinstance(declared, str):
        return "TokenizersBackend"
    name = declared.removesuffix("Fast")
    if name in ("PreTrainedTokenizer", "PythonBackend"):
        return "TokenizersBackend"
    if name == "LlamaTokenizer" and '"ByteLevel"' in tokenizer_json_text:
        return "TokenizersBackend"  # LlamaTokenizer hardcodes Metaspace, so byte-level files keep their own
    return name


def _file_bpe(tj: dict, path: Path, **options: Any) -> BackendTokenizer:
    """A tokenizer around the file's BPE vocabulary and merges, built as ``convert_to_native_format`` and
    the class ``__init__`` build it (``models.BPE(vocab=..., merges=..., **options)``)."""
    model = tj["model"]
    vocab = model.get("vocab")
    if isinstance(vocab, list):
        vocab = {tok[0] if isinstance(tok, list) and tok else tok: i for i, tok in enumerate(vocab)
                 if isinstance(tok, str) or (isinstance(tok, list) and tok and isinstance(tok[0], str))}
    if not isinstance(vocab, dict):
        raise FormatError("tokenizer model has no BPE vocabulary", path)
    merges = model.get("merges") or []
    if not isinstance(merges, list) or not all(isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(
            isinstance(x, str) for x in m)) for m in merges):
        raise FormatError("tokenizer model merges must be a list of \"a b\" strings or [a, b] pairs", path)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    try:
        return BackendTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, **options))
    except Exception as e:  # the Rust side reports malformed merges/vocab as plain exceptions
        raise FormatError(f"invalid BPE vocabulary or merges ({_one_line(e)})", path) from None


def _keep_file_post_processor(backend: BackendTokenizer, tj: dict, path: Path) -> None:
    """The rebuilt tokenizer keeps the file's post-processor (transformers reads it from a copy of the
    file without vocabulary)."""
    minimal = dict(tj, added_tokens=[], model=dict(tj["model"], vocab={}, merges=[]))
    try:
        post = BackendTokenizer.from_str(json.dumps(minimal)).post_processor
    except Exception as e:
        raise FormatError(f"not a valid tokenizers file ({_one_line(e)})", path) from None
    if post is not None:
        backend.post_processor = post


def _llama_backend(tj: dict, tok_cfg: dict, path: Path) -> BackendTokenizer:
    """``LlamaTokenizer.__init__``: the file's BPE in a SentencePiece-style pipeline."""
    backend = _file_bpe(tj, path, fuse_unk=True, byte_fallback=True)
    add_prefix_space = tok_cfg.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    legacy = bool(tok_cfg.get("legacy", False))
    scheme = ("always" if legacy else "first") if add_prefix_space else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    _keep_file_post_processor(backend, tj, path)
    return backend


#: ``models/qwen2/tokenization_qwen2.py``'s ``PRETOKENIZE_REGEX``
_QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                            r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _qwen2_backend(tj: dict, tok_cfg: dict, path: Path) -> BackendTokenizer:
    """``Qwen2Tokenizer.__init__``: the file's BPE with NFC, the Qwen2 split regex and byte-level bytes."""
    backend = _file_bpe(tj, path, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False)
    backend.decoder = decoders.ByteLevel()
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(tok_cfg.get("add_prefix_space") or False), use_regex=False),
    ])
    _keep_file_post_processor(backend, tj, path)
    return backend


def _special_tokens(tok_cfg: dict, cls_name: str, dirpath: Path, cfg_path: Path, file_added: list[dict],
                    listed=None):
    """Named, model-specific and extra special tokens, and ``added_tokens_decoder``, the way
    ``PreTrainedTokenizerBase.from_pretrained`` collects them from the configuration files."""
    cfg = dict(tok_cfg)
    decoder: dict[int, AddedToken] = {}
    if "added_tokens_decoder" in cfg:
        raw = cfg["added_tokens_decoder"]
        if not isinstance(raw, Mapping):
            raise FormatError("added_tokens_decoder must be an object {id: token}", cfg_path)
        for idx, tok in raw.items():
            tok = _added_token(tok, cfg_path, f"added_tokens_decoder[{idx}]")
            try:
                decoder[int(idx)] = tok if isinstance(tok, AddedToken) else AddedToken(str(tok), special=True)
            except (TypeError, ValueError):
                raise FormatError(f"added_tokens_decoder key {idx!r} is not a token id", cfg_path) from None
    else:
        stm_path = dirpath / SPECIAL_TOKENS_MAP_FILE
        for key, value in _optional_json(stm_path, listed).items():
            if key == "extra_special_tokens" and isinstance(value, list):
                existing = list(cfg.get("extra_special_tokens") or [])
                cfg["extra_special_tokens"] = existing + [v for v in value if v not in existing]
            elif isinstance(value, Mapping):
                cfg[key] = _added_token(dict(value, special=True), stm_path, key)
            else:
                cfg[key] = value
        for tok in file_added:  # tokenizer.json's added tokens stand in for added_tokens_decoder
            flags = {k: bool(tok[k]) for k in _ADDED_TOKEN_FLAGS if k in tok}
            decoder[int(tok["id"])] = AddedToken(tok["content"], **flags)
    by_content = {str(t): t for t in decoder.values()}
    if "additional_special_tokens" in cfg and not cfg.get("extra_special_tokens"):
        cfg["extra_special_tokens"] = cfg.pop("additional_special_tokens")

    named: dict[str, AddedToken | str] = {}
    defaults = _CLASS_DEFAULT_TOKENS.get(cls_name, {})
    for attr in SPECIAL_TOKEN_ATTRIBUTES:
        value = _added_token(cfg[attr] if attr in cfg else defaults.get(attr), cfg_path, attr)
        if value is not None:
            named[attr] = by_content.get(str(value), value)
    for key, value in cfg.items():  # model-specific tokens: image_token, boi_token, ...
        if key in SPECIAL_TOKEN_ATTRIBUTES or not key.endswith("_token"):
            continue
        if isinstance(value, Mapping) and value.get("__type") == "AddedToken":
            value = _added_token(value, cfg_path, key)
        if isinstance(value, (str, AddedToken)):
            named[key] = by_content.get(str(value), value)
    extra = cfg.get("extra_special_tokens") or []
    if isinstance(extra, Mapping):
        for key, value in extra.items():
            if isinstance(value, (str, Mapping)):
                named[key] = by_content.get(str(value), _added_token(value, cfg_path, key))
        extra = []
    if not isinstance(extra, list):
        raise FormatError("extra_special_tokens must be a list of tokens", cfg_path)
    extra = [_added_token(v, cfg_path, "extra_special_tokens") for v in extra]
    return named, [e for e in extra if e is not None], decoder


def _add_special_tokens(backend: BackendTokenizer, named: dict, extra: list, decoder: dict[int, AddedToken]) -> None:
    """``TokenizersBackend.__init__``: add the configured tokens the backend does not hold yet."""
    present = {repr(t) for t in backend.get_added_tokens_decoder().values()}
    to_add: list[AddedToken | str] = [t for _, t in sorted(decoder.items()) if repr(t) not in present]
    encoder = [str(t) for t in backend.get_added_tokens_decoder().values()] + [str(t) for t in to_add]
    for value in list(named.values()) + list(extra):
        if str(value) not in encoder and value not in to_add:
            to_add.append(value)
    named_strings = {str(v) for v in named.values()}
    tokens = []
    for tok in to_add:
        if isinstance(tok, str):
            tok = AddedToken(tok, special=True)
        elif not tok.special and str(tok) in named_strings:
            tok.special = True
        tokens.append(tok)
    if tokens:
        backend.add_tokens(tokens)


def _token_ids(cfg: dict, key: str, path: Path) -> list[int] | None:
    value = cfg.get(key)
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise FormatError(f"{key} must be a token id or a list of token ids, got {value!r}", path)
    return values or None


def _load_chat_templates(dirpath: Path, tok_cfg: dict, listed=None) -> tuple[str | dict[str, str] | None, Path | None]:
    """The chat template(s) and the file they come from; ``.jinja`` files win over tokenizer_config.json.
    With ``listed`` (a bundle's manifest), only listed files count: a bundle lists no sub-folder, so
    ``additional_chat_templates/`` is never read from one."""
    files: dict[str, str] = {}
    single = dirpath / CHAT_TEMPLATE_FILE
    if _present(single, listed):
        files["default"] = _read_text(single, 16 << 20)
    extra_dir = dirpath / CHAT_TEMPLATE_DIR
    if listed is None and extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            files[f.stem] = _read_text(f, 16 << 20)
    if files:
        source = single if "default" in files else extra_dir
        return (files["default"] if list(files) == ["default"] else files), source
    cfg_path = dirpath / TOKENIZER_CONFIG_FILE
    template = tok_cfg.get("chat_template")
    if template is None:
        return None, None
    if isinstance(template, str):
        return template, cfg_path
    if isinstance(template, list) and all(isinstance(t, Mapping) and isinstance(t.get("name"), str)
                                          and isinstance(t.get("template"), str) for t in template):
        return {t["name"]: t["template"] for t in template}, cfg_path
    raise FormatError("chat_template must be a string or a list of {\"name\": ..., \"template\": ...} objects",
                      cfg_path)


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------

class _TemplateRaised(Exception):
    """Raised by a template's ``raise_exception(message)``: the template rejects its input."""


class _TemplateLimit(BaseException):
    """A rendering went past a limit. A BaseException, so that no ``except Exception`` in code the
    template calls can swallow it."""


_PRINTF_SPEC = re.compile(r"%[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_size(n: int, what: str) -> None:
    if n > TEMPLATE_OUTPUT:
        raise _TemplateLimit(f"{what} would build {n:,} items, more than the {TEMPLATE_OUTPUT:,} a chat template "
                             f"may render")


def _check_printf(fmt: str) -> None:
    """A ``%`` format whose widths and precisions are bounded (``*`` would take them from the data)."""
    for m in _PRINTF_SPEC.finditer(fmt):
        for g in m.groups():
            if g == "*":
                raise _TemplateLimit("'%*' widths taken from data are not allowed in chat templates")
            if g is not None:
                _check_size(int(g), "a % format width")


def _check_format(fmt: str) -> None:
    """A ``str.format`` string whose specs are literal and bounded."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # malformed: format() itself raises
    for _, _, spec, _ in fields:
        if spec and "{" in spec:
            raise _TemplateLimit("nested format specs ('{:{}}') are not allowed in chat templates")
        for digits in re.findall(r"\d+", spec or ""):
            _check_size(int(digits), "a format width")


def _check_args(args, kwargs) -> None:
    """No integer argument that could make a result larger than a template may render
    (``'x'.center(10**9)``, ``lipsum(10**9)``, ``'x'|indent(10**9)``)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > TEMPLATE_OUTPUT:
            _check_size(abs(a), "a call argument")


def _render_limited(template, variables: dict) -> str:
    """``template.render(**variables)`` within the limits: output size counted as it is produced, and
    executed lines and time counted by a trace function on this thread (rendering is Python code
    that jinja2 compiled; nothing else can interrupt it). The caller's own tracer is put back after."""
    deadline = time.monotonic() + TEMPLATE_SECONDS
    steps = 0

    def tracer(frame, event, arg):
        nonlocal steps
        steps += 1
        if steps > TEMPLATE_STEPS:
            raise _TemplateLimit(f"rendering ran more than {TEMPLATE_STEPS:,} steps (a loop too long)")
        if steps % 1024 == 0 and time.monotonic() > deadline:
            raise _TemplateLimit(f"rendering took more than {TEMPLATE_SECONDS:g} s")
        return tracer

    previous = sys.gettrace()
    pieces, size = [], 0
    sys.settrace(tracer)
    try:
        for piece in template.generate(**variables):
            size += len(piece)
            _check_size(size, "the rendered prompt")
            pieces.append(piece)
    finally:
        sys.settrace(previous)
    return "".join(pieces)


@functools.lru_cache(maxsize=1)
def _jinja_environment():
    """The sandboxed environment of transformers' ``_cached_compile_jinja_template`` (jinja2 imported lazily)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < (3, 1, 6):
        raise UnsupportedError(f"chat templates need jinja2>=3.1.6 (older versions have sandbox escapes); "
                               f"installed: {jinja2.__version__}; run: pip install -U jinja2")

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text; rendering just keeps the body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class RaisedByTemplate(jinja2.exceptions.TemplateError, _TemplateRaised):
        """What ``raise_exception`` raises: a jinja2 TemplateError, as in transformers, that we can tell apart."""

    def raise_exception(message):
        raise RaisedByTemplate(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # unlike jinja2's own filter: no HTML escaping, and json.dumps' options
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        """``dict(...)`` for templates, without attribute access to the ``dict`` type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """``namespace(...)`` that refuses underscore-prefixed attribute names."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}")

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox with resource limits: ``*``, ``**``, ``+`` and ``%`` refuse results beyond what a
        template may render, as do format widths and integer arguments of calls and filters."""
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        _check_size(len(seq) * n, "'*'")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
                _check_size(max(left.bit_length(), 1) * right // 8, "'**'")
            elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                _check_size(len(left) + len(right), "'+'")
            elif operator == "%" and isinstance(left, str):
                _check_printf(left)
            return super().call_binop(context, operator, left, right)

        def getattr(self, obj, attribute):
            if isinstance(obj, str) and attribute in ("format", "format_map"):
                _check_format(obj)
            return super().getattr(obj, attribute)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            _check_args(args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

    def limited_filter(f):
        @functools.wraps(f)  # keeps jinja2's pass_context/pass_environment marks
        def wrapper(*args, **kwargs):
            _check_args(args, kwargs)
            if f.__name__ == "do_format" and args and isinstance(args[0], str):
                _check_printf(args[0])
            return f(*args, **kwargs)
        return wrapper

    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters = {name: limited_filter(f) for name, f in env.filters.items()}
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """Template data rebuilt from plain JSON-like types (transformers' ``_plain_template_data``): objects
    with methods the sandbox does not know about never reach the template."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # NumPy scalars
    return f"<{type(value).__name__}>"


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UsageError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts, "
                         f"got {type(messages).__name__}{'' if messages else ' (empty)'}")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise UsageError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise UsageError(f"messages[{i}] needs a non-empty string 'role' (system, user, assistant, ...), "
                             f"got {m.get('role')!r}")
        content = m.get("content")
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise UsageError(f"messages[{i}] ({m['role']}) needs a string 'content', got {type(content).__name__}")
        message = {k: v for k, v in m.items() if v is not None}  # transformers drops None values
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:  # transformers' _alias_reasoning_fields
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        checked.append(_plain(message))
    return checked


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

class Tokenizer:
    """A model's tokenizer: ``encode``/``decode`` equal to transformers' ``AutoTokenizer``, the ids that end
    generation, the chat template, and incremental decoding (:meth:`stream_decoder`).

    Create with :meth:`from_dir`.
    """

    def __init__(self, backend: BackendTokenizer, *, special_tokens: dict[str, str],
                 eos_token_ids: Iterable[int], bos_token_id: int | None,
                 chat_template: str | dict[str, str] | None = None, template_path: Path | None = None,
                 clean_up_tokenization_spaces: bool = False, path: Path | None = None):
        self._backend = backend
        self.special_tokens: dict[str, str] = dict(special_tokens)
        self.eos_token_ids: set[int] = set(eos_token_ids)
        self.bos_token_id: int | None = bos_token_id
        self.chat_template = chat_template
        self.path = path
        self._template_path = template_path
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._clean_up = bool(clean_up_tokenization_spaces)
        self._compiled: dict[str, Any] = {}

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path, listed=None) -> "Tokenizer":
        """Load ``tokenizer.json`` and, when present, ``tokenizer_config.json``, ``special_tokens_map.json``,
        ``generation_config.json``, ``config.json`` and ``chat_template.jinja`` from a model or bundle folder.
        ``listed``: the file names a bundle's manifest lists (``Bundle.listed``); a file not among them
        is not read even when it is there, since nothing verified it."""
        dirpath = Path(path)
        tj_path = dirpath / TOKENIZER_FILE
        if listed is not None and TOKENIZER_FILE not in listed:
            raise FormatError(f"the manifest does not list {TOKENIZER_FILE}; every file the loader opens must have "
                              f"a checksum", dirpath)
        if not tj_path.is_file():
            raise FormatError("no tokenizer.json in the model folder (save the tokenizer with transformers' "
                              "save_pretrained, which writes it)", dirpath)
        text = _read_text(tj_path)
        try:
            tj = json.loads(text)
        except (ValueError, RecursionError) as e:  # ValueError: also over-long integers
            raise FormatError(f"malformed JSON ({str(e)[:200]})", tj_path) from None
        if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
            raise FormatError("not a tokenizers file (no \"model\" object)", tj_path)
        cfg_path = dirpath / TOKENIZER_CONFIG_FILE
        tok_cfg = _optional_json(cfg_path, listed)
        gen_path = dirpath / GENERATION_CONFIG_FILE
        gen_cfg = _optional_json(gen_path, listed)
        model_path = dirpath / MODEL_CONFIG_FILE
        model_cfg = _optional_json(model_path, listed)

        cls_name = _transformers_class(tok_cfg, model_cfg, text)
        rebuild = {"LlamaTokenizer": _llama_backend, "Qwen2Tokenizer": _qwen2_backend}.get(cls_name)
        if rebuild is not None and tj["model"].get("type") == "BPE":
            backend = rebuild(tj, tok_cfg, tj_path)
        else:
            try:
                backend = BackendTokenizer.from_str(text)
            except Exception as e:  # tokenizers raises plain Exception for invalid files
                raise FormatError(f"not a valid tokenizers file ({_one_line(e)})", tj_path) from None
        file_added = tj.get("added_tokens") or []
        if not isinstance(file_added, list) or not all(
                isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str)
                for t in file_added):
            raise FormatError("added_tokens must be a list of {\"id\", \"content\", ...} objects", tj_path)
        named, extra, decoder = _special_tokens(tok_cfg, cls_name, dirpath, cfg_path, file_added, listed)
        _add_special_tokens(backend, named, extra, decoder)
        if cls_name == "Qwen2Tokenizer":  # Qwen2Tokenizer.__init__ ends by adding all its special tokens
            backend.add_tokens([AddedToken(t, special=True) for t in
                                dict.fromkeys([str(v) for v in named.values()] + [str(e) for e in extra])])
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(tok_cfg.get("split_special_tokens", False))

        special_tokens = {k: str(v) for k, v in named.items()}
        eos = (_token_ids(gen_cfg, "eos_token_id", gen_path) or _token_ids(model_cfg, "eos_token_id", model_path))
        if eos is None:
            eos_id = backend.token_to_id(special_tokens["eos_token"]) if "eos_token" in special_tokens else None
            eos = [] if eos_id is None else [eos_id]
        bos = (_token_ids(gen_cfg, "bos_token_id", gen_path) or _token_ids(model_cfg, "bos_token_id", model_path))
        if bos is None and "bos_token" in special_tokens:
            bos_id = backend.token_to_id(special_tokens["bos_token"])
            bos = None if bos_id is None else [bos_id]
        chat_template, template_path = _load_chat_templates(dirpath, tok_cfg, listed)
        # transformers' _decode skips the clean-up for BPE models unless forced
        clean_up = bool(tok_cfg.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
            or bool(tok_cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))
        return cls(backend, special_tokens=special_tokens, eos_token_ids=eos, bos_token_id=bos[0] if bos else None,
                   chat_template=chat_template, template_path=template_path, clean_up_tokenization_spaces=clean_up,
                   path=dirpath)

    # --- vocabulary --------------------------------------------------------------------------
    @property
    def backend(self) -> BackendTokenizer:
        """The configured ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    # --- encode / decode ---------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``: ``AutoTokenizer.from_pretrained(path)(text)["input_ids"]``."""
        if not isinstance(text, str):
            raise UsageError(f"text to encode must be a str, got {type(text).__name__}")
        try:
            return self._backend.encode(text, add_special_tokens=bool(add_special_tokens)).ids
        except TypeError:  # the Rust side refuses str that is not valid Unicode
            if any("\ud800" <= c <= "\udfff" for c in text):
                raise UsageError("text to encode holds a lone surrogate (not valid Unicode)") from None
            raise

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        try:
            out = [int(i) for i in ids]
        except (TypeError, ValueError):
            raise UsageError("token ids must be a sequence of integers") from None
        for i in out:
            if not 0 <= i < self._vocab_size:
                raise UsageError(f"token id {i} is outside the vocabulary (0..{self._vocab_size - 1})")
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``: transformers' ``decode(ids, skip_special_tokens=...)``."""
        text = self._backend.decode(self._check_ids(ids), skip_special_tokens=bool(skip_special_tokens))
        if self._clean_up:  # PreTrainedTokenizerBase.clean_up_tokenization
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """A fresh :class:`StreamDecoder` for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # --- chat --------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def _template(self, chat_template: str | None, tools) -> tuple[str, str]:
        """(cache key, template source) as ``PreTrainedTokenizerBase.get_chat_template`` picks it."""
        where = self._template_path or self.path
        if isinstance(self.chat_template, dict):
            if chat_template is not None and chat_template in self.chat_template:
                return chat_template, self.chat_template[chat_template]
            if chat_template is None:
                name = "tool_use" if tools is not None and "tool_use" in self.chat_template else "default"
                if name not in self.chat_template:
                    raise UnsupportedError(
                        f"the model has several chat templates ({', '.join(sorted(self.chat_template))}) and none "
                        f"named 'default'; pass chat_template=<name>", where)
                return name, self.chat_template[name]
        if chat_template is not None:
            return "\0" + chat_template, chat_template
        if self.chat_template is None:
            raise UnsupportedError("this model has no chat template (none in tokenizer_config.json or "
                                   "chat_template.jinja); use generate() with a plain prompt instead", self.path)
        return "default", self.chat_template

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None, *,
                            documents: Sequence[Mapping[str, Any]] | None = None,
                            chat_template: str | None = None, **kwargs: Any) -> str:
        """The prompt text for a conversation, equal to transformers' ``apply_chat_template(messages,
        tools=tools, add_generation_prompt=..., tokenize=False, **kwargs)``.

        ``messages`` is a list of ``{"role": str, "content": str}`` dicts (other keys pass through to the
        template); ``tools`` a list of JSON-schema dicts; extra keyword arguments become template
        variables. ``chat_template`` names one of several templates, or is a template itself.
        Encode the result with ``encode(text, add_special_tokens=False)``: the template writes the
        special tokens itself.
        """
        checked = _check_messages(messages)
        if tools is not None and (not isinstance(tools, (list, tuple))
                                  or not all(isinstance(t, Mapping) for t in tools)):
            raise UsageError("tools must be a list of JSON-schema dicts")
        if documents is not None and (not isinstance(documents, (list, tuple))
                                      or not all(isinstance(d, Mapping) for d in documents)):
            raise UsageError("documents must be a list of dicts with 'title' and 'text'")
        if chat_template is not None and not isinstance(chat_template, str):
            raise UsageError("chat_template must be a template name or a template string")
        import jinja2

        key, source = self._template(chat_template, tools)
        where = None if key.startswith("\0") else self._template_path or self.path  # the caller's own template
        template = self._compiled.get(key)
        if template is None:
            try:
                template = _jinja_environment().from_string(source)
            except jinja2.TemplateSyntaxError as e:
                raise FormatError(f"chat template has a syntax error at line {e.lineno}: {_one_line(e.message)}",
                                  where) from None
            except _TemplateLimit as e:  # raised while the compiler folds constants
                raise FormatError(f"chat template stopped: {e}", where) from None
            self._compiled[key] = template
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return _render_limited(template, dict(
                messages=checked, tools=_plain(None if tools is None else list(tools)),
                documents=_plain(None if documents is None else list(documents)),
                add_generation_prompt=bool(add_generation_prompt), **variables))
        except _TemplateLimit as e:
            raise FormatError(f"chat template stopped: {e}", where) from None
        except _TemplateRaised as e:
            raise UsageError(f"the chat template rejected the messages: {_one_line(e)}") from None
        except jinja2.TemplateError as e:
            raise FormatError(f"chat template failed: {_one_line(e)}", where) from None
        except Exception as e:  # template code errors surface as plain Python errors (TypeError, ...)
            raise FormatError(f"chat template failed: {type(e).__name__}: {_one_line(e)}", where) from None

    def __repr__(self) -> str:
        return (f"Tokenizer(path={str(self.path)!r}, vocab_size={self._vocab_size}, "
                f"eos_token_ids={sorted(self.eos_token_ids)}, chat_template={self.has_chat_template})")


class StreamDecoder:
    """Incremental detokenisation of one generated sequence.

    ``push(id)`` returns the text the id completes (``""`` while a multi-byte character is still arriving
    in byte tokens); ``flush()`` returns what is left and resets. No piece ends in half a character, and
    the pieces concatenated equal ``tokenizer.decode(all_ids)``. The one exception is garbage: a run of
    byte-fallback tokens that starts as valid UTF-8 and then turns invalid, which ``decode`` shows as one
    U+FFFD per byte of the whole run after its valid start was already streamed.

    Each step decodes only the tokens of the last emitted piece (the context that the SentencePiece
    leading-space rules need) plus the ones held since, so a step costs the same at token 10 and at
    token 10,000.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = bool(skip_special_tokens)
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next push starts a new sequence."""
        self._prefix: list[int] = []  # tokens of the last emitted piece
        self._prefix_text = ""  # decode(self._prefix)
        self._held: list[int] = []  # tokens pushed since

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes."""
        (token_id,) = self._tokenizer._check_ids([token_id])
        self._held.append(token_id)
        text = self._decode(self._prefix + self._held)
        if len(text) <= len(self._prefix_text):
            return ""
        if text.endswith(_REPLACEMENT_CHAR):
            return ""  # a character still incomplete (or real garbage: shown once a later token completes)
        piece = text[len(self._prefix_text):]
        self._prefix, self._held = self._held, []
        self._prefix_text = self._decode(self._prefix)
        return piece

    def flush(self) -> str:
        """Return whatever text is still held (an unfinished character decodes to U+FFFD) and reset."""
        text = self._decode(self._prefix + self._held)
        piece = text[len(self._prefix_text):] if len(text) > len(self._prefix_text) else ""
        self.reset()
        return piece


__all__ = ["Tokenizer", "StreamDecoder", "SPECIAL_TOKEN_ATTRIBUTES"]
