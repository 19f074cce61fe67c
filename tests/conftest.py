"""Fixtures shared by every test; the builders and constants they use live in fakes.py
(tests import them from there: two folders' conftest.py files would shadow each other as `conftest`)."""

from __future__ import annotations

import pytest

from fakes import (FOLDER_SPLITS, TINY_COMPARE, TINY_TRAIN, TOY_SPEC, build_ade20k, build_camvid, build_cityscapes,
                   build_coco_stuff, build_folder, build_voc)

# --- fixtures ------------------------------------------------------------------


@pytest.fixture
def camvid_root(tmp_path):
    return build_camvid(tmp_path / "camvid")


@pytest.fixture
def ade20k_root(tmp_path):
    return build_ade20k(tmp_path / "ADEChallengeData2016")


@pytest.fixture
def cityscapes_root(tmp_path):
    return build_cityscapes(tmp_path / "cityscapes")


@pytest.fixture
def voc_root(tmp_path):
    return build_voc(tmp_path / "voc")


@pytest.fixture
def coco_stuff_root(tmp_path):
    return build_coco_stuff(tmp_path / "coco_stuff")


@pytest.fixture
def folder_root(tmp_path):
    return build_folder(tmp_path / "folder", splits=FOLDER_SPLITS)



@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One tiny training run shared by the train/evaluate/CLI tests: (out folder, the in-memory final model).

    The model is captured from inside train() so a test can compare it with what load_segmenter reads back.
    """
    import segsynth.training.loop as train_module
    from segsynth.training.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("trained") / "run"
    created = []
    original = train_module.create_segmenter

    def capture(*args, **kwargs):
        model = original(*args, **kwargs)
        created.append(model)
        return model

    train_module.create_segmenter = capture
    try:
        checkpoint = train(TrainConfig(data=TOY_SPEC, out=str(out), **TINY_TRAIN))
    finally:
        train_module.create_segmenter = original
    assert checkpoint == out / "checkpoint"
    return out, created[0]


@pytest.fixture(scope="session")
def compare_run(tmp_path_factory):
    """One tiny `--method all` run, shared by the report and browser tests: (folder, results, printed output)."""
    import contextlib
    import io

    from segsynth.run import resolve_run_config, run

    out = tmp_path_factory.mktemp("compare") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        results = run(resolve_run_config({**TINY_COMPARE, "out": str(out)}))
    return out, results, printed.getvalue()
