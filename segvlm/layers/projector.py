"""Text & image projector: text and visual features in one D-dim space, plus a similarity map."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TextImageProjector(nn.Module):
    """Linear maps of the phrase (pooled B×cond_dim, tokens B×L×text_width) and of visual tokens
    (B×D×h×w) into one D-dim space.

    * :meth:`project_text` gives the projected phrase B×D (the refinement block's conditioning vector)
      and, when ``project_tokens``, projected tokens B×L×D (the cross-attention's keys / values). The
      token map exists only when something consumes it, so no parameter goes unused under DDP.
    * :meth:`forward` maps the visual grid, takes the cosine similarity of every location with the
      projected phrase times a learned temperature ``exp(logit_scale)`` (B×1×h×w), and adds it to the
      features through ``sim_proj``, a zero-initialised 1×1 conv (1 → D): the map starts with no
      influence on the features, while ``sim_proj`` still gets gradients from the first step.
    """

    def __init__(
        self,
        dim: int,
        *,
        text_width: int,
        cond_dim: int,
        project_tokens: bool = True,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        self.text_pooled = nn.Linear(cond_dim, dim)
        self.text_tokens = nn.Linear(text_width, dim) if project_tokens else None
        self.visual = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)
        self.sim_proj = nn.Conv2d(1, dim, kernel_size=1)
        nn.init.zeros_(self.sim_proj.weight)
        nn.init.zeros_(self.sim_proj.bias)

    def project_text(self, cond: Tensor, tokens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(B×D projected phrase, B×L×D projected tokens or None)."""
        pooled = self.text_pooled(cond)
        if tokens is None or self.text_tokens is None:
            return pooled, None
        return pooled, self.text_tokens(tokens)

    def similarity(self, x: Tensor, text: Tensor) -> Tensor:
        """Scaled cosine similarity B×1×h×w of the projected grid ``x`` (B×D×h×w) and phrase ``text`` (B×D)."""
        v = F.normalize(self.visual(x.permute(0, 2, 3, 1)), dim=-1)  # B×h×w×D
        t = F.normalize(text, dim=-1)
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        return scale * torch.einsum("bhwd,bd->bhw", v, t).unsqueeze(1)

    def forward(self, x: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """x: B×D×h×w, text: B×D projected phrase → (x + sim_proj(sim), sim B×1×h×w)."""
        sim = self.similarity(x, text)
        return x + self.sim_proj(sim), sim
