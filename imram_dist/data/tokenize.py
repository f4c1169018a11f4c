"""Penn-Treebank-style word tokeniser and the public vocabulary format.

``tokenize`` reproduces what ``nltk.word_tokenize(text.lower())`` (NLTK's improved Treebank
tokeniser) does on captions, with plain regular expressions and nothing downloaded: it splits
punctuation, clitics ("n't", "'s", "'ll", ...), "cannot" -> "can not", turns double quotes into
`` and '', and splits a sentence-final period. NLTK first splits sentences with the Punkt model;
here a period followed by whitespace ends a sentence unless the word before it looks like an
abbreviation ("u.s.", "mr.", single letters).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable

PAD, START, END, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")

_STARTING_QUOTES = [
    (re.compile("([«“‘„]|[`]+)"), r" \1 "),
    (re.compile(r'^"'), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(\')(?!re|ve|ll|m|t|s|d|n)(\w)\b"), r"\1 \2"),
]
_ENDING_QUOTES = [
    (re.compile("([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_PUNCTUATION = [
    (re.compile(r'([^\.])(\.)([\]\)}>"\'»”’ ]*)\s*$'), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r'([^\.])(\.)([\]\)}>"\']*)\s*$'), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
]
_PARENS = (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> ")
_DASHES = (re.compile(r"--"), r" -- ")
_CONTRACTIONS = [re.compile(p) for p in (
    r"(?i)\b(can)(?#X)(not)\b", r"(?i)\b(d)(?#X)('ye)\b", r"(?i)\b(gim)(?#X)(me)\b",
    r"(?i)\b(gon)(?#X)(na)\b", r"(?i)\b(got)(?#X)(ta)\b", r"(?i)\b(lem)(?#X)(me)\b",
    r"(?i)\b(more)(?#X)('n)\b", r"(?i)\b(wan)(?#X)(na)(?=\s)",
    r"(?i) ('t)(?#X)(is)\b", r"(?i) ('t)(?#X)(was)\b",
)]
# Sentence boundary: [.?!] (plus closing quotes/brackets) then whitespace, unless the word
# ending there is an abbreviation (dotted initials, single letters, common titles).
_SENT_END = re.compile(r"(?<=[.?!])([\"')\]]*)\s+")
_ABBREV = re.compile(r"(?:^|\s)(?:(?:[a-z]\.){2,}|[a-z]\.|mr\.|mrs\.|ms\.|dr\.|st\.|vs\.|etc\.|jr\.|sr\.|no\.)$")


def _sentences(text: str) -> list[str]:
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        head = text[start:m.start()]
        if _ABBREV.search(head.lower()):
            continue
        out.append(text[start:m.end(1)] if m.group(1) else head)
        start = m.end()
    out.append(text[start:])
    return [s for s in out if s.strip()]


def _treebank(text: str) -> list[str]:
    for regexp, sub in _STARTING_QUOTES:
        text = regexp.sub(sub, text)
    for regexp, sub in _PUNCTUATION:
        text = regexp.sub(sub, text)
    text = _PARENS[0].sub(_PARENS[1], text)
    text = _DASHES[0].sub(_DASHES[1], text)
    text = " " + text + " "
    for regexp, sub in _ENDING_QUOTES:
        text = regexp.sub(sub, text)
    for regexp in _CONTRACTIONS:
        text = regexp.sub(r" \1 \2 ", text)
    return text.split()


def tokenize(text: str) -> list[str]:
    """Lower-cased Penn-Treebank-style words of ``text`` (nltk.word_tokenize(text.lower()))."""
    text = str(text).lower()
    return [tok for sent in _sentences(text) for tok in _treebank(sent)]


class Vocabulary:
    """Word <-> id map in the public JSON format (keys word2idx, idx2word, idx):
    <pad>=0, <start>=1, <end>=2, <unk>=3, then the words."""

    def __init__(self, words: Iterable[str] = ()):
        self.word2idx: dict[str, int] = {}
        self.idx2word: dict[int, str] = {}
        for w in SPECIALS:
            self.add_word(w)
        for w in words:
            self.add_word(w)

    def add_word(self, word: str) -> int:
        if word not in self.word2idx:
            i = len(self.word2idx)
            self.word2idx[word] = i
            self.idx2word[i] = word
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.word2idx)

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, UNK)

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.word2idx == other.word2idx

    def encode(self, text: str) -> list[int]:
        """[<start>] + word ids (unknown words -> <unk>=3) + [<end>]."""
        return [START] + [self.word2idx.get(t, UNK) for t in tokenize(text)] + [END]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.idx2word.get(int(i), "<unk>") for i in ids]

    def to_json(self) -> dict:
        return {"word2idx": self.word2idx,
                "idx2word": {str(i): w for i, w in self.idx2word.items()},
                "idx": len(self.word2idx)}

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), ensure_ascii=False, sort_keys=False, indent=0).encode() + b"\n"

    @classmethod
    def from_json(cls, data: dict) -> Vocabulary:
        for k in ("word2idx", "idx2word", "idx"):
            if k not in data:
                raise ValueError(f"vocabulary JSON lacks the key {k!r} (expected word2idx, idx2word, idx)")
        v = cls.__new__(cls)
        v.word2idx = {str(w): int(i) for w, i in data["word2idx"].items()}
        v.idx2word = {int(i): str(w) for i, w in data["idx2word"].items()}
        for i, w in enumerate(SPECIALS):
            if v.word2idx.get(w) != i:
                raise ValueError(f"vocabulary: {w} must have id {i}, found {v.word2idx.get(w)}")
        return v

    @classmethod
    def loads(cls, raw: bytes | str) -> Vocabulary:
        return cls.from_json(json.loads(raw))

    @classmethod
    def load(cls, path_or_url: str) -> Vocabulary:
        """From a local path or an s3:// URL."""
        from .io import read_bytes

        return cls.loads(read_bytes(path_or_url))

    def save(self, path: str) -> None:
        from .io import atomic_write_bytes

        atomic_write_bytes(path, self.dumps())


def build_vocab(captions: Iterable[str], threshold: int = 4) -> Vocabulary:
    """Words with count >= threshold, in order of first appearance (as the SCAN/IMRAM vocab.py)."""
    counter: Counter[str] = Counter()
    for c in captions:
        counter.update(tokenize(c))
    return Vocabulary(w for w, n in counter.items() if n >= threshold and w not in SPECIALS)
