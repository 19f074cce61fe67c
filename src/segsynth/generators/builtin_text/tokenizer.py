"""A word-level tokenizer: one token per word, so a class word is one token.

Attention-based pseudo-masks (Attn2mask, DiffuMask) read the cross-attention
paid to the token of each class word. With a sub-word tokenizer a class word
can be several tokens whose maps must be merged; here every word is exactly
one token, and a multi-word class name ("traffic light", "chest of drawers")
is one token too: class names are registered as phrases, and a phrase in a
prompt becomes its single token (longest match first).

Text is lowercased and split into words (letters, digits and `_`, joined by
inner `-` or `'`: "wall-brick", "sign_symbol" and "don't" are one word each)
and single punctuation marks. Every prompt becomes
`<bos> tokens... <eos> <pad>...` of a fixed length; a word outside the
vocabulary becomes `<unk>` and is reported (a warning naming the word, once).

Saved as `tokenizer/vocab.json`: {"format", "max_length", "tokens"} where a
token's id is its index in "tokens".
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch

from segsynth.io import SegsynthError, atomic_write_json, read_json

VOCAB_FILE = "vocab.json"
FORMAT = "segsynth-word-tokenizer/1"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
# <eos> is deliberately not id 2: CLIPTextModel treats eos_token_id == 2 as the legacy OpenAI
# config and pools at the highest token id instead of at <eos>.
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
_PIECE = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")


def split_words(text: str) -> list[str]:
    """Lowercased words and punctuation marks, in order: 'A photo of road, sky' -> a photo of road , sky."""
    return _PIECE.findall(text.lower())


def normalise(text: str) -> str:
    """The token a word or phrase becomes: its words joined by single spaces."""
    return " ".join(split_words(text))


class WordTokenizer:
    """Words -> ids (see the module docstring)."""

    def __init__(self, tokens: Sequence[str], max_length: int):
        if tuple(tokens[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise SegsynthError(f"a word tokenizer's first tokens must be {', '.join(SPECIAL_TOKENS)}")
        if len(set(tokens)) != len(tokens):
            raise SegsynthError("a word tokenizer's tokens must be unique")
        if max_length < 3:
            raise SegsynthError(f"max_length {max_length}: a prompt needs room for <bos>, a word and <eos>")
        self.tokens = list(tokens)
        self.max_length = int(max_length)
        self.ids = {token: index for index, token in enumerate(self.tokens)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (self.ids[t] for t in SPECIAL_TOKENS)
        # phrase tokens by their first word: (words, token), longest first, for the greedy merge
        self._phrases: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for token in self.tokens[len(SPECIAL_TOKENS):]:
            words = tuple(token.split(" "))
            if len(words) > 1:
                self._phrases.setdefault(words[0], []).append((words, token))
        for entries in self._phrases.values():
            entries.sort(key=lambda entry: -len(entry[0]))
        self.unknown_words: set[str] = set()  # every out-of-vocabulary word met so far

    # --- building and saving -----------------------------------------------------

    @classmethod
    def build(cls, texts: Iterable[str], phrases: Iterable[str] = (), max_length: int = 0) -> "WordTokenizer":
        """A vocabulary of every word in `texts` plus `phrases` (class names) as single tokens.

        `max_length` 0: the longest text's token count plus <bos>/<eos>, rounded up to a multiple of 8."""
        phrase_tokens = sorted({normalise(p) for p in phrases} - {""})
        # 1. Split texts with the phrases known, so a class name in a prompt counts as its one token.
        draft = cls(list(SPECIAL_TOKENS) + phrase_tokens, max_length=3)
        pieces = [draft.words(text) for text in texts]
        words = {word for text_words in pieces for word in text_words} - set(SPECIAL_TOKENS)
        tokens = list(SPECIAL_TOKENS) + sorted(words | set(phrase_tokens))
        # 2. Long enough for every training text (no training prompt is ever cut).
        longest = max((len(p) for p in pieces), default=0) + 2
        if max_length <= 0:
            max_length = max(8, -(-longest // 8) * 8)
        elif max_length < longest:
            raise SegsynthError(f"max_length {max_length} is shorter than the longest training prompt "
                                f"({longest} tokens with <bos>/<eos>); raise it or leave it at 0 (automatic)")
        return cls(tokens, max_length)

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / VOCAB_FILE, {"format": FORMAT, "max_length": self.max_length, "tokens": self.tokens})
        return folder / VOCAB_FILE

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "WordTokenizer":
        path = Path(folder) / VOCAB_FILE
        if not path.is_file():
            raise SegsynthError(f"{path}: missing; a builtin text generator keeps its vocabulary there")
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("tokens"), list):
            raise SegsynthError(f"{path}: not a segsynth word vocabulary (expected format {FORMAT!r} and a tokens list)")
        return cls(data["tokens"], int(data["max_length"]))

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordTokenizer) and (self.tokens, self.max_length) == (other.tokens, other.max_length)

    # --- tokenizing ----------------------------------------------------------------

    def words(self, text: str) -> list[str]:
        """The tokens (as text) of `text`, phrases merged, before the vocabulary lookup and without specials."""
        pieces = split_words(text)
        merged, index = [], 0
        while index < len(pieces):
            for words, token in self._phrases.get(pieces[index], ()):
                if tuple(pieces[index: index + len(words)]) == words:
                    merged.append(token)
                    index += len(words)
                    break
            else:
                merged.append(pieces[index])
                index += 1
        return merged

    def encode(self, text: str) -> tuple[list[int], list[str]]:
        """(ids of length max_length, the out-of-vocabulary words of `text`)."""
        words = self.words(text)
        unknown = [word for word in words if word not in self.ids]
        body = [self.ids.get(word, self.unk_id) for word in words][: self.max_length - 2]
        ids = [self.bos_id] + body + [self.eos_id]
        return ids + [self.pad_id] * (self.max_length - len(ids)), unknown

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        """(B, max_length) int64 ids. Unknown words become <unk> (warned once each); long prompts are cut."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows, new_unknown = [], []
        for text in texts:
            ids, unknown = self.encode(text)
            new_unknown += [word for word in unknown if word not in self.unknown_words and word not in new_unknown]
            if len(self.words(text)) > self.max_length - 2:
                warnings.warn(f"prompt {text!r} is longer than the tokenizer's {self.max_length - 2} words; "
                              "the rest is cut", stacklevel=2)
            rows.append(ids)
        if new_unknown:
            self.unknown_words.update(new_unknown)
            warnings.warn(f"words outside the generator's vocabulary become <unk>: {', '.join(new_unknown)}",
                          stacklevel=2)
        return torch.tensor(rows, dtype=torch.long)

    def token_index(self, prompt: str, word: str) -> list[int]:
        """Positions in `self([prompt])[0]` (position 0 is <bos>) holding the token of `word` (a word or class name)."""
        token = normalise(word)
        if token not in self.ids:
            raise SegsynthError(f"{word!r} is not in the generator's vocabulary; it cannot be located in a prompt")
        ids, _ = self.encode(prompt)
        wanted = self.ids[token]
        return [position for position, value in enumerate(ids) if value == wanted]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text without the special tokens (for logs and tests)."""
        specials = {self.pad_id, self.bos_id, self.eos_id}
        return " ".join(self.tokens[int(i)] for i in ids if int(i) not in specials)
