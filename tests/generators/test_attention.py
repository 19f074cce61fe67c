"""AttentionCapture and token_indices_for_words on tiny random UNets built from configs."""

from __future__ import annotations

import warnings

import pytest
import torch

from segsynth.generators.attention import AttentionCapture, attention_levels, token_indices_for_words
from segsynth.generators.testing import TEXT_LENGTH, tiny_tokenizer
from segsynth.io import SegsynthError

CONTEXT_DIM = 32  # the tiny CLIP text encoder's hidden size


def three_level_unet(**overrides):
    """Cross-attention at 16x16 (factor 1), 8x8 (2) and the 4x4 mid block (4) for 16x16 latents."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 16, 32), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                  cross_attention_dim=CONTEXT_DIM, attention_head_dim=4)
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


@pytest.fixture(scope="module")
def unet():
    return three_level_unet()


def inputs(batch=4, height=16, width=16, keys=TEXT_LENGTH, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, height, width, generator=generator), torch.tensor(10),
            torch.randn(batch, keys, CONTEXT_DIM, generator=generator))


def run(unet, sample, timestep, context):
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=context).sample


class ReferenceStore:
    """Installs diffusers' own (non-SDPA) AttnProcessor everywhere, keeping every layer's probabilities."""

    def __init__(self, unet):
        from diffusers.models.attention_processor import AttnProcessor

        self.probabilities: dict[str, list[torch.Tensor]] = {}
        store = self

        class Keeping(AttnProcessor):
            def __init__(self, name):
                self.name = name

            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
                context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
                query = attn.head_to_batch_dim(attn.to_q(hidden_states))
                key = attn.head_to_batch_dim(attn.to_k(context))
                probabilities = attn.get_attention_scores(query, key)  # (batch * heads, queries, keys)
                store.probabilities.setdefault(self.name, []).append(
                    probabilities.view(hidden_states.shape[0], attn.heads, *probabilities.shape[1:]))
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)

        unet.set_attn_processor({key: Keeping(key.removesuffix(".processor")) for key in unet.attn_processors})


def test_levels_name_resolutions_by_map_height(unet):
    levels = attention_levels(unet)
    assert {r: (level["factor"], level["shape"]) for r, level in levels.items()} == {
        16: (1, (16, 16)), 8: (2, (8, 8)), 4: (4, (4, 4))}
    assert all(name.endswith("attn2") for level in levels.values() for name in level["cross"])
    assert all(name.endswith("attn1") for level in levels.values() for name in level["self"])
    wide = attention_levels(unet, latent_size=(16, 24))
    assert {r: level["shape"] for r, level in wide.items()} == {16: (16, 24), 8: (8, 12), 4: (4, 6)}


def test_capture_matches_diffusers_probabilities_and_leaves_output_unchanged(unet):
    sample, timestep, context = inputs()
    tokens = [0, 3, 5, 76]
    reference_unet = three_level_unet()
    reference = ReferenceStore(reference_unet)
    expected_output = run(reference_unet, sample, timestep, context)
    before = run(unet, sample, timestep, context)
    with AttentionCapture(unet, tokens, resolutions=(16, 8, 4), self_resolutions=(8,), query_chunk=37) as capture:
        after = run(unet, sample, timestep, context)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(after, expected_output, atol=1e-4, rtol=1e-4)  # SDPA vs the bmm processor

    # Mean over layers and heads of the conditional half (rows 2, 3), the requested tokens only.
    levels = attention_levels(unet)
    cross, self_attention = capture.cross_attention(1), capture.self_attention(1)
    for resolution in (16, 8, 4):
        height, width = levels[resolution]["shape"]
        per_layer = [reference.probabilities[name][0][3].mean(0) for name in levels[resolution]["cross"]]
        expected = torch.stack(per_layer).mean(0)[:, tokens].T.reshape(len(tokens), height, width)
        torch.testing.assert_close(cross[resolution], expected, atol=1e-5, rtol=1e-4)
    per_layer = [reference.probabilities[name][0][3].mean(0) for name in levels[8]["self"]]
    torch.testing.assert_close(self_attention[8], torch.stack(per_layer).mean(0).reshape(8, 8, 8, 8),
                               atol=1e-5, rtol=1e-4)
    assert set(self_attention) == {8}
    assert capture.counts == {"cross": {r: len(levels[r]["cross"]) for r in (4, 8, 16)},
                              "self": {8: len(levels[8]["self"])}}


def test_probabilities_over_all_tokens_sum_to_one(unet):
    sample, timestep, context = inputs(keys=9)
    with AttentionCapture(unet, list(range(9)), resolutions=(16,), self_resolutions=(16,)) as capture:
        run(unet, sample, timestep, context)
    torch.testing.assert_close(capture.cross_attention(0)[16].sum(0), torch.ones(16, 16))
    torch.testing.assert_close(capture.self_attention(0)[16].sum((2, 3)), torch.ones(16, 16))


def test_only_chosen_layers_are_replaced_and_originals_come_back(unet):
    from segsynth.generators.attention import _RecordingProcessor

    originals = dict(unet.attn_processors)
    with AttentionCapture(unet, [1], resolutions=(8,), self_resolutions=(4,)):
        inside = unet.attn_processors
        levels = attention_levels(unet)
        replaced = {key.removesuffix(".processor") for key, p in inside.items() if isinstance(p, _RecordingProcessor)}
        assert replaced == set(levels[8]["cross"]) | set(levels[4]["self"])
        assert all(inside[key] is originals[key] for key in inside if key.removesuffix(".processor") not in replaced)
    assert all(unet.attn_processors[key] is originals[key] for key in originals)

    with pytest.raises(RuntimeError, match="boom"):
        with AttentionCapture(unet, [1], resolutions=(8,)):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[key] is originals[key] for key in originals)
    assert not unet._forward_pre_hooks  # the step-counting hook is gone too


def test_query_chunks_do_not_change_the_maps(unet):
    sample, timestep, context = inputs()
    results = []
    for chunk in (3, 64, 100000):
        with AttentionCapture(unet, [2, 7], resolutions=(16, 8), self_resolutions=(16,), query_chunk=chunk) as capture:
            run(unet, sample, timestep, context)
        results.append((capture.cross_attention(0), capture.self_attention(0)))
    for cross, self_attention in results[1:]:
        for resolution in (16, 8):
            torch.testing.assert_close(cross[resolution], results[0][0][resolution], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(self_attention[16], results[0][1][16], atol=1e-6, rtol=1e-5)


def test_step_range_with_automatic_and_manual_numbering(unet):
    calls = [inputs(seed=seed) for seed in range(3)]
    with AttentionCapture(unet, [4], resolutions=(8,)) as only_second:
        run(unet, *calls[1])
    with AttentionCapture(unet, [4], resolutions=(8,)) as only_third:
        run(unet, *calls[2])
    with AttentionCapture(unet, [4], resolutions=(8,), steps=(1, 2)) as automatic:
        for call in calls:
            run(unet, *call)
    with AttentionCapture(unet, [4], resolutions=(8,), steps=(1, 2)) as manual:
        for index, call in zip((0, 0, 1), calls):  # e.g. two UNet calls in step 0
            manual.step(index)
            run(unet, *call)
    layers = len(attention_levels(unet)[8]["cross"])
    assert automatic.counts["cross"] == {8: layers} and manual.counts["cross"] == {8: layers}
    torch.testing.assert_close(automatic.cross_attention(0)[8], only_second.cross_attention(0)[8])
    torch.testing.assert_close(manual.cross_attention(0)[8], only_third.cross_attention(0)[8])
    assert not torch.allclose(only_second.cross_attention(0)[8], only_third.cross_attention(0)[8])
    automatic.reset()
    assert automatic.counts == {"cross": {}, "self": {}}
    with AttentionCapture(unet, torch.tensor([4]), resolutions=(8,), steps=(1, 2)) as overlap:
        overlap.step(0)
        run(unet, *calls[0])
    assert overlap.counts["cross"] == {}
    with pytest.raises(SegsynthError, match="nothing was captured"):
        overlap.cross_attention(0)


def test_batch_rows_per_sample_tokens_and_groups(unet):
    sample, timestep, context = inputs()
    with AttentionCapture(unet, [3, 4, 5], resolutions=(8,), batch="all") as everything:
        run(unet, sample, timestep, context)
    with AttentionCapture(unet, [[3, 4], [5]], resolutions=(8,), batch=(1, 3)) as rows:
        run(unet, sample, timestep, context)
    all_maps = [everything.cross_attention(row)[8] for row in range(4)]
    torch.testing.assert_close(rows.cross_attention(0)[8], all_maps[1][:2])
    torch.testing.assert_close(rows.cross_attention(1)[8], all_maps[2][2:])
    grouped = everything.cross_attention(3, groups=[[3, 5], [4]])[8]
    torch.testing.assert_close(grouped[0], (all_maps[3][0] + all_maps[3][2]) / 2)
    torch.testing.assert_close(grouped[1], all_maps[3][1])
    with pytest.raises(SegsynthError, match="not captured"):
        everything.cross_attention(0, groups=[[6]])
    with pytest.raises(SegsynthError, match="out of range"):
        everything.cross_attention(4)

    with pytest.raises(SegsynthError, match="even number"):
        with AttentionCapture(unet, [1], resolutions=(8,)):
            run(unet, *inputs(batch=3))
    with pytest.raises(SegsynthError, match="2 per-sample lists but 1"):
        with AttentionCapture(unet, [[1], [2]], resolutions=(8,), batch=(0, 1)):
            run(unet, sample, timestep, context)


def test_non_square_latents_by_factor(unet):
    with AttentionCapture(unet, [1, 2], factors=(2,), self_factors=(4,), latent_size=(16, 24)) as capture:
        run(unet, *inputs(height=16, width=24))
    assert {r: tuple(m.shape) for r, m in capture.cross_attention(0).items()} == {8: (2, 8, 12)}
    assert {r: tuple(m.shape) for r, m in capture.self_attention(0).items()} == {4: (4, 6, 4, 6)}
    with pytest.raises(SegsynthError, match=r"latent_size=\(16, 24\)"):
        with AttentionCapture(unet, [1], resolutions=(8,)):
            run(unet, *inputs(height=16, width=24))


def test_errors_name_the_model_the_resolutions_and_the_tokens(unet):
    from diffusers import UNet2DConditionModel

    plain = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                 mid_block_type=None, cross_attention_dim=CONTEXT_DIM)
    with pytest.raises(SegsynthError, match="UNet2DConditionModel has no cross-attention"):
        AttentionCapture(plain, [1], resolutions=(8,))
    with pytest.raises(SegsynthError, match=r"resolution\(s\) \[32\].*it has \[4, 8, 16\]"):
        AttentionCapture(unet, [1], resolutions=(32, 8))
    with pytest.raises(SegsynthError, match=r"self-attention at resolution\(s\) \[2\]"):
        AttentionCapture(unet, [1], resolutions=(8,), self_resolutions=(2,))
    with pytest.raises(SegsynthError, match=r"factor\(s\) \[8\].*\[1, 2, 4\]"):
        AttentionCapture(unet, [1], factors=(8,))
    with pytest.raises(SegsynthError, match="positions >= 0"):
        AttentionCapture(unet, [-1], resolutions=(8,))

    originals = dict(unet.attn_processors)
    with pytest.raises(SegsynthError, match="token index 77 is out of range.*77 tokens"):
        with AttentionCapture(unet, [2, 77], resolutions=(8,)):
            run(unet, *inputs())
    assert all(unet.attn_processors[key] is originals[key] for key in originals)


def test_stable_diffusion_pipeline_end_to_end(unet):
    """A real diffusers pipeline: CFG batch, automatic step count, and the words' maps from the prompt."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from segsynth.generators.testing import tiny_text_encoder, tiny_vae

    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(),
                                   unet=unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a cat on a mat"
    positions = token_indices_for_words(pipe.tokenizer, prompt, ["cat", "mat"], on_split="ignore")
    tokens = sorted({i for word in positions.values() for i in word})
    with AttentionCapture(pipe.unet, tokens, resolutions=(16, 8), steps=(1, 3)) as capture:
        pipe(prompt, num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="np",
             generator=torch.Generator().manual_seed(0))
    layers = attention_levels(unet)
    assert capture.counts["cross"] == {16: 2 * len(layers[16]["cross"]), 8: 2 * len(layers[8]["cross"])}
    maps = capture.cross_attention(0, groups=list(positions.values()))
    assert {r: tuple(m.shape) for r, m in maps.items()} == {16: (2, 16, 16), 8: (2, 8, 8)}
    assert all(torch.isfinite(m).all() and (m > 0).all() for m in maps.values())


# --- token_indices_for_words ------------------------------------------------------


def test_word_positions_with_the_clip_tokenizer():
    tokenizer = tiny_tokenizer()  # byte-level: every letter is a token, the last one marked '</w>'
    ids = tokenizer("a photo of a dog on a carpet").input_ids
    positions = token_indices_for_words(tokenizer, "a photo of a dog on a carpet", ["dog", "a", "Photo"],
                                        on_split="ignore")
    assert tokenizer.convert_ids_to_tokens([ids[i] for i in positions["dog"]]) == ["d", "o", "g</w>"]
    assert positions["a"] == [1, 9, 15]  # the word 'a', never the 'a' inside 'carpet'
    assert positions["Photo"] == [2, 3, 4, 5, 6]  # CLIP lower-cases
    two_words = token_indices_for_words(tokenizer, "a traffic light, a dog", ["traffic light"], on_split="ignore")
    assert two_words["traffic light"] == list(range(2, 14))  # 't' ... 'c</w>', 'l' ... 't</w>'


def test_word_errors_and_split_reports():
    tokenizer = tiny_tokenizer()
    with pytest.raises(SegsynthError, match="'pet'.*not in the prompt"):
        token_indices_for_words(tokenizer, "a carpet", ["pet"], on_split="ignore")  # only inside 'carpet'
    with pytest.raises(SegsynthError, match="'cow'.*not in the prompt"):
        token_indices_for_words(tokenizer, "a dog", ["cow"], on_split="ignore")
    with pytest.raises(SegsynthError, match="first 77 tokens"):
        token_indices_for_words(tokenizer, "x " * 80 + "dog", ["dog"], on_split="ignore")
    with pytest.warns(UserWarning, match="'dog' is split into 3 tokens"):
        token_indices_for_words(tokenizer, "a dog", ["dog"])
    with pytest.raises(SegsynthError, match="split into 3 tokens"):
        token_indices_for_words(tokenizer, "a dog", ["dog"], on_split="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token_indices_for_words(tokenizer, "a b", ["b"])  # one token: nothing to report
    with pytest.raises(SegsynthError, match="options: warn, ignore, error"):
        token_indices_for_words(tokenizer, "a dog", ["dog"], on_split="loud")


def test_word_level_tokenizer_plugs_in():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1, "a": 2, "dog": 3, "on": 4, "sofa": 5, "red": 6}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", model_max_length=8)
    assert token_indices_for_words(tokenizer, "a red dog on a sofa", ["dog", "sofa"]) == {"dog": [2], "sofa": [5]}
    with pytest.raises(SegsynthError, match="'cat' is not in the tokenizer's vocabulary"):
        token_indices_for_words(tokenizer, "a cat on a sofa", ["cat"])
