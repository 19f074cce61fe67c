"""The request -> sample contract end to end with a generator that makes its own labels: text requests in a
plan, samples with a confidence map and extra pictures, the synthetic set that records them, the dataset
that yields the weights, and the training stream that passes them to the loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from segsynth import IGNORE_INDEX
from segsynth.data import open_dataset
from segsynth.formats.plan import PlanEntry, plan_requests, read_plan, write_plan
from segsynth.generators import GENERATORS
from segsynth.generators.base import Condition, GeneratedSample, Generator, Prepared, Request
from segsynth.io import SegsynthError
from segsynth.data.transforms import AugmentConfig
from segsynth.stage_configs import SynthesizeConfig, TrainConfig
from segsynth.synthesize import synthesize
from segsynth.training.recipes import RECIPES
from segsynth.training.stream import SampleStream

TOY = "toy:n=6,n_val=2,size=32"


class StripesFromText(Generator):
    """Text -> image + its own label: class k of the prompt's class words fills stripe k; the confidence falls
    off towards the stripe borders; an "attention" extra is kept. Deterministic per seed, batch-independent."""

    name = "stripes"
    request_kinds = ("text",)
    uses_prompts = True

    def __init__(self, classes):
        self.classes = list(classes)

    def working_size(self, mask_shape):
        assert mask_shape is None  # text requests name no mask
        return (16, 24)

    def prepare(self, conditions: list[Condition]) -> Prepared:
        return Prepared((16, 24), [c.prompt for c in conditions], [c.request.seed for c in conditions], {}, conditions)

    def run(self, prepared: Prepared) -> list[GeneratedSample]:
        samples = []
        for condition in prepared.conditions:
            ids = [self.classes.index(name) for name in condition.request.words_by_class()]
            label = np.repeat(np.array(ids, np.uint8), 24 // len(ids))[None].repeat(16, 0)
            rng = np.random.default_rng(condition.request.seed)
            image = rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)
            weight = np.tile(np.abs(np.linspace(-1, 1, 24 // len(ids), dtype=np.float32)), len(ids))[None].repeat(16, 0)
            weight = 1.0 - weight
            label[weight < 0.2] = IGNORE_INDEX  # an uncertain band, as attention pseudo-masks have
            samples.append(GeneratedSample(image, label, weight, {"attention": (weight * 255).astype(np.uint8)},
                                           {"words": condition.request.words_by_class()}))
        return samples

    def identity(self) -> dict:
        return {"name": self.name}


@pytest.fixture
def stripes_generator(monkeypatch):
    classes = open_dataset(TOY).classes
    monkeypatch.setitem(GENERATORS, "stripes", lambda argument, settings: StripesFromText(classes))


def text_plan(path):
    return write_plan(path, [
        PlanEntry("street-a", [3, 4], kind="text", prompt="a road under the sky",
                  class_words={"road": ["road"], "sky": ["sky"]}),
        PlanEntry("street-b", [5], kind="text", prompt="a car on a road", class_words={"car": ["car"], "road": ["road"]}),
    ])


def test_plan_entries_expand_to_requests(tmp_path):
    entries = read_plan(text_plan(tmp_path / "plan.jsonl"))
    requests = plan_requests(entries, "plan.jsonl")
    assert [r.id for r in requests] == ["street-a_s3", "street-a_s4", "street-b_s5"]
    assert requests[0].kind == "text" and requests[0].source is None and requests[0].prompt == "a road under the sky"
    assert requests[2].words_by_class() == {"car": ["car"], "road": ["road"]}
    masks = plan_requests([PlanEntry("m1", [0, 1], {"hardness": 0.5})], "p")
    assert [(r.kind, r.source, r.seed) for r in masks] == [("mask", "m1", 0), ("mask", "m1", 1)]


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "seeds": [1], "kind": "picture"}', "unknown kind 'picture'; options: mask, text, none"),
    ('{"id": "a", "seeds": [1], "kind": "text"}', 'a text entry needs a non-empty "prompt"'),
    ('{"id": "a", "seeds": [1], "kind": "text", "prompt": "x", "class_words": {"car": "car"}}',
     '"class_words" must map class names to lists of words'),
])
def test_bad_plan_entries(tmp_path, line, message):
    path = tmp_path / "plan.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(SegsynthError) as error:
        read_plan(path)
    assert str(error.value).startswith(f"{path}: entry 1 (a): ") and message in str(error.value)


def test_text_requests_make_a_set_with_weights_and_extras(tmp_path, stripes_generator):
    out = tmp_path / "set"
    summary = synthesize(SynthesizeConfig(data=TOY, plan=str(text_plan(tmp_path / "plan.jsonl")), generator="stripes:x",
                                          out=str(out), batch_size=2, progress=False))
    assert summary["generated"] == 3
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    first = records[0]
    assert first["kind"] == "text" and first["source"] is None and first["prompt"] == "a road under the sky"
    assert first["weight"] == "weights/street-a_s3.png"
    assert first["extras"] == {"attention": "extras/attention/street-a_s3.png"}
    assert first["meta"] == {"words": {"road": ["road"], "sky": ["sky"]}}
    for record in records:
        for name in (record["image"], record["mask"], record["weight"], *record["extras"].values()):
            Image.open(out / name).verify()

    # The set is a dataset whose samples carry the weight map (8-bit, so within 1/255 of the generator's).
    dataset = open_dataset(f"synthetic:{out}")
    sample = dataset.split("train")[0]
    expected = StripesFromText(dataset.classes).run(StripesFromText(dataset.classes).prepare([
        Condition(Request("street-a_s3", "text", 3, prompt="a road under the sky",
                          class_words=(("road", ("road",)), ("sky", ("sky",)))), None, "")]))[0]
    assert sample.weight is not None and np.abs(sample.weight - expected.weight).max() <= 0.5 / 255 + 1e-6
    assert np.array_equal(sample.label, expected.label)

    # Training draws the weights with the samples: the synthetic recipe's stream yields them.
    config = TrainConfig(data=TOY, out=str(tmp_path / "train"), recipe="synthetic", synthetic=[str(out)])
    sources = RECIPES["synthetic"](config, open_dataset(TOY))
    stream = SampleStream(sources, AugmentConfig(crop=(16, 24), base=(16, 24), scale_range=(1.0, 1.0)), seed=0)
    weights = [stream[g][2] for g in range(6)]
    assert all(float(w.min()) < 0.5 < float(w.max()) <= 1.0 for w in weights)  # not the all-ones default


def test_a_rerun_drops_a_sample_whose_weight_file_is_gone(tmp_path, stripes_generator):
    out = tmp_path / "set"
    config = SynthesizeConfig(data=TOY, plan=str(text_plan(tmp_path / "plan.jsonl")), generator="stripes:x",
                              out=str(out), progress=False)
    synthesize(config)
    (out / "weights" / "street-b_s5.png").unlink()
    (out / "extras" / "attention" / "stray.png").write_bytes(b"not ours")
    again = synthesize(config)
    assert again["already_done"] == 2 and again["generated"] == 1  # only the damaged sample is made again
    assert not (out / "extras" / "attention" / "stray.png").exists()  # files no record names are cleaned


def test_a_mask_to_image_generator_refuses_text_requests(tmp_path):
    from segsynth.generators.testing import save_tiny_builtin

    generator = save_tiny_builtin(tmp_path / "generator", data=TOY, iterations=1)
    with pytest.raises(SegsynthError, match=r"has text request\(s\), but generator builtin:.* takes only mask requests"):
        synthesize(SynthesizeConfig(data=TOY, plan=str(text_plan(tmp_path / "plan.jsonl")),
                                    generator=f"builtin:{generator}", out=str(tmp_path / "set"), progress=False))
    assert not (tmp_path / "set").exists()
