"""Cutting a long text to what truncation can keep before the tokenizer sees it whole.

A request may carry documents of megabytes; truncation keeps a few hundred tokens of each. Tokenizing the whole text
and throwing most of it away costs time and memory in proportion to the text's tokens (a 2 MB run of commas is two
million tokens: about a gigabyte and seconds). `TextCutter.cut` gives a prefix (or, for left truncation, a suffix)
whose tokenization starts (ends) with exactly the tokens the whole text's tokenization starts (ends) with, as many as
asked for, and costs about what tokenizing those tokens costs, whatever the script, spacing or word length.

How it knows where to cut, from the tokenizer's own pipeline (normalizer, pre-tokenizer, model):
- Tokens never cross a pre-tokenizer word (the tokenizer's `word_ids`), and a word's tokens depend only on that
  word. It tokenizes a window of the text (about four characters per token wanted, doubled until enough) and keeps
  the tokens of the words the window holds whole: for a prefix, every word before its last two (the last may be cut
  in the middle, and a pre-tokenizer's look-ahead reaches one word back); for a suffix, every word but the first with
  BERT's pre-tokenizer (it splits at every space and punctuation character), and otherwise every word after a space that
  follows a non-space character (where every supported pre-tokenizer starts a new word whatever came before: WordPiece's
  and Metaspace's split there, and the byte-level regexes of GPT-2, Llama 3 and Qwen give a space to the word after
  it), so a word the window's start cut or misaligned is never counted. A pre-tokenizer that groups digits in threes
  from a run's start (Llama 3) has a suffix start a whole number of groups into a run of digits it falls in.
- Unicode normalization (NFC, NFKC) reorders a run of combining marks as a whole, so a cut inside such a run could
  move marks that the whole text keeps elsewhere. When the window's edge falls inside a run and the tokenizer's
  normalizer reorders marks, the text is first normalized by that normalizer itself (linear, once): normalized text
  is in canonical order, its normalization is itself, and a cut no longer moves anything.
- A run longer than the window without such a boundary (one 2 MB "word", CJK or emoji without spaces, a run of one
  punctuation character under a byte-level tokenizer) is taken as its tokens away from the cut: all of them but the
  `margin` tokens next to the cut, where `margin` is twice the longest vocabulary entry in characters (at least 16).
  This is done for BPE and Unigram only, and relies on a long word's tokens far from its end not depending on its
  end, which the property tests check on each tokenizer family but which is not a theorem. Never for WordPiece,
  where a word longer than `max_input_chars_per_word` is one unknown token, so its first tokens depend on its length.
Some text is many characters and few tokens under the BERT family's pipeline (BertNormalizer, BertPreTokenizer,
WordPiece: the default model's): a 2 MB word is one unknown token, a 2 MB run of spaces or control characters none.
For such a tokenizer, a text whose first window is not enough is first shortened by rules that change none of its
tokens (`BertRuns`): characters the normalizer deletes are deleted, a run of spaces becomes one, and a run of
letters, digits and symbols longer than `max_input_chars_per_word` + 1 keeps that many (the word stays one unknown
token). These are linear numpy passes over the text's code points, so such a text costs milliseconds, not the
tokenizer's second per 2 MB. A Unigram tokenizer (XLM-R's family) has two such rules too (`UnigramRuns`): a run of
spaces that its normalizer collapses, and a run of characters no vocabulary piece holds (one unknown token).
A text that is not longer than the window is returned whole, so short texts cost one `len`.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata

import numpy as np

_FIRST_WINDOW_CHARS_PER_TOKEN = 4  # English averages about 4.5; denser scripts stop at the first window
_MIN_MARGIN = 16


def _longest_token_chars(tokenizer, model: dict) -> int:
    """The most characters one vocabulary entry spells (WordPiece's continuation prefix not counted; a byte-level
    entry counts its bytes, never fewer than its characters). `model` is the tokenizer's JSON "model" object."""
    prefix = model.get("continuing_subword_prefix") or ""
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    return max((len(t) - (len(prefix) if prefix and t.startswith(prefix) else 0) for t in vocab), default=1)


class TextCutter:
    """Cuts texts for one tokenizer (a copy that adds no special tokens, neither truncates nor pads)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        config = json.loads(tokenizer.to_str())  # read once: a real vocabulary's JSON is megabytes
        model = config.get("model") or {}
        # WordPiece makes a word longer than max_input_chars_per_word one unknown token, so the tokens of a word's
        # start depend on its length: only BPE and Unigram words are taken in part
        local = model.get("type") in ("BPE", "Unigram")
        self.margin = max(_MIN_MARGIN, 2 * _longest_token_chars(tokenizer, model)) if local else None
        # BERT's pre-tokenizer splits at every space and around every punctuation character whatever came before:
        # in a suffix, every word but the first is the whole text's (other pre-tokenizers: after a space, below)
        self.words_are_local = (config.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
        normalizer = tokenizer.normalizer
        # NFC/NFD/NFKC/NFKD put U+0323 (class 220) before U+0301 (class 230); BERT's accent stripping removes both
        self.reorders_marks = normalizer is not None and normalizer.normalize_str("\u0301\u0323") == "\u0323\u0301"
        self.runs = BertRuns.for_tokenizer(tokenizer, config) or UnigramRuns.for_tokenizer(tokenizer, config)
        self.digit_group = _digit_group(config.get("pre_tokenizer"))

    def cut(self, text: str, keep: int, side: str = "right") -> str:
        """A prefix of `text` (a suffix with side="left") that the tokenizer turns into the same first (last) `keep`
        tokens as the whole text, or the whole text when it has no more than that. It may be a prefix of the text
        as the tokenizer's normalizer writes it (see the module's docstring), which tokenizes the same."""
        size = _FIRST_WINDOW_CHARS_PER_TOKEN * (keep + (self.margin or _MIN_MARGIN))
        normalized = shortened = False
        while size < len(text):
            edge = size if side == "right" else len(text) - size
            if self.reorders_marks and not normalized and _inside_mark_run(text, edge):
                text, normalized = self.tokenizer.normalizer.normalize_str(text), True
                continue
            window = text[:size] if side == "right" else text[self._suffix_start(text, len(text) - size):]
            if self._exact_tokens(window, side) >= keep:
                return window
            if self.runs is not None and not shortened:
                text, shortened = self.runs.shorten(text, normalized), True
                continue
            size *= 2
        return text

    def _suffix_start(self, text: str, start: int) -> int:
        """`start`, or just before it where the pre-tokenizer groups digits (Llama 3's `\\p{N}{1,3}`) and `start`
        falls inside a run of digits: the groups count from the run's start, so the suffix must start a whole number
        of groups into the run for its groups to be the whole text's."""
        if self.digit_group is None or start <= 0 or not (_is_number(text[start - 1]) and _is_number(text[start])):
            return start
        codes = _codes(text[:start])
        others = np.flatnonzero(~_number_table()[codes])
        run_start = int(others[-1]) + 1 if len(others) else 0
        return start - (start - run_start) % self.digit_group

    def _exact_tokens(self, window: str, side: str) -> int:
        """How many tokens at the kept end of `window` are the whole text's tokens: those of whole words (see the
        module's docstring), or, if more, all but the `margin` tokens next to the cut."""
        enc = self.tokenizer.encode(window, add_special_tokens=False)
        n = len(window)
        if side == "right":
            ends = [end for _, end in enc.offsets]
            last_two = _distinct_from_end(enc.word_ids, 2)
            starts = zip(enc.offsets, enc.word_ids, strict=True)
            edge = min((start for (start, _), w in starts if w in last_two), default=0)
        else:  # mirrored: distances from the window's end, from the last token back
            ends = [n - start for start, _ in reversed(enc.offsets)]
            if self.words_are_local:
                first = enc.word_ids[0] if enc.word_ids else None
                starts = zip(enc.offsets, enc.word_ids, strict=True)
                edge = n - next((start for (start, _), w in starts if w != first), n)
            else:
                edge = n - _left_sync_point(window)
        whole = 0
        for end in ends:
            if end > edge:
                break
            whole += 1
        return whole if self.margin is None else max(whole, len(ends) - self.margin)


class BertRuns:
    """Token-preserving shortening for a BertNormalizer + BertPreTokenizer + WordPiece tokenizer, by the rules of
    the `tokenizers` library's implementation: clean_text deletes `\\0`, U+FFFD and every character of Unicode
    category C* but tab, CR and LF, and makes every White_Space character a space; accent stripping (on when asked,
    or when lowercasing and not asked) deletes category Mn after NFD; the pre-tokenizer splits at White_Space and
    keeps each punctuation character (ASCII punctuation, category P*) alone; CJK ideographs are padded with spaces;
    a word longer than max_input_chars_per_word characters is the unknown token."""

    def __init__(self, max_word_chars: int, clean_text: bool, strip_marks: bool, added: list[str]):
        self.max_word_chars = max_word_chars
        self.clean_text, self.strip_marks = clean_text, strip_marks
        self.added = added  # added tokens are matched before normalization: deleting must not make one

    @classmethod
    def for_tokenizer(cls, tokenizer, config: dict) -> BertRuns | None:
        """The rules for `tokenizer` (`config`: its JSON), or None when it is not of the BERT family."""
        model, normalizer, pre = config.get("model") or {}, config.get("normalizer"), config.get("pre_tokenizer")
        if model.get("type") != "WordPiece" or (pre or {}).get("type") != "BertPreTokenizer" or \
                (normalizer is not None and normalizer.get("type") != "BertNormalizer"):
            return None
        normalizer = normalizer or {"clean_text": False, "strip_accents": False, "lowercase": False}
        strip = normalizer.get("strip_accents")
        strip = normalizer.get("lowercase", True) if strip is None else strip
        added = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
        return cls(int(model.get("max_input_chars_per_word", 100)), bool(normalizer.get("clean_text", True)),
                   bool(strip), added)

    def shorten(self, text: str, normalized: bool = False) -> str:
        """`text` with the same tokens and no more characters: deleted characters deleted (unless that would
        spell an added token), runs of spaces as one, runs of word characters longer than max_word_chars + 1 cut
        to that. Works on the code points as a numpy array: linear, a few bytes per character."""
        kinds_of = _bert_table()
        codes = _codes(text)
        kinds = kinds_of[codes]
        deleted = (kinds == _CONTROL) if self.clean_text else np.zeros(len(codes), dtype=bool)
        if self.strip_marks:
            deleted |= kinds == _NONSPACING
        if deleted.any():
            kept = _text(codes[~deleted])
            if all(kept.count(t) == text.count(t) for t in self.added):
                codes, kinds = codes[~deleted], kinds[~deleted]
        space = kinds == _SPACE
        drop = space & np.r_[False, space[:-1]]  # a space after a space
        word = np.r_[False, kinds == _WORD, False]
        edges = np.flatnonzero(word[1:] != word[:-1])  # starts and ends of the runs of word characters, paired
        for start, end in zip(edges[::2], edges[1::2], strict=True):
            if end - start > self.max_word_chars + 1:
                drop[start + self.max_word_chars + 1:end] = True
        return _text(codes[~drop])


class UnigramRuns:
    """Token-preserving shortening for a Unigram tokenizer without byte fallback (XLM-R and other SentencePiece
    exports). Two rules, each exact:
    - When the normalizer's last step replaces runs of two or more spaces by one (XLM-R's `Replace(" {2,}", " ")`),
      a run of spaces becomes one space first: the normalizer would make it one anyway.
    - Unigram gives a character that no vocabulary piece holds the unknown token, and joins consecutive unknown
      tokens into one, so a run of such characters is one token whatever its length: it keeps its first character.
      Only characters that normalization leaves alone wherever they stand are taken (no decomposition, combining
      class 0, not the second half of a composition, not a space, the same after this tokenizer's normalizer)."""

    def __init__(self, tokenizer, collapse_spaces: bool, known: set[str]):
        self.tokenizer = tokenizer
        self.collapse_spaces = collapse_spaces
        self.known = known  # characters that some vocabulary piece holds
        self._unknown: dict[int, bool] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer, config: dict) -> UnigramRuns | None:
        """The rules for `tokenizer` (`config`: its JSON), or None when it is not a Unigram one."""
        model = config.get("model") or {}
        if model.get("type") != "Unigram" or model.get("byte_fallback"):
            return None
        steps = (config.get("normalizer") or {})
        steps = steps.get("normalizers", [steps]) if steps.get("type") == "Sequence" else [steps]
        last = steps[-1] if steps else {}
        collapse = last.get("type") == "Replace" and last.get("pattern") == {"Regex": " {2,}"} and \
            last.get("content") == " "
        known = {ch for piece, _ in model.get("vocab", []) for ch in piece}
        return cls(tokenizer, collapse, known)

    def shorten(self, text: str, normalized: bool = False) -> str:
        """`text` with the same tokens and no more characters. With `normalized` (the text is already what this
        tokenizer's normalizer makes of it), a run of one repeated unknown character of any kind (a run of one
        combining mark) also keeps one: normalized text is in canonical order, a repeated mark composed with
        nothing the first time and composes with nothing after, and the result is checked to be its own
        normalization."""
        if self.collapse_spaces:
            text = _SPACES.sub(" ", text)
        codes = _codes(text)
        distinct = np.unique(codes)
        inert = [int(c) for c in distinct if self._inert_unknown(int(c))]
        unknown = np.isin(codes, inert)
        drop = unknown & np.r_[False, unknown[:-1]]  # an unknown character after an unknown one
        if normalized:
            repeats = np.isin(codes, [int(c) for c in distinct if chr(c) not in self.known and not chr(c).isspace()
                                      and chr(c) != "\u2581"])  # spaces and Metaspace's mark are words' edges
            drop |= repeats & np.r_[False, codes[1:] == codes[:-1]]
        if not drop.any():
            return text
        short = _text(codes[~drop])
        normalizer = self.tokenizer.normalizer
        if normalized and normalizer is not None and normalizer.normalize_str(short) != short:
            return _text(codes[~(unknown & np.r_[False, unknown[:-1]])])
        return short

    def _inert_unknown(self, code: int) -> bool:
        found = self._unknown.get(code)
        if found is None:
            ch = chr(code)
            normalizer = self.tokenizer.normalizer
            found = ch not in self.known and not ch.isspace() and unicodedata.category(ch) != "Cn" and \
                not unicodedata.decomposition(ch) and not unicodedata.combining(ch) and \
                code not in _composition_seconds() and \
                (normalizer is None or normalizer.normalize_str(ch) == ch)
            if len(self._unknown) < 100_000:  # bounded: a text cannot grow it past the code points it asks about
                self._unknown[code] = found
        return found


_SPACES = re.compile(" {2,}")


@functools.cache
def _composition_seconds() -> frozenset[int]:
    """Characters that canonical composition can join to the character before them (the second of a two-character
    canonical decomposition, and Hangul's medial and final jamo)."""
    seconds = set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))
    for code in range(0x110000):
        parts = unicodedata.decomposition(chr(code)).split()
        if len(parts) == 2 and not parts[0].startswith("<"):
            seconds.add(int(parts[1], 16))
    return frozenset(seconds)


def _codes(text: str) -> np.ndarray:
    """The text's code points as a numpy array (lone surrogates kept: a JSON body may hold them); `_text` undoes it."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _text(codes: np.ndarray) -> str:
    return codes.tobytes().decode("utf-32-le", "surrogatepass")


_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))  # BERT's "Chinese characters"
_WHITE_SPACE = "\t\n\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029" \
               "\u202f\u205f\u3000"  # the White_Space characters that clean_text keeps (the others are Cc: deleted)
_OTHER, _WORD, _SPACE, _CONTROL, _NONSPACING = range(5)


@functools.cache
def _bert_table() -> np.ndarray:
    """Each code point's kind for BertRuns, from this Python's Unicode database: _CONTROL (what clean_text deletes:
    categories Cc, Cf, Cs, Co but tab, CR, LF; and U+FFFD), _NONSPACING (Mn), _SPACE, _WORD (certainly inside a
    word: a letter, digit or symbol outside ASCII punctuation and CJK whose NFD holds only such characters and Mn)
    and _OTHER. An unassigned code point is _OTHER: a newer Unicode than this Python's may make it anything, so it
    is never deleted and always ends a run. Planes 3 to 14, but for the tags and variation selectors, are
    unassigned and planes 15 and 16 private use (Co): they are filled without asking about each code point."""
    table = np.full(0x110000, _OTHER, dtype=np.uint8)
    category = unicodedata.category
    cjk = np.zeros(0x110000, dtype=bool)
    for lo, hi in _CJK:
        cjk[lo:hi + 1] = True
    for code in (*range(0x323B0), *range(0xE0000, 0xE0200)):
        ch = chr(code)
        cat = category(ch)
        if (cat in ("Cc", "Cf", "Cs", "Co") and ch not in "\t\n\r") or code == 0xFFFD:
            table[code] = _CONTROL
        elif cat == "Mn":
            table[code] = _NONSPACING
        elif ch in _WHITE_SPACE:
            table[code] = _SPACE
        elif cat[0] in "LNS" and not (code < 128 and not ch.isalnum()) and not cjk[code] and (
                not unicodedata.decomposition(ch) or all(category(c)[0] in "LNS" or category(c) == "Mn"
                                                         for c in unicodedata.normalize("NFD", ch))):
            table[code] = _WORD
    table[0xF0000:0xFFFFE] = _CONTROL  # private use
    table[0x100000:0x10FFFE] = _CONTROL
    return table


def _digit_group(pre_tokenizer: dict | None) -> int | None:
    """K when a Split pre-tokenizer's pattern groups numbers K at a time (`\\p{N}{1,K}`), else None."""
    found = re.search(r"\\p\{N\}\{1,(\d+)\}", json.dumps(pre_tokenizer or {}).replace("\\\\", "\\"))
    return int(found.group(1)) if found else None


def _is_number(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "N"


@functools.cache
def _number_table() -> np.ndarray:
    """Whether each code point is in Unicode category N (what a regex's \\p{N} matches)."""
    table = np.zeros(0x110000, dtype=bool)
    for code in range(0x323B0):
        table[code] = unicodedata.category(chr(code))[0] == "N"
    return table


def _inside_mark_run(text: str, edge: int) -> bool:
    """Whether the characters on both sides of `edge` are combining marks (a run that the cut would split)."""
    return 0 < edge < len(text) and bool(unicodedata.combining(text[edge - 1])) and \
        bool(unicodedata.combining(text[edge]))


def _left_sync_point(window: str) -> int:
    """Where a suffix's words start to be the whole text's: the first space that follows a non-space character (the
    window's length if there is none)."""
    at = 0
    while True:
        space = window.find(" ", at + 1)
        if space < 0:
            return len(window)
        if not window[space - 1].isspace():
            return space
        at = space


def _distinct_from_end(words, count: int) -> list:
    """The last `count` distinct word ids (None, an added token, counts as a word of its own)."""
    seen: list = []
    for w in reversed(words):
        if not seen or seen[-1] != w:
            seen.append(w)
            if len(seen) == count:
                break
    return seen
