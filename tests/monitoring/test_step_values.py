"""Training steps log plain tensors: each must equal what the torchmetrics Metric's own forward returns."""
import math

import pytest
import torch
from torchmetrics import MaxMetric, MeanMetric, SumMetric

from vlsafe.monitoring.metrics import TokenPerplexity, step_value

CASES = [
    (MeanMetric, (torch.tensor([0.2, 1.5, -3.0, 4.25]),)),  # per-sample preference stats
    (MeanMetric, (torch.tensor(2.7), 37)),  # token-weighted SFT loss
    (MeanMetric, (torch.tensor([1.0, 3.0]), torch.tensor([30.0, 10.0]))),
    (TokenPerplexity, (torch.tensor(1.3), 12)),
    (SumMetric, (41.0,)),
    (SumMetric, (torch.tensor([3, 4]),)),
]


@pytest.mark.parametrize("metric_type, args", CASES)
def test_step_value_is_the_metric_forward_value_and_leaves_the_state_alone(metric_type, args):
    metric = metric_type()
    value = step_value(metric, *args)
    assert isinstance(value, torch.Tensor) and value.ndim == 0
    torch.testing.assert_close(value, metric_type()(*args).float())
    assert metric.update_count == 0


def test_a_metric_without_a_formula_takes_its_own_forward():
    metric = MaxMetric()
    assert step_value(metric, torch.tensor([1.0, 5.0])) is metric
    assert metric.update_count == 1 and float(metric.compute()) == 5.0


def test_a_non_finite_training_value_is_logged_not_dropped():
    assert math.isnan(float(step_value(MeanMetric(), torch.tensor([1.0, float("nan")]))))
    assert math.isinf(float(step_value(TokenPerplexity(), torch.tensor(float("inf")), 3)))
