"""Capture a diffusers UNet's attention maps while it denoises, for attention pseudo-masks.

Text -> image generators can label their own images: a class word's
cross-attention map (how strongly each latent pixel attends to the word's
tokens) is a soft mask of where the class was drawn. DiffuMask (Wu et al.,
ICCV 2023), Dataset Diffusion (Nguyen et al., NeurIPS 2023), DAAM (Tang et
al., ACL 2023) and Attn2mask ("Exploring Limits of Diffusion-Synthetic
Training with Weakly Supervised Semantic Segmentation", arXiv 2309.01369) all
start from these maps; `segsynth.methods.attn2mask.pseudo_mask` turns them
into labels.

`AttentionCapture` installs a recording processor on the chosen attention
layers only and restores the UNet's own processors on exit:

    positions = token_indices_for_words(pipe.tokenizer, prompt, ["dog", "sofa"])
    tokens = sorted({i for word in positions.values() for i in word})
    with AttentionCapture(pipe.unet, tokens, resolutions=(16, 32, 64), self_resolutions=(32,)) as capture:
        image = pipe(prompt, num_inference_steps=50).images[0]
        cross = capture.cross_attention(0, groups=list(positions.values()))  # {16: (2, 16, 16), ...}
        self_attention = capture.self_attention(0)                           # {32: (32, 32, 32, 32)}

What is recorded, and how:

- Layers are picked by *resolution*: the height of their attention map, e.g.
  16, 32, 64 for SD1.5 at 512x512 (64x64 latents). `latent_size` (default:
  the UNet's configured sample size) says what the latents will be; a
  different size at run time is an error, because it would change which
  layers the resolutions name. For non-square latents the map of a level with
  downsampling factor f is ceil(h/f) x ceil(w/f) and its resolution is still
  its height; `factors=(4, 2)` selects levels by factor instead (SD1.5: the
  16x16 level of a 64x64 latent is factor 4). Results are keyed by resolution
  either way.
- Only the probabilities of the requested token positions are kept, averaged
  over heads and summed over layers and denoising steps (with a count, so the
  results are means). Self-attention maps (query pixel -> key pixel) at the
  `self_resolutions` are kept whole, averaged the same way, for the
  SA^k refinement of Dataset Diffusion.
- Only some rows of the UNet batch are recorded: by default the second half,
  the conditional half of diffusers' classifier-free-guidance batch
  (`torch.cat([uncond, cond])`); `batch="all"` or a `(start, stop)` row range
  otherwise.
- Steps: each UNet forward call is one step (diffusers pipelines call the UNet
  once per step with the CFG pair batched), counted from 0; call
  `capture.step(i)` before the UNet call to number steps yourself instead
  (after the first such call the automatic count is no longer used).
  `steps=(start, stop)` records only those steps.
- The layer's output comes from its original processor (fast SDPA, LoRA and
  all), untouched: the probabilities are recomputed beside it from the
  layer's own `to_q`/`to_k` for the recorded rows only, in chunks of
  `query_chunk` queries and in float32, so memory stays at
  rows x heads x query_chunk x keys floats (SD1.5 64x64: 4096 queries, 77
  keys, 8 heads).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Sequence

import torch

from segsynth.io import SegsynthError

# How the rows of the UNet batch to record can be named.
BATCH_CHOICES = ("second-half", "all")


# --- which layers exist, at which resolution -------------------------------------


def _latent_hw(unet, latent_size) -> tuple[int, int]:
    size = latent_size if latent_size is not None else getattr(unet.config, "sample_size", None)
    if size is None:
        raise SegsynthError(f"{type(unet).__name__} has no config.sample_size; pass latent_size=(height, width)")
    if isinstance(size, int):
        return size, size
    height, width = (int(v) for v in size)
    return height, width


def _map_shape(latent_hw: tuple[int, int], factor: int) -> tuple[int, int]:
    """The feature-map size after log2(factor) stride-2 convolutions (padding 1): ceil-halving each time."""
    height, width = latent_hw
    for _ in range(int(math.log2(factor))):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


def _layer_factor(name: str, unet) -> int:
    """Downsampling factor of an attention layer of a UNet2DConditionModel, from where it sits.

    down_blocks[i] runs at 2**i (each down block but the last ends in a downsampler), the mid block at the
    lowest resolution, up_blocks[i] mirrors the down path. The query count is checked at run time.
    """
    levels = len(unet.down_blocks)
    match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.", name)
    if match:
        index = int(match.group(2))
        return 2 ** index if match.group(1) == "down_blocks" else 2 ** (len(unet.up_blocks) - 1 - index)
    if name.startswith("mid_block."):
        return 2 ** (levels - 1)
    raise SegsynthError(f"attention layer {name!r} is outside the down/mid/up blocks of a UNet2DConditionModel; "
                        "AttentionCapture cannot tell its resolution")


def attention_levels(unet, latent_size: int | Sequence[int] | None = None) -> dict[int, dict]:
    """The UNet's attention levels: {resolution: {factor, shape, cross: [layer names], self: [layer names]}}.

    A resolution is the height of the level's attention map for latents of `latent_size` (default: the UNet's
    configured sample size); layer names are those of `unet.attn_processors` without '.processor'.
    """
    from diffusers.models.attention_processor import Attention

    if not hasattr(unet, "attn_processors"):
        raise SegsynthError(f"{type(unet).__name__} is not a diffusers UNet with attention processors")
    latent_hw = _latent_hw(unet, latent_size)
    levels: dict[int, dict] = {}
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        module = unet.get_submodule(name)
        if not isinstance(module, Attention):
            continue
        factor = _layer_factor(name, unet)
        shape = _map_shape(latent_hw, factor)
        level = levels.setdefault(shape[0], {"factor": factor, "shape": shape, "cross": [], "self": []})
        level["cross" if module.is_cross_attention else "self"].append(name)
    return dict(sorted(levels.items()))


# --- the capture ------------------------------------------------------------------


class _RecordingProcessor:
    """Records one layer's attention probabilities, then returns exactly what the original processor returns."""

    def __init__(self, inner, capture: "AttentionCapture", name: str, resolution: int, cross: bool):
        self.inner, self.capture, self.name, self.resolution, self.cross = inner, capture, name, resolution, cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if self.capture._recording():
            self.capture._record(self, attn, hidden_states, encoder_hidden_states, attention_mask)
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, **kwargs)


class AttentionCapture:
    """Context manager that records chosen attention maps of a diffusers `UNet2DConditionModel`.

    token_indices: prompt positions whose cross-attention to keep; one list shared by every recorded sample,
        or one list per recorded sample (the UNet batch's recorded rows, in order).
    resolutions / self_resolutions: attention-map heights whose cross- / self-attention to record
        (`attention_levels(unet)` lists them); or `factors` / `self_factors`: downsampling factors.
    latent_size: latent height and width (or one int) the UNet will run at; default its config.sample_size.
    batch: 'second-half' (the conditional half of a CFG batch, default), 'all', or a (start, stop) row range.
    steps: (start, stop) step indices to record (stop exclusive); None = every step.
    query_chunk: queries per chunk of the probability computation (bounds memory).
    """

    def __init__(self, unet, token_indices: Sequence[int] | Sequence[Sequence[int]],
                 resolutions: Sequence[int] = (16, 32), self_resolutions: Sequence[int] = (), *,
                 factors: Sequence[int] | None = None, self_factors: Sequence[int] | None = None,
                 latent_size: int | Sequence[int] | None = None, batch: str | Sequence[int] = "second-half",
                 steps: Sequence[int] | range | None = None, query_chunk: int = 1024):
        self.unet = unet
        self.latent_hw = _latent_hw(unet, latent_size)
        self.levels = attention_levels(unet, self.latent_hw)
        if not any(level["cross"] for level in self.levels.values()):
            raise SegsynthError(f"{type(unet).__name__} has no cross-attention layers: it is not text-conditioned, "
                                "so there is no word attention to capture")
        self.resolutions = self._resolve(resolutions, factors, "cross")
        self.self_resolutions = self._resolve(self_resolutions, self_factors, "self")
        self.token_indices = self._check_tokens(token_indices)
        self.batch = self._check_batch(batch)
        self.steps = self._check_steps(steps)
        if int(query_chunk) < 1:
            raise SegsynthError(f"query_chunk must be at least 1, got {query_chunk}")
        self.query_chunk = int(query_chunk)
        self._saved: dict | None = None
        self._hook = None
        self.reset()

    # 1. settings, checked before anything is installed

    def _resolve(self, resolutions, factors, kind: str) -> list[int]:
        available = {r: level for r, level in self.levels.items() if level[kind]}
        if factors is not None:
            by_factor = {level["factor"]: r for r, level in available.items()}
            missing = [f for f in factors if f not in by_factor]
            if missing:
                raise SegsynthError(f"{type(self.unet).__name__} has no {kind}-attention at downsampling factor(s) "
                                    f"{missing}; it has factors {sorted(by_factor)}")
            return sorted({by_factor[f] for f in factors})
        missing = [r for r in resolutions if r not in available]
        if missing:
            raise SegsynthError(
                f"{type(self.unet).__name__} has no {kind}-attention at resolution(s) {missing} for "
                f"{self.latent_hw[0]}x{self.latent_hw[1]} latents; it has {sorted(available)} "
                "(a resolution is the attention map's height; pass latent_size= if the latents differ)")
        return sorted(set(int(r) for r in resolutions))

    @staticmethod
    def _check_tokens(token_indices) -> list[int] | list[list[int]]:
        if isinstance(token_indices, torch.Tensor):
            token_indices = token_indices.tolist()
        if len(token_indices) == 0:
            raise SegsynthError("token_indices is empty: name at least one prompt position to capture")
        per_sample = hasattr(token_indices[0], "__len__")
        lists = [list(map(int, row)) for row in token_indices] if per_sample else [list(map(int, token_indices))]
        for row in lists:
            if not row or min(row) < 0:
                raise SegsynthError(f"token indices must be non-empty lists of positions >= 0, got {row}")
        return lists if per_sample else lists[0]

    @staticmethod
    def _check_batch(batch):
        if isinstance(batch, str):
            if batch not in BATCH_CHOICES:
                raise SegsynthError(f"unknown batch {batch!r}; options: {', '.join(BATCH_CHOICES)} or (start, stop)")
            return batch
        start, stop = (int(v) for v in batch)
        if not 0 <= start < stop:
            raise SegsynthError(f"batch row range must be (start, stop) with 0 <= start < stop, got {tuple(batch)}")
        return start, stop

    @staticmethod
    def _check_steps(steps) -> range | None:
        if steps is None or isinstance(steps, range):
            return steps
        if len(steps) == 0:
            return None
        if len(steps) != 2 or int(steps[0]) < 0 or int(steps[1]) <= int(steps[0]):
            raise SegsynthError(f"steps must be (start, stop) with 0 <= start < stop, got {list(steps)}")
        return range(int(steps[0]), int(steps[1]))

    # 2. install / restore

    def __enter__(self) -> "AttentionCapture":
        self._saved = dict(self.unet.attn_processors)
        chosen = {name: (r, True) for r in self.resolutions for name in self.levels[r]["cross"]}
        chosen.update({name: (r, False) for r in self.self_resolutions for name in self.levels[r]["self"]})
        processors = {}
        for key, original in self._saved.items():
            name = key.removesuffix(".processor")
            if name in chosen:
                resolution, cross = chosen[name]
                processors[key] = _RecordingProcessor(original, self, name, resolution, cross)
            else:
                processors[key] = original
        try:
            self.unet.set_attn_processor(processors)  # diffusers pops from the dict it is given
            self._hook = self.unet.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._saved is not None:
            self.unet.set_attn_processor(dict(self._saved))
            self._saved = None

    def reset(self) -> None:
        """Forget everything recorded (e.g. before the next batch of images); the processors stay installed."""
        self._cross_sum: dict[int, torch.Tensor] = {}
        self._self_sum: dict[int, torch.Tensor] = {}
        self._cross_count: dict[int, int] = {}
        self._self_count: dict[int, int] = {}
        self._forward_calls = 0
        self._manual_step = False
        self._step = 0

    # 3. steps

    def step(self, index: int) -> None:
        """Number the next UNet call(s) as denoising step `index` (turns off the automatic per-call count)."""
        self._manual_step, self._step = True, int(index)

    def _before_forward(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if sample is not None and tuple(sample.shape[-2:]) != self.latent_hw:
            raise SegsynthError(
                f"AttentionCapture was set up for {self.latent_hw[0]}x{self.latent_hw[1]} latents but the UNet ran on "
                f"{sample.shape[-2]}x{sample.shape[-1]}; pass latent_size=({sample.shape[-2]}, {sample.shape[-1]})")
        if not self._manual_step:
            self._step = self._forward_calls
        self._forward_calls += 1

    def _recording(self) -> bool:
        return self.steps is None or self._step in self.steps

    # 4. recording

    def _rows(self, batch_size: int) -> range:
        if self.batch == "all":
            return range(batch_size)
        if self.batch == "second-half":
            if batch_size % 2:
                raise SegsynthError(f"batch='second-half' expects a classifier-free-guidance batch of an even number "
                                    f"of rows, got {batch_size}; pass batch='all' or a (start, stop) row range")
            return range(batch_size // 2, batch_size)
        start, stop = self.batch
        if stop > batch_size:
            raise SegsynthError(f"batch rows {start}:{stop} are outside the UNet batch of {batch_size} rows")
        return range(start, stop)

    def _token_tensor(self, rows: int, keys: int, device) -> torch.Tensor:
        """(rows, T) token positions; per-sample lists are padded with their first position (trimmed on read)."""
        lists = self.token_indices if isinstance(self.token_indices[0], list) else [self.token_indices] * rows
        if len(lists) != rows:
            raise SegsynthError(f"token_indices has {len(lists)} per-sample lists but {rows} batch rows are recorded")
        highest = max(max(row) for row in lists)
        if highest >= keys:
            raise SegsynthError(f"token index {highest} is out of range: the text has {keys} tokens "
                                f"(positions 0..{keys - 1})")
        width = max(len(row) for row in lists)
        return torch.tensor([row + [row[0]] * (width - len(row)) for row in lists], device=device)

    @torch.no_grad()
    def _record(self, processor: _RecordingProcessor, attn, hidden_states, encoder_hidden_states, attention_mask):
        # 1. the recorded rows' queries and keys, as the layer computes them
        rows = self._rows(hidden_states.shape[0])
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch = hidden_states.shape[0]
        states = hidden_states[rows.start:rows.stop]
        if attn.group_norm is not None:
            states = attn.group_norm(states.transpose(1, 2)).transpose(1, 2)
        context = states
        if processor.cross:
            context = encoder_hidden_states[rows.start:rows.stop]
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
        height, width = self.levels[processor.resolution]["shape"]
        if states.shape[1] != height * width:
            raise SegsynthError(f"attention layer {processor.name} has {states.shape[1]} queries, not the "
                                f"{height}x{width} its position in the UNet implies; this UNet's block layout is "
                                "not UNet2DConditionModel's")
        query, key = attn.to_q(states), attn.to_k(context)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(len(rows), -1, heads, head_dim).transpose(1, 2)
        key = key.view(len(rows), -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query, key = query.float(), key.float()
        keys = key.shape[2]
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, keys, batch)
            mask = mask.view(batch, heads, -1, keys)[rows.start:rows.stop].float()

        # 2. the accumulators, made on first use
        store, counts = (self._cross_sum, self._cross_count) if processor.cross else (self._self_sum, self._self_count)
        tokens = self._token_tensor(len(rows), keys, query.device) if processor.cross else None
        if processor.resolution not in store:
            columns = tokens.shape[1] if processor.cross else height * width
            store[processor.resolution] = query.new_zeros(len(rows), columns, height * width) if processor.cross \
                else query.new_zeros(len(rows), height * width, columns)
            counts[processor.resolution] = 0
        total = store[processor.resolution]
        if total.shape[0] != len(rows):
            raise SegsynthError(f"the number of recorded batch rows changed from {total.shape[0]} to {len(rows)}; "
                                "call capture.reset() between batches of different sizes")

        # 3. probabilities chunk by chunk, head-averaged, added to the sums
        for start in range(0, query.shape[2], self.query_chunk):
            stop = min(start + self.query_chunk, query.shape[2])
            scores = query[:, :, start:stop] @ key.transpose(-1, -2) * attn.scale
            if mask is not None:
                scores = scores + (mask if mask.shape[2] == 1 else mask[:, :, start:stop])
            probabilities = scores.softmax(dim=-1)
            if processor.cross:
                picked = probabilities.gather(-1, tokens[:, None, None, :].expand(-1, heads, stop - start, -1))
                total[:, :, start:stop] += picked.mean(dim=1).transpose(1, 2)
            else:
                total[:, start:stop] += probabilities.mean(dim=1)
        counts[processor.resolution] += 1

    # 5. results

    def _sample_tokens(self, sample: int) -> list[int]:
        return self.token_indices[sample] if isinstance(self.token_indices[0], list) else self.token_indices

    def _check_recorded(self, store: dict, sample: int) -> None:
        if not store:
            raise SegsynthError("nothing was captured: run the UNet inside the `with AttentionCapture(...)` block "
                                f"(steps recorded: {self.steps if self.steps is not None else 'all'})")
        rows = next(iter(store.values())).shape[0]
        if not 0 <= sample < rows:
            raise SegsynthError(f"sample {sample} is out of range: {rows} batch row(s) were recorded")

    def cross_attention(self, sample: int = 0, groups: Sequence[Sequence[int]] | None = None) -> dict[int, torch.Tensor]:
        """{resolution: (T, h, w)} mean cross-attention of recorded sample `sample` to each captured token position
        (in the order given), over heads, layers and recorded steps. With `groups` (lists of prompt positions, e.g.
        one per class word's sub-word tokens), {resolution: (len(groups), h, w)}: each group's positions averaged."""
        self._check_recorded(self._cross_sum, sample)
        tokens = self._sample_tokens(sample)
        rows = [list(range(len(tokens)))] if groups is None else []
        for group in groups or []:
            missing = [position for position in group if position not in tokens]
            if missing or not group:
                raise SegsynthError(f"group {list(group)} has position(s) {missing} that were not captured "
                                    f"(captured: {tokens})")
            rows.append([tokens.index(position) for position in group])
        maps = {}
        for resolution, total in self._cross_sum.items():
            height, width = self.levels[resolution]["shape"]
            mean = total[sample, :len(tokens)] / self._cross_count[resolution]
            mean = mean.view(len(tokens), height, width)
            maps[resolution] = mean if groups is None else torch.stack([mean[row].mean(0) for row in rows])
        return maps

    def self_attention(self, sample: int = 0) -> dict[int, torch.Tensor]:
        """{resolution: (h, w, h, w)}: [i, j] is query pixel (i, j)'s mean attention over the key pixels."""
        self._check_recorded(self._self_sum, sample)
        maps = {}
        for resolution, total in self._self_sum.items():
            height, width = self.levels[resolution]["shape"]
            maps[resolution] = (total[sample] / self._self_count[resolution]).view(height, width, height, width)
        return maps

    @property
    def counts(self) -> dict[str, dict[int, int]]:
        """How many layer calls were summed per resolution: {'cross': {res: n}, 'self': {res: n}}."""
        return {"cross": dict(self._cross_count), "self": dict(self._self_count)}


# --- prompt positions of class words -------------------------------------------------


SPLIT_CHOICES = ("warn", "ignore", "error")


def _encode(tokenizer, text: str, with_offsets: bool, **kwargs):
    if with_offsets:
        try:
            return tokenizer(text, return_offsets_mapping=True, **kwargs)
        except (NotImplementedError, TypeError, ValueError):
            pass  # a tokenizer without offsets: fall back to token matching alone
    return tokenizer(text, **kwargs)


def _on_word_boundary(text: str, start: int, stop: int) -> bool:
    before = text[start - 1] if start > 0 else " "
    after = text[stop] if stop < len(text) else " "
    return not before.isalnum() and not after.isalnum()


def _find(ids: list[int], word_ids: list[int], prompt: str, offsets) -> list[int]:
    starts = []
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start:start + len(word_ids)] != word_ids:
            continue
        # Offsets (fast tokenizers) rule out a word matched inside a longer one ('pet' in 'car'+'pet').
        if offsets is not None and not _on_word_boundary(prompt, offsets[start][0], offsets[start + len(word_ids) - 1][1]):
            continue
        starts.append(start)
    return starts


def token_indices_for_words(tokenizer, prompt: str, words: Sequence[str], on_split: str = "warn") -> dict[str, list[int]]:
    """The prompt positions of each word's tokens, as the text encoder sees the prompt: {word: [positions]}.

    The prompt is tokenized the way diffusers' SD pipelines do (special tokens added, cut at
    `tokenizer.model_max_length`), so positions index the encoder's output and the cross-attention keys;
    every occurrence of a word is listed. A word may be several words ('traffic light') and each may be split
    into several sub-word tokens: all their positions are returned, to be averaged into one map. A single word
    split into several tokens is reported per `on_split`: 'warn' (default; `warnings.warn`), 'ignore' or
    'error' (SegsynthError). A word that is not in the prompt (or only past the cut), or that the tokenizer
    does not know (its unknown token), is a SegsynthError: a class with no tokens would silently get no mask.

    Written for transformers' CLIPTokenizer; any tokenizer plugs in that, like transformers' tokenizers, is
    called as `tokenizer(text, add_special_tokens=..., truncation=..., max_length=...)` and returns a mapping
    with 'input_ids' (a word-level tokenizer included). When it also supports `return_offsets_mapping`,
    matches must start and end on word boundaries of the prompt.
    """
    if on_split not in SPLIT_CHOICES:
        raise SegsynthError(f"unknown on_split {on_split!r}; options: {', '.join(SPLIT_CHOICES)}")
    max_length = getattr(tokenizer, "model_max_length", None)
    limit = dict(truncation=True, max_length=max_length) if max_length and max_length < 10**6 else {}
    encoding = _encode(tokenizer, prompt, True, **limit)
    ids = list(encoding["input_ids"])
    offsets = encoding.get("offset_mapping") if hasattr(encoding, "get") else None
    unknown = getattr(tokenizer, "unk_token_id", None)
    positions: dict[str, list[int]] = {}
    for word in words:
        word_ids = list(tokenizer(word, add_special_tokens=False)["input_ids"])
        if not word_ids:
            raise SegsynthError(f"class word {word!r} has no tokens; give each class a non-empty word")
        if unknown is not None and unknown in word_ids:
            raise SegsynthError(f"class word {word!r} is not in the tokenizer's vocabulary (it becomes the unknown "
                                "token); use a word the text encoder knows")
        starts = _find(ids, word_ids, prompt, offsets)
        if not starts:
            full = _encode(tokenizer, prompt, True)
            cut = bool(_find(list(full["input_ids"]), word_ids, prompt, full.get("offset_mapping")))
            tokens = getattr(tokenizer, "convert_ids_to_tokens", lambda x: x)(word_ids)
            raise SegsynthError(
                f"class word {word!r} (tokens {tokens}) is not in the prompt {prompt!r}"
                + (f" within its first {max_length} tokens (the text encoder's limit); shorten the prompt"
                   if cut else "; put the class word in the prompt as written (same form, e.g. singular)"))
        if len(word_ids) > len(word.split()) and on_split != "ignore":
            tokens = getattr(tokenizer, "convert_ids_to_tokens", lambda x: x)(word_ids)
            message = (f"class word {word!r} is split into {len(word_ids)} tokens {tokens}; "
                       "their attention maps are averaged")
            if on_split == "error":
                raise SegsynthError(message)
            warnings.warn(message, stacklevel=2)
        positions[word] = [start + i for start in starts for i in range(len(word_ids))]
    return positions


__all__ = ["AttentionCapture", "attention_levels", "token_indices_for_words"]
