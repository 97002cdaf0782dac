"""A classifier's outputs read as class logits.

A model's outputs may be a tensor or a structure holding one: the first element of a tuple or list (a model that
returns ``(logits, features)``), the ``logits`` entry of a mapping, or the ``logits`` attribute of an output
object (Hugging Face's ``ModelOutput``) — `logits` finds it.  The loop's own training loss (`Pipeline.loss_fn`)
always gets the outputs as the model returned them; everything fgtrac reads as classes gets `class_logits`.

Multi-class logits (n, C) are the class logits as they are.  A binary classifier with one logit per example
((n,) or (n, 1), trained with ``BCEWithLogitsLoss``) reads as the two-class logits (0, z): their softmax is
(1 − σ(z), σ(z)), so the predicted class is z > 0, the confidence max(σ(z), 1 − σ(z)), the cross-entropy of
label y the binary cross-entropy with logits, and the margin (logit of the label minus the other) +z for label 1
and −z for label 0.  Every place fgtrac reads outputs as classes (the stored predictions and test losses, the
stage behaviours, the test losses the LDS check replays for) goes through `class_logits`.

Per-sample losses of the loop's loss and the micro-batches of an accumulated step slice structured outputs with
`fgtrac_core.batched`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from fgtrac_core.errors import FgtracError


def logits(outputs: Any) -> torch.Tensor:
    """The class-logit tensor in a model's `outputs`: the outputs themselves when a tensor, else the first element
    of a tuple or list, the ``logits`` entry of a mapping or the ``logits`` attribute of an object; a one-line
    FgtracError when there is none."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        found = outputs.get("logits")
    elif isinstance(outputs, tuple | list) and outputs:
        found = outputs[0]
    else:
        found = getattr(outputs, "logits", None)
    if not isinstance(found, torch.Tensor):
        raise FgtracError(
            f"the model's outputs are a {type(outputs).__name__} without class logits: fgtrac reads them from a "
            f"tensor, the first element of a tuple or list, or a 'logits' entry or attribute"
        )
    return found


def class_logits(outputs: Any) -> torch.Tensor:
    """(n, C) class logits of a classifier's `outputs` (`logits`): (n, C) with C > 1 as they are; (n,) or (n, 1)
    (one logit z per example) as (n, 2) = (0, z)."""
    outputs = logits(outputs)
    if outputs.dim() == 1:
        z = outputs
    elif outputs.dim() == 2 and outputs.shape[1] == 1:
        z = outputs[:, 0]
    else:
        return outputs
    return torch.stack([torch.zeros_like(z), z], 1)


def cross_entropy(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch of `outputs` read as class logits: the training loss of a pipeline that
    names none (the recorded sample pipelines')."""
    return F.cross_entropy(class_logits(outputs), targets)
