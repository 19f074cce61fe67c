"""Training recipes: which samples each one draws, and that filtered ignore pixels reach training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segsynth.data import open_dataset
from segsynth.data.transforms import AugmentConfig
from segsynth.io import SegsynthError
from segsynth.training.recipes import RECIPES
from segsynth.training.loop import SampleStream, TrainConfig, train
from synthetic_sets import write_synthetic_set

TOY = "toy:n=12,n_val=4,size=32x40"


@pytest.fixture
def synthetic(tmp_path):
    return write_synthetic_set(tmp_path / "syn", open_dataset(TOY), copies=2)  # 24 samples


def _config(tmp_path, **overrides):
    values = dict(data=TOY, out=str(tmp_path / "out"), model="segformer-tiny", iterations=4, batch_size=2,
                  workers=0, eval_split="", device="cpu", log_every=1, warmup=1)
    values.update(overrides)
    return TrainConfig(**values)


def _draw_sources(sources, draws=600):
    stream = SampleStream(sources, AugmentConfig(crop=(32, 40), base=(32, 40)), seed=0)
    counts = {}
    for draw in range(draws):
        source, _ = stream.locate(draw)
        counts[sources[source].name] = counts.get(sources[source].name, 0) + 1
    return counts


def test_joint_repeats_real_to_match_synthetic(tmp_path, synthetic):
    config = _config(tmp_path, recipe="joint", synthetic=[str(synthetic)])
    sources = RECIPES["joint"](config, open_dataset(TOY))
    assert [s.name for s in sources] == ["real", f"synthetic:{synthetic}"]
    assert sources[0].repeat == pytest.approx(24 / 12)
    counts = _draw_sources(sources, draws=480)  # 10 epochs of 48
    assert counts["real"] == counts[f"synthetic:{synthetic}"] == 240


def test_synthetic_recipe_uses_only_synthetic(tmp_path, synthetic):
    sources = RECIPES["synthetic"](_config(tmp_path, recipe="synthetic", synthetic=[str(synthetic)]), open_dataset(TOY))
    assert len(sources) == 1 and len(sources[0].split) == 24


def test_replace_swaps_real_for_same_mask_synthetic_at_p(tmp_path, synthetic):
    config = _config(tmp_path, recipe="replace", synthetic=[str(synthetic)], replace_probability=0.6)
    (source,) = RECIPES["replace"](config, open_dataset(TOY))
    stream = SampleStream([source], AugmentConfig(crop=(32, 40), base=(32, 40)), seed=0)
    replaced = 0
    draws = 400
    for draw in range(draws):
        _, item = stream.locate(draw)
        rng = np.random.default_rng([0, 13, draw])
        choices = source.alternative_index[item]
        if rng.random() < 0.6:
            replaced += 1
            picked = source.alternatives.ids[choices[int(rng.integers(len(choices)))]]
            assert picked.startswith(source.split.ids[item] + "_s")  # same real mask
    assert abs(replaced / draws - 0.6) < 0.07


def test_replace_from_pool_draws_any_synthetic_sample_at_p_deterministically(tmp_path, synthetic):
    from segsynth.data.base import Split

    # A second set whose masks have no real twin (made from the val split), as SegGen's MaskSyn.
    twinless = write_synthetic_set(tmp_path / "twinless", open_dataset(TOY), split="val", copies=3)  # 12 samples
    with pytest.raises(SegsynthError, match="or --replace-from pool"):
        RECIPES["replace"](_config(tmp_path, recipe="replace", synthetic=[str(twinless)]), open_dataset(TOY))
    with pytest.raises(SegsynthError, match="replace_from = 'twin' is unknown: replace_from must be one of: same-mask, pool"):
        RECIPES["replace"](_config(tmp_path, recipe="replace", synthetic=[str(twinless)], replace_from="twin"),
                           open_dataset(TOY))
    config = _config(tmp_path, recipe="replace", synthetic=[str(synthetic), str(twinless)], replace_from="pool",
                     replace_probability=0.6)

    def picks(seed, draws=300):
        (source,) = RECIPES["replace"](config, open_dataset(TOY))
        assert source.alternative_index is None and len(source.alternatives) == 24 + 12
        pool, loaded = source.alternatives, []
        source.alternatives = Split("pool", pool.ids, lambda i: (loaded.append(pool.ids[i]), pool[i])[1])
        stream = SampleStream([source], AugmentConfig(crop=(32, 40), base=(32, 40)), seed=seed)
        result = []
        for draw in range(draws):
            loaded.clear()
            stream[draw]
            result.append(loaded[0] if loaded else None)
        return result

    first = picks(0)
    replaced = [sample_id for sample_id in first if sample_id is not None]
    assert abs(len(replaced) / len(first) - 0.6) < 0.07
    from_twinless = sum(sample_id.startswith("toy_val_") for sample_id in replaced)
    assert abs(from_twinless / len(replaced) - 12 / 36) < 0.1  # uniform over all 36 pooled samples
    assert picks(0) == first and picks(1) != first  # a pure function of (seed, draw)


def test_filtered_masks_reach_training_as_ignore(tmp_path, synthetic):
    # Mark every filtered mask as all-ignore but the first row; training must see 255 there.
    lines = []
    for line in (synthetic / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        from segsynth.io import atomic_write_png

        mask = np.full((32, 40), 255, np.uint8)
        mask[0] = 1
        atomic_write_png(synthetic / "masks_filtered" / f"{record['id']}.png", mask)
        record["filtered_mask"] = f"masks_filtered/{record['id']}.png"
        lines.append(json.dumps(record))
    (synthetic / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (source,) = RECIPES["synthetic"](_config(tmp_path, recipe="synthetic", synthetic=[str(synthetic)]), open_dataset(TOY))
    label = source.split[0].label
    assert (label == 255).mean() > 0.9
    (raw,) = RECIPES["synthetic"](_config(tmp_path, recipe="synthetic", synthetic=[str(synthetic)],
                                          synthetic_masks="raw"), open_dataset(TOY))
    assert (raw.split[0].label == 255).mean() == 0


def test_filtered_required_but_missing_is_an_error(tmp_path, synthetic):
    with pytest.raises(SegsynthError, match="not filtered yet"):
        RECIPES["joint"](_config(tmp_path, recipe="joint", synthetic=[str(synthetic)], synthetic_masks="filtered"),
                         open_dataset(TOY))


def test_recipes_need_synthetic_and_unknown_recipe_lists_options(tmp_path, synthetic):
    with pytest.raises(SegsynthError, match="needs at least one --synthetic"):
        train(_config(tmp_path, recipe="joint"))
    with pytest.raises(SegsynthError, match="must be one of: real, synthetic, joint, pretrain-finetune, replace"):
        train(_config(tmp_path, recipe="mixup"))


def test_pretrain_finetune_runs_both_stages(tmp_path, synthetic):
    checkpoint = train(_config(tmp_path, recipe="pretrain-finetune", synthetic=[str(synthetic)], pretrain_iterations=3))
    out = tmp_path / "out"
    assert checkpoint == out / "checkpoint"
    pretrain_meta = json.loads((out / "pretrain" / "checkpoint" / "segsynth.json").read_text())
    final_meta = json.loads((out / "checkpoint" / "segsynth.json").read_text())
    assert pretrain_meta["train_config"]["recipe"] == "synthetic" and pretrain_meta["state"]["iteration"] == 3
    assert final_meta["train_config"]["recipe"] == "real"
    assert final_meta["train_config"]["init_checkpoint"].endswith("pretrain/checkpoint")
    assert "pretrain-finetune" in (out / "config.yaml").read_text()


def test_synthetic_set_of_other_classes_is_refused(tmp_path, synthetic):
    info = json.loads((synthetic / "classes.json").read_text())
    info["classes"][0] = "heaven"
    (synthetic / "classes.json").write_text(json.dumps(info))
    with pytest.raises(SegsynthError, match="classes differ"):
        RECIPES["synthetic"](_config(tmp_path, recipe="synthetic", synthetic=[str(synthetic)]), open_dataset(TOY))


def test_paste_pixels_pastes_only_the_kept_pixels_of_the_chosen_classes():
    from segsynth.data import Sample
    from segsynth.training.stream import paste_pixels

    target = Sample("real", np.zeros((6, 8, 3), np.uint8), np.zeros((6, 8), np.uint8))
    donor_label = np.full((12, 16), 1, np.uint8)  # twice the size: resized (nearest) to the target first
    donor_label[:, :4] = 2                         # class 2 on the left quarter ...
    donor_label[:2, :4] = 255                      # ... but the filter ignored its top rows
    donor_label[:, 12:] = 3                        # class 3 on the right quarter: not pasted
    donor = Sample("syn", np.full((12, 16, 3), 200, np.uint8), donor_label)
    pasted = paste_pixels(target, donor, (2,))
    expected = np.zeros((6, 8), bool)
    expected[1:, :2] = True
    assert pasted.id == "real+syn"
    assert np.array_equal(pasted.label == 2, expected) and not np.isin(pasted.label, (1, 3, 255)).any()
    assert np.array_equal(pasted.image[..., 0] == 200, expected)
    assert pasted.weight is None and (target.label == 0).all()  # the real sample is not edited
    weighted = paste_pixels(Sample("real", target.image, target.label, np.full((6, 8), 0.5, np.float32)), donor, (2,))
    assert np.array_equal(weighted.weight == 1.0, expected) and (weighted.weight[~expected] == 0.5).all()


def test_paste_recipe_pastes_synthetic_pixels_of_the_named_classes_onto_real_draws(tmp_path):
    def invert_everything(i, image, label, other):
        image[:] = 255 - image
        return np.ones(label.shape, bool)

    dataset = open_dataset(TOY)
    donors = write_synthetic_set(tmp_path / "inverted", dataset, split="val", copies=3, corrupt=invert_everything)
    with pytest.raises(SegsynthError, match=r"recipe paste needs --paste-classes NAME \(once per class\).*classes: sky, building"):
        RECIPES["paste"](_config(tmp_path, recipe="paste", synthetic=[str(donors)]), dataset)
    with pytest.raises(SegsynthError, match="--paste-classes: lamp not a class of toy.*options: sky, building"):
        RECIPES["paste"](_config(tmp_path, recipe="paste", synthetic=[str(donors)], paste_classes=["pole", "lamp"]),
                         dataset)
    with pytest.raises(SegsynthError, match="paste same-mask needs sets made .* or --paste-from pool"):
        RECIPES["paste"](_config(tmp_path, recipe="paste", synthetic=[str(donors)], paste_classes=["pole"],
                                 paste_from="same-mask"), dataset)
    config = _config(tmp_path, recipe="paste", synthetic=[str(donors)], paste_classes=["person", "pole"],
                     paste_probability=0.5)
    (source,) = RECIPES["paste"](config, dataset)
    assert source.paste_classes == (6, 7) and len(source.split) == 12 and len(source.alternatives) == 12
    identity = AugmentConfig(crop=(32, 40), base=(32, 40), scale_range=(1.0, 1.0), flip=False, photometric=False)
    stream = SampleStream([source], identity, seed=0)
    pasted_draws = 0
    for draw in range(120):
        image, label, _ = stream[draw]
        real = source.split[stream.locate(draw)[1]]
        changed = (label.numpy() != real.label) | (image.permute(1, 2, 0).numpy() != real.image).any(-1)
        # Only pixels now labelled person or pole changed, and every one of them came from an inverted donor.
        assert np.isin(label.numpy()[changed], (6, 7)).all()
        pasted_draws += bool(changed.any())
    assert 0.35 < pasted_draws / 120 < 0.6  # p = 0.5 (a donor with no person or pole changes nothing)

    # The control without synthetic data: donors are the real training images themselves.
    with pytest.raises(SegsynthError, match="--paste-from real pastes pixels of other real training images; it "
                                            "reads no --synthetic set"):
        RECIPES["paste"](_config(tmp_path, recipe="paste", synthetic=[str(donors)], paste_classes=["pole"],
                                 paste_from="real"), dataset)
    (control,) = RECIPES["paste"](_config(tmp_path, recipe="paste", paste_classes=["pole"], paste_from="real",
                                          paste_probability=1.0), dataset)
    assert control.alternatives.ids == dataset.split("train").ids and control.alternative_index is None
    control_stream = SampleStream([control], identity, seed=0)
    added = 0
    for draw in range(12):
        _, label, _ = control_stream[draw]
        real = control.split[control_stream.locate(draw)[1]].label
        changed = label.numpy() != real
        assert (label.numpy()[changed] == 7).all()  # only pole was pasted, and pasting never removes a pole pixel
        added += int(changed.sum())
    assert added > 0

    # Both pools at once: every synthetic sample and every real training image, each drawn uniformly.
    with pytest.raises(SegsynthError, match="--paste-from pool\\+real draws donors from the --synthetic sets and the "
                                            "real training images; name a set with --synthetic DIR"):
        RECIPES["paste"](_config(tmp_path, recipe="paste", paste_classes=["pole"], paste_from="pool+real"), dataset)
    (both,) = RECIPES["paste"](_config(tmp_path, recipe="paste", synthetic=[str(donors)], paste_classes=["pole"],
                                       paste_from="pool+real", paste_probability=1.0), dataset)
    train = dataset.split("train")
    assert both.alternatives.ids == source.alternatives.ids + [f"real:{i}" for i in train.ids]
    assert both.alternative_index is None and both.paste_classes == (7,)
    assert np.array_equal(both.alternatives[len(source.alternatives) + 3].image, train[3].image)
    assert np.array_equal(both.alternatives[3].image, source.alternatives[3].image)
    # Over many draws both kinds of donor are pasted: an inverted (synthetic) donor's pole pixels and a real one's.
    kinds = set()
    both_stream = SampleStream([both], identity, seed=0)
    inverted = {i: source.alternatives[i].image for i in range(len(source.alternatives))}
    for draw in range(60):
        image, label, _ = both_stream[draw]
        real = both.split[both_stream.locate(draw)[1]]
        changed = (label.numpy() != real.label) | (image.permute(1, 2, 0).numpy() != real.image).any(-1)
        if changed.any():
            pasted = image.permute(1, 2, 0).numpy()[changed]
            kinds.add("synthetic" if any(np.array_equal(pasted, donor[changed]) for donor in inverted.values())
                      else "real")
    assert kinds == {"synthetic", "real"}
