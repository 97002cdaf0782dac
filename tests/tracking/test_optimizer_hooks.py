"""The recorder's optimizer step hooks: its own step numbering, hyperparameters as applied, batch association in
either loop order, refusals of a step that goes backwards or an lr that was not applied, clipping inference."""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from torch import nn

from fgtrac_core import RecorderStateError, Run, RunStore
from fgtrac_core.errors import FgtracError
from fgtrac_core.tracking.optimizer_hooks import (
    ParamFingerprint,
    StepFacts,
    StepHooks,
    apply_clip,
    expand_hparams,
    fingerprint_tensors,
    fingerprint_value,
    hparams_delta,
    infer_clip,
    param_fingerprint,
)
from tests.conftest import run_cli


def _run(run_dir: Path) -> tuple[Run, nn.Module]:
    torch.manual_seed(0)
    run = Run.create(run_dir, name="hooks")
    run.register_samples(
        np.arange(20), split="train", labels=np.arange(20) % 2, raw=[bytes([i]) for i in range(20)]
    )
    return run, nn.Linear(3, 2)


def _backward(model: nn.Module) -> torch.Tensor:
    loss = model(torch.randn(4, 3)).pow(2).mean()
    loss.backward()
    return loss


def _rows(run_dir: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(run_dir / "snapshot.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


@pytest.mark.parametrize("order", ["sched_then_log", "log_then_sched", "log_first"])
def test_batches_get_the_applied_lr_whatever_the_order(tmp_path: Path, order: str) -> None:
    run, model = _run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with run.stage("s", optimizer=opt, model=model):
        for epoch in range(2):
            for i in range(3):
                ids = [2 * i, 2 * i + 1]
                if order == "log_first":
                    run.log_batch(ids, epoch=epoch)
                opt.zero_grad()
                _backward(model)
                opt.step()
                if order == "log_then_sched":
                    run.log_batch(ids, epoch=epoch)
                sched.step()
                if order == "sched_then_log":
                    run.log_batch(ids, epoch=epoch)
    run.close()
    rows = _rows(tmp_path / "r", "SELECT step, lr FROM batches ORDER BY batch_id")
    assert rows == [(s, 0.1 * 0.5**s) for s in range(6)]
    assert _rows(tmp_path / "r", "SELECT start_step, end_step FROM stages") == [(0, 5)]


@pytest.mark.parametrize("order", ["log_after_step", "log_first"])
def test_batches_get_every_groups_rate_when_they_differ(
    tmp_path: Path, order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slower body: each batch records every param group's rate as its step applied it (read by the loop just
    before the step: the reference), NULL where the groups share one rate; `fgtrac sample` and the lifecycle page
    show them."""
    run, model = _run(tmp_path / "r")
    body, head = nn.Linear(3, 3), model
    opt = torch.optim.SGD([{"params": body.parameters(), "lr": 0.01}, {"params": head.parameters()}], lr=0.1)
    # per-group lambdas: the body's rate decays, the head's does not (their ratio changes every step)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5**s, lambda s: 1.0])
    applied = []
    with run.stage("s", optimizer=opt, model=head):
        for i in range(4):
            ids = [2 * i, 2 * i + 1]
            if order == "log_first":
                run.log_batch(ids)
            opt.zero_grad()
            head(torch.tanh(body(torch.randn(4, 3)))).pow(2).mean().backward()
            applied.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()
            if order == "log_after_step":
                run.log_batch(ids)
    equal = torch.optim.SGD(model.parameters(), lr=0.1)
    with run.stage("one", optimizer=equal, model=model):
        equal.zero_grad()
        _backward(model)
        equal.step()
        run.log_batch([0, 1])
    run.close()
    rows = _rows(tmp_path / "r", "SELECT lr, group_lrs FROM batches ORDER BY batch_id")
    assert rows[:4] == [(rates[0], json.dumps(rates, separators=(",", ":"))) for rates in applied]
    assert rows[4] == (0.1, None)
    shown = f"{applied[1][0]:.3g} / {applied[1][1]:.3g}"  # sample 2 is in the second batch
    assert f"lr {shown}  batch loss" in run_cli("sample", str(tmp_path / "r"), "2").stdout
    shown = f"{applied[0][0]:.3g} / {applied[0][1]:.3g}"  # sample 0: the first batch, then stage "one"
    # imported here: the app's helpers need streamlit, and this module's CUDA tests run on GPU hosts without it
    from tests.app._support import PAGES, open_page

    at = open_page(tmp_path / "r", PAGES[3], monkeypatch, sample="0")
    uses = next(d.value for d in at.dataframe if "step" in d.value.columns)
    assert uses["lr"].tolist() == [shown, "0.1"] and "group_lrs" not in uses.columns


@pytest.mark.parametrize("where", ["after_backward", "before_forward", "end_of_body"])
def test_accumulated_micro_batches_get_their_step_wherever_the_loop_logs(tmp_path: Path, where: str) -> None:
    """Gradient accumulation over 3 micro-batches (7 an epoch: steps of 3, 3 and 1), each logged after its
    backward, before its forward, or at the end of the loop body (the step's last one after `opt.step()`): every
    micro-batch is recorded for the optimizer step that applied it."""
    run, model = _run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    truth, step = [], 0
    with run.stage("s", optimizer=opt, model=model):
        for epoch in range(2):
            for i in range(7):
                ids = [i, 10 + i]
                if where == "before_forward":
                    run.log_batch(ids, epoch=epoch)
                _backward(model)
                if where == "after_backward":
                    run.log_batch(ids, epoch=epoch)
                truth.append(step)
                if i % 3 == 2 or i == 6:
                    opt.step()
                    opt.zero_grad()
                    step += 1
                if where == "end_of_body":
                    run.log_batch(ids, epoch=epoch)
    run.close()
    assert [s for (s,) in _rows(tmp_path / "r", "SELECT step FROM batches ORDER BY batch_id")] == truth
    assert _rows(tmp_path / "r", "SELECT count(*) FROM optimizer_steps") == [(6,)]


def test_hparams_are_stored_as_changes_and_expand_back(tmp_path: Path) -> None:
    run, model = _run(tmp_path / "r")
    opt = torch.optim.Adam([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}], lr=0.01)
    with run.stage("s", optimizer=opt, model=model):
        for step in range(4):
            opt.zero_grad()
            _backward(model)
            if step == 2:
                opt.param_groups[1]["betas"] = (0.8, 0.99)
            opt.step()
            run.log_batch([step])
    run.close()
    deltas = [
        json.loads(h) for (h,) in _rows(tmp_path / "r", "SELECT hparams FROM optimizer_steps ORDER BY step")
    ]
    assert deltas[0][0]["lr"] == 0.01 and deltas[0][1]["lr"] == 0.5 and deltas[0][0]["betas"] == [0.9, 0.999]
    assert {"eps", "weight_decay", "amsgrad", "maximize"} <= set(deltas[0][0])
    assert deltas[1] == [{}, {}] and deltas[2] == [{}, {"betas": [0.8, 0.99]}] and deltas[3] == [{}, {}]
    full = expand_hparams([json.dumps(d) for d in deltas])
    assert full[3][1]["betas"] == [0.8, 0.99] and full[3][0]["betas"] == [0.9, 0.999]
    assert hparams_delta(None, full[0]) == full[0]


def test_steps_are_numbered_across_stages_epochs_and_sessions(tmp_path: Path) -> None:
    run, model = _run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for name in ("a", "b"):
        with run.stage(name, optimizer=opt, model=model):
            for _ in range(2):  # epochs
                for i in range(3):
                    opt.zero_grad()
                    _backward(model)
                    opt.step()
                    run.log_batch([i])
    run.close()
    run = Run.open(tmp_path / "r")
    with run.stage("c", optimizer=opt, model=model):
        opt.step()
        run.log_batch([0])
        assert run.checkpoint(model).step == 13
    run.close()
    assert [s for (s,) in _rows(tmp_path / "r", "SELECT step FROM batches ORDER BY batch_id")] == list(
        range(13)
    )
    assert _rows(tmp_path / "r", "SELECT name, start_step, end_step FROM stages ORDER BY stage_id") == [
        ("a", 0, 5),
        ("b", 6, 11),
        ("c", 12, 12),
    ]


def test_gradient_accumulation_batches_share_their_step(tmp_path: Path) -> None:
    run, model = _run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with run.stage("s", optimizer=opt, model=model):
        opt.zero_grad()
        for micro in range(6):
            _backward(model)
            run.log_batch([micro])
            if micro % 3 == 2:
                opt.step()
                opt.zero_grad()
    run.close()
    assert [s for (s,) in _rows(tmp_path / "r", "SELECT step FROM batches ORDER BY batch_id")] == [
        0,
        0,
        0,
        1,
        1,
        1,
    ]


def _log_after_step(run: Run, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    for i in range(3):
        opt.zero_grad()
        _backward(model)
        opt.step()
        run.log_batch([i])


def _log_before_step(run: Run, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    for i in range(3):
        run.log_batch([i])
        opt.zero_grad()
        _backward(model)
        opt.step()


def _accumulate_then_dangle(run: Run, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    for micro in range(5):  # steps after micro-batches 2 and 5; the last two batches' step never runs
        _backward(model)
        run.log_batch([micro])
        if micro % 3 == 2:
            opt.step()
            opt.zero_grad()


def _steps_without_batches(run: Run, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    for _ in range(2):
        opt.zero_grad()
        _backward(model)
        opt.step()


@pytest.mark.parametrize(
    "loops",
    [
        (_log_after_step, _log_before_step),
        (_log_before_step, _steps_without_batches, _log_after_step),
        (_accumulate_then_dangle, _log_after_step, _accumulate_then_dangle),
    ],
    ids=["after-before", "before-none-after", "dangling"],
)
def test_a_stage_ends_at_its_last_batch_step(tmp_path: Path, loops: tuple[Callable[..., None], ...]) -> None:
    """The recorder fills in a stage's end_step from its own count (no read-back of the batches): it equals the
    largest step of the stage's batches (NULL without batches), committed and verified, over a reopen too."""
    run, model = _run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i, loop in enumerate(loops):
        if i == len(loops) - 1:  # the last stage in a reopened run
            run.close()
            run = Run.open(tmp_path / "r")
        with run.stage(f"s{i}", optimizer=opt, model=model):
            loop(run, model, opt)
    run.close()
    ends = _rows(
        tmp_path / "r",
        """SELECT s.end_step, (SELECT max(step) FROM batches b WHERE b.stage_id = s.stage_id)
           FROM stages s ORDER BY s.stage_id""",
    )
    assert [recorded for recorded, _ in ends] == [largest for _, largest in ends]
    assert any(largest is None for _, largest in ends) == (_steps_without_batches in loops)
    assert run_cli("verify", str(tmp_path / "r")).returncode == 0


def test_step_going_backwards_is_one_line_and_leaves_the_stage_open(tmp_path: Path) -> None:
    """`enumerate(loader)` as step= restarts at 0 in epoch 2: refused, nothing recorded, the stage goes on."""
    run, model = _run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with run.stage("s", optimizer=opt, model=model):
        for epoch in range(2):
            for step in range(3):
                opt.zero_grad()
                _backward(model)
                opt.step()
                if epoch == 1 and step == 0:
                    with pytest.raises(RecorderStateError) as err:
                        run.log_batch([step], step=step, epoch=epoch)
                    assert "\n" not in str(err.value) and "before the last logged step 2" in str(err.value)
                    run.log_batch([step], epoch=epoch)  # without step= the recorder's numbering carries on
                else:
                    run.log_batch([step], step=step if epoch == 0 else None, epoch=epoch)
    run.close()
    with RunStore(tmp_path / "r") as store:
        assert store.stages()["status"].tolist() == ["done"]
    assert [s for (s,) in _rows(tmp_path / "r", "SELECT step FROM batches ORDER BY batch_id")] == list(
        range(6)
    )


def test_lr_that_was_not_applied_is_refused(tmp_path: Path) -> None:
    run, model = _run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with run.stage("s", optimizer=opt, model=model):
        opt.zero_grad()
        _backward(model)
        opt.step()
        sched.step()
        # log after step: checked at once, the batch is not recorded
        with pytest.raises(RecorderStateError, match=r"given lr=0\.05, but optimizer step 0 applied lr=0\.1"):
            run.log_batch([0], lr=opt.param_groups[0]["lr"])
        run.log_batch([0], lr=0.1)
        # log before step: checked when the step runs, raised at the next recorder call
        run.log_batch([1], lr=0.3)
        opt.zero_grad()
        _backward(model)
        opt.step()
        with pytest.raises(RecorderStateError, match=r"given lr=0\.3, but optimizer step 1 applied lr=0\.05"):
            run.flush()
        run.flush()  # raised once; the run stays usable
    run.close()
    assert _rows(tmp_path / "r", "SELECT step, lr FROM batches ORDER BY batch_id") == [(0, 0.1), (1, 0.05)]


def test_hooks_are_removed_at_the_stage_end(tmp_path: Path) -> None:
    run, model = _run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with run.stage("s", optimizer=opt, model=model):
        opt.step()
        run.log_batch([0])
    opt.step()  # outside any stage: not recorded
    run.close()
    assert len(_rows(tmp_path / "r", "SELECT * FROM optimizer_steps")) == 1
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not model.weight._post_accumulate_grad_hooks


@pytest.mark.parametrize(
    ("clip", "expected"),
    [
        (
            lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5),
            {"rule": "norm", "max_norm": 0.5, "norm_type": 2.0},
        ),
        (
            lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.25, norm_type=float("inf")),
            {"rule": "norm", "max_norm": 0.25, "norm_type": float("inf")},
        ),
        (lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.1), {"rule": "value", "clip_value": 0.1}),
        (lambda ps: [p.grad.mul_(0.9) for p in ps], None),
        (lambda ps: [p.grad.add_(1e-3) for p in ps], None),
    ],
    ids=["norm2", "norm_inf", "value", "scaled", "shifted"],
)
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_infer_clip(clip, expected, device: str) -> None:
    torch.manual_seed(1)
    params = [torch.zeros(5, 4, device=device, requires_grad=True), torch.zeros(7, device=device, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    acc = [p.grad.clone() for p in params]
    clip(params)
    assert infer_clip(acc, [p.grad for p in params]) == expected


def test_overhead_is_small_without_clipping(tmp_path: Path) -> None:
    """The hooks buffer one row per step (a fingerprint, no gradient copies after a clean first step); no database
    work per step."""
    run, model = _run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with run.stage("s", optimizer=opt, model=model):
        for i in range(50):
            opt.zero_grad()
            _backward(model)
            opt.step()
            run.log_batch([i % 20])
        assert len(run._steps) == 50  # buffered, inserted at the stage end in one Arrow insert
    run.close()
    assert len(_rows(tmp_path / "r", "SELECT * FROM optimizer_steps")) == 50


def test_targets_are_recorded_per_use_and_checked(tmp_path: Path) -> None:
    run, model = _run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with run.stage("s", optimizer=opt, model=model):
        opt.step()
        with pytest.raises(FgtracError, match="targets has 1 entries for 2 sample ids"):
            run.log_batch([0, 1], targets=[1])
        run.log_batch([0, 1], targets=torch.tensor([1, 1]))  # sample 0 is registered with label 0
        opt.step()
        run.log_batch([0, 3])
    run.close()
    rows = _rows(
        tmp_path / "r", "SELECT batch_id, sample_id, target FROM batch_samples ORDER BY batch_id, position"
    )
    assert rows == [(0, 0, 1), (0, 1, 1), (1, 0, None), (1, 3, None)]
    with RunStore(tmp_path / "r") as store:
        assert store.sample_relabels(0) == [
            {"step": 0, "stage": "s", "from": 0, "to": 1},
            {"step": 1, "stage": "s", "from": 1, "to": 0},
        ]
        assert store.sample_relabels(1) == []


def test_hparams_reader_sees_every_change_the_full_conversion_sees() -> None:
    """The per-step fast path (one dict comparison per group) against `applied_hparams` at every step, for the
    kinds of change schedulers and loops make: a rate, a replaced betas tuple, a tensor rate edited in place, a
    list edited in place, a new param group; an unchanged step hands back the previous object."""
    from fgtrac_core.tracking.optimizer_hooks import _HparamsReader, applied_hparams, json_groups

    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.9, 0.99))
    reader = _HparamsReader()
    # (edit, whether the fast path may hand back the previous object: only for groups of immutable values)
    edits = [
        (lambda g: None, True),
        (lambda g: g.__setitem__("lr", 0.05), True),
        (lambda g: None, True),
        (lambda g: g.__setitem__("betas", (0.8, 0.99)), True),
        (lambda g: None, True),
        (lambda g: g.__setitem__("extra", [1, 2]), False),
        (lambda g: g["extra"].__setitem__(0, 3), False),  # a list edited in place: a shallow copy misses it
        (lambda g: g.__setitem__("extra", (3, 2)), False),  # a new object, converted to an equal value
        (lambda g: None, True),
        (lambda g: g.__setitem__("lr", torch.tensor(0.02)), False),
        (lambda g: g["lr"].fill_(0.01), False),  # a tensor edited in place
        (lambda g: None, False),
    ]
    previous, reused = None, 0
    for edit, may_reuse in edits:
        edit(opt.param_groups[0])
        got = reader.read(opt)
        assert json_groups(got) == applied_hparams(opt)  # held as copies (or converted), converted at flush
        if previous is not None and got == previous and may_reuse:
            assert got is previous and hparams_delta(previous, got) == [{}]
            reused += 1
        previous = got
    assert reused == 3
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.3})
    assert json_groups(reader.read(opt)) == applied_hparams(opt) and len(reader.read(opt)) == 2


def test_gradient_copies_are_kept_only_while_the_loop_modifies_gradients() -> None:
    """Copies are taken at the stage's first step, dropped after a step that leaves every gradient alone, taken
    again from the first step that modifies them (that step has none: rule 'unknown') and kept from then on."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    facts: list[StepFacts] = []
    hooks = StepHooks(opt, facts.append)

    def step(clip: bool) -> StepFacts:
        opt.zero_grad()
        _backward(model)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
        return facts[-1]

    assert hooks.copying
    first = step(False)
    assert (first.clip, first.grads_altered) == (None, False)
    assert not hooks.copying and hooks._acc == [None, None]
    assert (step(False).clip, hooks.copying) == (None, False)
    unknown = step(True)
    assert (unknown.clip, unknown.grads_altered, hooks.copying) == ({"rule": "unknown"}, True, True)
    inferred = step(True)
    assert (inferred.clip, inferred.grads_altered) == ({"rule": "norm", "max_norm": 0.001, "norm_type": 2.0}, False)
    clean = step(False)
    assert (clean.clip, clean.grads_altered, hooks.copying) == (None, False, True)
    hooks.remove()

    # a loop that clips from the stage's first step has its rule inferred at every step
    facts.clear()
    hooks = StepHooks(opt, facts.append)
    assert [step(True).clip["rule"] for _ in range(3)] == ["norm"] * 3
    hooks.remove()


def test_gradient_changes_are_seen_beside_frozen_and_unused_parameters() -> None:
    """The per-step identity and version check (a C-level pass, an exact one-by-one fallback) with a frozen
    parameter in the optimizer and a layer that some steps leave out (its gradients None): those steps stay
    untouched; a replaced gradient and one scaled in place are gradients altered by the loop."""
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    frozen = nn.Parameter(torch.ones(1), requires_grad=False)
    opt = torch.optim.SGD([*a.parameters(), *b.parameters(), frozen], lr=0.1)
    facts: list[StepFacts] = []
    hooks = StepHooks(opt, facts.append)
    x = torch.randn(4, 3)

    def step(use_b: bool, change: Callable[[], object] | None = None) -> tuple[object, bool]:
        opt.zero_grad()
        out = a(x) + b(x) if use_b else a(x)
        out.pow(2).sum().backward()
        if change is not None:
            change()
        opt.step()
        return facts[-1].clip, facts[-1].grads_altered

    assert [step(use_b) for use_b in (True, False, True, False)] == [(None, False)] * 4
    assert b.weight.grad is None and frozen.grad is None
    assert step(False, lambda: setattr(a.weight, "grad", a.weight.grad * 0.5)) == ({"rule": "unknown"}, True)
    assert step(True, lambda: b.bias.grad.mul_(0.5))[1] is True
    assert step(True) == (None, False)
    hooks.remove()


def test_the_hooks_let_go_of_each_steps_gradients() -> None:
    """After a step the hooks hold neither the gradients backward made nor their copies: zero_grad() frees them
    (they used to stay alive through the next forward and backward, a second set of gradients in memory)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = StepHooks(opt, lambda facts: None)
    for clip in (False, True, True):  # no copies, then copies kept while the loop clips
        opt.zero_grad()
        _backward(model)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
        grads = [weakref.ref(p.grad) for p in model.parameters()]
        opt.zero_grad()
        gc.collect()
        assert [g() for g in grads] == [None, None]
    hooks.remove()


def _reference_fingerprint(tensors: list[torch.Tensor]) -> float:
    return sum(float(torch.linalg.vector_norm(t.detach().reshape(-1)[:4096].double())) for t in tensors)


def test_fingerprint_reads_the_smallest_trainable_tensor_of_each_group() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(5, 4), nn.Linear(4, 3)
    frozen = nn.Parameter(torch.ones(1), requires_grad=False)
    wide = nn.Parameter(torch.randn(5000))
    opt = torch.optim.SGD(
        [{"params": [a.weight, a.bias, frozen]}, {"params": [b.weight, b.bias]}, {"params": [wide]}], lr=0.1
    )
    assert [id(t) for t in fingerprint_tensors(opt)] == [id(a.bias), id(b.bias), id(wide)]
    # an independent reference: float64 norms by torch (of the leading 4096 values of the 5000-element tensor)
    assert param_fingerprint(opt) == pytest.approx(_reference_fingerprint([a.bias, b.bias, wide]), rel=1e-14)

    fp = ParamFingerprint(opt)
    before = fp.snapshot()
    with torch.no_grad():
        a.bias.add_(1.0)  # in place, as an optimizer step writes
    after = fp.snapshot()
    assert fingerprint_value(before) != fingerprint_value(after)  # a snapshot is a copy, not a view
    assert fingerprint_value(after) == pytest.approx(_reference_fingerprint([a.bias, b.bias, wide]), rel=1e-14)
    a.bias.data = torch.zeros(4)  # storage replaced by the loop: bound again
    assert fingerprint_value(fp.snapshot()) == pytest.approx(_reference_fingerprint([a.bias, b.bias, wide]))


def test_fingerprint_of_bfloat16_and_non_contiguous_parameters() -> None:
    """Parameters numpy cannot view (bfloat16) or that are not contiguous take the clone path, same value."""
    torch.manual_seed(0)
    half = nn.Parameter(torch.randn(6).to(torch.bfloat16))
    strided = nn.Parameter(torch.randn(4, 3).t())
    for param in (half, strided):
        opt = torch.optim.SGD([param], lr=0.1)
        assert param_fingerprint(opt) == pytest.approx(_reference_fingerprint([param]), rel=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_fingerprint_read_by_numpy_is_the_same_bits_as_through_torch(dtype: torch.dtype) -> None:
    """Runs recorded before numpy converted the snapshots are replayed with it: a fingerprint must not move by
    one bit.  The reference converts the same bytes through torch, as the recorder did."""
    torch.manual_seed(0)
    param = nn.Parameter((torch.randn(4096, dtype=torch.float64) * 1e3).to(dtype))
    snapshot = ParamFingerprint(torch.optim.SGD([param], lr=0.1)).snapshot()
    assert isinstance(snapshot[1][0], bytes)  # the CPU byte-copy path
    reference = param.detach().to(torch.float64).numpy()
    assert fingerprint_value(snapshot) == float(np.sqrt(np.sum(reference * reference)))


def test_clipping_in_the_models_order_when_the_optimizer_holds_another() -> None:
    """An optimizer over model.parameters() reversed, a loop clipping model.parameters(): torch sums the per-tensor
    norms in the order given, so some steps (here from step 4 on) reproduce in the model's order only and record
    it; a hand replay applying each step's rule in its recorded order ends bit for bit where the loop did, one
    that always uses the optimizer's order does not."""

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(7)
        model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
        return model, torch.optim.SGD(list(reversed(list(model.parameters()))), lr=0.01)

    def train(model: torch.nn.Module, opt: torch.optim.Optimizer, clip_step) -> None:
        for step in range(10):
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step)) * (step + 1)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            clip_step(model, opt, step)
            opt.step()

    model, opt = build()
    rules: list[dict | None] = []
    hooks = StepHooks(opt, lambda facts: rules.append(facts.clip), model)
    train(model, opt, lambda m, o, s: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5))
    hooks.remove()
    # None: the step's norm was under the threshold (torch scaled by exactly 1)
    assert all(r is None or (r["rule"] == "norm" and r["max_norm"] == 0.5) for r in rules)
    assert [i for i, r in enumerate(rules) if r and r.get("order") == "model"]

    def as_recorded(m: torch.nn.Module, o: torch.optim.Optimizer, step: int) -> None:
        rule = rules[step]
        apply_clip(list(m.parameters()) if rule and rule.get("order") == "model" else o.param_groups[0]["params"], rule)

    def optimizer_order(m: torch.nn.Module, o: torch.optim.Optimizer, step: int) -> None:
        apply_clip(o.param_groups[0]["params"], rules[step])

    for replay, same in ((as_recorded, True), (optimizer_order, False)):
        again, again_opt = build()
        train(again, again_opt, replay)
        mine, loops = again.state_dict(), model.state_dict()
        equal = all(torch.equal(mine[name], loops[name]) for name in loops)
        assert equal is same, replay.__name__
