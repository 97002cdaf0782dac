"""A user's own pipelines, written as the README says, in a project folder fgtrac has never seen (not installed,
no PYTHONPATH): a tabular MLP and an image CNN are recorded, then `fgtrac influence` and `fgtrac stages` rebuild
them from that folder with --model/--inputs/--head-layer, and `fgtrac verify` covers what they stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fgtrac_core.store import RunStore

FGTRAC = str(Path(sys.executable).parent / "fgtrac")

_COMMON = '''
import numpy as np
import torch
from torch import nn
from fgtrac_core import Run

def inputs(config, sample_ids):
    return X[torch.from_numpy(sample_ids)]

def record(run_dir, x, y, stages):
    torch.manual_seed(0)
    model = Net()
    ids = np.arange(len(y))
    split = np.where(ids % 5 == 0, "test", "train")
    run = Run.create(run_dir, name="own", config={"seed": 0})
    for s in ("train", "test"):
        mine = ids[split == s]
        run.register_samples(mine, split=s, labels=y[mine].numpy(), raw=x[mine].numpy())
    train = ids[split == "train"]
    g = torch.Generator().manual_seed(0)
    for name, make_opt, epochs in stages:
        opt = make_opt(model)
        with run.stage(name, optimizer=opt, model=model):
            for epoch in range(epochs):
                order = train[torch.randperm(len(train), generator=g).numpy()]
                for b in range(0, len(order), 32):
                    bid = order[b : b + 32]
                    loss = nn.functional.cross_entropy(model(x[bid]), y[bid])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    run.log_batch(bid, epoch=epoch, loss=loss)
                with torch.no_grad():
                    val = nn.functional.cross_entropy(model(x[ids[split == "test"]]), y[ids[split == "test"]])
                run.checkpoint(model, opt, val_loss=val, epoch=epoch)
    run.close()
'''

_TABULAR = '''
from sklearn.datasets import load_breast_cancer
data = load_breast_cancer()
X = torch.tensor((data.data - data.data.mean(0)) / data.data.std(0), dtype=torch.float32)[:300]
Y = torch.tensor(data.target[:300], dtype=torch.long)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(30, 16), nn.ReLU())
        self.out = nn.Linear(16, 2)
    def forward(self, x):
        return self.out(self.body(x))

if __name__ == "__main__":
    import sys
    record(sys.argv[1], X, Y, [
        ("warmup", lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), 2),
        ("tune", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), 2),
    ])
'''

_IMAGE = '''
g = torch.Generator().manual_seed(1)
Y = torch.arange(240) % 3
X = torch.zeros(240, 1, 12, 12)
for i, c in enumerate(Y.tolist()):
    if c == 0: X[i, 0, 3:9, 5:7] = 1.0
    elif c == 1: X[i, 0, 5:7, 3:9] = 1.0
    else: X[i, 0, 3:9, 3:9] = 0.5
X = X + 0.3 * torch.randn(X.shape, generator=g)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)
    def forward(self, x):
        return self.fc(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))

if __name__ == "__main__":
    import sys
    record(sys.argv[1], X, Y, [
        ("base", lambda m: torch.optim.Adam(m.parameters(), lr=3e-3), 2),
        ("polish", lambda m: torch.optim.SGD(m.parameters(), lr=0.01), 1),
    ])
'''


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env


def _fgtrac(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FGTRAC, *args], cwd=project, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(("module", "body", "head"), [("tabpipe", _TABULAR, "out"), ("shapes", _IMAGE, "fc")])
def test_own_pipeline_from_its_project_folder(tmp_path: Path, module: str, body: str, head: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / f"{module}.py").write_text(textwrap.dedent(_COMMON + body))
    subprocess.run([sys.executable, f"{module}.py", "run"], cwd=project, env=_env(), check=True, timeout=600)

    # the run names no pipeline: everything missing is named in one line
    proc = _fgtrac(project, "influence", "run")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--model" in proc.stderr and "--inputs" in proc.stderr and "--head-layer" in proc.stderr

    flags = ["--model", f"{module}:Net", "--inputs", f"{module}:inputs"]
    proc = _fgtrac(project, "influence", "run", *flags, "--head-layer", head, "--k", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_test"] > 0
    proc = _fgtrac(project, "stages", "run", *flags, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["aggregates"]

    proc = _fgtrac(project, "verify", "run", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"]
    with RunStore(project / "run") as store:
        assert set(store.analyses()["kind"]) == {"influence", "stages"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "os:system"], "not a class or a Python function"),
        (["--model", "os:getcwd"], "not a class or a Python function"),
        (["--model", "json:JSONDecoder"], "not a torch.nn.Module"),
        (["--model", "nosuchmodule_xyz:Net"], "cannot import"),
        (["--model", "justaname"], "MODULE:NAME"),
    ],
)
def test_bad_pipeline_flags_are_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "tabpipe.py").write_text(textwrap.dedent(_COMMON + _TABULAR))
    subprocess.run([sys.executable, "tabpipe.py", "run"], cwd=project, env=_env(), check=True, timeout=600)
    proc = _fgtrac(project, "influence", "run", *args, "--inputs", "tabpipe:inputs", "--head-layer", "out")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert needle in proc.stderr, proc.stderr
