"""Small frozen value types shared by the ops, the dispatch rules and the backends."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConvGeometry:
    """Everything a backend needs to know about one convolution, already normalised.

    Attributes
    ----------
    N, C, H, W : int
        Input batch, channels, height, width.
    K, R, S : int
        Filters (output channels), filter height, filter width. Each filter has ``C // groups``
        input channels.
    P, Q : int
        Output height and width.
    stride : (int, int)
        ``(sh, sw)``.
    padding : (int, int, int, int)
        ``(top, bottom, left, right)`` zero padding.
    dilation : (int, int)
        ``(dh, dw)``.
    groups : int
        Number of groups; ``C % groups == 0`` and ``K % groups == 0``.
    """

    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    P: int
    Q: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.C, self.H, self.W)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.K, self.C // self.groups, self.R, self.S)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.K, self.P, self.Q)

    @property
    def flops(self) -> int:
        """Multiply-adds times two of the forward pass (direct algorithm)."""
        return 2 * self.N * self.K * self.P * self.Q * (self.C // self.groups) * self.R * self.S


@dataclass(frozen=True)
class Algo:
    """An algorithm choice made by ``fastconv.dispatch`` for one call.

    ``name`` selects the code path inside a backend, ``params`` tunes it (tile sizes, precision,
    workspace bound, ...) and ``reason`` says in words why the rules chose it.
    """

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    reason: str = ""

    def get(self, key: str, default: Any = None) -> Any:
        for k, v in self.params:
            if k == key:
                return v
        return default

    def as_dict(self) -> dict:
        return {"name": self.name, "params": dict(self.params), "reason": self.reason}
