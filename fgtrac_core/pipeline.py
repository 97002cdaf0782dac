"""How fgtrac rebuilds a recorded run's model and model inputs for analyses (influence, stage replay).

A run names its pipeline in its config (``Run.create(config=...)``):

    {"model": "package.module:ModelClass",        # called with no arguments
     "inputs": "package.module:function",         # function(config: dict, sample_ids: np.ndarray) -> Tensor
                                                   #   (or a tuple / dict of them: `fgtrac_core.inputs`)
     "head_layer": "head",                         # the final nn.Linear (influence's last_layer mode)
     "loss": "package.module:function"}           # optional: the loop's loss (default: mean cross-entropy)

The loss is the training loss of a batch exactly as the loop computes it, ``loss(outputs, targets) -> scalar``
(e.g. ``F.cross_entropy(outputs, targets, label_smoothing=0.1)``), of the outputs as the model returns them (a
tensor, or a tuple or dict holding the logits: `fgtrac_core.outputs`): replay must reproduce the loop's steps bit for
bit, and a mean over per-sample losses is not always the same bits as a reduction inside the loss.  Influence
takes a sample's loss as the same function of that sample alone (a batch of one).

Labels are never taken from the pipeline: they are the recorded labels (`samples.label`), the ones training saw.
Importing a module runs its code, so fgtrac imports by itself only the bundled pipelines (`sample_runs.*`); any
other run's pipeline must be named explicitly by the user (``--model``/``--inputs``/``--head-layer`` and
``--loss`` when the config names one, on every command that rebuilds the model), who thereby trusts it; the
current directory is then importable, as with ``python -m``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from fgtrac_core._per_example import per_example_losses
from fgtrac_core.errors import FgtracError
from fgtrac_core.inputs import Inputs, unpack_inputs
from fgtrac_core.outputs import class_logits, cross_entropy

_TRUSTED_PREFIXES = ("sample_runs.",)


@dataclass
class Pipeline:
    """A run's model factory and input loader, plus its recorded config."""

    model_factory: Callable[[], nn.Module]
    load_inputs: Callable[[dict[str, Any], np.ndarray], torch.Tensor]
    head_layer: str | None
    config: dict[str, Any]
    # the loop's training loss of a batch, (outputs, targets) -> scalar; None: mean cross-entropy
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def model(self) -> nn.Module:
        """A new model, called with the pipeline's inputs as the loop called it (`fgtrac_core.inputs`)."""
        model = self.model_factory()
        model.register_forward_pre_hook(unpack_inputs, with_kwargs=True)
        return model

    def per_sample_loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """(outputs, targets) -> one loss per sample: `loss_fn` of each sample alone (None: cross-entropy's)."""
        return None if self.loss_fn is None else functools.partial(per_example_losses, self.loss_fn)

    def inputs(self, sample_ids: np.ndarray) -> torch.Tensor | Inputs:
        """Model inputs of these samples, in the given order: one tensor, or `Inputs` when the loader returns
        several (a tuple, list or dict of tensors)."""
        try:  # a fresh writable array: loaders may hand it to torch.from_numpy
            x = self.load_inputs(self.config, np.array(sample_ids, dtype=np.int64))
        except FgtracError:
            raise
        except Exception as e:
            name = getattr(self.load_inputs, "__qualname__", "the inputs loader")
            raise FgtracError(f"the pipeline's inputs loader {name} failed ({type(e).__name__}: {e})") from None
        x = Inputs.of(x)
        bad = next((len(t) for t in pytree.tree_leaves(x) if len(t) != len(sample_ids)), None)
        if bad is not None:
            raise FgtracError(f"the pipeline returned {bad} inputs for {len(sample_ids)} sample ids")
        return x

    def check(self, x: torch.Tensor, targets: torch.Tensor) -> None:
        """Run the model (in eval mode, without gradients) on the inputs `x` of a few samples and the loss on its
        outputs, so that a pipeline that does not fit the run (inputs of another width, a loss that fails on these
        outputs) is refused here in one line, `FgtracError`, rather than deep inside an analysis."""
        model = self.model().eval()
        with torch.no_grad():
            try:
                out = model(x)
            except Exception as e:
                raise FgtracError(
                    f"the model does not run on the pipeline's inputs ({_first_line(e)}); check --model and --inputs"
                ) from None
            class_logits(out)  # outputs fgtrac cannot read classes from: its one-line error
            loss = self.loss_fn or cross_entropy
            try:
                loss(out, targets)
            except Exception as e:
                raise FgtracError(
                    f"the training loss {loss_description(self.loss_fn)} fails on the model's outputs "
                    f"({_first_line(e)}); check --loss"
                ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """`model.load_state_dict(state)`, or a one-line FgtracError naming what does not fit (the pipeline's
    `--model` is not the class the run trained, or not built the same way)."""
    try:
        model.load_state_dict(state)
    except RuntimeError:
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
        parts = [
            f"{label} {names[0]}" + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")
            for label, names in (("missing", missing), ("unexpected", unexpected), ("shape differs for", shapes))
            if names
        ]
        raise FgtracError(
            f"{what} does not fit the pipeline's model {type(model).__name__}: {'; '.join(parts) or 'see torch'}"
            f" (is --model the class the run trained, built the same way?)"
        ) from None


def _importable_cwd() -> None:
    """Make the current directory importable, as `python -m` does, for pipelines the user names explicitly."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _resolve(ref: str, flag: str) -> Any:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise FgtracError(f"{flag} must be given as MODULE:NAME (e.g. mypkg.models:Net), not {ref!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise FgtracError(
            f"{flag} {ref}: cannot import {module_name!r} ({e}); run fgtrac from the folder that holds it "
            "or install it"
        ) from None
    except Exception as e:  # the module's own code failed on import
        raise FgtracError(f"{flag} {ref}: importing {module_name!r} failed ({type(e).__name__}: {e})") from None
    value = getattr(module, attr, None)
    if value is None:
        raise FgtracError(f"{flag} {ref}: {module_name!r} has no {attr!r}")
    if not (inspect.isclass(value) or inspect.isfunction(value) or isinstance(value, functools.partial)):
        raise FgtracError(f"{flag} {ref} is a {type(value).__name__}, not a class or a Python function")
    return value


def _build(model_ref: str, factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Check once that the factory builds an nn.Module with no arguments (a clear error instead of a traceback)."""
    try:
        built = factory()
    except Exception as e:
        raise FgtracError(f"--model {model_ref} could not be built with no arguments ({type(e).__name__}: {e})") from None
    if not isinstance(built, nn.Module):
        raise FgtracError(f"--model {model_ref} built a {type(built).__name__}, not a torch.nn.Module")
    return factory


def loss_description(loss_fn: Callable[..., Any] | None, default: Callable[..., Any] | None = None) -> str:
    """``module:name`` of a pipeline's training loss, or "mean cross-entropy" for none (or `default`)."""
    if loss_fn is None or loss_fn is default:
        return "mean cross-entropy"
    return f"{getattr(loss_fn, '__module__', '?')}:{getattr(loss_fn, '__qualname__', type(loss_fn).__name__)}"


def load_pipeline(
    config: dict[str, Any] | str,
    *,
    model: str | None = None,
    inputs: str | None = None,
    head_layer: str | None = None,
    need_head: bool = False,
    loss: str | None = None,
) -> Pipeline:
    """The pipeline a run's config names; `model`/`inputs`/`head_layer`/`loss` override it (and are trusted).

    Everything missing — a model or inputs the config does not name, or names in a module fgtrac does not import
    by itself, and the head layer when `need_head` — is named in one error, with the flags that supply it.
    """
    cfg = json.loads(config) if isinstance(config, str) else dict(config)
    refs = {"--model": (model, cfg.get("model")), "--inputs": (inputs, cfg.get("inputs"))}
    if cfg.get("loss"):  # a run that names its loss must not be replayed or scored with another one
        refs["--loss"] = (loss, cfg["loss"])
    missing = []
    for flag, (given, recorded) in refs.items():
        if given is None and not (isinstance(recorded, str) and recorded.split(":")[0].startswith(_TRUSTED_PREFIXES)):
            missing.append(f"{flag} {recorded}" if isinstance(recorded, str) and recorded else f"{flag} MODULE:NAME")
    head = head_layer or cfg.get("head_layer")
    if need_head and not head:
        missing.append("--head-layer NAME")
    if missing:
        raise FgtracError(
            "name this run's pipeline: " + " ".join(missing) + " (fgtrac imports only its bundled pipelines by "
            "itself; naming a module means you trust its code; run from the folder that holds it)"
        )
    if model is not None or inputs is not None or loss is not None:
        _importable_cwd()
    model_ref, loss_ref = model or cfg["model"], loss or cfg.get("loss")
    return Pipeline(
        model_factory=_build(model_ref, _resolve(model_ref, "--model")),
        load_inputs=_resolve(inputs or cfg["inputs"], "--inputs"),
        head_layer=head,
        config=cfg,
        loss_fn=_resolve(loss_ref, "--loss") if loss_ref else None,
    )
