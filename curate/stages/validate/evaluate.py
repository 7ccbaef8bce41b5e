"""Evaluate a trained CLIP on a held-out set: zero-shot classification, image<->text retrieval, linear probe.

The metric functions take plain tensors, so they can be checked on hand-made cases; `evaluate_checkpoint`
loads a model through open_clip and feeds them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curate.stages.validate.evalsets import EvalSet

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a {} shape.")
DEFAULT_KS = (1, 5, 10)


@dataclass(frozen=True)
class EvalOptions:
    templates: Sequence[str] = DEFAULT_TEMPLATES
    classnames: Sequence[str] | None = None  # default: the eval set's classes
    ks: Sequence[int] = DEFAULT_KS
    probe_train_fraction: float = 0.5
    probe_l2: float = 1e-3
    seed: int = 0
    batch_size: int = 256
    text_metrics: bool = True  # False for image-only models (SimCLR): zero-shot and retrieval are skipped
    task_templates: Mapping[str, Sequence[str]] = field(default_factory=dict)  # per eval-set task; else `templates`

    def templates_for(self, task: str) -> list[str]:
        return list(self.task_templates.get(task) or self.templates)


# ---------------------------------------------------------------- metrics on tensors


def zero_shot_accuracy(image_features: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of `image_features @ classifier` (classifier: dim x classes, open_clip's layout)."""
    predictions = (image_features @ classifier).argmax(dim=1)
    return float((predictions == labels).float().mean())


def recall_at_k(similarity: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Fraction of queries (rows) with a relevant candidate (column) among their k most similar.

    A candidate ranks by the number of candidates strictly more similar, so exact ties (the same caption
    text twice) are not broken by position.
    """
    import torch

    masked = torch.where(relevant, similarity, torch.full_like(similarity, -torch.inf))
    best_relevant = masked.max(dim=1).values
    rank = (similarity > best_relevant[:, None]).sum(dim=1)
    return {k: float((rank < k).float().mean()) for k in ks}


def retrieval_recalls(
    image_features: torch.Tensor, text_features: torch.Tensor, captions: Sequence[str], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """image->text and text->image recall@k for paired rows; identical caption texts count as the same text."""
    import torch

    same_text = torch.tensor([[a == b for b in captions] for a in captions])
    similarity = image_features @ text_features.T
    i2t = recall_at_k(similarity, same_text, ks)
    t2i = recall_at_k(similarity.T, same_text, ks)
    return {**{f"image_to_text_r{k}": v for k, v in i2t.items()}, **{f"text_to_image_r{k}": v for k, v in t2i.items()}}


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    n_classes: int,
    l2: float = 1e-3,
    steps: int = 100,
) -> float:
    """Test accuracy of multinomial logistic regression (L2-regularised, full-batch L-BFGS) on frozen features."""
    import torch

    weight = torch.zeros(train_x.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train_x @ weight + bias, train_y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((test_x @ weight + bias).argmax(dim=1) == test_y).float().mean())


def probe_split(labels: torch.Tensor, train_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) index tensors, a seeded random split."""
    import torch

    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = max(1, min(len(labels) - 1, round(train_fraction * len(labels))))
    return order[:cut], order[cut:]


# ---------------------------------------------------------------- a model on an eval set


def evaluate_checkpoint(
    checkpoint: Path, model_name: str, eval_set: EvalSet, options: EvalOptions, device: str = "cpu"
) -> dict[str, Any]:
    """All metrics of the open_clip model `model_name` with weights `checkpoint` on `eval_set`: for its main task
    `zero_shot_acc` and `linear_probe_acc`, for each further task T `zero_shot_acc_T` and `linear_probe_acc_T`,
    and the retrieval recalls."""
    import torch

    from curate.clip import ClipSpec, load_clip

    loaded = load_clip(ClipSpec(model_name, str(checkpoint), device, section="validate"))
    model, preprocess, tokenizer, device = loaded.model, loaded.preprocess, loaded.tokenizer, loaded.device
    labels = torch.tensor(eval_set.labels)
    with torch.no_grad():
        images = encode_images(model, preprocess, eval_set, options.batch_size, device)
    metrics: dict[str, Any] = {"n_eval": len(eval_set)}
    train, test = probe_split(labels, options.probe_train_fraction, options.seed)
    metrics["linear_probe_acc"] = linear_probe(
        images[train], labels[train], images[test], labels[test], len(eval_set.classes), options.probe_l2
    )
    for name, task in eval_set.tasks.items():
        task_labels = torch.tensor(task.labels)
        metrics[f"linear_probe_acc_{name}"] = linear_probe(
            images[train], task_labels[train], images[test], task_labels[test], len(task.classes), options.probe_l2
        )
    if options.text_metrics:
        classnames = list(options.classnames or eval_set.classes)
        classifier = zero_shot_classifier(model, tokenizer, classnames, list(options.templates), device)
        metrics["zero_shot_acc"] = zero_shot_accuracy(images, classifier, labels)
        for name, task in eval_set.tasks.items():
            classifier = zero_shot_classifier(model, tokenizer, task.classes, options.templates_for(name), device)
            metrics[f"zero_shot_acc_{name}"] = zero_shot_accuracy(images, classifier, torch.tensor(task.labels))
        with torch.no_grad():
            texts = encode_texts(model, tokenizer, eval_set.captions, options.batch_size, device)
        metrics.update(retrieval_recalls(images, texts, eval_set.captions, options.ks))
    return metrics


def zero_shot_classifier(
    model: Any, tokenizer: Any, classnames: Sequence[str], templates: Sequence[str], device: str | torch.device
) -> torch.Tensor:
    """open_clip's prompt-ensemble classifier (dim x classes), on the CPU."""
    import open_clip

    return open_clip.build_zero_shot_classifier(
        model, tokenizer, list(classnames), list(templates), num_classes_per_batch=None, device=device
    ).cpu()


def encode_images(
    model: Any, preprocess: Any, eval_set: EvalSet, batch_size: int, device: str | torch.device
) -> torch.Tensor:
    import torch

    features = []
    for start in range(0, len(eval_set), batch_size):
        stop = min(start + batch_size, len(eval_set))
        batch = torch.stack([preprocess(eval_set.load_image(i)) for i in range(start, stop)]).to(device)
        features.append(model.encode_image(batch, normalize=True).float().cpu())
    return torch.cat(features)


def encode_texts(
    model: Any, tokenizer: Any, captions: Sequence[str], batch_size: int, device: str | torch.device
) -> torch.Tensor:
    import torch

    features = []
    for start in range(0, len(captions), batch_size):
        tokens = tokenizer(list(captions[start : start + batch_size])).to(device)
        features.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(features)
