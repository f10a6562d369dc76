"""A stand-in for torchvision, for the timm tests only.

timm 1.0.31 imports ``torchvision.ops.misc.FrozenBatchNorm2d`` when it is imported
(``timm.layers``), and torchvision cannot be installed next to the torch this repository pins
(PyPI's torchvision wheels for it fail to import: "operator torchvision::nms does not exist";
the ones that import need another torch). timm's optimizer factory, which the tests exercise,
uses nothing of torchvision. This package provides only the one class timm's import needs;
``tests/test_integrations.py`` puts it on the path of a child process only when the real
torchvision cannot be imported.
"""

__version__ = "0.0.0+tuneless-test-stub"
