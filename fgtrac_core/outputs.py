"""A classifier's outputs read as class logits.

Multi-class outputs (n, C) are the logits as they are.  A binary classifier with one logit per example ((n,) or
(n, 1), trained with ``BCEWithLogitsLoss``) reads as the two-class logits (0, z): their softmax is
(1 − σ(z), σ(z)), so the predicted class is z > 0, the confidence max(σ(z), 1 − σ(z)), the cross-entropy of
label y the binary cross-entropy with logits, and the margin (logit of the label minus the other) +z for label 1
and −z for label 0.  Every place fgtrac reads outputs as classes (the stored predictions and test losses, the
stage behaviours, the test losses the LDS check replays for) goes through `class_logits`; the training loss is
always the loop's own (`Pipeline.loss_fn`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_logits(outputs: torch.Tensor) -> torch.Tensor:
    """(n, C) class logits of a classifier's `outputs`: (n, C) with C > 1 as they are; (n,) or (n, 1) (one logit
    z per example) as (n, 2) = (0, z)."""
    if outputs.dim() == 1:
        z = outputs
    elif outputs.dim() == 2 and outputs.shape[1] == 1:
        z = outputs[:, 0]
    else:
        return outputs
    return torch.stack([torch.zeros_like(z), z], 1)


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch of `outputs` read as class logits: the training loss of a pipeline that
    names none (the recorded sample pipelines')."""
    return F.cross_entropy(class_logits(outputs), targets)
