"""The tokenizer against transformers' AutoTokenizer: encode, decode, streaming, eos ids, chat templates.

Reference tokenizers: the real stories260K checkpoint (SentencePiece-style BPE, ``LlamaTokenizer``) and
two tokenizers trained here with the ``tokenizers`` library on a few sentences with non-ASCII text:
a byte-level BPE and a Metaspace BPE with byte fallback, each under two ``tokenizer_class`` values
(transformers treats ``LlamaTokenizer`` specially).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgelora.errors import FormatError, UnsupportedError, UsageError
from edgelora.runtime.tokenizer import StreamDecoder, Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CORPUS = [
    "Once upon a time there was a little cat who liked to sit in the sun.",
    "The cat said: hello, world! How are you today?",
    "She drank a café au lait at the café near the station.",
    "Naïve résumé, déjà vu, façade, jalapeño and crème brûlée.",
    "日本語のテキストも少しあります。東京は大きい。",
    "Emoji time 🙂 🚀 👍🏽 and a family 👨‍👩‍👧 too.",
    "Numbers 12345 and 3.14159, tabs\tand  double  spaces,\nnew lines\n\nand more.",
    "def main():\n    return {'key': [1, 2, 3]}\n",
] * 3

TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(turns=0) %}"
    "{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
    "{% for message in messages %}\n"
    "    {% if message['role'] == 'system' %}\n"
    "        {% if not loop.first %}{% continue %}{% endif %}\n"
    "<<SYS>>{{ message['content'] | trim }}<</SYS>>\n"
    "    {% elif message['role'] == 'user' %}\n"
    "        {% set ns.turns = ns.turns + 1 %}\n"
    "<|user|>{{ message['content'] }}\n"
    "    {% elif message['role'] == 'assistant' %}\n"
    "<|assistant|>{{ message['content'] }}{{ eos_token }}\n"
    "    {% else %}\n"
    "        {{ raise_exception('Unknown role: ' + message['role']) }}\n"
    "    {% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "<|assistant|>{% if enable_thinking is defined and enable_thinking %}<think>{% endif %}\n"
    "{% endif %}"
    "[{{ ns.turns }} user turns]"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And <b>café</b> & 日本語 🙂?"}],
    [{"role": "system", "content": "First"}, {"role": "system", "content": "dropped by {% continue %}"},
     {"role": "user", "content": "hi", "name": None}],
]

SAMPLE_TEXTS = [
    "", " ", "  ", "\n", "Hello world", " Hello", "Hello ", "  leading and trailing  ",
    "Once upon a time, there was a cat.", "café", "naïve déjà vu", "日本語", "日本語のテキスト", "🙂", "👨‍👩‍👧",
    "👍🏽 ok", "tabs\tand\nnewlines\r\n", "e\u0301 combining", "zero\u200bwidth", "\x00 control \x7f",
    "<s>", "</s>", "<unk>", "<s>hi</s> there <unk>", "x</s>  y", "<|user|>Hi<|assistant|>Hello</s>",
    "▁already▁marked", "ÿ þ ð", "Ω≈ç√∫", "mixed 日本 and café 🚀!", "a" * 300, "1234567890" * 5,
]


# --------------------------------------------------------------------------------------------
# Reference tokenizers
# --------------------------------------------------------------------------------------------

def train_byte_level() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def train_byte_fallback() -> tokenizers.Tokenizer:
    """A Llama-style BPE: Metaspace pre-tokenizer, <0xNN> tokens for characters outside the vocabulary.

    Trained on the whole corpus, then every token with a character beyond Latin (the Japanese text, the
    emoji) is dropped with its merges, so those characters fall back to bytes. (The trainer's
    ``limit_alphabet`` would do it too, but breaks frequency ties in hash order: not reproducible.)"""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]):
        if all(ord(c) <= 0x24F or c == "▁" for c in t):
            vocab.setdefault(t, len(vocab))
    merges = [m for m in spec["model"]["merges"] if "".join(m) in vocab and m[0] in vocab and m[1] in vocab]
    spec["model"].update(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True)
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def write_model_dir(d: Path, tok: tokenizers.Tokenizer, tokenizer_config: dict | None,
                    generation_config: dict | None = None, config: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    if tokenizer_config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    if generation_config is not None:
        (d / "generation_config.json").write_text(json.dumps(generation_config))
    (d / "config.json").write_text(json.dumps(config if config is not None else {"model_type": "llama"}))
    return d


def base_config(cls: str, **extra) -> dict:
    return {"tokenizer_class": cls, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "clean_up_tokenization_spaces": False, "model_max_length": 512, **extra}


VARIANTS = {  # name: (trainer, tokenizer_class, model_type)
    "bytelevel": (train_byte_level, "PreTrainedTokenizerFast", "llama"),
    "bytelevel_llama_class": (train_byte_level, "LlamaTokenizer", "llama"),  # byte-level: the file is kept
    "bytelevel_qwen2": (train_byte_level, "PreTrainedTokenizerFast", "qwen2"),  # rebuilt: Qwen2 regex, NFC
    "fallback_llama_class": (train_byte_fallback, "LlamaTokenizer", "llama"),  # rebuilt: prepend "first"
    "fallback_fast": (train_byte_fallback, "PreTrainedTokenizerFast", "llama"),  # the file as it is
    "fallback_mistral": (train_byte_fallback, "LlamaTokenizer", "mistral"),  # mistral: the file as it is
}


@pytest.fixture(scope="module")
def trained_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trained")
    trained = {fn: fn() for fn in {v[0] for v in VARIANTS.values()}}
    return {name: write_model_dir(root / name, trained[fn], base_config(cls, chat_template=TEMPLATE),
                                  generation_config={"bos_token_id": 1, "eos_token_id": [2, 4]},
                                  config={"model_type": model_type})
            for name, (fn, cls, model_type) in VARIANTS.items()}


@pytest.fixture(scope="module", params=["stories260k", *VARIANTS])
def pair(request, trained_dirs) -> tuple[Tokenizer, object, Path]:
    """(ours, transformers', folder) for each reference tokenizer."""
    if request.param == "stories260k":
        path = request.getfixturevalue("stories260k")
    else:
        path = trained_dirs[request.param]
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path), path


@pytest.fixture(scope="module", params=list(VARIANTS))
def chat_pair(request, trained_dirs) -> tuple[Tokenizer, object]:
    """(ours, transformers') for the trained tokenizers, whose tokenizer_config.json holds TEMPLATE."""
    path = trained_dirs[request.param]
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)


def hf_ids(ref, text: str, add_special_tokens: bool = True) -> list[int]:
    return ref(text, add_special_tokens=add_special_tokens)["input_ids"]


def is_byte_token(tok: Tokenizer, i: int) -> bool:
    t = tok.id_to_token(i)
    return t is not None and len(t) == 6 and t.startswith("<0x") and t.endswith(">")


# --------------------------------------------------------------------------------------------
# encode / decode
# --------------------------------------------------------------------------------------------

def test_reference_tokenizers_exercise_byte_fallback(trained_dirs):
    tok = Tokenizer.from_dir(trained_dirs["fallback_fast"])
    ids = tok.encode("日本語 🙂", add_special_tokens=False)
    assert sum(is_byte_token(tok, i) for i in ids) == 13  # 3 x 3 + 4 bytes: not in the vocabulary
    assert not any(is_byte_token(tok, i) for i in tok.encode("café naïve", add_special_tokens=False))


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_and_decode_equal_transformers(pair, add_special_tokens):
    ours, ref, _ = pair
    for text in SAMPLE_TEXTS:
        ids = hf_ids(ref, text, add_special_tokens)
        assert ours.encode(text, add_special_tokens=add_special_tokens) == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text


def test_the_rebuilding_classes_differ_from_the_file(trained_dirs):
    """The variants really exercise transformers' rebuilds: LlamaTokenizer does not prepend '▁' after a
    special token (the file's pipeline does), Qwen2Tokenizer splits digits one by one."""
    def enc(name, text):
        return Tokenizer.from_dir(trained_dirs[name]).encode(text)

    assert enc("fallback_llama_class", "<|user|>hello</s>there") != enc("fallback_fast", "<|user|>hello</s>there")
    assert enc("fallback_mistral", "<|user|>hello</s>there") == enc("fallback_fast", "<|user|>hello</s>there")
    assert enc("bytelevel_qwen2", "Numbers 12345") != enc("bytelevel", "Numbers 12345")
    assert enc("bytelevel_llama_class", "Numbers 12345") == enc("bytelevel", "Numbers 12345")


def test_bos_comes_from_the_post_processor_not_add_bos_token(tmp_path, stories260k):
    """transformers drops add_bos_token/add_eos_token from tokenizer_config.json when tokenizer.json exists."""
    d = tmp_path / "m"
    shutil.copytree(stories260k, d, ignore=shutil.ignore_patterns("*.safetensors", "*.model"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(add_bos_token=False, add_eos_token=True)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref = transformers.AutoTokenizer.from_pretrained(d)
    ours = Tokenizer.from_dir(d)
    assert ours.encode("hi there") == hf_ids(ref, "hi there")
    assert ours.encode("hi there")[0] == 1 and ours.encode("hi there")[-1] != 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40) | st.text(alphabet="ab é日🙂<s>/\n\t ", max_size=30))
def test_hypothesis_text_equals_transformers(pair, text):
    ours, ref, _ = pair
    ids = hf_ids(ref, text)
    assert ours.encode(text) == ids
    assert ours.encode(text, add_special_tokens=False) == hf_ids(ref, text, False)
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hypothesis_arbitrary_ids_decode_equals_transformers(pair, data):
    ours, ref, _ = pair
    ids = data.draw(st.lists(st.integers(0, ours.vocab_size - 1), max_size=30))
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_bad_arguments(pair):
    ours = pair[0]
    with pytest.raises(UsageError):
        ours.encode(b"bytes")
    with pytest.raises(UsageError, match="surrogate"):
        ours.encode("lone \ud800 surrogate")
    with pytest.raises(UsageError, match="outside the vocabulary"):
        ours.decode([ours.vocab_size])
    with pytest.raises(UsageError):
        ours.decode([-1])
    with pytest.raises(UsageError):
        ours.decode(["a"])


# --------------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------------

def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    dec = tok.stream_decoder(skip_special_tokens=skip_special_tokens)
    pieces = [dec.push(i) for i in ids]
    return pieces + [dec.flush()]


def test_stream_equals_decode(pair):
    ours = pair[0]
    for text in SAMPLE_TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            for skip in (False, True):
                pieces = stream(ours, ids, skip)
                assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip), (text, ids)
                assert not any("\ufffd" in p for p in pieces), (text, pieces)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=40))
def test_hypothesis_stream_equals_decode(pair, text):
    ours = pair[0]
    ids = ours.encode(text, add_special_tokens=False)
    pieces = stream(ours, ids)
    assert "".join(pieces) == ours.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[-1] == ""  # every character was complete before the stream ended


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hypothesis_stream_of_arbitrary_ids_byte_level(trained_dirs, data):
    """Byte-level decoding is lossy UTF-8 of the joined bytes: streaming is exact for any ids."""
    tok = Tokenizer.from_dir(trained_dirs["bytelevel"])
    ids = data.draw(st.lists(st.integers(5, tok.vocab_size - 1), max_size=25))
    assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_stream_with_a_real_replacement_character(pair):
    """A U+FFFD that is really in the text is held like an unfinished character, then comes out."""
    ours = pair[0]
    ids = ours.encode("a \ufffd b \ufffd", add_special_tokens=False)
    assert "".join(stream(ours, ids)) == ours.decode(ids)


def test_stream_holds_split_characters_until_complete(pair):
    ours = pair[0]
    for text in ["日本語", "a 🙂 b", "x👍🏽", "café 日本"]:
        ids = ours.encode(text, add_special_tokens=False)
        dec = ours.stream_decoder()
        out = ""
        for i in ids:
            piece = dec.push(i)
            assert "\ufffd" not in piece
            out += piece
            assert ours.decode(ids).startswith(out)
        assert dec.flush() == ""
        assert out == ours.decode(ids)


def test_stream_byte_fallback_pieces(stories260k):
    """stories260K has no '日': three byte tokens, held until the third arrives; '▁' handling at the start."""
    tok = Tokenizer.from_dir(stories260k)
    ids = tok.encode("日 cat", add_special_tokens=False)
    first3 = ids[:3] if is_byte_token(tok, ids[0]) else ids[1:4]
    assert all(is_byte_token(tok, i) for i in first3), [tok.id_to_token(i) for i in ids]
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    emitted = [p for p in pieces if p]
    assert emitted[0] == "日" and "".join(emitted) == "日 cat" == tok.decode(ids)
    assert pieces[ids.index(first3[2])] == "日" and pieces[ids.index(first3[1])] == ""
    # the first word keeps no leading space, later words keep theirs
    ids = tok.encode("Once upon a time", add_special_tokens=False)
    pieces = stream(tok, ids)
    assert pieces[0] == "Once" and "".join(pieces) == "Once upon a time"
    assert any(p.startswith(" ") for p in pieces[1:])


def test_stream_flush_returns_an_unfinished_character_and_resets(stories260k):
    tok = Tokenizer.from_dir(stories260k)
    ids = tok.encode("日", add_special_tokens=False)
    byte_ids = [i for i in ids if is_byte_token(tok, i)]
    dec = StreamDecoder(tok)
    assert dec.push(byte_ids[0]) == "" and dec.push(byte_ids[1]) == ""
    assert dec.flush() == tok.decode(ids[:ids.index(byte_ids[1]) + 1])
    assert "\ufffd" in tok.decode(byte_ids[:2])
    assert dec.push(tok.encode("cat", add_special_tokens=False)[0]) != ""  # fresh sequence after flush


# --------------------------------------------------------------------------------------------
# eos / bos ids
# --------------------------------------------------------------------------------------------

def test_eos_and_bos_from_stories260k(stories260k):
    tok = Tokenizer.from_dir(stories260k)
    assert tok.eos_token_ids == {2} and tok.bos_token_id == 1
    assert tok.eos_token == "</s>" and tok.bos_token == "<s>"


@pytest.mark.parametrize("gen, config, expected_eos, expected_bos", [
    ({"eos_token_id": [2, 4], "bos_token_id": 1}, {"model_type": "llama", "eos_token_id": 3}, {2, 4}, 1),
    ({"eos_token_id": 4}, {"model_type": "llama", "eos_token_id": 3, "bos_token_id": 0}, {4}, 0),
    (None, {"model_type": "llama", "eos_token_id": [3, 2]}, {2, 3}, 1),  # bos from the "<s>" token
    ({"do_sample": False}, {"model_type": "llama"}, {2}, 1),  # from eos_token "</s>" in tokenizer_config
])
def test_eos_ids_sources(tmp_path, gen, config, expected_eos, expected_bos):
    d = write_model_dir(tmp_path / "m", train_byte_level(), base_config("PreTrainedTokenizerFast"), gen, config)
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token_ids == expected_eos and tok.bos_token_id == expected_bos


def test_eos_id_of_wrong_type_is_a_format_error(tmp_path):
    d = write_model_dir(tmp_path / "m", train_byte_level(), base_config("PreTrainedTokenizerFast"),
                        {"eos_token_id": "</s>"})
    with pytest.raises(FormatError, match="generation_config.json.*eos_token_id"):
        Tokenizer.from_dir(d)


def test_special_tokens_from_config_are_added_like_transformers(tmp_path):
    """A special token named in tokenizer_config.json but absent from tokenizer.json becomes an added token."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end|>", "pad_token": "<|pad|>",
           "extra_special_tokens": ["<|tool|>"], "image_token": "<|img|>"}
    d = write_model_dir(tmp_path / "m", tok, cfg)
    ours, ref = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    text = "hi<|end|>x<|pad|> <|tool|><|img|>"
    assert ours.encode(text) == hf_ids(ref, text)
    assert ours.vocab_size == len(ref)
    assert ours.eos_token_ids == {ours.token_to_id("<|end|>")}
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == ref.decode(hf_ids(ref, text),
                                                                                 skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# chat templates
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(chat_pair, conversation, add_generation_prompt):
    ours, ref = chat_pair
    messages = CONVERSATIONS[conversation]
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == expected
    assert "<|user|>" in text and text.startswith("<s>") and text.endswith("user turns]")
    assert text.rstrip("[]0123456789 usertn").endswith("<|assistant|>") == add_generation_prompt
    ref_ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    ref_ids = ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids
    assert ours.encode(text, add_special_tokens=False) == list(ref_ids)


def test_chat_template_tools_kwargs_and_tojson(chat_pair):
    ours, ref = chat_pair
    tools = [{"type": "function", "function": {"name": "weather", "description": "Météo <html> & \"quotes\"",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = CONVERSATIONS[1]
    for kwargs in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
        expected = ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                           **kwargs)
        assert ours.apply_chat_template(messages, tools=tools, **kwargs) == expected
    assert "Météo <html> &" in ours.apply_chat_template(messages, tools=tools)  # no HTML escaping
    assert "<think>" in ours.apply_chat_template(messages, enable_thinking=True)


def test_named_templates_and_jinja_file(tmp_path):
    named = [{"name": "default", "template": "D{% for m in messages %}[{{ m.content }}]{% endfor %}"},
             {"name": "tool_use",
              "template": "T{{ tools | length if tools else 0 }}{% for m in messages %}{{ m.role }}{% endfor %}"}]
    d = write_model_dir(tmp_path / "named", train_byte_level(), base_config("PreTrainedTokenizerFast",
                                                                            chat_template=named))
    ours, ref = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    msgs = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False,
                                                                     add_generation_prompt=True) == "D[hi]"
    assert ours.apply_chat_template(msgs, tools=tools) == "T1user" == ref.apply_chat_template(
        msgs, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(msgs, chat_template="tool_use") == "T0user"
    # chat_template.jinja wins over tokenizer_config.json
    (d / "chat_template.jinja").write_text("J{{ messages[0].content }}{{ eos_token }}", encoding="utf-8")
    ours, ref = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.apply_chat_template(msgs) == "Jhi</s>" == ref.apply_chat_template(msgs, tokenize=False,
                                                                                 add_generation_prompt=True)


def test_generation_tag_and_strftime(tmp_path):
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}|{{ strftime_now('%Y') }}")
    d = write_model_dir(tmp_path / "g", train_byte_level(), base_config("PreTrainedTokenizerFast",
                                                                        chat_template=template))
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    ref = transformers.AutoTokenizer.from_pretrained(d)
    assert Tokenizer.from_dir(d).apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False,
                                                                                      add_generation_prompt=True)


def test_no_chat_template_is_unsupported(stories260k):
    tok = Tokenizer.from_dir(stories260k)
    assert not tok.has_chat_template
    with pytest.raises(UnsupportedError) as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    msg = str(e.value)
    assert "no chat template" in msg and "generate()" in msg and str(stories260k) in msg and "\n" not in msg


@pytest.mark.parametrize("messages, fragment", [
    ("hello", "non-empty list"),
    ([], "non-empty list"),
    ([["user", "hi"]], "messages[0] must be a dict"),
    ([{"content": "hi"}], "messages[0] needs a non-empty string 'role'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant"}], "messages[1] (assistant) needs a string 'content'"),
    ([{"role": "user", "content": 3}], "needs a string 'content'"),
    ([{"role": "user", "content": None}], "needs a string 'content'"),
])
def test_bad_messages_are_usage_errors(trained_dirs, messages, fragment):
    tok = Tokenizer.from_dir(trained_dirs["bytelevel"])
    with pytest.raises(UsageError) as e:
        tok.apply_chat_template(messages)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_template_errors(trained_dirs, tmp_path):
    tok = Tokenizer.from_dir(trained_dirs["bytelevel"])
    with pytest.raises(UsageError, match="rejected the messages: Unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(UsageError, match="tools must be a list"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], tools="weather")
    d = write_model_dir(tmp_path / "syntax", train_byte_level(),
                        base_config("PreTrainedTokenizerFast", chat_template="{% for m in messages %}{{ m }"))
    with pytest.raises(FormatError, match="tokenizer_config.json.*syntax error"):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}])
    broken = write_model_dir(tmp_path / "broken", train_byte_level(), base_config(
        "PreTrainedTokenizerFast", chat_template="{{ messages | length + none }}"))
    with pytest.raises(FormatError, match="tokenizer_config.json: chat template failed: TypeError"):
        Tokenizer.from_dir(broken).apply_chat_template([{"role": "user", "content": "x"}])
    sandbox = write_model_dir(tmp_path / "sandbox", train_byte_level(), base_config(
        "PreTrainedTokenizerFast", chat_template="{{ messages.__class__.__mro__ }}"))
    with pytest.raises((FormatError, UsageError)):
        Tokenizer.from_dir(sandbox).apply_chat_template([{"role": "user", "content": "x"}])


# --------------------------------------------------------------------------------------------
# malformed folders
# --------------------------------------------------------------------------------------------

def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FormatError, match="no tokenizer.json") as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                  "config.json"])
def test_malformed_json_names_the_file(tmp_path, name):
    d = write_model_dir(tmp_path / "m", train_byte_level(), base_config("PreTrainedTokenizerFast"),
                        {"eos_token_id": 2})
    (d / name).write_text('{"model": {"type": "BPE", ', encoding="utf-8")
    with pytest.raises(FormatError) as e:
        Tokenizer.from_dir(d)
    assert str(d / name) in str(e.value) and "malformed JSON" in str(e.value) and "\n" not in str(e.value)


def test_invalid_tokenizer_file(tmp_path):
    d = write_model_dir(tmp_path / "m", train_byte_level(), None)
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(FormatError, match="tokenizer.json.*not a valid tokenizers file"):
        Tokenizer.from_dir(d)
    (d / "tokenizer.json").write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(FormatError, match="tokenizer.json"):
        Tokenizer.from_dir(d)


def test_bad_chat_template_type(tmp_path):
    d = write_model_dir(tmp_path / "m", train_byte_level(), base_config("PreTrainedTokenizerFast",
                                                                        chat_template=42))
    with pytest.raises(FormatError, match="tokenizer_config.json.*chat_template"):
        Tokenizer.from_dir(d)


def test_without_tokenizer_config(tmp_path):
    d = write_model_dir(tmp_path / "m", train_byte_level(), None, {"eos_token_id": 2})
    tok, ref = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    assert tok.encode("Hello café") == hf_ids(ref, "Hello café")
    assert tok.eos_token_ids == {2} and not tok.has_chat_template
