"""pFedHN's hypernetwork (Shamsian et al., ICML 2021): one output head per tensor.

Homogeneous: every client runs the same architecture, whose trainable tensors
``W_1 .. W_T`` (``named_parameters()`` order) the server knows. Client ``i`` owns
one embedding vector ``v_i`` in ``R^e`` (``N(0, 1)`` like ``nn.Embedding``); a
shared MLP

    f(v) = L_{m}( ReLU( ... ReLU( L_1(v) ) ) ),   L_1: R^e -> R^h, L_k: R^h -> R^h

(``m = hidden_layers + 1`` linear layers, no activation after the last, as in
pFedHN's ``CNNHyper``) feeds one linear head per target tensor:

    W_t(v_i) = reshape( A_t f(v_i) + b_t ),   A_t: (numel(W_t), h)

and ``theta_i`` is the concatenation of the ``W_t(v_i)`` in order. Unlike
MH-pFedHN there is no chunking: the heads are as wide as the tensors, so this
only fits one architecture.
"""

from __future__ import annotations

import torch
from torch import nn

from .generator import ClientGenerator


class PerTensorHyperNetwork(ClientGenerator):
    """pFedHN's generator for one architecture with tensors of ``sizes``.

    Parameters
    ----------
    sizes : list of int
        ``numel`` of every trainable tensor of the target model, in order.
    embed_dim, hidden_dim, hidden_layers : int
        ``e``, ``h`` and the number of hidden ``h -> h`` layers (pFedHN: e =
        1 + clients / 4, h = 100, 3).
    """

    shape_names = "tensor sizes, pfedhn-embed-dim, pfedhn-hidden-dim, hidden-layers"

    def __init__(
        self, sizes: list[int], embed_dim: int, hidden_dim: int, hidden_layers: int
    ) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.embed_dim, self.hidden_dim = embed_dim, hidden_dim
        layers: list[nn.Module] = [nn.Linear(embed_dim, hidden_dim)]
        for _ in range(hidden_layers):
            layers += [nn.ReLU(), nn.Linear(hidden_dim, hidden_dim)]
        self.extractor = nn.Sequential(*layers)
        self.key = str(sum(self.sizes))
        self.heads = nn.ModuleDict(
            {self.key: nn.ModuleList(nn.Linear(hidden_dim, n) for n in self.sizes)}
        )
        self.embeddings = nn.ParameterDict()
        self.num_params: dict[str, int] = {}

    def add_client(
        self, name: str, num_params: int, generator: torch.Generator | None = None
    ) -> list[nn.Parameter]:
        """Register a client of the one architecture; return its new embedding."""
        if num_params != int(self.key):
            raise ValueError(
                f"pfedhn: client {name!r} has {num_params} parameters but the "
                f"federation's model has {self.key}; every client must run it"
            )
        if name in self.num_params:
            return []
        emb = torch.empty(self.embed_dim).normal_(0.0, 1.0, generator=generator)
        device = self.extractor[0].weight.device
        self.embeddings[name] = nn.Parameter(emb.to(device))
        self.num_params[name] = num_params
        return [self.embeddings[name]]

    def head_of(self, name: str) -> str:
        return self.key

    def chunks_of(self, name: str) -> int:
        """Generated pieces: one per target tensor."""
        return len(self.sizes)

    def forward(self, name: str) -> torch.Tensor:
        """``theta`` of client ``name``: the heads' outputs concatenated."""
        features = self.extractor(self.embeddings[name])
        return torch.cat([head(features) for head in self.heads[self.key]])

    def _shape(self) -> list:
        layers = sum(isinstance(m, nn.Linear) for m in self.extractor) - 1
        return [self.sizes, self.embed_dim, self.hidden_dim, layers]
