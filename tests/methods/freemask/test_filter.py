"""The FreeMask filter: the rule itself, its outputs, resume, and that it finds planted wrong regions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from segsynth.data import open_dataset
from segsynth.data.toy import BUILDING, ROAD
from segsynth.methods.freemask.filter import (FilterConfig, _record, class_thresholds, filter_batch, filter_labels, filter_synthetic,
                             ignored_by_class, judge_regions, probe_lanes, scoring_lanes)
from segsynth.methods.freemask.variants import filtered_done
from segsynth.io import SegsynthError
from segsynth.training.loop import TrainConfig, train
from synthetic_sets import write_synthetic_set

TOY = "toy:n=160,n_val=24,size=48x64"


def test_filter_rule_is_alpha_times_class_mean():
    label = np.array([[0, 0, 1, 1, 255]], np.uint8)
    loss = np.array([[1.0, 1.3, 2.4, 2.6, 9.0]])
    mean_loss = np.array([1.0, 2.0])
    filtered = filter_labels(label, loss, mean_loss, alpha=1.25)
    # class 0: threshold 1.25 -> 1.3 ignored; class 1: threshold 2.5 -> 2.6 ignored; ignore stays ignore
    assert filtered.tolist() == [[0, 255, 1, 255, 255]]
    assert ignored_by_class(label, filtered, ["a", "b"]) == {"a": 0.5, "b": 0.5}


def test_class_without_statistics_is_kept():
    label = np.array([[0, 1]], np.uint8)
    filtered = filter_labels(label, np.array([[50.0, 50.0]]), np.array([1.0, np.nan]), alpha=1.25)
    assert filtered.tolist() == [[255, 1]]


def test_a_class_alpha_overrides_alpha_for_that_class_only():
    label = np.array([[0, 0, 1, 1]], np.uint8)
    loss = np.array([[1.0, 1.3, 1.4, 2.4]])
    mean_loss = np.array([1.0, 2.0])
    # class 1 at alpha 0.6: threshold 1.2 -> 1.4 and 2.4 ignored; class 0 keeps alpha 1.25 (1.3 ignored)
    assert filter_labels(label, loss, mean_loss, 1.25, class_alphas={1: 0.6}).tolist() == [[0, 255, 255, 255]]
    assert filter_labels(label, loss, mean_loss, 1.25).tolist() == [[0, 255, 1, 1]]
    thresholds = class_thresholds(mean_loss, 1.25, class_alphas={1: 0.6}, dropped=[0])
    assert thresholds[0] == -np.inf and thresholds[1].item() == pytest.approx(1.2) and thresholds[2] == np.inf


def test_dropped_class_loses_every_pixel_and_others_keep_the_rule():
    label = np.array([[0, 0, 1, 1, 2, 255]], np.uint8)
    loss = np.array([[1.0, 1.3, 0.0, 2.6, 0.1, 9.0]])
    filtered = filter_labels(label, loss, np.array([1.0, 2.0, np.nan]), alpha=1.25, dropped=[1])
    # class 1 dropped even at loss 0; class 0 by the rule; class 2 has no statistics, kept
    assert filtered.tolist() == [[0, 255, 255, 255, 2, 255]]


def _toy_val_set(tmp_path):
    """A synthetic set that copies the toy val split (images and masks), and its class names."""
    root = write_synthetic_set(tmp_path / "syn", open_dataset(TOY), split="val")
    return root, json.loads((root / "classes.json").read_text())["classes"]


def _filter(root, segmenter, **options) -> dict:
    return filter_synthetic(FilterConfig(synthetic=str(root), segmenter=str(segmenter), device="cpu", **options))


def test_a_region_class_is_kept_or_ignored_whole_by_its_mean_loss():
    # class 1: two regions (8-neighbour: the diagonal pair is one region), threshold 2.0; class 0 keeps the
    # pixel rule's decisions
    label = np.array([[1, 1, 0, 0, 1],
                      [0, 0, 1, 0, 1],
                      [0, 0, 0, 0, 255]], np.uint8)
    loss = np.array([[0.5, 3.0, 9.0, 0.1, 3.0],   # region A = (0,0),(0,1),(1,2): mean 1.5 -> kept whole
                     [0.1, 0.1, 1.0, 0.1, 2.0],   # region B = (0,4),(1,4): mean 2.5 -> ignored whole
                     [0.1, 0.1, 0.1, 0.1, 9.0]])
    pixel_rule = filter_labels(label, loss, np.array([1.0, 1.6]), alpha=1.25)
    assert pixel_rule[0, 1] == 255 and pixel_rule[0, 2] == 255  # the pixel rule split region A
    judged = judge_regions(label, loss, pixel_rule, [1], np.array([1.25, 2.0]))
    assert judged.tolist() == [[1, 1, 255, 0, 255],
                               [0, 0, 1, 0, 255],
                               [0, 0, 0, 0, 255]]
    # no region of the class: nothing changes
    assert (judge_regions(label, loss, pixel_rule, [2], np.array([1.25, 2.0, 1.0])) == pixel_rule).all()


def test_filter_judges_region_classes_per_object_and_records_them(tmp_path, toy_segmenter):
    from scipy import ndimage

    root, classes = _toy_val_set(tmp_path)
    name = classes[BUILDING]
    with pytest.raises(SegsynthError, match=r"region_classes and drop_classes both name \['" + name):
        _filter(root, toy_segmenter, region_classes=[name], drop_classes=[name])
    with pytest.raises(SegsynthError, match=r"region_classes \['bike'\]: not classes of"):
        _filter(root, toy_segmenter, region_classes=["bike"])
    assert not (root / "filter.json").exists()  # refused before anything was written
    summary = _filter(root, toy_segmenter, region_classes=[name])
    regions = whole = 0
    for line in (root / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        mask = np.array(Image.open(root / record["mask"]))
        filtered = np.array(Image.open(root / record["filtered_mask"]))
        labelled, count = ndimage.label(mask == BUILDING, structure=np.ones((3, 3), bool))
        for region in range(1, count + 1):
            kept = np.unique(filtered[labelled == region])
            regions += 1
            whole += len(kept) == 1  # all building or all ignore, never split
        # the manifest counts what the file holds
        if (mask == BUILDING).any():
            share = ((mask == BUILDING) & (filtered == 255)).sum() / (mask == BUILDING).sum()
            assert record["ignored"][name] == pytest.approx(share, abs=1e-4)
    assert regions > 0 and whole == regions
    assert json.loads((root / "filter.json").read_text())["region_classes"] == [name]
    assert 0.0 <= summary["mean_ignored_by_class"][name] <= 1.0
    assert filtered_done(root, 1.25, {"region_classes": [name]}) and not filtered_done(root, 1.25)


def test_batched_filter_matches_the_per_sample_rule():
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]
    labels = rng.integers(0, 4, (3, 16, 20)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.1] = 255
    losses = rng.exponential(1.0, labels.shape).astype(np.float32)
    mean_loss = np.array([0.5, 1.0, np.nan, 2.0])
    filtered, labelled, ignored = filter_batch(torch.from_numpy(labels), torch.from_numpy(losses),
                                               class_thresholds(mean_loss, 1.25), 4)
    for i in range(3):
        # the rule written out pixel by pixel, independently of the tensor code
        expected = labels[i].copy()
        for (y, x), value in np.ndenumerate(labels[i]):
            if value != 255 and np.isfinite(mean_loss[value]) and losses[i, y, x] > 1.25 * mean_loss[value]:
                expected[y, x] = 255
        assert np.array_equal(filtered[i].numpy(), expected)
        assert np.array_equal(filter_labels(labels[i], losses[i], mean_loss, 1.25), expected)
        valid = labels[i] != 255
        assert labelled[i].tolist() == [int((labels[i] == c).sum()) for c in range(4)]
        assert ignored[i].tolist() == [int(((labels[i] == c) & (expected == 255)).sum()) for c in range(4)]
        record = _record("x", labelled[i].numpy(), ignored[i].numpy(), classes)
        assert record["ignored"] == ignored_by_class(labels[i], expected, classes)
        assert record["ignored_fraction"] == round(float((expected[valid] == 255).mean()), 4)


@pytest.fixture(scope="module")
def toy_segmenter(tmp_path_factory):
    out = tmp_path_factory.mktemp("segmenter") / "real"
    train(TrainConfig(data=TOY, out=str(out), model="segformer-tiny", iterations=200, batch_size=8, lr=3e-3,
                      warmup=20, workers=0, eval_split="", device="cpu", log_every=50, save_every=1000))
    return out


def _road_looks_like_building(index, image, label, other):
    """Plant a wrong region: road pixels take the building facade of another scene, shifted down from
    above its horizon (coherent texture, not scattered pixels)."""
    shift = int(label.shape[0] * 0.4)
    source_label = np.full_like(label, 255)
    source_label[shift:] = other.label[:-shift]
    source_image = np.zeros_like(image)
    source_image[shift:] = other.image[:-shift]
    wrong = (label == ROAD) & (source_label == BUILDING)
    image[wrong] = source_image[wrong]
    return wrong


def test_filter_finds_planted_wrong_regions(tmp_path, toy_segmenter):
    dataset = open_dataset(TOY)
    root = write_synthetic_set(tmp_path / "syn", dataset, split="val", corrupt=_road_looks_like_building)
    summary = filter_synthetic(FilterConfig(synthetic=str(root), segmenter=str(toy_segmenter), device="cpu"))
    assert summary["filtered"] == 24

    wrong_ignored = wrong_total = right_ignored = right_total = 0
    for line in (root / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        truth = np.array(Image.open(root / "truth" / f"{record['id']}.png")) > 0
        mask = np.array(Image.open(root / record["mask"]))
        filtered = np.array(Image.open(root / record["filtered_mask"]))
        ignored = (filtered == 255) & (mask != 255)
        wrong_ignored += (ignored & truth).sum()
        wrong_total += truth.sum()
        right_ignored += (ignored & ~truth).sum()
        right_total += (~truth).sum()
        assert set(np.unique(filtered[filtered != 255])) <= set(np.unique(mask))  # only ever ignores
    recall, false_ignore = wrong_ignored / wrong_total, right_ignored / right_total
    print(f"planted wrong pixels: {wrong_total}, recall {recall:.3f}, false-ignore rate {false_ignore:.3f}")
    assert wrong_total > 1000
    # A 200-iteration tiny segmenter is a weak judge; the margins below hold for it, and the
    # closing notes report the figures for stronger ones.
    assert recall > 0.5
    assert false_ignore < 0.35
    assert recall > 2 * false_ignore


def test_filter_resumes_and_refuses_other_settings(tmp_path, toy_segmenter):
    dataset = open_dataset(TOY)
    root = write_synthetic_set(tmp_path / "syn", dataset, split="val")
    config = FilterConfig(synthetic=str(root), segmenter=str(toy_segmenter), device="cpu")
    first = filter_synthetic(config)
    assert first["filtered_now"] == 24
    masks = {p.name: p.read_bytes() for p in (root / "masks_filtered").iterdir()}
    again = filter_synthetic(config)
    assert again["filtered_now"] == 0 and again["filtered"] == 24
    assert masks == {p.name: p.read_bytes() for p in (root / "masks_filtered").iterdir()}
    assert (root / "masks" / next(iter(masks))).is_file()  # originals kept
    with pytest.raises(SegsynthError, match="other settings"):
        filter_synthetic(FilterConfig(synthetic=str(root), segmenter=str(toy_segmenter), alpha=2.0, device="cpu"))


def test_filter_drops_named_classes_and_records_them(tmp_path, toy_segmenter):
    root, classes = _toy_val_set(tmp_path)
    name = classes[ROAD]
    with pytest.raises(SegsynthError, match=r"not classes of .*classes.json \(its classes: "):
        _filter(root, toy_segmenter, drop_classes=["bike"])
    assert not (root / "filter.json").exists()  # refused before anything was written
    summary = _filter(root, toy_segmenter, drop_classes=[name])
    assert summary["mean_ignored_by_class"][name] == 1.0
    assert summary["mean_ignored_by_class"][classes[BUILDING]] < 1.0
    building = building_kept = 0
    for line in (root / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        mask = np.array(Image.open(root / record["mask"]))
        filtered = np.array(Image.open(root / record["filtered_mask"]))
        assert not (filtered == ROAD).any()
        building, building_kept = building + (mask == BUILDING).sum(), building_kept + (filtered == BUILDING).sum()
    assert building > 0 and building_kept > 0.5 * building  # the other classes still follow the loss rule
    assert json.loads((root / "filter.json").read_text())["drop_classes"] == [name]
    # A run's stage is done only for the settings it asks for.
    rules = {"drop_classes": [name], "class_alphas": {}}
    assert filtered_done(root, 1.25, rules) and not filtered_done(root, 1.25) and not filtered_done(root, 2.0, rules)
    assert not filtered_done(root, 1.25, {**rules, "class_alphas": {name: 0.5}})
    with pytest.raises(SegsynthError, match="other settings"):
        filter_synthetic(FilterConfig(synthetic=str(root), segmenter=str(toy_segmenter), device="cpu"))


def test_filter_takes_class_alphas_by_name_and_records_them(tmp_path, toy_segmenter):
    dataset = open_dataset(TOY)
    root = write_synthetic_set(tmp_path / "syn", dataset, split="val")
    classes = json.loads((root / "classes.json").read_text())["classes"]
    name = classes[BUILDING]
    for bad, message in (({"bike": 0.5}, r"class_alphas \['bike'\]: not classes of .*its classes: "),
                         ({name: 0}, rf"class_alphas {name}=0: give a number in \(0, 100\]"),
                         ({name: "strict"}, "give a number")):
        with pytest.raises(SegsynthError, match=message):
            filter_synthetic(FilterConfig(synthetic=str(root), segmenter=str(toy_segmenter), class_alphas=bad,
                                          device="cpu"))
    assert not (root / "filter.json").exists()  # refused before anything was written
    plain = filter_synthetic(FilterConfig(synthetic=str(root), segmenter=str(toy_segmenter), device="cpu"))
    for path in [root / "filter.json", *root.glob("filter.rank*.jsonl"), *(root / "masks_filtered").iterdir()]:
        path.unlink()
    strict = filter_synthetic(FilterConfig(synthetic=str(root), segmenter=str(toy_segmenter),
                                           class_alphas={name: 0.25}, device="cpu"))
    # a fifth of the threshold ignores more building pixels; the other classes are filtered as before
    assert strict["mean_ignored_by_class"][name] > plain["mean_ignored_by_class"][name]
    for other in classes:
        if other != name and np.isfinite(plain["mean_ignored_by_class"][other]):
            assert strict["mean_ignored_by_class"][other] == plain["mean_ignored_by_class"][other]
    assert json.loads((root / "filter.json").read_text())["class_alphas"] == {name: 0.25}
    assert filtered_done(root, 1.25, {"class_alphas": {name: 0.25}}) and not filtered_done(root, 1.25)


def test_filter_refuses_manifest_path_leaving_the_set(tmp_path, toy_segmenter):
    dataset = open_dataset(TOY)
    root = write_synthetic_set(tmp_path / "syn", dataset, split="val")
    lines = (root / "manifest.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["image"] = "../../etc/passwd"
    (root / "manifest.jsonl").write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
    with pytest.raises(SegsynthError, match="leaves its folder"):
        filter_synthetic(FilterConfig(synthetic=str(root), segmenter=str(toy_segmenter), device="cpu"))
    assert not (root / "masks_filtered").exists() or not any((root / "masks_filtered").iterdir())


def test_filter_refuses_segmenter_of_other_classes(tmp_path, toy_segmenter):
    dataset = open_dataset(TOY)
    root = write_synthetic_set(tmp_path / "syn", dataset, split="val")
    info = json.loads((root / "classes.json").read_text())
    info["classes"], info["palette"] = info["classes"][:-1], info["palette"][:-1]
    (root / "classes.json").write_text(json.dumps(info))
    with pytest.raises(SegsynthError, match="the segmenter has 9 classes .* but .*classes.json has"):
        filter_synthetic(FilterConfig(synthetic=str(root), segmenter=str(toy_segmenter), device="cpu"))


def test_scoring_lanes_split_the_threads(monkeypatch):
    import segsynth.methods.freemask.filter as filter_module

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    cpu = torch.device("cpu")
    assert scoring_lanes(2, cpu)[:2] == (2, 4)  # asked for: no probe
    assert scoring_lanes(3, cpu)[:2] == (3, 2)
    assert scoring_lanes(0, torch.device("cuda"))[:2] == (2, 8)  # a GPU: two lanes, no probe
    assert scoring_lanes(0, cpu, lambda lanes, threads: {"use_lanes": True})[:2] == (8, 1)
    assert scoring_lanes(0, cpu, lambda lanes, threads: {"use_lanes": False})[:2] == (1, 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 32)
    assert scoring_lanes(0, cpu, lambda lanes, threads: {"use_lanes": True})[:2] == (filter_module.MAX_AUTO_LANES, 4)


def test_probe_weighs_side_work_that_lanes_overlap(monkeypatch):
    """Lanes pay side work / lanes, a team pays it whole: a team 10 % faster at the bare forward
    still loses when the side work is large."""
    import segsynth.methods.freemask.filter as filter_module

    # seconds per model call: the warm-up (team, 2 lanes), then twice (team, 2 lanes); lanes share the clock
    rounds = [0, 0, 0] + [0.010 * 8, 0.011 * 8, 0.011 * 8] * 2
    timings = iter(rounds)

    class FakeClock:
        now = 0.0

        @classmethod
        def perf_counter(cls):
            return cls.now

    monkeypatch.setattr(filter_module.time, "perf_counter", FakeClock.perf_counter)

    class Model(torch.nn.Module):
        def forward(self, images):
            FakeClock.now += next(timings)

    batch = [(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8))] * 8
    heavy = probe_lanes(Model(), batch, decode_seconds=8 * 0.004, lanes=2, threads=2)
    assert heavy["use_lanes"] and heavy["team_ms_per_image"] == 10.0 and heavy["lanes_ms_per_image"] == 11.0
    timings = iter(rounds)
    before = torch.get_num_threads()
    light = probe_lanes(Model(), batch, decode_seconds=8 * 0.0005, lanes=2, threads=before + 1)
    assert not light["use_lanes"]
    assert torch.get_num_threads() == before  # the process's thread count is left as it was


def test_filter_keeps_its_lane_choice_and_lanes_agree(tmp_path, toy_segmenter, monkeypatch):
    import segsynth.methods.freemask.filter as filter_module

    dataset = open_dataset(TOY)
    roots = {lanes: write_synthetic_set(tmp_path / f"syn{lanes}", dataset, split="val") for lanes in (0, 1, 2)}
    summaries = {lanes: filter_synthetic(FilterConfig(synthetic=str(root), segmenter=str(toy_segmenter), lanes=lanes,
                                                      batch_size=4, device="cpu")) for lanes, root in roots.items()}
    assert summaries[1]["lanes"] == 1 and summaries[2]["lanes"] == 2
    if torch.get_num_threads() > 1:  # auto: probed once, kept, and not probed again on resume
        choice = json.loads((roots[0] / "filter.lanes.rank0.json").read_text())
        assert summaries[0]["lane_probe"] == choice["figures"]
        assert summaries[0]["lanes"] == (2 if choice["figures"]["use_lanes"] else 1)
        for path in (roots[0] / "masks_filtered").iterdir():
            path.unlink()
        monkeypatch.setattr(filter_module, "probe_lanes", lambda *args: pytest.fail("probed again"))
        resumed = filter_synthetic(FilterConfig(synthetic=str(roots[0]), segmenter=str(toy_segmenter), batch_size=4,
                                                device="cpu"))
        assert resumed["filtered_now"] == 24 and resumed["lane_probe"] == choice["figures"]
    # Thread counts change float rounding (~1e-7), not decisions: the sets agree but for rare ties.
    one, two = ({p.stem: np.asarray(Image.open(p)) for p in (roots[n] / "masks_filtered").glob("*.png")} for n in (1, 2))
    assert one.keys() == two.keys()
    differing = sum(int((one[k] != two[k]).sum()) for k in one)
    assert differing <= 1e-4 * sum(v.size for v in one.values())
