"""The CLIP tokenizer gives transformers' CLIPTokenizer ids on the same BPE files; prompt tables.

No real CLIP vocabulary can be downloaded here, so the test trains a small byte-level BPE (the
``tokenizers`` library, CLIP's normaliser and word split, ``</w>`` suffix) on the prompt sentences
of every method plus odd strings, writes it in the three file forms a CLIP checkpoint directory
may hold (Hugging Face vocab.json + merges.txt, tokenizer.json, OpenAI's gzipped merges), and
compares our ids with ``transformers.CLIPTokenizer`` loaded from the Hugging Face files.
transformers 5 has no Python ("slow") CLIPTokenizer any more: the reference is the
tokenizers-backed one. It does not do OpenAI's ftfy / HTML cleaning, so texts that need that
cleaning are compared with transformers on the cleaned text written out by hand.
"""

import gzip
import json
import random
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
from extras import optional

from zsad_jax import prompts
from zsad_jax.data.protocol import (
    BTAD_CATEGORIES,
    MPDD_CATEGORIES,
    MVTEC_AD_CATEGORIES,
    VISA_CATEGORIES,
)
from zsad_jax.encoders import tokenizer as tk

# None without the convert extra (transformers brings tokenizers and regex); the tests that use
# them are marked torch (tests/extras.py).
regex = optional("regex")
tokenizers = optional("tokenizers")
transformers = optional("transformers")
hf_byte_table = optional("transformers.convert_slow_tokenizer")

ODD_TEXTS = [
    "",
    "   ",
    ".",
    "a",
    "A Photo Of A METAL_NUT.",
    "metal_nut pipe_fryum pcb1 macaroni2 chewinggum",
    "punctuation!!! ?? ... --- ;: ,, (brackets) [x] {y} <z> @#$%^*+=~`|\\/",
    "digits 0123456789 3.14159 1,000,000 -42 1e-5 2026",
    "it's don't we're I've I'm you'll he'd can't rock'n'roll O'Neil 's ''s '' 'S IT'S",
    "the letters 'FF' engraved and \"double\" quotes",
    "naïve café résumé Zürich São Paulo ŁÓDŹ ångström",
    "e\u0301 cafe\u0301 (combining accents, NFC composes them)",
    "ελληνικά κείμενα, русский текст, українська",
    "日本語のテキスト 中文文本 한국어 텍스트",
    "emoji 👍🏽 👩‍👩‍👧 🇩🇪 ❤️ 🙂",
    "مرحبا بالعالم עברית",
    "हिन्दी भाषा ภาษาไทย",
    "Ⅻ ½ ² ① µ Å K Ω ß ẞ",
    "tabs\tand\nnew\r\nlines\u00a0nbsp\u2003em\u2028sep",
    "x <|endoftext|> y <|startoftext|> z",
    "x<|endoftext|>y",
    "aaaaaaaaaa abababab mississippi bananas",
    "very long " + " ".join(f"word{i} token{i}" for i in range(60)),
    "a" * 120,
]

# OpenAI cleans text with ftfy and html.unescape, transformers does not: (raw, what it cleans to).
CLEANED_TEXTS = [
    ("a &amp; b &lt;3 &#39;s &quot;q&quot;", 'a & b <3 \'s "q"'),
    ("double escaped &amp;amp; &amp;lt;", "double escaped & <"),
    ("many times &amp;amp;amp;amp; x", "many times & x"),  # ftfy unescapes to a fixed point
    ("<b>&amp;amp;amp;</b>", "<b>&amp;</b>"),  # ...but not text with "<": only OpenAI's two
    ("it&rsquo;s &ldquo;ok&rdquo;", 'it\'s "ok"'),  # ftfy unescapes, then uncurls
    (
        "it\u2019s a \u201cgood\u201d \u2018photo\u2019 \u201e\u201f \u02bc",
        "it's a \"good\" 'photo' \"\" '",
    ),
    ("\ufb01ne \ufb02at \ufb00 \ufb03 \ufb04 \u0133 \u01c6", "fine flat ff ffi ffl ij d\u017e"),
    (
        "\uff21\uff22\uff23\uff11\uff12\uff13\uff01\u3000\uff08x\uff09",
        unicodedata.normalize("NFKC", "\uff21\uff22\uff23\uff11\uff12\uff13\uff01") + " (x)",
    ),
    ("a\x00b\x07\x7f c\ufeff\u206a d\ufffc", "ab c d"),
    ("\x1b[31mred\x1b[0m text", "red text"),
    ("\u039f\u0394\u039f\u03a3 \u03a3\u0391\u03a3", "\u03bf\u03b4\u03bf\u03c2 \u03c3\u03b1\u03c2"),
    ("a\ud800b \ud83d\ude00", "a\ufffdb \U0001f600"),
]

FUZZ_POOL = (
    list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789     '\".,-!?()[]{}<>|/\\_+=*#@$%^~`;:")
    + list("éèüößçñåøłğşčžœæ αβγδεζηθλμπσςω абвгдеёжзиклмнопрст 日本語中文한국어")
    + list("٠١٢ अआइ ก ๑ ½²Ⅻ 👍🏽🙂❤️\u200d\u0301\u0308")
)


def _train_merges(corpus: list[str], vocab_size: int) -> list[tuple[str, str]]:
    """A byte-level BPE with CLIP's normaliser, word split and ``</w>`` suffix, as merges."""
    # No files: only its normaliser and pre-tokenizer are used.
    template = transformers.CLIPTokenizer()
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = template.backend_tokenizer.normalizer
    bpe.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
    )
    bpe.train_from_iterator(corpus, trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def _clip_vocab(merges):
    """CLIP's vocabulary layout, built from transformers' GPT-2 byte table (not from our module)."""
    symbols = list(hf_byte_table.bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens)
    return vocab


def _prompt_texts() -> list[str]:
    texts = list(prompts.AF_CLIP_STATES) + list(prompts.object_agnostic_prompts())
    for name in MVTEC_AD_CATEGORIES + VISA_CATEGORIES:
        for part in (*prompts.ensemble_sentences(name), *prompts.acd_clip_sentences(name)):
            texts += part
        texts += sum(prompts.ensemble_sentences(name.replace("_", " ")), [])
    for name in [*MPDD_CATEGORIES, *BTAD_CATEGORIES, *prompts.REAL_NAMES, "object"]:
        texts += sum(prompts.acd_clip_sentences(name), [])
    return list(dict.fromkeys(texts))


def _fuzz_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(FUZZ_POOL, k=rng.randint(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    corpus = _prompt_texts() + ODD_TEXTS + _fuzz_texts(300, seed=1)
    merges = _train_merges(corpus, vocab_size=2500)
    root = tmp_path_factory.mktemp("clip_bpe")
    hf_dir, openai_dir, json_dir = root / "hf", root / "openai", root / "json"
    for d in (hf_dir, openai_dir, json_dir):
        d.mkdir()
    (hf_dir / "vocab.json").write_text(json.dumps(_clip_vocab(merges)), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (hf_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # OpenAI's file: a header line, then merges only (the real one's header is the name + version).
    with gzip.open(openai_dir / tk.OPENAI_BPE_FILE, "wt", encoding="utf-8") as f:
        f.write("\n".join(["bpe_simple_vocab_16e6.txt#version: 0.2"] + lines[1:]) + "\n")
    hf = transformers.CLIPTokenizer.from_pretrained(str(hf_dir))
    hf.backend_tokenizer.save(str(json_dir / "tokenizer.json"))
    return {"merges": merges, "hf_dir": hf_dir, "openai_dir": openai_dir, "json_dir": json_dir}


@pytest.fixture(scope="module")
def hf(files):
    return transformers.CLIPTokenizer.from_pretrained(str(files["hf_dir"]))


@pytest.fixture(scope="module")
def ours(files):
    return tk.ClipTokenizer.from_dir(files["hf_dir"])


def _hf_ids(hf, texts, context_length=77, *, with_mask=False):
    out = hf(texts, padding="max_length", max_length=context_length, truncation=True)
    ids, mask = np.asarray(out["input_ids"]), np.asarray(out["attention_mask"])
    return (ids, mask) if with_mask else ids


def _assert_same_as_hf(ours, hf, texts, context_length=77):
    ref, real = _hf_ids(hf, texts, context_length, with_mask=True)
    got_hf_pad = ours(texts, context_length, truncate=True, pad_id=ours.eot_id)
    got = ours(texts, context_length, truncate=True)
    assert got.dtype == np.int32 and got.shape == (len(texts), context_length)
    bad = [t for t, a, b in zip(texts, got_hf_pad, ref, strict=True) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ from transformers, e.g. {bad[:3]!r}"
    # Zero padding (OpenAI's): the same ids where transformers' attention mask is on, zeros after.
    np.testing.assert_array_equal(np.where(real == 1, ref, 0), got)


@pytest.mark.torch
def test_vocabulary_layout_is_clips(files, ours):
    symbols = list(hf_byte_table.bytes_to_unicode().values())
    assert tk.base_symbols() == symbols
    assert tk.openai_vocab(files["merges"]) == _clip_vocab(files["merges"])
    assert ours.vocab_size == 512 + len(files["merges"]) + 2
    assert (ours.sos_id, ours.eot_id) == (ours.vocab_size - 2, ours.vocab_size - 1)


@pytest.mark.torch
def test_prompts_of_every_method_match_transformers(ours, hf):
    texts = _prompt_texts()
    assert len(texts) > 5000
    _assert_same_as_hf(ours, hf, texts)


@pytest.mark.torch
def test_odd_inputs_match_transformers(ours, hf):
    _assert_same_as_hf(ours, hf, ODD_TEXTS)
    _assert_same_as_hf(ours, hf, ODD_TEXTS, context_length=16)


@pytest.mark.torch
def test_random_strings_match_transformers(ours, hf):
    _assert_same_as_hf(ours, hf, _fuzz_texts(3000))


@pytest.mark.torch
def test_openai_and_tokenizer_json_files_give_the_same_ids(files, ours):
    texts = _prompt_texts()[::7] + ODD_TEXTS + _fuzz_texts(300, seed=2)
    reference = ours(texts, truncate=True)
    for key in ("openai_dir", "json_dir"):
        other = tk.ClipTokenizer.from_dir(files[key])
        assert other.encoder == ours.encoder, key
        np.testing.assert_array_equal(other(texts, truncate=True), reference, err_msg=key)


@pytest.mark.torch
def test_openai_file_reads_only_its_first_merges(tmp_path, files):
    # OpenAI's SimpleTokenizer keeps 48,894 merges of a 262k-line file; num_merges does the same.
    path = tmp_path / "merges.txt.gz"
    lines = ["header"] + [f"{a} {b}" for a, b in files["merges"]]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines))
    assert tk.read_openai_bpe(path) == files["merges"]
    assert tk.read_openai_bpe(path, num_merges=100) == files["merges"][:100]
    assert tk.OPENAI_NUM_MERGES + 512 + 2 == 49408


@pytest.mark.torch
def test_truncation_keeps_eot_or_raises_naming_the_text(ours, hf):
    long_text = "a photo of a very long description " * 20
    ids = ours([long_text, "short"], truncate=True)
    assert ids[0, -1] == ours.eot_id and ids[0, 0] == ours.sos_id
    np.testing.assert_array_equal(ids[0], _hf_ids(hf, [long_text])[0])
    with pytest.raises(ValueError, match="very long description"):
        ours([long_text])
    fits = ours.encode("word " * 75)
    assert len(fits) == 75
    ours(["word " * 75])  # 75 + SOS + EOT = 77 fits exactly
    with pytest.raises(ValueError, match="78 tokens"):
        ours(["word " * 76])


@pytest.mark.torch
def test_eot_pooling_position_with_either_padding(ours):
    texts = ["without defect.", "with defect.", "", "a photo of a dark bottle."]
    for pad_id in (0, ours.eot_id):
        ids = ours(texts, pad_id=pad_id)
        lengths = [len(ours.encode(t)) + 2 for t in texts]
        np.testing.assert_array_equal(np.argmax(ids, axis=1), np.array(lengths) - 1)


@pytest.mark.torch
def test_cleaning_follows_openai(ours, hf):
    raws, cleaned = (list(texts) for texts in zip(*CLEANED_TEXTS, strict=True))
    np.testing.assert_array_equal(ours(raws, pad_id=ours.eot_id), _hf_ids(hf, cleaned))
    assert tk.clean_text("  A \t\n B  ") == "a b"


@pytest.mark.torch
def test_special_token_text_maps_to_special_ids(ours):
    assert ours.encode("<|endoftext|>") == [ours.eot_id]
    assert ours.encode("x <|startoftext|>") == ours.encode("x") + [ours.sos_id]


@pytest.mark.torch
def test_word_scanner_without_regex_module_matches_openai_pattern(monkeypatch, ours, hf):
    pattern = regex.compile(tk._WORD_PATTERN, regex.IGNORECASE)
    texts = [tk.clean_text(t) for t in _prompt_texts()[::5] + ODD_TEXTS + _fuzz_texts(1000)]
    for text in texts:
        assert tk._scan_words(text) == pattern.findall(text), text
    monkeypatch.setattr(tk, "_WORD_RE", None)
    fresh = tk.ClipTokenizer(ours.encoder, list(ours.ranks))
    np.testing.assert_array_equal(fresh(ODD_TEXTS, truncate=True), ours(ODD_TEXTS, truncate=True))
    _assert_same_as_hf(fresh, hf, _fuzz_texts(200, seed=3))


@pytest.mark.torch
def test_decode_matches_transformers(ours, hf):
    texts = _prompt_texts()[::50] + ["naïve café 日本語 👍🏽"]
    for row, text in zip(ours(texts), texts, strict=True):
        expected = hf.decode(hf(text)["input_ids"], skip_special_tokens=True)
        assert ours.decode(row) == expected


@pytest.mark.torch
def test_bad_files_and_inputs_raise_helpful_errors(tmp_path, files, ours):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        tk.ClipTokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        tk.ClipTokenizer.from_files(files["hf_dir"] / "vocab.json")
    vocab, merges = dict(ours.encoder), list(ours.ranks)
    without_eot = {k: v for k, v in vocab.items() if k != "<|endoftext|>"}
    with pytest.raises(ValueError, match="lacks"):
        tk.ClipTokenizer(without_eot, merges)
    with pytest.raises(ValueError, match="largest id"):
        tk.ClipTokenizer({**vocab, "extra": len(vocab)}, merges)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tk.ClipTokenizer(vocab, merges + [("q", "zzz</w>")])
    bad_merges = tmp_path / "merges.txt"
    bad_merges.write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        tk.read_hf_files(files["hf_dir"] / "vocab.json", bad_merges)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        ours(["ok", 3])
    with pytest.raises(ValueError, match="pad_id"):
        ours(["ok"], pad_id=ours.eot_id + 1)


def _byte_tokenizer_files(folder) -> int:
    """CLIP's byte-level vocabulary (no merges) as vocab.json + merges.txt; returns its size."""
    vocab = tk.openai_vocab([])
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return len(vocab)


def test_a_converted_clip_refuses_a_tokenizer_past_its_text_embedding(tmp_path):
    """An id past the embedding reads no row: every text feature and loss would be NaN."""
    from zsad_jax.encoders import checkpoint

    size = _byte_tokenizer_files(tmp_path)
    for rows in (size - 1, size):
        meta = {
            "format": checkpoint.FORMAT,
            "type": "clip",
            "config": {"text": {"vocab_size": rows}},
        }
        (tmp_path / checkpoint.CONFIG_FILE).write_text(json.dumps(meta))
        if rows < size:
            with pytest.raises(ValueError) as refused:
                tk.ClipTokenizer.from_dir(tmp_path)
            message = str(refused.value)
            assert str(tmp_path / "vocab.json") in message and "\n" not in message
            assert f"largest token id is {size - 1}" in message and f"has {rows} token" in message
        else:
            assert tk.ClipTokenizer.from_dir(tmp_path).eot_id == rows - 1


def test_a_vocab_json_with_a_repeated_token_is_refused(tmp_path):
    _byte_tokenizer_files(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1, "a": 2}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"token 'a' appears twice \(ids 0 and 2\)"):
        tk.read_hf_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


def test_runtime_imports_neither_torch_nor_transformers():
    code = (
        "import sys, zsad_jax.encoders.tokenizer, zsad_jax.prompts; "
        "bad = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# Prompt tables (methods.md §1.4, §2.2, §3.5, §4)


def test_ensemble_prompts_as_in_spec():
    assert len(prompts.ENSEMBLE_NORMAL_STATES) == 7
    assert len(prompts.ENSEMBLE_ABNORMAL_STATES) == 5
    assert len(set(prompts.ENSEMBLE_TEMPLATES)) == 35
    assert prompts.ENSEMBLE_TEMPLATES[0] == "a bad photo of a {}."
    assert prompts.ENSEMBLE_TEMPLATES[-1] == "this is one {} in the scene."
    normal, abnormal = prompts.ensemble_sentences("metal_nut")
    assert (len(normal), len(abnormal)) == (245, 175)
    # State-major order, raw folder name kept.
    assert normal[:2] == ["a bad photo of a metal_nut.", "a low resolution photo of the metal_nut."]
    assert normal[35] == "a bad photo of a flawless metal_nut."
    assert abnormal[-1] == "this is one metal_nut with damage in the scene."


def test_acd_clip_prompts_and_real_names_as_in_spec():
    normal, abnormal = prompts.acd_clip_sentences("bottle")
    assert normal == [
        "dark bottle.",
        "a photo of dark bottle.",
        "a dark bottle.",
        "a photo of a dark bottle.",
        "the dark bottle.",
        "a photo of the dark bottle.",
    ]
    assert len(abnormal) == 10 and abnormal[:2] == [
        "a damaged dark bottle.",
        "a photo of a damaged dark bottle.",
    ]
    expected = {  # methods.md §3.5 examples
        "cable": "top view of three cables",
        "metal_nut": "metal nut which has four notched edges",
        "pill": "oval white pill with small red speckles and the letters 'FF' engraved",
        "pcb1": "dual ultrasonic distance sensor pcb module",
        "macaroni2": "scattered yellow macaroni",
        "fryum": "wheel-shaped fryum snack",
    }
    assert {k: prompts.REAL_NAMES[k] for k in expected} == expected
    for dataset, categories in [
        ("MVTec", MVTEC_AD_CATEGORIES),
        ("VisA", VISA_CATEGORIES),
        ("MPDD", MPDD_CATEGORIES),
        ("BTAD", BTAD_CATEGORIES),
    ]:
        assert sorted(prompts.ACD_CLIP_REAL_NAMES_BY_DATASET[dataset]) == sorted(categories)
    assert prompts.real_name("object") == "object"
    assert prompts.real_name("new_category") == "new category"


@pytest.mark.torch
def test_af_clip_and_object_agnostic_prompts_tokenise_as_used(ours):
    normal, abnormal = prompts.object_agnostic_prompts()
    assert normal == " ".join(["X"] * 12) + " object."
    assert abnormal == " ".join(["X"] * 12) + " damaged object."
    ids = ours([normal, abnormal])
    # The 12 learnt vectors replace the embeddings at positions 1..12 (one token per "X").
    (x_id,) = ours.encode("X")
    assert (ids[:, 1:13] == x_id).all() and (ids[:, 13] != x_id).all()
    assert prompts.object_agnostic_prompts(0) == ("object.", "damaged object.")
    assert prompts.AF_CLIP_STATES == ("without defect.", "with defect.")
    af = ours(list(prompts.AF_CLIP_STATES))
    np.testing.assert_array_equal(af[:, 0], ours.sos_id)
