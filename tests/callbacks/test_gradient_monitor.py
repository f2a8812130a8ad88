"""GradientMonitor inside real Lightning runs, against references recorded in the same run.

A reference callback placed after the monitor clones every gradient at the same hook
(``on_before_optimizer_step``) and the parameters around the optimizer step; the expected norms
are then computed here with ``torch.linalg.vector_norm`` on those clones.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch import seed_everything as pl_seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_optdiag.callbacks import GradientEvent, GradientMonitor, GradientStats

pytestmark = [
    # Tiny synthetic runs: Lightning's advice about the logging interval is noise here, and
    # Lightning 2.6 still builds a torch pytree LeafSpec, which torch 2.13 deprecates.
    pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]

IN_FEATURES = 4
OUT_FEATURES = 2
BATCH_SIZE = 8
INF = math.inf

# The modules of Net that own parameters, in parameter order.
LAYERS = ("encoder.0", "encoder.3", "head", "side")


# ------------------------------------------------------------------------------------ models
class Net(LightningModule):
    """``head(encoder(x)) + scale * side(x)``: four Linear layers, optionally frozen or scaled.

    Args:
        spike_step: at this ``global_step`` the inputs are multiplied by 1e3.
        nan_step: at this ``global_step`` the inputs are NaN (and the update is dropped).
        side_scale: factor on the ``side`` branch (tiny gradients when tiny) ...
        side_scale_until: ... applied only before this ``global_step`` (``None``: always).
        frozen: parameter names with ``requires_grad=False``.
        manual: manual optimization; ``two_optimizers``: encoder vs. head+side.
    """

    def __init__(
        self,
        hidden: int = 8,
        dropout: float = 0.0,
        optimizer: str = "sgd",
        lr: float = 0.05,
        spike_step: int | None = None,
        nan_step: int | None = None,
        side_scale: float = 1.0,
        side_scale_until: int | None = None,
        frozen: tuple[str, ...] = (),
        manual: bool = False,
        two_optimizers: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.encoder = nn.Sequential(
                nn.Linear(IN_FEATURES, hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
            )
            self.head = nn.Linear(hidden, OUT_FEATURES)
            self.side = nn.Linear(IN_FEATURES, OUT_FEATURES)
        for name, param in self.named_parameters():
            param.requires_grad_(name not in frozen)
        self.optimizer_name = optimizer
        self.lr = lr
        self.spike_step = spike_step
        self.nan_step = nan_step
        self.side_scale = side_scale
        self.side_scale_until = side_scale_until
        self.automatic_optimization = not manual
        self.two_optimizers = two_optimizers

    def forward(self, x: Tensor) -> Tensor:
        scale = self.side_scale
        if self.side_scale_until is not None and self.global_step >= self.side_scale_until:
            scale = 1.0
        return self.head(self.encoder(x)) + scale * self.side(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch
        if self.spike_step is not None and self.global_step == self.spike_step:
            x = x * 1e3
        if self.nan_step is not None and self.global_step == self.nan_step:
            x = torch.full_like(x, math.nan)
        loss = F.mse_loss(self(x), y)
        if self.automatic_optimization:
            return loss
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        self.manual_backward(loss)
        for optimizer in optimizers:
            optimizer.step()
        for optimizer in optimizers:
            optimizer.zero_grad()
        return None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs after the callbacks: they saw the NaN gradients; the parameters stay finite.
        if self.nan_step is not None and self.global_step == self.nan_step:
            for param in self.parameters():
                if param.grad is not None:
                    param.grad.zero_()

    def _make(self, params: Any) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        return torch.optim.SGD(params, lr=self.lr)

    def configure_optimizers(self) -> Any:
        if self.two_optimizers:
            rest = [*self.head.parameters(), *self.side.parameters()]
            return self._make(self.encoder.parameters()), self._make(rest)
        return self._make(self.parameters())


def make_dataset(num_batches: int = 8, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    n = num_batches * BATCH_SIZE
    x = torch.randn(n, IN_FEATURES, generator=generator)
    y = torch.randn(n, OUT_FEATURES, generator=generator)
    return TensorDataset(x, y)


def make_loader(num_batches: int = 8, seed: int = 0, shuffle: bool = False) -> DataLoader:
    return DataLoader(make_dataset(num_batches, seed), batch_size=BATCH_SIZE, shuffle=shuffle)


class DataModule(LightningDataModule):
    def __init__(self, num_batches: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.num_batches = num_batches
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.num_batches, self.seed)


def make_trainer(callbacks: list[Callback], **kwargs: Any) -> Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "max_steps": 5,
    }
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


# ---------------------------------------------------------------------------- the reference
class Recorder(Callback):
    """Placed after the monitor: what it measured, and clones of what it should have measured.

    For every ``on_before_optimizer_step``: the step, the optimizer index, the monitor's
    ``latest`` entry, every gradient of that optimizer's parameters and the parameters before
    the step; at the end of the batch, the parameters after the step.
    """

    def __init__(self, monitor: GradientMonitor | None = None) -> None:
        self.monitor = monitor
        self.records: list[dict[str, Any]] = []
        self.batches: list[tuple[Tensor, Tensor]] = []

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batches.append((batch[0].clone(), batch[1].clone()))

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        index = next(i for i, o in enumerate(trainer.optimizers) if o is optimizer)
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        named = [(n, p) for n, p in pl_module.named_parameters() if id(p) in owned]
        self.records.append(
            {
                "step": trainer.global_step,
                "index": index,
                "stats": copy.deepcopy(self.monitor.latest.get(index)) if self.monitor else None,
                "grads": {n: p.grad.detach().clone() for n, p in named if p.grad is not None},
                "before": {n: p.detach().clone() for n, p in named},
                "num_batches": len(self.batches),
            }
        )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        params = dict(pl_module.named_parameters())
        for record in self.records:
            if "after" not in record:
                record["after"] = {n: params[n].detach().clone() for n in record["before"]}

    def totals(self, index: int = 0, norm_type: float = 2.0) -> list[float]:
        return [
            concat_norm(list(r["grads"].values()), norm_type)
            for r in self.records
            if r["index"] == index
        ]


def concat_norm(tensors: list[Tensor], norm_type: float = 2.0) -> float:
    flat = torch.cat([t.detach().double().reshape(-1) for t in tensors])
    return torch.linalg.vector_norm(flat, norm_type).item()


def label_of(name: str, per_parameter: bool) -> str:
    return name if per_parameter else ".".join(name.split(".")[:-1])


def grouped(
    tensors: dict[str, Tensor], per_parameter: bool = False, layer_filter: str | None = None
) -> dict[str, list[Tensor]]:
    """The tensors of every layer (module, or parameter), in first-appearance order."""
    groups: dict[str, list[Tensor]] = {}
    for name, tensor in tensors.items():
        label = label_of(name, per_parameter)
        if layer_filter is None or re.search(layer_filter, label):
            groups.setdefault(label, []).append(tensor)
    return groups


def layer_norms(
    tensors: dict[str, Tensor],
    norm_type: float = 2.0,
    per_parameter: bool = False,
    layer_filter: str | None = None,
) -> dict[str, float]:
    groups = grouped(tensors, per_parameter, layer_filter)
    return {label: concat_norm(members, norm_type) for label, members in groups.items()}


def update_ratios(record: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """``||theta_after - theta_before|| / ||theta_after||`` and ``||theta_after||`` per module."""
    after = grouped(record["after"])
    deltas = grouped(
        {n: record["after"][n].double() - record["before"][n] for n in record["after"]}
    )
    norms = {label: concat_norm(members) for label, members in after.items()}
    ratios = {label: concat_norm(deltas[label]) / norms[label] for label in after}
    return ratios, norms


def assert_close(actual: float, expected: float, rel: float = 1e-6) -> None:
    assert actual == pytest.approx(expected, rel=rel, abs=0), (actual, expected)


def assert_layers_close(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert list(actual) == list(expected)
    for name, value in expected.items():
        assert_close(actual[name], value)


def read_csv_metrics(logger: CSVLogger) -> dict[str, dict[int, float]]:
    """``{key: {step: value}}`` from metrics.csv; each key at most once per step."""
    metrics: dict[str, dict[int, float]] = defaultdict(dict)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    assert step not in metrics[key], f"{key} logged twice at step {step}"
                    metrics[key][step] = float(value)
    return dict(metrics)


def run(
    monitor: GradientMonitor | None,
    model: Net | None = None,
    loader: DataLoader | None = None,
    **trainer_kwargs: Any,
) -> tuple[Recorder, Net, Trainer]:
    recorder = Recorder(monitor)
    model = model if model is not None else Net()
    callbacks: list[Callback] = [recorder] if monitor is None else [monitor, recorder]
    trainer = make_trainer(callbacks, **trainer_kwargs)
    trainer.fit(model, loader if loader is not None else make_loader())
    return recorder, model, trainer


def assert_matches_reference(
    recorder: Recorder,
    norm_type: float = 2.0,
    per_parameter: bool = False,
    layer_filter: str | None = None,
) -> None:
    assert recorder.records
    for record in recorder.records:
        stats: GradientStats = record["stats"]
        assert stats.step == record["step"]
        assert stats.optimizer_index == record["index"]
        assert_close(stats.total, concat_norm(list(record["grads"].values()), norm_type))
        expected = layer_norms(record["grads"], norm_type, per_parameter, layer_filter)
        assert_layers_close(stats.layers, expected)


# ------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("norm_type", [2.0, INF, 1.0])
def test_values_per_module_equal_reference_norms(norm_type: float) -> None:
    monitor = GradientMonitor(norm_type=norm_type)
    recorder, _, trainer = run(monitor, max_steps=5)
    assert [r["step"] for r in recorder.records] == list(range(5))
    assert_matches_reference(recorder, norm_type)
    assert list(recorder.records[0]["stats"].layers) == list(LAYERS)
    # logger=False: nothing is logged, but ``latest`` holds the last step.
    assert trainer.loggers == []
    assert monitor.latest[0].step == 4
    assert monitor.latest[0] == recorder.records[-1]["stats"]


@pytest.mark.parametrize("norm_type", [2.0, INF])
def test_values_per_parameter_equal_reference_norms(norm_type: float) -> None:
    monitor = GradientMonitor(per_parameter=True, norm_type=norm_type)
    recorder, model, _ = run(monitor, max_steps=4)
    assert_matches_reference(recorder, norm_type, per_parameter=True)
    assert list(recorder.records[0]["stats"].layers) == [n for n, _ in model.named_parameters()]


def test_two_monitors_with_different_settings_in_one_trainer() -> None:
    euclidean = GradientMonitor()
    maximum = GradientMonitor(norm_type=INF, per_parameter=True)
    recorder = Recorder(euclidean)
    trainer = make_trainer([euclidean, maximum, recorder], max_steps=3)
    trainer.fit(Net(), make_loader())
    assert_matches_reference(recorder)
    last = recorder.records[-1]["grads"]
    assert_close(maximum.latest[0].total, concat_norm(list(last.values()), INF))
    assert_layers_close(maximum.latest[0].layers, layer_norms(last, INF, per_parameter=True))
    assert euclidean.state_key != maximum.state_key


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_values_with_non_float32_parameters(precision: str) -> None:
    monitor = GradientMonitor(log_every_n_steps=1)
    recorder, model, _ = run(monitor, max_steps=3, precision=precision)
    dtype = {"64-true": torch.float64, "bf16-true": torch.bfloat16}[precision]
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(g.dtype == dtype for g in recorder.records[0]["grads"].values())
    assert_matches_reference(recorder)


@pytest.mark.parametrize(
    ("layer_filter", "per_parameter", "expected_layers"),
    [
        (r"^encoder\.", False, ["encoder.0", "encoder.3"]),
        ("head|side", False, ["head", "side"]),
        (r"weight$", True, ["encoder.0.weight", "encoder.3.weight", "head.weight", "side.weight"]),
    ],
)
def test_layer_filter_restricts_layers_but_not_the_total(
    layer_filter: str, per_parameter: bool, expected_layers: list[str]
) -> None:
    monitor = GradientMonitor(layer_filter=layer_filter, per_parameter=per_parameter)
    recorder, _, _ = run(monitor, max_steps=3)
    assert_matches_reference(recorder, 2.0, per_parameter, layer_filter)
    for record in recorder.records:
        assert list(record["stats"].layers) == expected_layers
        # The total still covers every parameter.
        assert_close(record["stats"].total, concat_norm(list(record["grads"].values())))


def test_clipping_does_not_hide_the_true_norm() -> None:
    clip, lr = 1e-3, 0.1
    monitor = GradientMonitor()
    recorder, _, _ = run(monitor, Net(lr=lr), max_steps=4, gradient_clip_val=clip)
    for record in recorder.records:
        unclipped = concat_norm(list(record["grads"].values()))
        assert_close(record["stats"].total, unclipped)
        assert record["stats"].total > 10 * clip
        # The clipping did happen after the measurement: plain SGD moved by lr * clip.
        step = concat_norm([record["after"][n] - record["before"][n] for n in record["before"]])
        assert step / lr == pytest.approx(clip, rel=1e-3)


def test_accumulated_gradient_is_measured_once_per_optimizer_step() -> None:
    monitor = GradientMonitor()
    model = Net()
    recorder, _, trainer = run(monitor, model, max_steps=3, accumulate_grad_batches=2)
    assert len(recorder.batches) == 6
    assert [r["step"] for r in recorder.records] == [0, 1, 2]
    # One measurement per optimizer step: three values in the spike history, not six.
    assert monitor.state_dict()["medians"][0]["values"] == [
        r["stats"].total for r in recorder.records
    ]
    for record in recorder.records:
        micro = recorder.batches[record["num_batches"] - 2 : record["num_batches"]]
        params = {n: p.clone().requires_grad_(True) for n, p in record["before"].items()}

        def loss_on(batches: list[tuple[Tensor, Tensor]], params: dict[str, Tensor]) -> Tensor:
            losses = [F.mse_loss(functional_call(model, params, (x,)), y) for x, y in batches]
            return torch.stack(losses).mean()

        accumulated = torch.autograd.grad(loss_on(micro, params), list(params.values()))
        last_only = torch.autograd.grad(loss_on(micro[1:], params), list(params.values()))
        expected = concat_norm(list(accumulated))
        assert_close(record["stats"].total, expected, rel=1e-5)
        # The test can tell the two apart: the last micro-batch alone has another norm.
        assert abs(concat_norm(list(last_only)) - expected) > 1e-3 * expected
        expected_layers = layer_norms(dict(zip(params, accumulated, strict=True)))
        for name, value in expected_layers.items():
            assert_close(record["stats"].layers[name], value, rel=1e-5)
    assert trainer.global_step == 3


@pytest.mark.parametrize("per_parameter", [False, True])
def test_frozen_parameters_are_absent(per_parameter: bool) -> None:
    frozen = ("encoder.0.weight", "encoder.0.bias", "head.bias")
    monitor = GradientMonitor(per_parameter=per_parameter)
    recorder, model, _ = run(monitor, Net(frozen=frozen), max_steps=3)
    assert_matches_reference(recorder, per_parameter=per_parameter)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = trainable if per_parameter else ["encoder.3", "head", "side"]
    for record in recorder.records:
        assert set(record["grads"]) == set(trainable)
        assert list(record["stats"].layers) == expected


def test_two_optimizers_with_manual_optimization(tmp_path: Path) -> None:
    monitor = GradientMonitor(log_every_n_steps=1)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    model = Net(manual=True, two_optimizers=True)
    recorder, _, _ = run(monitor, model, max_steps=6, logger=logger)
    # Manual optimization counts every optimizer step: 3 batches x 2 optimizers.
    assert [(r["step"], r["index"]) for r in recorder.records] == [
        (0, 0), (1, 1), (2, 0), (3, 1), (4, 0), (5, 1)
    ]  # fmt: skip
    assert_matches_reference(recorder)
    assert list(monitor.latest[0].layers) == ["encoder.0", "encoder.3"]
    assert list(monitor.latest[1].layers) == ["head", "side"]
    metrics = read_csv_metrics(logger)
    assert "optdiag/grad_norm/total" not in metrics
    for index in (0, 1):
        logged = metrics[f"optdiag/grad_norm/total_optimizer{index}"]
        expected = {r["step"]: r for r in recorder.records if r["index"] == index}
        assert sorted(logged) == sorted(expected)
        for step, value in logged.items():
            assert_close(value, concat_norm(list(expected[step]["grads"].values())))


def test_every_optimizer_is_logged_with_a_logging_interval(tmp_path: Path) -> None:
    # Two optimizers step on every batch; with an interval of 2 each must still be logged.
    monitor = GradientMonitor(log_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    run(monitor, Net(manual=True, two_optimizers=True), max_steps=8, logger=logger)
    metrics = read_csv_metrics(logger)
    assert "optdiag/grad_norm/total_optimizer0" in metrics
    assert "optdiag/grad_norm/total_optimizer1" in metrics
    assert "optdiag/grad_norm/head" in metrics


def test_manual_optimization_single_optimizer() -> None:
    monitor = GradientMonitor()
    recorder, _, _ = run(monitor, Net(manual=True), max_steps=4)
    assert [r["step"] for r in recorder.records] == [0, 1, 2, 3]
    assert_matches_reference(recorder)
    assert list(monitor.latest) == [0]


# ----------------------------------------------------------------------------------- logging
def test_csv_logging_interval_grad_norms_and_update_ratios(tmp_path: Path) -> None:
    monitor = GradientMonitor(log_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    # 5 steps: the update of step 4 is only read back at the end of training.
    recorder, _, _ = run(monitor, Net(optimizer="adam", lr=1e-2), max_steps=5, logger=logger)
    metrics = read_csv_metrics(logger)
    by_step = {r["step"]: r for r in recorder.records}
    logged_steps = [0, 2, 4]

    expected_keys = {"optdiag/grad_norm/total"}
    for kind in ("grad_norm", "param_norm", "update_ratio"):
        expected_keys |= {f"optdiag/{kind}/{layer}" for layer in LAYERS}
    assert set(metrics) == expected_keys

    for step in logged_steps:
        record = by_step[step]
        assert_close(
            metrics["optdiag/grad_norm/total"][step], concat_norm(list(record["grads"].values()))
        )
        for layer, value in layer_norms(record["grads"]).items():
            assert_close(metrics[f"optdiag/grad_norm/{layer}"][step], value)
        ratios, norms = update_ratios(record)
        for layer in LAYERS:
            assert_close(metrics[f"optdiag/param_norm/{layer}"][step], norms[layer])
            assert_close(metrics[f"optdiag/update_ratio/{layer}"][step], ratios[layer], rel=1e-5)
            assert 0 < ratios[layer] < 1
    for key, values in metrics.items():
        assert sorted(values) == logged_steps, key


def test_logging_interval_defaults_to_the_trainers(tmp_path: Path) -> None:
    monitor = GradientMonitor()
    logger = CSVLogger(tmp_path, name="csv", version=0)
    run(monitor, max_steps=7, logger=logger, log_every_n_steps=3)
    metrics = read_csv_metrics(logger)
    assert sorted(metrics["optdiag/grad_norm/total"]) == [0, 3, 6]
    assert sorted(metrics["optdiag/update_ratio/head"]) == [0, 3, 6]


def test_latest_update_ratios_hold_the_last_measurement() -> None:
    # Measured on logging steps 0 and 2; the last step (3) is not a logging step.
    monitor = GradientMonitor(log_every_n_steps=2)
    recorder, _, _ = run(monitor, Net(optimizer="adam", lr=1e-2), max_steps=4)
    ratios, norms = update_ratios(recorder.records[2])
    stats = monitor.latest[0]
    assert stats.step == 3
    assert stats.update_ratios is not None, "update_ratios lost after the measured step"
    assert stats.param_norms is not None
    for layer in LAYERS:
        assert_close(stats.update_ratios[layer], ratios[layer], rel=1e-5)
        assert_close(stats.param_norms[layer], norms[layer])


@pytest.mark.parametrize("every", [1, 2])
def test_tensorboard_histograms(tmp_path: Path, every: int) -> None:
    from tensorboard.backend.event_processing.event_accumulator import (
        HISTOGRAMS,
        SCALARS,
        EventAccumulator,
    )

    monitor = GradientMonitor(log_every_n_steps=1, histogram_every_n_steps=every)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    recorder, model, _ = run(monitor, max_steps=4, logger=logger)
    accumulator = EventAccumulator(logger.log_dir, size_guidance={HISTOGRAMS: 0, SCALARS: 0})
    accumulator.Reload()
    names = [n for n, _ in model.named_parameters()]
    tags = accumulator.Tags()
    assert set(tags["histograms"]) == {f"optdiag/grad/{n}" for n in names} | {
        f"optdiag/weight/{n}" for n in names
    }
    assert "optdiag/grad_norm/total" in tags["scalars"]
    by_step = {r["step"]: r for r in recorder.records}
    expected_steps = list(range(0, 4, every))
    for name in names:
        for kind, source in (("grad", "grads"), ("weight", "before")):
            events = accumulator.Histograms(f"optdiag/{kind}/{name}")
            assert [e.step for e in events] == expected_steps
            for event in events:
                reference = by_step[event.step][source][name].double()
                histogram = event.histogram_value
                assert histogram.num == reference.numel()
                assert histogram.min == pytest.approx(reference.min().item(), rel=1e-6)
                assert histogram.max == pytest.approx(reference.max().item(), rel=1e-6)
                assert histogram.sum == pytest.approx(reference.sum().item(), rel=1e-5, abs=1e-9)


def test_no_histograms_by_default(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    run(GradientMonitor(log_every_n_steps=1), max_steps=2, logger=logger)
    accumulator = EventAccumulator(logger.log_dir)
    accumulator.Reload()
    assert accumulator.Tags()["histograms"] == []
    assert "optdiag/grad_norm/total" in accumulator.Tags()["scalars"]


def test_histograms_follow_the_layer_filter(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import (
        HISTOGRAMS,
        EventAccumulator,
    )

    # A module name, as documented for layer_filter: its parameters are the layer's.
    monitor = GradientMonitor(histogram_every_n_steps=1, layer_filter=r"^encoder\.0$")
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    recorder, _, _ = run(monitor, max_steps=2, logger=logger)
    assert list(recorder.records[0]["stats"].layers) == ["encoder.0"]
    accumulator = EventAccumulator(logger.log_dir, size_guidance={HISTOGRAMS: 0})
    accumulator.Reload()
    assert set(accumulator.Tags()["histograms"]) == {
        f"optdiag/{kind}/encoder.0.{param}"
        for kind in ("grad", "weight")
        for param in ("weight", "bias")
    }


# ------------------------------------------------------------------------------------ spikes
SPIKE_ARGS: dict[str, Any] = {"min_history": 5, "spike_window": 20}


def spike_run(spike_step: int | None, max_steps: int = 16) -> tuple[GradientMonitor, Recorder]:
    monitor = GradientMonitor(**SPIKE_ARGS)
    model = Net(optimizer="adam", lr=1e-3, spike_step=spike_step)
    recorder, _, _ = run(monitor, model, make_loader(num_batches=max_steps), max_steps=max_steps)
    return monitor, recorder


def test_one_scaled_batch_gives_exactly_one_spike() -> None:
    monitor, recorder = spike_run(spike_step=12)
    totals = recorder.totals()
    assert len(monitor.events) == 1
    event = monitor.events[0]
    assert (event.kind, event.step, event.optimizer_index, event.layers) == ("spike", 12, 0, [])
    assert_close(event.value, totals[12])
    assert_close(event.reference, statistics.median(totals[:12]))
    assert event.value > 10 * event.reference
    flagged = [r["step"] for r in recorder.records if r["stats"].spike]
    assert flagged == [12]
    # median_total is the running median before each step.
    for step in range(1, len(totals)):
        assert_close(recorder.records[step]["stats"].median_total, statistics.median(totals[:step]))


def test_healthy_run_raises_no_alarm() -> None:
    monitor, recorder = spike_run(spike_step=None)
    assert monitor.events == []
    assert not any(r["stats"].spike or r["stats"].vanishing for r in recorder.records)


@pytest.mark.parametrize(("spike_step", "flagged"), [(3, False), (4, False), (5, True)])
def test_spikes_need_min_history(spike_step: int, flagged: bool) -> None:
    monitor, _ = spike_run(spike_step=spike_step, max_steps=spike_step + 2)
    expected = [("spike", spike_step)] if flagged else []
    assert [(e.kind, e.step) for e in monitor.events] == expected


def test_a_nonfinite_step_is_neither_a_spike_nor_history() -> None:
    monitor = GradientMonitor(**SPIKE_ARGS)
    model = Net(optimizer="adam", lr=1e-3, nan_step=7)
    recorder, _, _ = run(monitor, model, make_loader(num_batches=10), max_steps=10)
    stats = [r["stats"] for r in recorder.records]
    assert math.isnan(stats[7].total)
    assert all(math.isnan(value) for value in stats[7].layers.values())
    assert not any(s.spike for s in stats)
    assert monitor.events == []
    finite = [s.total for s in stats if math.isfinite(s.total)]
    assert len(finite) == 9
    assert monitor.state_dict()["medians"][0]["values"] == finite
    # The step after the NaN compares against the finite history only.
    assert_close(stats[8].median_total, statistics.median(finite[:7]))


# --------------------------------------------------------------------------------- vanishing
@pytest.mark.parametrize("patience", [1, 3])
def test_tiny_layer_gradients_give_a_vanishing_event(patience: int) -> None:
    monitor = GradientMonitor(vanishing_patience=patience)
    recorder, _, _ = run(monitor, Net(side_scale=1e-6), max_steps=patience + 3)
    flagged_at = patience - 1  # below the threshold on every step from step 0
    norms = layer_norms(recorder.records[flagged_at]["grads"])
    assert norms["side"] < 1e-3 * statistics.median(norms.values())
    assert len(monitor.events) == 1  # reported when it starts, not on every step
    event = monitor.events[0]
    assert (event.kind, event.step, event.optimizer_index, event.layers) == (
        "vanishing",
        flagged_at,
        0,
        ["side"],
    )
    assert_close(event.value, norms["side"])
    assert_close(event.reference, statistics.median(norms.values()))
    for record in recorder.records:
        expected = ["side"] if record["step"] >= flagged_at else []
        assert record["stats"].vanishing == expected


def test_vanishing_cleared_when_the_layer_recovers() -> None:
    # Below the threshold on steps 0-2, above from step 3; two steps in a row flag or clear.
    monitor = GradientMonitor(vanishing_patience=2)
    recorder, _, _ = run(monitor, Net(side_scale=1e-6, side_scale_until=3), max_steps=6)
    assert [(e.kind, e.step, e.layers) for e in monitor.events] == [
        ("vanishing", 1, ["side"]),
        ("vanishing_cleared", 4, ["side"]),
    ]
    assert [r["stats"].vanishing for r in recorder.records] == [
        [], ["side"], ["side"], ["side"], [], []
    ]  # fmt: skip
    assert monitor.latest[0].vanishing == []


def test_a_transient_dip_shorter_than_the_patience_is_not_an_event() -> None:
    monitor = GradientMonitor(vanishing_patience=3)
    recorder, _, _ = run(monitor, Net(side_scale=1e-6, side_scale_until=2), max_steps=6)
    # The layer was below the threshold on steps 0 and 1 (the detection would have seen it) ...
    for record in recorder.records[:2]:
        norms = layer_norms(record["grads"])
        assert norms["side"] < 1e-3 * statistics.median(norms.values())
    # ... but not for 3 steps in a row.
    assert monitor.events == []
    assert all(r["stats"].vanishing == [] for r in recorder.records)


def test_healthy_layers_are_not_vanishing() -> None:
    monitor = GradientMonitor(vanishing_patience=1)
    recorder, _, _ = run(monitor, Net(side_scale=1.0), max_steps=4)
    assert monitor.events == []
    assert all(r["stats"].vanishing == [] for r in recorder.records)


def test_layer_filter_excludes_layers_from_vanishing_checks() -> None:
    monitor = GradientMonitor(layer_filter="encoder|head", vanishing_patience=1)
    run(monitor, Net(side_scale=1e-6), max_steps=3)
    assert monitor.events == []


# ------------------------------------------------------------------------ no observer effect
def final_state(monitor: GradientMonitor | None, dropout: float, logger: Any) -> dict[str, Any]:
    pl_seed_everything(123, verbose=False)
    model = Net(dropout=dropout, optimizer="adam", lr=1e-2, seed=5)
    trainer = make_trainer(
        [monitor] if monitor is not None else [], max_steps=10, logger=logger, log_every_n_steps=1
    )
    trainer.fit(model, make_loader(num_batches=6, shuffle=True))
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
        "rng": torch.get_rng_state(),
    }


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("logger_kind", ["csv", "tensorboard"])
def test_zero_observer_effect(tmp_path: Path, dropout: float, logger_kind: str) -> None:
    def logger(name: str) -> Any:
        if logger_kind == "csv":
            return CSVLogger(tmp_path, name=name, version=0)
        return TensorBoardLogger(tmp_path, name=name, version=0)

    without = final_state(None, dropout, logger("without"))
    monitor = GradientMonitor(
        log_every_n_steps=1, histogram_every_n_steps=1, per_parameter=dropout > 0
    )
    with_monitor = final_state(monitor, dropout, logger("with"))
    assert monitor.latest[0].step == 9
    for name, param in without["params"].items():
        assert torch.equal(param, with_monitor["params"][name]), name
    for key, value in without["optimizer"]["state"].items():
        for field, tensor in value.items():
            assert torch.equal(tensor, with_monitor["optimizer"]["state"][key][field])
    assert torch.equal(without["rng"], with_monitor["rng"])


# ------------------------------------------------------------------------------ checkpoints
def test_state_dict_round_trip(tmp_path: Path) -> None:
    args = {**SPIKE_ARGS, "vanishing_patience": 2}
    monitor = GradientMonitor(**args)
    model = Net(optimizer="adam", lr=1e-3, spike_step=7, side_scale=1e-6, side_scale_until=9)
    run(monitor, model, make_loader(num_batches=12), max_steps=12)
    assert [(e.kind, e.step) for e in monitor.events] == [
        ("vanishing", 1),
        ("spike", 7),
        ("vanishing_cleared", 10),
    ]
    state = monitor.state_dict()
    assert len(state["medians"][0]["values"]) == 12
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)

    restored = GradientMonitor(**args)
    restored.load_state_dict(loaded)
    again = restored.state_dict()
    # Events hold NaN (the value of a "vanishing_cleared"): compared field by field below.
    assert {k: v for k, v in again.items() if k != "events"} == {
        k: v for k, v in state.items() if k != "events"
    }
    assert set(state) >= {"medians", "events"}
    assert len(again["events"]) == len(restored.events) == len(monitor.events)
    for a, b in zip(restored.events, monitor.events, strict=True):
        assert isinstance(a, GradientEvent)
        assert (a.kind, a.step, a.optimizer_index, a.layers) == (
            b.kind,
            b.step,
            b.optimizer_index,
            b.layers,
        )
        assert a.value == b.value or (math.isnan(a.value) and math.isnan(b.value))
        assert a.reference == b.reference


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch")
def test_checkpoint_resume_restores_detection_state(tmp_path: Path) -> None:
    args = {**SPIKE_ARGS, "vanishing_patience": 8}

    def model() -> Net:
        return Net(optimizer="adam", lr=1e-3, spike_step=8, side_scale=1e-6)

    first = GradientMonitor(**args)
    recorder, _, trainer = run(first, model(), make_loader(num_batches=20), max_steps=6)
    assert first.events == []  # 6 steps of a tiny layer: not yet 8 in a row
    trainer.save_checkpoint(tmp_path / "six.ckpt")
    totals = [r["stats"].total for r in recorder.records]

    second = GradientMonitor(**args)
    resumed = Recorder(second)
    trainer = make_trainer([second, resumed], max_steps=10)
    trainer.fit(model(), make_loader(num_batches=20), ckpt_path=tmp_path / "six.ckpt")
    assert [r["step"] for r in resumed.records] == [6, 7, 8, 9]
    # The running median continues from the first run's history ...
    assert resumed.records[0]["stats"].median_total == statistics.median(totals)
    # ... so a spike two steps after resuming is caught (a fresh monitor would lack the
    # history), and the vanishing streak continues: 8 steps in a row end at step 7.
    assert [(e.kind, e.step) for e in second.events] == [("vanishing", 7), ("spike", 8)]
    assert second.events[0].layers == ["side"]


# -------------------------------------------------------------------------------------- CLI
@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")
def test_lightning_cli_configures_the_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["cli"])  # only ``args`` count, not pytest's arguments

    cli = LightningCLI(
        Net,
        DataModule,
        args=[
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.callbacks+=lightning_optdiag.callbacks.GradientMonitor",
            "--trainer.callbacks.log_every_n_steps=5",
            "--trainer.callbacks.norm_type=.inf",  # YAML infinity
            "--trainer.callbacks.vanishing_patience=4",
            "--trainer.callbacks.layer_filter=^encoder",
            "--trainer.callbacks.spike_window=50",
            "--trainer.callbacks.per_parameter=true",
            "--trainer.callbacks.histogram_every_n_steps=7",
        ],
        run=False,
        seed_everything_default=False,
    )
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradientMonitor)]
    assert monitor.log_every_n_steps == 5
    assert monitor.norm_type == INF
    assert monitor.layer_filter == "^encoder"
    assert monitor.spike_window == 50
    assert monitor.per_parameter is True
    assert monitor.histogram_every_n_steps == 7
    assert monitor.vanishing_patience == 4
    assert monitor.spike_factor == GradientMonitor().spike_factor  # untouched defaults


@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")
def test_lightning_cli_fit_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["cli"])

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  accelerator: cpu\n"
        "  max_steps: 2\n"
        "  logger: false\n"
        "  enable_progress_bar: false\n"
        "  enable_checkpointing: false\n"
        "  enable_model_summary: false\n"
        f"  default_root_dir: {tmp_path}\n"
        "  callbacks:\n"
        "    - class_path: lightning_optdiag.callbacks.GradientMonitor\n"
        "      init_args:\n"
        "        log_every_n_steps: 5\n"
        "        spike_factor: 4.5\n"
        "        min_history: 3\n"
    )
    cli = LightningCLI(
        Net,
        DataModule,
        args=["fit", "--config", str(config)],
        seed_everything_default=False,
        save_config_kwargs={"overwrite": True},
    )
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradientMonitor)]
    assert (monitor.log_every_n_steps, monitor.spike_factor, monitor.min_history) == (5, 4.5, 3)
    assert cli.trainer.global_step == 2
    assert monitor.latest[0].step == 1
    assert list(monitor.latest[0].layers) == list(LAYERS)


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps: 0"),
        ({"log_every_n_steps": -3}, ValueError, "log_every_n_steps: -3"),
        ({"log_every_n_steps": 2.5}, TypeError, "log_every_n_steps: 2.5"),
        ({"log_every_n_steps": True}, TypeError, "log_every_n_steps: True"),
        ({"per_parameter": "yes"}, TypeError, "per_parameter: 'yes'"),
        ({"per_parameter": 1}, TypeError, "per_parameter: 1"),
        ({"layer_filter": "("}, ValueError, r"layer_filter: '\('"),
        ({"layer_filter": 3}, TypeError, "layer_filter: 3"),
        ({"norm_type": -1}, ValueError, "norm_type: -1"),
        ({"norm_type": 0}, ValueError, "norm_type: 0"),
        ({"norm_type": math.nan}, ValueError, "norm_type: nan"),
        ({"norm_type": -INF}, ValueError, "norm_type: -inf"),
        ({"norm_type": "2"}, TypeError, "norm_type: '2'"),
        ({"norm_type": True}, TypeError, "norm_type: True"),
        ({"spike_factor": 1}, ValueError, "spike_factor: 1"),
        ({"spike_factor": 0.5}, ValueError, "spike_factor: 0.5"),
        ({"spike_factor": INF}, ValueError, "spike_factor: inf"),
        ({"spike_factor": math.nan}, ValueError, "spike_factor: nan"),
        ({"spike_factor": "10"}, TypeError, "spike_factor: '10'"),
        ({"spike_window": 2}, ValueError, "spike_window: 2"),
        ({"spike_window": 10.0}, TypeError, "spike_window: 10.0"),
        ({"min_history": 0}, ValueError, "min_history: 0"),
        ({"min_history": 11, "spike_window": 10}, ValueError, "min_history: 11"),
        ({"min_history": 101}, ValueError, "min_history: 101"),
        ({"min_history": 2.0}, TypeError, "min_history: 2.0"),
        ({"vanishing_ratio": 0}, ValueError, "vanishing_ratio: 0"),
        ({"vanishing_ratio": 2}, ValueError, "vanishing_ratio: 2"),
        ({"vanishing_ratio": -0.1}, ValueError, "vanishing_ratio: -0.1"),
        ({"vanishing_ratio": math.nan}, ValueError, "vanishing_ratio: nan"),
        ({"vanishing_ratio": None}, TypeError, "vanishing_ratio: None"),
        ({"vanishing_patience": 0}, ValueError, "vanishing_patience: 0"),
        ({"vanishing_patience": 1.5}, TypeError, "vanishing_patience: 1.5"),
        ({"histogram_every_n_steps": 0}, ValueError, "histogram_every_n_steps: 0"),
        ({"histogram_every_n_steps": "1"}, TypeError, "histogram_every_n_steps: '1'"),
    ],
)
def test_invalid_arguments_are_rejected(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        GradientMonitor(**kwargs)


def test_boundary_arguments_are_accepted() -> None:
    monitor = GradientMonitor(
        log_every_n_steps=1,
        per_parameter=True,
        layer_filter="",
        norm_type=INF,
        spike_factor=1.5,
        spike_window=3,
        min_history=3,
        vanishing_ratio=1.0,
        vanishing_patience=1,
        histogram_every_n_steps=1,
    )
    assert (monitor.norm_type, monitor.spike_window, monitor.min_history) == (INF, 3, 3)
    assert monitor.vanishing_ratio == 1.0
    assert GradientMonitor(norm_type=1).norm_type == 1.0


# ------------------------------------------------------------------------------------- DDP
class DumpTotals(Callback):
    """Each rank writes the monitor's totals, its own reference totals and its first batch."""

    def __init__(self, monitor: GradientMonitor, out_dir: str) -> None:
        self.monitor = monitor
        self.out_dir = out_dir
        self.rows: list[dict[str, Any]] = []
        self.first_batch: float | None = None

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.first_batch is None:
            self.first_batch = batch[0].sum().item()

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        stats = self.monitor.latest[0]
        self.rows.append(
            {
                "step": trainer.global_step,
                "monitor_step": stats.step,
                "total": stats.total,
                "reference": concat_norm(grads),
            }
        )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"rows": self.rows, "first_batch": self.first_batch}))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ddp_spawn_ranks_see_the_same_synchronised_gradients(tmp_path: Path) -> None:
    monitor = GradientMonitor(log_every_n_steps=1)
    trainer = make_trainer(
        [monitor, DumpTotals(monitor, str(tmp_path))],
        strategy="ddp_spawn",
        devices=2,
        max_steps=3,
        logger=CSVLogger(tmp_path, name="csv", version=0),
    )
    trainer.fit(Net(), make_loader(num_batches=8))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Different data on each rank ...
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]
    for rank in ranks:
        assert [row["step"] for row in rank["rows"]] == [0, 1, 2]
        for row in rank["rows"]:
            assert row["monitor_step"] == row["step"]
            assert_close(row["total"], row["reference"])
    # ... yet the same (all-reduced) gradient norms.
    for row0, row1 in zip(ranks[0]["rows"], ranks[1]["rows"], strict=True):
        assert_close(row0["total"], row1["total"], rel=1e-6)
    # Only rank 0 logs.
    metrics = read_csv_metrics(CSVLogger(tmp_path, name="csv", version=0))
    assert sorted(metrics["optdiag/grad_norm/total"]) == [0, 1, 2]
    for step, value in metrics["optdiag/grad_norm/total"].items():
        assert_close(value, ranks[0]["rows"][step]["total"])
