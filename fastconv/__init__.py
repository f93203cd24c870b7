"""fastconv: fast 2-D convolution and multiclass hinge loss for the CPU (Numba) and the GPU
(CUDA C++ through CuPy), with a plain NumPy reference backend as the oracle.

Public names only; see the README for a tour.
"""
from ._types import Algo, ConvGeometry
from .conv import conv2d, conv2d_bias_grad, conv2d_input_grad, conv2d_weight_grad
from .conv import (conv_transpose2d, conv_transpose2d_input_grad,
                   conv_transpose2d_weight_grad)
from .dispatch import (BackendUnavailableError, available_backends, get_backend,
                       get_precision, set_backend, set_precision)
from .explain import explain
from .hinge import hinge_loss, hinge_loss_and_grad, hinge_loss_grad
from .layers import (SGD, Conv2d, ConvTranspose2d, Flatten, Linear, MultiClassHingeLoss, ReLU,
                     Sequential)

__version__ = "0.1.0"

__all__ = [
    "conv2d", "conv2d_input_grad", "conv2d_weight_grad", "conv2d_bias_grad",
    "conv_transpose2d", "conv_transpose2d_input_grad", "conv_transpose2d_weight_grad",
    "hinge_loss", "hinge_loss_grad", "hinge_loss_and_grad",
    "set_backend", "get_backend", "available_backends", "set_precision", "get_precision",
    "explain", "BackendUnavailableError", "Algo", "ConvGeometry",
    "Conv2d", "ConvTranspose2d", "MultiClassHingeLoss", "ReLU", "Linear", "Flatten",
    "Sequential", "SGD",
]
