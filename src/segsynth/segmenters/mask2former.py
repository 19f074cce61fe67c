"""Mask2Former (Cheng et al. 2022) over transformers' Mask2FormerForUniversalSegmentation.

`Mask2FormerSegmenter` gives the universal (mask-classification) model segsynth's
segmenter interface (see `segsynth.segmenters`), so train, evaluate, stats and
filter use it through the `SEGMENTERS` table like SegFormer:

Semantic inference. Each of the Q queries predicts a class distribution over
C classes + "no object" and a mask logit map. As in Mask2Former's semantic
post-processing, the per-pixel class score is

    s_c(x) = sum_q softmax(class logits_q)[c] * sigmoid(mask logit_q(x))     (null class dropped)

`predict(images, size)` upsamples the mask logits to `size` before the sigmoid
(what the reference implementation does) and returns log(s_c / sum_c' s_c'):
the score map normalised to a per-pixel distribution, as log-probabilities, so
argmax is the usual semantic map and anything that treats the output as logits
sees the same distribution. `forward(images)` returns the same at the mask
resolution (stride 4).

Per-pixel loss (FreeMask's L̄_c and filter). `segmenters.losses.pixel_losses`
takes the cross-entropy of `predict` at label size, which for this model is

    loss(x) = -log( s_y(x) / sum_c s_c(x) )

the negative log of the normalised semantic score of the labelled class y:
low where the queries that cover x agree on y, high where they cover x with
other classes or barely cover it with y. It is 0 only when every query mass at
x goes to y, as the SegFormer loss is 0 only when the softmax puts all mass on y.

Training loss. Mask2Former's own set-prediction loss: Hungarian matching of
queries to the image's ground-truth class masks (cost: class probability +
sigmoid cross-entropy + dice on uniformly sampled points), then cross-entropy
on every query's class (no-object weight 0.1) and sigmoid cross-entropy + dice
on importance-sampled points of the matched masks, on the final and every
intermediate decoder layer (`Mask2FormerConfig` weights: class 2, mask 5,
dice 5). A label map becomes per-image targets here (one binary mask per class
present; 255 = ignore). Unlike transformers' loss -- where an ignore pixel is
simply "not in any mask", i.e. a negative for every query -- ignore pixels do
not count: each point's mask and dice terms carry the label's per-pixel weight
(0 at ignore, the sample's weight map elsewhere, 1 without one), in the matching
cost too, and no importance-sampled point lands on a zero-weight pixel. With
unit weights and no ignore pixels the loss is transformers' loss exactly
(tests/segmenters/test_mask2former.py checks it). The class term is not
weighted; a class whose every pixel has weight 0 is not a target. So with
`--loss ce` (the reference) a query that finds such a class is told "no
object": where FreeMask's filter ignores a whole sign, or `drop_classes` every
building, the set loss says the image has none. `--loss ce-ignore-unknown`
scales each unmatched query's "no object" term by the share of its predicted
mask (pixels with mask logit > 0; no gradient) on pixels with weight > 0: a query on ignore
pixels is not judged, one on labelled pixels is judged as in the reference,
and without ignore pixels the two losses are equal. As in the
reference, an image with more classes than queries leaves the extra classes
unmatched (100 queries for ADE20K's 150 classes: no image has that many).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
from transformers.models.mask2former.modeling_mask2former import sample_point

from segsynth import IGNORE_INDEX
from segsynth.io import SegsynthError
from segsynth.segmenters.losses import ignore_unknown_cross_entropy, weighted_cross_entropy
from segsynth.segmenters.segformer import IMAGENET_MEAN, IMAGENET_STD, label_info, load_pretrained

SWIN_STAGES = ["stage1", "stage2", "stage3", "stage4"]

# Swin backbones of the Mask2Former paper (Cheng et al. 2022, ADE20K semantic: 100 queries, 9 decoder
# layers + the query-only prediction, 6 pixel-decoder layers, 256-d), plus CPU presets: Swin widths of
# segformer-small / -tiny with fewer blocks and a small transformer head.
_PAPER_HEAD = dict(hidden_dim=256, feature_size=256, mask_feature_size=256, num_queries=100, decoder_layers=10,
                   encoder_layers=6, num_attention_heads=8, dim_feedforward=2048, encoder_feedforward_dim=1024)
MASK2FORMER_VARIANTS = {
    "mask2former-swin-t": dict(backbone=dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                                             window_size=7, drop_path_rate=0.3), head=_PAPER_HEAD),
    "mask2former-swin-s": dict(backbone=dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24],
                                             window_size=7, drop_path_rate=0.3), head=_PAPER_HEAD),
    "mask2former-swin-b": dict(backbone=dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                                             window_size=12, drop_path_rate=0.3), head=_PAPER_HEAD),
    "mask2former-swin-l": dict(backbone=dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48],
                                             window_size=12, drop_path_rate=0.3), head=_PAPER_HEAD),
    # CPU presets. small: about segformer-small's parameter count (2.4 M vs 2.5 M), sampled points scaled to
    # ~100x128 crops; tiny: for tests and quick demos.
    "mask2former-small": dict(
        backbone=dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=4, drop_path_rate=0.1),
        head=dict(hidden_dim=64, feature_size=64, mask_feature_size=64, num_queries=20, decoder_layers=7,
                  encoder_layers=3, num_attention_heads=4, dim_feedforward=512, encoder_feedforward_dim=512,
                  train_num_points=2048)),
    "mask2former-tiny": dict(
        backbone=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 4], window_size=4, drop_path_rate=0.0),
        head=dict(hidden_dim=32, feature_size=64, mask_feature_size=32, num_queries=8, decoder_layers=4,
                  encoder_layers=1, num_attention_heads=2, dim_feedforward=64, encoder_feedforward_dim=64,
                  train_num_points=256)),
}


# --- semantic inference -------------------------------------------------------------


def semantic_log_probs(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """(B, Q, C+1) class logits and (B, Q, H, W) mask logits -> (B, C, H, W) log of the normalised
    per-pixel class scores (see the module docstring)."""
    probabilities = class_logits.softmax(-1)[..., :-1]
    scores = torch.einsum("bqc,bqhw->bchw", probabilities, mask_logits.sigmoid()).clamp_min(1e-12)
    return scores.log() - scores.sum(1, keepdim=True).log()


# --- the weighted set-prediction loss ----------------------------------------------


def targets_from_labels(labels: torch.Tensor, weights: torch.Tensor | None):
    """A (B, H, W) label map (255 = ignore) and optional weights -> per image the classes present (with
    weight > 0), their binary masks and the per-pixel weight map (0 at ignore)."""
    weight_maps = (labels != IGNORE_INDEX).float()
    if weights is not None:
        weight_maps = weight_maps * weights.float()
    classes, masks = [], []
    for label, weight in zip(labels, weight_maps):
        present = label[weight > 0].unique().long()
        classes.append(present)
        masks.append((label[None] == present[:, None, None]).float())
    return classes, masks, weight_maps


def _sample_weights(weight_maps: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """Weights at points, bilinear; the border extended (zero padding would down-weight the image's edge)."""
    return sample_point(weight_maps, coordinates, align_corners=False, padding_mode="border")


def _unit_mean(point_weights: torch.Tensor) -> torch.Tensor:
    """Point weights scaled to mean 1 over the last dimension: unit weights stay as they are, a uniform scale
    changes nothing (as in the weighted cross-entropy), and dice's +1 smoothing meets the usual point count."""
    return point_weights / point_weights.mean(-1, keepdim=True).clamp_min(1e-6)


def _pair_costs(point_logits, point_targets, point_weights):
    """Weighted pairwise sigmoid cross-entropy and dice: (Q, P) logits x (T, P) targets, (P,) weights -> (Q, T)."""
    point_weights = _unit_mean(point_weights)
    total = point_weights.sum().clamp_min(1e-6)
    positive = F.binary_cross_entropy_with_logits(point_logits, torch.ones_like(point_logits), reduction="none")
    negative = F.binary_cross_entropy_with_logits(point_logits, torch.zeros_like(point_logits), reduction="none")
    cross_entropy = ((positive * point_weights) @ point_targets.T + (negative * point_weights) @ (1 - point_targets).T) / total
    probabilities = point_logits.sigmoid() * point_weights
    numerator = 2 * probabilities @ point_targets.T
    denominator = probabilities.sum(-1)[:, None] + (point_targets * point_weights).sum(-1)[None, :]
    return cross_entropy, 1 - (numerator + 1) / (denominator + 1)


@torch.no_grad()
def hungarian_match(class_logits, mask_logits, classes, masks, weight_maps, config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image: (query indices, target indices) minimising class + mask + dice cost on random points."""
    matches = []
    for image in range(class_logits.shape[0]):
        # The same random draw order as transformers' matcher, so unit weights reproduce it exactly.
        coordinates = torch.rand(1, config.train_num_points, 2, device=mask_logits.device)
        if len(classes[image]) == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            matches.append((empty, empty))
            continue
        cost_class = -class_logits[image].softmax(-1)[:, classes[image]]
        point_targets = sample_point(masks[image][:, None], coordinates.repeat(len(classes[image]), 1, 1),
                                     align_corners=False).squeeze(1)
        point_logits = sample_point(mask_logits[image][:, None], coordinates.repeat(mask_logits.shape[1], 1, 1),
                                    align_corners=False).squeeze(1)
        point_weights = _sample_weights(weight_maps[image][None, None], coordinates).view(-1)
        cost_mask, cost_dice = _pair_costs(point_logits, point_targets, point_weights)
        cost = config.mask_weight * cost_mask + config.class_weight * cost_class + config.dice_weight * cost_dice
        cost = torch.nan_to_num(cost, nan=torch.finfo(cost.dtype).max, posinf=torch.finfo(cost.dtype).max)
        queries, targets = linear_sum_assignment(cost.cpu())
        matches.append((torch.as_tensor(queries, dtype=torch.int64), torch.as_tensor(targets, dtype=torch.int64)))
    return matches


def _uncertain_points(logits, weights_at, config) -> torch.Tensor:
    """Mask2Former's importance sampling (PointRend): of `oversample_ratio` x P random points keep the
    `importance_sample_ratio` share with the least confident logits, plus uniform ones. Points on
    zero-weight pixels are never chosen as uncertain (they carry no loss)."""
    count = logits.shape[0]
    sampled = int(config.train_num_points * config.oversample_ratio)
    coordinates = torch.rand(count, sampled, 2, device=logits.device)
    uncertainty = -sample_point(logits, coordinates, align_corners=False).abs()[:, 0]
    uncertainty = uncertainty.masked_fill(weights_at(coordinates) <= 0, float("-inf"))
    uncertain = int(config.importance_sample_ratio * config.train_num_points)
    index = torch.topk(uncertainty, k=uncertain, dim=1)[1]
    index = index + sampled * torch.arange(count, device=logits.device)[:, None]
    coordinates = coordinates.view(-1, 2)[index.view(-1)].view(count, uncertain, 2)
    if config.train_num_points > uncertain:
        coordinates = torch.cat([coordinates, torch.rand(count, config.train_num_points - uncertain, 2,
                                                         device=logits.device)], dim=1)
    return coordinates


def layer_loss(class_logits, mask_logits, classes, masks, weight_maps, num_masks, config,
               ignore_unknown: bool = False) -> torch.Tensor:
    """One decoder layer's weighted class + mask + dice loss; `ignore_unknown`: each unmatched query's
    "no object" term scaled by the share of its mask on known (weight > 0) pixels."""
    matches = hungarian_match(class_logits, mask_logits, classes, masks, weight_maps, config)
    batch_of = torch.cat([torch.full_like(queries, image) for image, (queries, _) in enumerate(matches)])
    queries = torch.cat([queries for queries, _ in matches])

    # 1. Mask terms on points of each matched (query, target) pair, weighted per point.
    if len(queries):
        predicted = mask_logits[batch_of, queries][:, None]
        target = torch.cat([masks[image][targets] for image, (_, targets) in enumerate(matches)])[:, None]
        weight = weight_maps[batch_of][:, None]
        with torch.no_grad():
            coordinates = _uncertain_points(
                predicted, lambda xy: _sample_weights(weight, xy)[:, 0], config)
            point_targets = sample_point(target, coordinates, align_corners=False).squeeze(1)
            point_weights = _unit_mean(_sample_weights(weight, coordinates).squeeze(1))
        point_logits = sample_point(predicted, coordinates, align_corners=False).squeeze(1)
        per_point = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none")
        loss_mask = (per_point * point_weights).mean(1).sum() / num_masks  # = sum(w l) / sum(w): weights have mean 1
        probabilities = point_logits.sigmoid() * point_weights
        numerator = 2 * (probabilities * point_targets).sum(-1)
        denominator = probabilities.sum(-1) + (point_targets * point_weights).sum(-1)
        loss_dice = (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks
    else:  # nothing labelled in the batch: the masks get a zero gradient (DistributedDataParallel needs one)
        loss_mask = loss_dice = mask_logits.sum() * 0.0

    # 2. Class term: matched queries take their target's class, the others "no object" (weight eos).
    num_classes = class_logits.shape[-1] - 1
    target_classes = torch.full(class_logits.shape[:2], num_classes, dtype=torch.int64, device=class_logits.device)
    if len(queries):
        target_classes[batch_of, queries] = torch.cat([classes[image][targets]
                                                       for image, (_, targets) in enumerate(matches)])
    class_weight = torch.ones(num_classes + 1, device=class_logits.device)
    class_weight[-1] = config.no_object_weight
    if not ignore_unknown:
        loss_class = F.cross_entropy(class_logits.transpose(1, 2), target_classes, weight=class_weight)
    else:
        per_query = F.cross_entropy(class_logits.transpose(1, 2), target_classes, weight=class_weight, reduction="none")
        judged = _known_mask_shares(mask_logits, weight_maps)
        if len(queries):
            judged[batch_of, queries] = 1.0
        # The reference's normaliser (sum of the targets' class weights), so unit shares give its loss exactly and
        # an unjudged query lowers the loss instead of raising the others' weight.
        loss_class = (per_query * judged).sum() / class_weight[target_classes].sum()
    return config.class_weight * loss_class + config.mask_weight * loss_mask + config.dice_weight * loss_dice


@torch.no_grad()
def _known_mask_shares(mask_logits: torch.Tensor, weight_maps: torch.Tensor) -> torch.Tensor:
    """(B, Q, h, w) mask logits, (B, H, W) weight maps -> (B, Q): the share of each query's predicted mask
    (its pixels with logit > 0) on pixels with weight > 0; a query that claims no pixel is fully judged.
    No gradient: a query must not lower its loss by moving its mask onto ignore pixels."""
    known = F.adaptive_avg_pool2d((weight_maps > 0).float()[:, None], mask_logits.shape[-2:])
    claimed = (mask_logits > 0).float()
    area = claimed.sum((-2, -1))
    return torch.where(area > 0, (claimed * known).sum((-2, -1)) / area.clamp_min(1.0), torch.ones_like(area))


def set_prediction_loss(outputs, labels: torch.Tensor, weights: torch.Tensor | None, config,
                        ignore_unknown: bool = False) -> torch.Tensor:
    """The whole training loss of one forward pass: the final layer plus every auxiliary (intermediate) layer."""
    classes, masks, weight_maps = targets_from_labels(labels, weights)
    # Mask terms are normalised by the mean number of target masks per process (as the reference does).
    num_masks = torch.tensor(float(sum(len(c) for c in classes)), device=labels.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(num_masks)
        num_masks = num_masks / torch.distributed.get_world_size()
    num_masks = num_masks.clamp_min(1.0)
    layers = [(outputs.class_queries_logits, outputs.masks_queries_logits)]
    layers += [(aux["class_queries_logits"], aux["masks_queries_logits"]) for aux in outputs.auxiliary_logits or []]
    return sum(layer_loss(class_logits, mask_logits, classes, masks, weight_maps, num_masks, config, ignore_unknown)
               for class_logits, mask_logits in layers)


# --- the segmenter -------------------------------------------------------------------


class Mask2FormerSegmenter(nn.Module):
    """transformers' Mask2FormerForUniversalSegmentation with segsynth's interface."""

    def __init__(self, model: Mask2FormerForUniversalSegmentation):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # SwinBackbone keeps SwinModel's final LayerNorm but never uses it: frozen, so DistributedDataParallel
        # does not wait for a gradient that never comes (and the optimizer does not decay it).
        unused = getattr(getattr(model.model.pixel_level_module.encoder, "swin", None), "layernorm", None)
        for parameter in unused.parameters() if unused is not None else []:
            parameter.requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return self.model.config.num_labels

    def _outputs(self, images: torch.Tensor, auxiliary: bool = False):
        return self.model(pixel_values=(images - self.mean) / self.std, output_auxiliary_logits=auxiliary)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                weights: torch.Tensor | None = None, loss=weighted_cross_entropy) -> torch.Tensor:
        if labels is None:
            outputs = self._outputs(images)
            return semantic_log_probs(outputs.class_queries_logits, outputs.masks_queries_logits)
        ignore_unknown = {weighted_cross_entropy: False, ignore_unknown_cross_entropy: True}.get(loss)
        if ignore_unknown is None:  # training_loss() refuses this before any compute; a backstop
            raise SegsynthError("Mask2Former trains with its own set-prediction loss (--loss ce or ce-ignore-unknown); "
                                "per-pixel-logit losses such as --loss reliable need a segformer-* model")
        return set_prediction_loss(self._outputs(images, auxiliary=True), labels, weights, self.model.config,
                                   ignore_unknown)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        outputs = self._outputs(images)
        masks = F.interpolate(outputs.masks_queries_logits, size=size or images.shape[-2:], mode="bilinear",
                              align_corners=False)
        return semantic_log_probs(outputs.class_queries_logits, masks)

    def save(self, directory: Path) -> None:
        """config.json + model.safetensors, the transformers layout (loadable by from_pretrained)."""
        self.model.save_pretrained(directory, safe_serialization=True)


def mask2former_config(name: str, labels: dict) -> Mask2FormerConfig:
    variant = MASK2FORMER_VARIANTS[name]
    backbone = SwinConfig(**variant["backbone"], out_features=SWIN_STAGES)
    return Mask2FormerConfig(backbone_config=backbone, **variant["head"], **labels)


def create_mask2former(name: str, num_classes: int, pretrained: str | None, classes: list[str] | None):
    """A Mask2Former of the named variant: from scratch; from `pretrained`, a Mask2Former checkpoint (hub id or
    save_pretrained folder: every weight kept, the class head re-made for these classes); or from a Swin
    image classifier (e.g. an ImageNet Swin: the variant's head around that backbone, its weights loaded)."""
    labels = label_info(num_classes, classes)
    if not pretrained:
        return Mask2FormerSegmenter(Mask2FormerForUniversalSegmentation(mask2former_config(name, labels)))
    model = load_pretrained(Mask2FormerForUniversalSegmentation, pretrained, labels,
                            backbones={"swin": lambda config: _with_swin_backbone(name, pretrained, config, labels)})
    return Mask2FormerSegmenter(model)


def _with_swin_backbone(name: str, pretrained: str, swin_config, labels: dict):
    """The named variant's head around a pretrained Swin (its config and weights; stage outputs added)."""
    from transformers import SwinBackbone

    settings = {k: v for k, v in swin_config.to_dict().items() if k not in ("out_features", "out_indices")}
    # The checkpoint fixes the architecture; the regularisation is the preset's (the paper: drop path 0.3).
    settings["drop_path_rate"] = MASK2FORMER_VARIANTS[name]["backbone"]["drop_path_rate"]
    swin_config = SwinConfig(**settings, out_features=SWIN_STAGES)
    config = Mask2FormerConfig(backbone_config=swin_config, **MASK2FORMER_VARIANTS[name]["head"], **labels)
    model = Mask2FormerForUniversalSegmentation(config)
    backbone = SwinBackbone.from_pretrained(pretrained, config=swin_config, use_safetensors=True)
    model.model.pixel_level_module.encoder.load_state_dict(backbone.state_dict())
    return model


def load_mask2former(checkpoint: Path) -> Mask2FormerSegmenter:
    """The segmenter of a segsynth checkpoint folder (config.json + model.safetensors)."""
    return Mask2FormerSegmenter(Mask2FormerForUniversalSegmentation.from_pretrained(checkpoint, use_safetensors=True))
