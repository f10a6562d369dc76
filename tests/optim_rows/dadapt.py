"""Rows of D-Adaptation (Defazio & Mishchenko, 2023): DAdaptSGD, DAdaptAdam, DAdaptAdaGrad."""

from tests.optim_db import ErrorInput, OptimizerInfo
from tuneless import DAdaptAdaGrad, DAdaptAdam, DAdaptSGD, InvalidArgumentError


def _common_errors(owner: str) -> list[ErrorInput]:
    return [
        ErrorInput(dict(lr=-1.0), InvalidArgumentError,
                   rf"^{owner}: lr = -1.0 is invalid; allowed: 0 <= lr \(recommended: 1.0\)$"),
        ErrorInput(dict(d0=0.0), InvalidArgumentError,
                   rf"^{owner}: d0 = 0.0 is invalid; allowed: 0 < d0 \(recommended: 1e-06\)$"),
        ErrorInput(dict(weight_decay=-0.1), InvalidArgumentError,
                   rf"^{owner}: weight_decay = -0.1 is invalid; allowed: 0 <= weight_decay \(recommended: 0.0\)$"),
        ErrorInput(dict(growth_rate=0.5), InvalidArgumentError,
                   rf"^{owner}: growth_rate = 0.5 is invalid; allowed: 1 <= growth_rate \(inf: no limit\) "
                   r"\(recommended: inf\)$"),
        ErrorInput(dict(growth_rate=float("nan")), InvalidArgumentError,
                   rf"^{owner}: growth_rate = nan is invalid"),
    ]


_SGD_ERRORS = _common_errors("DAdaptSGD") + [
    ErrorInput(dict(momentum=1.0), InvalidArgumentError,
               r"^DAdaptSGD: momentum = 1.0 is invalid; allowed: 0 <= momentum and momentum < 1 \(recommended: 0.9\)$"),
    ErrorInput(dict(momentum=-0.1), InvalidArgumentError,
               r"^DAdaptSGD: momentum = -0.1 is invalid; allowed: 0 <= momentum and momentum < 1"),
]

_ADAM_ERRORS = _common_errors("DAdaptAdam") + [
    ErrorInput(dict(betas=(0.9, 1.0)), InvalidArgumentError,
               r"^DAdaptAdam: betas\[1\] = 1.0 is invalid; allowed: 0 <= betas\[1\] and betas\[1\] < 1 "
               r"\(recommended: 0.999\)$"),
    ErrorInput(dict(betas=(0.9,)), InvalidArgumentError,
               r"^DAdaptAdam: betas = \(0.9,\) is invalid; allowed: a tuple of 2 numbers in \[0, 1\) "
               r"\(recommended: \(0.9, 0.999\)\)$"),
    ErrorInput(dict(eps=0.0), InvalidArgumentError,
               r"^DAdaptAdam: eps = 0.0 is invalid; allowed: 0 < eps \(recommended: 1e-08\)$"),
    ErrorInput(dict(decouple=1), InvalidArgumentError,
               r"^DAdaptAdam: decouple = 1 is invalid; allowed: True or False$"),
    ErrorInput(dict(use_bias_correction="yes"), InvalidArgumentError,
               r"^DAdaptAdam: use_bias_correction = 'yes' is invalid; allowed: True or False$"),
]

_ADAGRAD_ERRORS = _common_errors("DAdaptAdaGrad") + [
    ErrorInput(dict(eps=-1e-6), InvalidArgumentError,
               r"^DAdaptAdaGrad: eps = -1e-06 is invalid; allowed: 0 < eps \(recommended: 1e-06\)$"),
    ErrorInput(dict(momentum=2.0), InvalidArgumentError,
               r"^DAdaptAdaGrad: momentum = 2.0 is invalid; allowed: 0 <= momentum and momentum < 1 "
               r"\(recommended: 0.0\)$"),
]

ROWS = [
    OptimizerInfo(cls=DAdaptSGD, kwargs={}, extra_kwargs=[dict(growth_rate=1.05, d0=1e-4)],
                  error_inputs=_SGD_ERRORS, misspelt="momentun"),
    OptimizerInfo(cls=DAdaptSGD, kwargs=dict(momentum=0.9), extra_kwargs=[dict(momentum=0.5, weight_decay=0.01)],
                  error_inputs=_SGD_ERRORS[-2:], misspelt="weight_decy", id="DAdaptSGD-momentum", tensor_lr_zero_stops=False),
    OptimizerInfo(cls=DAdaptSGD, kwargs=dict(weight_decay=0.1), error_inputs=_SGD_ERRORS[2:3],
                  misspelt="weightdecay", id="DAdaptSGD-weight_decay"),
    OptimizerInfo(cls=DAdaptAdam, kwargs={}, tensor_lr_zero_stops=False, extra_kwargs=[dict(growth_rate=1.02, betas=(0.8, 0.99))],
                  error_inputs=_ADAM_ERRORS, misspelt="weight_decy"),
    OptimizerInfo(cls=DAdaptAdam, kwargs=dict(weight_decay=0.1, decouple=True), tensor_lr_zero_stops=False,
                  extra_kwargs=[dict(weight_decay=0.1, decouple=False)],
                  error_inputs=_ADAM_ERRORS[-2:-1], misspelt="decoupled", id="DAdaptAdam-weight_decay"),
    OptimizerInfo(cls=DAdaptAdam, kwargs=dict(use_bias_correction=True), tensor_lr_zero_stops=False,
                  extra_kwargs=[dict(use_bias_correction=True, weight_decay=0.01, decouple=True, eps=1e-6)],
                  error_inputs=_ADAM_ERRORS[-1:], misspelt="bias_correction", id="DAdaptAdam-bias_correction"),
    OptimizerInfo(cls=DAdaptAdaGrad, kwargs={}, tensor_lr_zero_stops=False, extra_kwargs=[dict(eps=1e-4, growth_rate=1.1)],
                  error_inputs=_ADAGRAD_ERRORS, misspelt="epsilon"),
    OptimizerInfo(cls=DAdaptAdaGrad, kwargs=dict(momentum=0.5, weight_decay=0.01), tensor_lr_zero_stops=False, error_inputs=_ADAGRAD_ERRORS[-1:],
                  misspelt="momentun", id="DAdaptAdaGrad-momentum_weight_decay"),
]
