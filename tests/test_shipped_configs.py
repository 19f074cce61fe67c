"""Every file under configs/ resolves as the config of the verb its header names (no unknown key, every value in
range, cross-checks passed), so a renamed or re-ranged key cannot leave a shipped config broken unnoticed.
Nothing is trained: only the config objects are built (paths are not opened)."""

from __future__ import annotations

import pytest

from fakes import REPO
from segsynth.config import build_config, load_yaml
from segsynth.methods.attn2mask.prompts import read_word_file
from segsynth.run import resolve_run_config
from segsynth.stage_configs import TrainConfig, TrainGeneratorConfig

CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian",
                  "bicyclist")
# config file -> the verb it is given to; a new file must be added here
VERBS = {
    "camvid_dusk.yaml": "run", "camvid_latent_mask2former_run.yaml": "run",
    "camvid_latent_mask2former_full_finetune.yaml": "run", "camvid_latent_mask2former_nobike_run.yaml": "run",
    "camvid_latent_mask2former_3000_run.yaml": "run", "camvid_latent_mask2former_loop_run.yaml": "run",
    "camvid_latent_mask2former_k4_run.yaml": "run", "camvid_latent_mask2former_alphas_run.yaml": "run",
    "camvid_latent_mask2former_5000_run.yaml": "run",
    "camvid_latent_mask2former_long_generator_run.yaml": "run",
    "camvid_latent_mask2former_share_run.yaml": "run", "camvid_latent_mask2former_targeted_run.yaml": "run",
    "camvid_latent_mask2former_region_run.yaml": "run", "camvid_latent_mask2former_paste_run.yaml": "run",
    "camvid_latent_mask2former_paste_p1_run.yaml": "run", "camvid_latent_mask2former_paste_both_run.yaml": "run",
    "camvid_latent_mask2former_paste_k4_run.yaml": "run", "camvid_latent_mask2former_paste_g8000_run.yaml": "run",
    "camvid_latent_mask2former_sdedit_run.yaml": "run", "camvid_latent_mask2former_sdedit07_run.yaml": "run",
    "camvid_latent_mask2former_sdeditcontrol_run.yaml": "run", "camvid_latent_mask2former_evidence_run.yaml": "run",
    "camvid_latent_mask2former_evidence_control_run.yaml": "run",
    "camvid_latent_mask2former_targeted_drop_run.yaml": "run",
    "camvid_latent_mask2former_targeted_unknown_run.yaml": "run",
    "camvid_latent_mask2former_targeted_drop_unknown_run.yaml": "run",
    "camvid_mask2former_run.yaml": "run",
    "camvid_run.yaml": "run", "camvid_seggen.yaml": "run",
    "camvid_generator.yaml": "train-generator", "camvid_latent_generator.yaml": "train-generator",
    "camvid_latent_generator_long.yaml": "train-generator",
    "toy_generator.yaml": "train-generator",
    "camvid_mask2former_real.yaml": "train", "camvid_real.yaml": "train",
    "camvid_prompt_words.yaml": "words",
}


def test_every_shipped_config_is_listed():
    assert sorted(path.name for path in (REPO / "configs").glob("*.yaml")) == sorted(VERBS)


@pytest.mark.parametrize("name", sorted(VERBS))
def test_shipped_config_resolves(name, tmp_path):
    path = REPO / "configs" / name
    verb = VERBS[name]
    if verb == "words":
        assert set(read_word_file(path, CAMVID_CLASSES)) <= set(CAMVID_CLASSES)
        return
    values = load_yaml(path)
    if verb == "run":
        config = resolve_run_config(values)
        assert config.arms and config.seeds
    else:
        cls = TrainConfig if verb == "train" else TrainGeneratorConfig
        config = build_config(cls, {"out": str(tmp_path / "out"), **values}, str(path))
        assert config.data == values["data"]
