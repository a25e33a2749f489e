"""Squeeze-and-Excitation (Hu et al. 2018): channel gating from global context."""

from __future__ import annotations

from torch import Tensor, nn


class SqueezeExcite(nn.Module):
    """``x · gate(FC(act(FC(avgpool(x)))))`` on a B×C×H×W map; C → C/reduction → C.

    The FCs are 1×1 convs on the B×C×1×1 pooled map (the same maths as Linear, no reshapes).
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 4,
        act_layer: type[nn.Module] = nn.ReLU,
        gate_layer: type[nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)
        self.gate = gate_layer()

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)  # B×C×1×1
        s = self.fc2(self.act(self.fc1(s)))
        return x * self.gate(s)
