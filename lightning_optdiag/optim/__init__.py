"""Optimizers torch.optim lacks, and one registry over them and torch's own.

torch.optim already provides SGD (momentum, Nesterov), Adagrad, RMSprop, Adadelta, Adam (with
AMSGrad), AdamW, NAdam and RAdam; they are reused through :func:`create_optimizer`, not
rewritten. Bundled here:

- :class:`SWATS`: Adam that switches to momentum SGD (Keskar & Socher 2017).
- :class:`Lookahead`: k fast steps of any optimizer, then a slow-weight update (Zhang et al.
  2019).
- :class:`AdaBound` / :class:`AMSBound`: Adam with step-size bounds converging to SGD
  (Luo et al. 2019).
- :class:`SGDW`: SGD with decoupled weight decay (Loshchilov & Hutter 2019).
- :class:`LARS` / :class:`LAMB`: layer-wise trust ratios (You et al. 2017, 2019), with
  :func:`param_groups_for_layer_adaptation` to exclude biases and normalisation parameters.

Every bundled optimizer is a :class:`torch.optim.Optimizer` with a multi-tensor (``foreach``)
path by default and a per-tensor reference path (``foreach=False``), closure support, float32 /
float64 / bfloat16 parameters and a bit-exact ``state_dict`` round trip.
"""

from lightning_optdiag.optim.adabound import AdaBound, AMSBound
from lightning_optdiag.optim.lamb import LAMB
from lightning_optdiag.optim.lars import LARS
from lightning_optdiag.optim.layer_adaptation import (
    NORMALIZATION_LAYERS,
    param_groups_for_layer_adaptation,
)
from lightning_optdiag.optim.lookahead import Lookahead
from lightning_optdiag.optim.registry import create_optimizer, list_optimizers
from lightning_optdiag.optim.sgdw import SGDW
from lightning_optdiag.optim.swats import (
    DEFAULT_SWITCH_MIN_STEPS,
    DEFAULT_SWITCH_THRESHOLD,
    SWATS,
    SwitchStatus,
)

__all__ = [
    "DEFAULT_SWITCH_MIN_STEPS",
    "DEFAULT_SWITCH_THRESHOLD",
    "LAMB",
    "LARS",
    "NORMALIZATION_LAYERS",
    "SGDW",
    "SWATS",
    "AMSBound",
    "AdaBound",
    "Lookahead",
    "SwitchStatus",
    "create_optimizer",
    "list_optimizers",
    "param_groups_for_layer_adaptation",
]
