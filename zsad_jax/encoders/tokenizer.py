"""CLIP's byte-level BPE tokenizer, offline and without torch or transformers.

``ClipTokenizer(texts) -> ids (N, 77) int32`` gives the ids of OpenAI's ``clip.tokenize`` (the
tokenizer every reproduced method's official code uses): ``[SOS, bpe ids..., EOT, 0, 0, ...]``.

Files it reads (whichever a converted CLIP checkpoint directory holds, see :meth:`from_dir`):

* Hugging Face ``vocab.json`` + ``merges.txt`` (``#version`` header, one ``"left right"`` merge a
  line, in rank order), or ``tokenizer.json`` (the same vocabulary and merges inside);
* OpenAI's ``bpe_simple_vocab_16e6.txt.gz``: a header line and then merges only. The vocabulary is
  derived from them as OpenAI's ``SimpleTokenizer`` does: the 256 byte symbols (printable bytes
  first, see :func:`base_symbols`), the same 256 with the end-of-word marker ``</w>``, the first
  48,894 merges joined, then ``<|startoftext|>`` and ``<|endoftext|>`` (ids 49406, 49407). For the
  real CLIP files this equals Hugging Face's ``vocab.json``.

Padding and EOT pooling: rows are padded with id 0 (OpenAI ``clip.tokenize`` and open_clip pad
with zeros; Hugging Face's ``padding="max_length"`` pads with its pad token, ``<|endoftext|>`` =
49407 for the OpenAI CLIP checkpoints; ``pad_id=tokenizer.eot_id`` reproduces that). The CLIP text
tower pools the token at ``argmax(ids)``; EOT is the largest id of a CLIP vocabulary (checked on
load), and argmax returns the first maximum, so the pooled position is the EOT with either padding.
The padding only changes the embeddings *after* the EOT, which the causal text tower never lets
reach it. (A literal ``<|endoftext|>`` inside a text becomes the EOT id, as in OpenAI's tokenizer,
and is then the pooled position.)

Text cleaning follows OpenAI's ``basic_clean`` + ``whitespace_clean`` + ``lower``: ftfy's
``fix_text``, ``html.unescape`` twice, whitespace runs collapsed to one space, stripped, lowercased.
ftfy is not a dependency; :func:`clean_text` does the parts of ``fix_text`` (ftfy 6 defaults) that
are context free, repeated until nothing changes as ftfy does: HTML entities ``&name;`` / ``&#n;``
unescaped unless the text contains "<", NFC normalisation, curly quotes to straight ones, Latin
ligatures split, half/full-width forms to normal width (U+3000 to a space), ANSI terminal escapes
and unintended control characters removed, surrogate pairs joined (lone ones become U+FFFD). Not
done: ftfy's mojibake repair (``fix_encoding``, ``fix_c1_controls``: re-decoding text that was
decoded with the wrong codec) and its upper-case entity names (``&EACUTE;``). Hugging Face's
tokenizer does none of ftfy's fixes nor the HTML unescape (only NFC, whitespace, lowercase), so the
two differ on text with HTML entities, curly quotes, ligatures, full-width characters or control
characters; prompts contain none of them.

Words are split with OpenAI's pattern (``regex`` module, case-insensitive as OpenAI compiles it).
Without the ``regex`` module a scanner over ``unicodedata`` categories does the same split; it
differs from the regex only on characters that are not letters but whose case variants are (e.g.
U+0345), which it treats as punctuation as Hugging Face's (case-sensitive) pattern does.
"""

from __future__ import annotations

import gzip
import html
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

try:  # Optional (transformers depends on it): OpenAI's own pattern needs \p{L} / \p{N}.
    import regex as _regex
except ImportError:  # pragma: no cover - exercised through _scan_words in the tests
    _regex = None

SOS_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77

HF_VOCAB_FILE = "vocab.json"
HF_MERGES_FILE = "merges.txt"
HF_TOKENIZER_FILE = "tokenizer.json"
OPENAI_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI's SimpleTokenizer reads only this many merges of its 262k-line file:
# 48,894 merges + 512 byte symbols + 2 specials = CLIP's 49,408 ids.
OPENAI_NUM_MERGES = 49152 - 256 - 2

_WORD_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_WORD_RE = _regex.compile(_WORD_PATTERN, _regex.IGNORECASE) if _regex is not None else None


# ----------------------------------------------------------------------------------------------
# Byte symbols


def _printable_bytes() -> list[int]:
    # Bytes that stand for themselves: visible Latin-1 characters except the soft hyphen (0xAD).
    return [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]


def byte_to_symbol() -> dict[int, str]:
    """The printable character that stands for each byte 0..255 inside BPE tokens.

    Printable bytes map to themselves; the other 68 (controls, space, 0x7F-0xA0, 0xAD) map in byte
    order to U+0100, U+0101, ... so no token contains whitespace or a control character.
    """
    table = {b: chr(b) for b in _printable_bytes()}
    next_free = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_free)
            next_free += 1
    return table


def base_symbols() -> list[str]:
    """The 256 byte symbols in vocabulary order (ids 0..255): printable bytes, then the others."""
    table = byte_to_symbol()
    printable = _printable_bytes()
    rest = sorted(set(range(256)) - set(printable))
    return [table[b] for b in printable + rest]


def openai_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """The vocabulary OpenAI's ``SimpleTokenizer`` derives from a merges list (token -> id)."""
    symbols = base_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    tokens += [left + right for left, right in merges]
    tokens += [SOS_TOKEN, EOT_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


# ----------------------------------------------------------------------------------------------
# Text cleaning


def _ligature_map() -> dict[int, str]:
    # ftfy's fix_latin_ligatures: Dutch IJ, Afrikaans 'n, Serbo-Croatian DZ/LJ/NJ digraphs and the
    # typographic ff..st ligatures, each replaced by its compatibility decomposition (recomposed).
    codes = [
        0x132,
        0x133,
        0x149,
        *range(0x1C4, 0x1CD),
        *range(0x1F1, 0x1F4),
        *range(0xFB00, 0xFB07),
    ]
    return {c: unicodedata.normalize("NFC", unicodedata.normalize("NFKD", chr(c))) for c in codes}


def _width_map() -> dict[int, str]:
    # ftfy's fix_character_width: half/full-width forms (U+FF01..U+FFEF) to their NFKC form, and
    # the ideographic space to a space.
    table = {0x3000: " "}
    for code in range(0xFF01, 0xFFF0):
        normal = unicodedata.normalize("NFKC", chr(code))
        if normal != chr(code):
            table[code] = normal
    return table


def _quote_and_control_map() -> dict[int, str | None]:
    # ftfy's uncurl_quotes and remove_control_chars (whitespace controls are kept: they become
    # spaces below).
    table: dict[int, str | None] = {0x2BC: "'", **{c: "'" for c in range(0x2018, 0x201C)}}
    table.update({c: '"' for c in range(0x201C, 0x2020)})
    removed = [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070)]
    removed += [0xFEFF, *range(0xFFF9, 0xFFFD)]
    table.update(dict.fromkeys(removed))
    return table


_FIX_TABLE = {**_ligature_map(), **_width_map(), **_quote_and_control_map()}
_ANSI_ESCAPE_RE = re.compile(r"\x1b\[[\d;]*[a-zA-Z]")
_HTML_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_WHITESPACE_RE = re.compile(r"\s+")


def _fix_text(text: str) -> str:
    """The context-free part of ``ftfy.fix_text`` (see the module docstring), to a fixed point."""
    # Join surrogate pairs and replace lone surrogates; otherwise UTF-8 encoding would fail.
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    # ftfy unescapes complete entities ("&name;", "&#n;") unless the text looks like HTML.
    unescape = "<" not in text
    while True:
        before = text
        if unescape:
            text = _HTML_ENTITY_RE.sub(lambda m: html.unescape(m.group(0)), text)
        # Terminal escapes go before the control characters, which would leave "[31m" behind.
        text = _ANSI_ESCAPE_RE.sub("", text).translate(_FIX_TABLE)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def clean_text(text: str) -> str:
    """CLIP's text normalisation: ftfy-like fixes, HTML unescaping, whitespace collapse, lowercase.

    See the module docstring for which of ftfy's fixes are done. ``str.lower`` (Python's Unicode
    lowercasing, final sigma included) as in OpenAI's tokenizer.
    """
    text = html.unescape(html.unescape(_fix_text(text)))
    return _WHITESPACE_RE.sub(" ", text).strip().lower()


# ----------------------------------------------------------------------------------------------
# Word splitting


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "L"


def _is_number(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "N"


def _scan_words(text: str) -> list[str]:
    """OpenAI's word pattern without the ``regex`` module (alternatives tried in pattern order)."""
    words = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if text.startswith(SOS_TOKEN, i) or text.startswith(EOT_TOKEN, i):
            special = SOS_TOKEN if text.startswith(SOS_TOKEN, i) else EOT_TOKEN
            words.append(special)
            i += len(special)
            continue
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
        if contraction is not None:
            words.append(contraction)
            i += len(contraction)
            continue
        j = i + 1
        if _is_letter(ch):
            while j < n and _is_letter(text[j]):
                j += 1
        elif _is_number(ch):
            pass
        elif ch.isspace():
            i += 1
            continue
        else:
            while j < n and not (text[j].isspace() or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
        words.append(text[i:j])
        i = j
    return words


def split_words(text: str) -> list[str]:
    """Cleaned text -> the words BPE runs on (letter runs, single digits, punctuation runs, ...)."""
    if _WORD_RE is None:
        return _scan_words(text)
    return _WORD_RE.findall(text)


# ----------------------------------------------------------------------------------------------
# Reading files


def _parse_merges(lines, source: str, *, skip_first: bool) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(lines, start=1):
        if (skip_first and number == 1) or line.startswith("#version") or not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(
                f"{source}: line {number} is not a merge 'left right': {line!r}; expected a CLIP "
                f"BPE merges file"
            )
        merges.append((parts[0], parts[1]))
    return merges


def read_hf_files(vocab_file, merges_file) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Hugging Face ``vocab.json`` + ``merges.txt`` -> (vocab, merges in rank order)."""
    with open(vocab_file, encoding="utf-8") as f:
        # json.load keeps the last of two equal keys, which silently shifts every later id.
        vocab = json.load(f, object_pairs_hook=lambda pairs: _unique_tokens(pairs, vocab_file))
    if not isinstance(vocab, dict):
        raise ValueError(f"{vocab_file}: expected a JSON object token -> id")
    with open(merges_file, encoding="utf-8") as f:
        merges = _parse_merges(f.read().split("\n"), str(merges_file), skip_first=False)
    return vocab, merges


def _unique_tokens(pairs: list[tuple[str, object]], source) -> dict[str, object]:
    tokens: dict[str, object] = {}
    for token, value in pairs:
        if token in tokens:
            raise ValueError(
                f"{source}: token {token!r} appears twice (ids {tokens[token]} and {value}); a "
                "vocab.json maps each token once: use the file of the model's own tokenizer"
            )
        tokens[token] = value
    return tokens


def read_tokenizer_json(path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Hugging Face ``tokenizer.json`` (a BPE model with ``</w>`` suffix) -> (vocab, merges)."""
    with open(path, encoding="utf-8") as f:
        model = json.load(f).get("model", {})
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") not in (None, END_OF_WORD):
        raise ValueError(
            f"{path}: model is {model.get('type')!r} with end_of_word_suffix "
            f"{model.get('end_of_word_suffix')!r}; a CLIP tokenizer is BPE with '</w>'"
        )
    merges = []
    for merge in model.get("merges", []):
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(parts) != 2:
            raise ValueError(f"{path}: model.merges entry {merge!r} is not a pair")
        merges.append((parts[0], parts[1]))
    return dict(model.get("vocab", {})), merges


def read_openai_bpe(path, *, num_merges: int = OPENAI_NUM_MERGES) -> list[tuple[str, str]]:
    """OpenAI's gzipped merges file -> its first ``num_merges`` merges (line 1 is a header)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # OpenAI keeps lines[1 : num_merges + 1]; blank lines are only ever at the end of the file.
    return _parse_merges(lines[: num_merges + 1], str(path), skip_first=True)[:num_merges]


def _converted_text_rows(path: Path) -> int | None:
    """The text tower's vocabulary size when ``path`` is a converted CLIP checkpoint folder (its
    ``config.json``, read here without ``zsad_jax.encoders.checkpoint``, which imports JAX)."""
    try:
        meta = json.loads((path / "config.json").read_text())
        if str(meta["format"]).startswith("zsad_jax") and meta["type"] == "clip":
            return int(meta["config"]["text"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not a converted CLIP folder (or a damaged one, which its loader reports)
    return None


# ----------------------------------------------------------------------------------------------
# The tokenizer


class ClipTokenizer:
    """CLIP BPE tokenizer: ``tokenizer(texts, context_length=77) -> (N, context_length) int32``.

    Build it with :meth:`from_dir` or :meth:`from_files`; ``ClipTokenizer(vocab, merges)`` takes
    the token -> id table and the merges in rank order directly.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        source: str = "<in memory>",
    ):
        self.source = source
        self.encoder = {str(k): int(v) for k, v in vocab.items()}
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.ranks = {(a, b): rank for rank, (a, b) in enumerate(merges)}
        self._byte_symbol = byte_to_symbol()
        self._symbol_byte = {s: b for b, s in self._byte_symbol.items()}
        self._check()
        self.sos_id = self.encoder[SOS_TOKEN]
        self.eot_id = self.encoder[EOT_TOKEN]
        self._cache: dict[str, tuple[int, ...]] = {}

    def _check(self) -> None:
        where = f"CLIP tokenizer files {self.source}"
        if len(self.decoder) != len(self.encoder):
            raise ValueError(f"{where}: vocabulary has repeated ids")
        for special in (SOS_TOKEN, EOT_TOKEN):
            if special not in self.encoder:
                raise ValueError(f"{where}: vocabulary lacks {special!r}; not a CLIP vocabulary")
        if self.encoder[EOT_TOKEN] != max(self.decoder):
            raise ValueError(
                f"{where}: {EOT_TOKEN!r} has id {self.encoder[EOT_TOKEN]}, not the largest id "
                f"{max(self.decoder)}; CLIP's text tower pools the token at argmax(ids), so the "
                f"EOT must have the largest id"
            )
        symbols = base_symbols()
        missing = [s for s in symbols + [s + END_OF_WORD for s in symbols] if s not in self.encoder]
        if missing:
            raise ValueError(
                f"{where}: {len(missing)} byte symbols missing from the vocabulary (first "
                f"{missing[:3]}); a CLIP byte-level vocabulary has all 512"
            )
        for (left, right), rank in self.ranks.items():
            if left + right not in self.encoder:
                raise ValueError(
                    f"{where}: merge {rank} ({left!r}, {right!r}) makes {left + right!r}, which "
                    f"is not in the vocabulary; vocab and merges come from different tokenizers?"
                )

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_files(
        cls,
        vocab_file: str | Path | None = None,
        merges_file: str | Path | None = None,
        *,
        bpe_file: str | Path | None = None,
        tokenizer_file: str | Path | None = None,
    ) -> ClipTokenizer:
        """From ``vocab_file`` + ``merges_file`` (HF), ``bpe_file`` (OpenAI) or ``tokenizer_file``
        (HF ``tokenizer.json``)."""
        given = [vocab_file is not None or merges_file is not None, bpe_file is not None]
        given.append(tokenizer_file is not None)
        if sum(given) != 1 or (given[0] and (vocab_file is None or merges_file is None)):
            raise ValueError(
                "ClipTokenizer.from_files: give vocab_file and merges_file (Hugging Face), or "
                "bpe_file (OpenAI bpe_simple_vocab_16e6.txt.gz), or tokenizer_file "
                "(tokenizer.json), exactly one of the three"
            )
        if bpe_file is not None:
            merges = read_openai_bpe(bpe_file)
            return cls(openai_vocab(merges), merges, source=str(bpe_file))
        if tokenizer_file is not None:
            vocab, merges = read_tokenizer_json(tokenizer_file)
            return cls(vocab, merges, source=str(tokenizer_file))
        vocab, merges = read_hf_files(vocab_file, merges_file)
        return cls(vocab, merges, source=f"{vocab_file} + {merges_file}")

    @classmethod
    def from_dir(cls, path: str | Path) -> ClipTokenizer:
        """From a directory holding ``vocab.json`` + ``merges.txt``, ``tokenizer.json`` or
        ``bpe_simple_vocab_16e6.txt.gz`` (looked for in that order). In a converted CLIP
        checkpoint folder, the tokenizer must fit its text tower (:meth:`check_fits`)."""
        path = Path(path)
        tokenizer = cls._from_files_in(path)
        rows = _converted_text_rows(path)
        if rows is not None:
            tokenizer.check_fits(rows, where=f"the text tower of {path}")
        return tokenizer

    @classmethod
    def _from_files_in(cls, path: Path) -> ClipTokenizer:
        if (path / HF_VOCAB_FILE).is_file() and (path / HF_MERGES_FILE).is_file():
            return cls.from_files(path / HF_VOCAB_FILE, path / HF_MERGES_FILE)
        if (path / HF_TOKENIZER_FILE).is_file():
            return cls.from_files(tokenizer_file=path / HF_TOKENIZER_FILE)
        if (path / OPENAI_BPE_FILE).is_file():
            return cls.from_files(bpe_file=path / OPENAI_BPE_FILE)
        raise FileNotFoundError(
            f"{path}: no CLIP tokenizer files; expected {HF_VOCAB_FILE} + {HF_MERGES_FILE} or "
            f"{HF_TOKENIZER_FILE} (from the Hugging Face model directory) or {OPENAI_BPE_FILE} "
            f"(from OpenAI's clip package); copy them there (python -m convert.clip copies them, "
            f"give it --bpe for an OpenAI checkpoint)"
        )

    def check_fits(self, rows: int, *, where: str) -> None:
        """Refuses a tokenizer with an id (SOS and EOT included) past the ``rows`` rows of a text
        tower's token embedding: such an id reads no row and every text feature, and so every
        loss, is NaN."""
        largest = max(self.decoder)
        if largest >= rows:
            raise ValueError(
                f"CLIP tokenizer files {self.source}: the largest token id is {largest} "
                f"({self.decoder[largest]!r}), but {where} has {rows} token embedding rows (ids "
                f"0..{rows - 1}); these files are not this model's tokenizer: use the tokenizer "
                "files that came with the weights"
            )

    # -- encoding --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """One word (byte symbols) -> ids: merges the lowest-ranked adjacent pair while one exists.

        All occurrences of the chosen pair are merged left to right without overlap, as OpenAI's
        ``SimpleTokenizer.bpe`` does.
        """
        if word in self._cache:
            return self._cache[word]
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            ranked = [
                (self.ranks.get(pair), i)
                for i, pair in enumerate(zip(parts[:-1], parts[1:], strict=True))
            ]
            ranked = [r for r in ranked if r[0] is not None]
            if not ranked:
                break
            _, first_at = min(ranked)
            left, right = parts[first_at], parts[first_at + 1]
            merged, i = parts[:first_at], first_at
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == left and parts[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = tuple(self.encoder[p] for p in parts)
        if len(self._cache) < 200_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids without SOS/EOT (OpenAI ``SimpleTokenizer.encode``)."""
        ids: list[int] = []
        for word in split_words(clean_text(text)):
            if word in (SOS_TOKEN, EOT_TOKEN):
                ids.append(self.encoder[word])
                continue
            ids.extend(self._bpe("".join(self._byte_symbol[b] for b in word.encode("utf-8"))))
        return ids

    def __call__(
        self,
        texts: str | Sequence[str],
        context_length: int = CONTEXT_LENGTH,
        *,
        truncate: bool = False,
        pad_id: int = 0,
    ) -> np.ndarray:
        """texts (N strings, or one) -> ids (N, context_length) int32: SOS, BPE ids, EOT, pad_id.

        A text longer than ``context_length`` (SOS and EOT included) raises a ``ValueError`` naming
        it, or with ``truncate=True`` keeps its first ``context_length - 1`` ids and ends with EOT
        (OpenAI's ``truncate=True``; Hugging Face's ``truncation=True`` gives the same ids).
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"ClipTokenizer: context_length must be >= 2, got {context_length}")
        if not 0 <= pad_id <= self.eot_id:
            raise ValueError(
                f"ClipTokenizer: pad_id {pad_id} must be in [0, eot_id={self.eot_id}] so that "
                f"argmax(ids) still finds the EOT"
            )
        out = np.full((len(texts), context_length), pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"ClipTokenizer: texts[{row}] is {type(text).__name__}, not str")
            ids = [self.sos_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(
                        f"ClipTokenizer: texts[{row}] = {text!r} is {len(ids)} tokens with SOS and "
                        f"EOT, more than context_length={context_length}; shorten it or pass "
                        f"truncate=True"
                    )
                ids = ids[: context_length - 1] + [self.eot_id]
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids (one row) -> text: SOS skipped, stops at the first EOT; words end with a space."""
        data = bytearray()
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == self.eot_id:
                break
            if i == self.sos_id:
                continue
            token = self.decoder[i]
            word_end = token.endswith(END_OF_WORD)
            data += bytes(self._symbol_byte[c] for c in token.removesuffix(END_OF_WORD))
            data += b" " if word_end else b""
        return data.decode("utf-8", errors="replace").strip()
