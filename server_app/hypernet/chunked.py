"""The MH-pFedHN hypernetwork: per-client embeddings, shared extractor, chunk heads.

Client ``i`` with ``K_i`` trainable parameters is generated in ``n_i = ceil(K_i/C)``
chunks of ``C`` values. It owns an embedding matrix ``v_i`` of shape ``(n_i, d)``,
initialised from ``N(0, s^2)`` (``s = 0.002`` in the paper). Every row goes through
the shared extractor ``f`` (``hidden_layers`` linear layers of width ``h``, each
followed by a ReLU) and then through the *position map* of its row in a head::

    theta_i = concat_j ( W[j] f(v_i[j]) + b[j] )[:K_i],   W[j]: (C, h), b[j]: (C,)

The heads are :mod:`.heads`. Only the hypernetwork's state lives here; how replies
update it is :mod:`server_app.strategies.mh_pfedhn`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from common.models import num_chunks

from .generator import ClientGenerator
from .heads import HeadType, check_head_type, make_head

if TYPE_CHECKING:
    from common.config import RunConfig


class HyperNetwork(ClientGenerator):
    """Generates every registered client's flat parameter vector.

    Parameters
    ----------
    embed_dim, hidden_dim, hidden_layers, chunk_size : int
        ``d``, ``h``, number of extractor layers and ``C`` (paper: 64, 128, 3, 3072).
    embed_init_std : float
        Standard deviation of the embedding initialisation (paper: 0.002).
    head_type, head_rank
        ``per-position`` (the paper), ``shared`` or ``low-rank`` (of rank
        ``head_rank``); see the module docstring.
    """

    shape_names = "embed-dim, hidden-dim, hidden-layers, chunk-size, head-type"

    def __init__(
        self,
        embed_dim: int = 64,
        hidden_dim: int = 128,
        hidden_layers: int = 3,
        chunk_size: int = 3072,
        embed_init_std: float = 0.002,
        head_type: HeadType = "per-position",
        head_rank: int = 8,
    ) -> None:
        super().__init__()
        check_head_type(head_type)
        self.head_type = head_type
        self.head_rank = head_rank
        self.embed_dim = embed_dim
        self.hidden_dim = hidden_dim
        self.chunk_size = chunk_size
        self.embed_init_std = embed_init_std
        layers: list[nn.Module] = []
        width = embed_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        self.extractor = nn.Sequential(*layers)
        self.heads = nn.ModuleDict()
        self.embeddings = nn.ParameterDict()
        self.num_params: dict[str, int] = {}

    @classmethod
    def from_config(cls, cfg: RunConfig) -> HyperNetwork:
        """The hypernetwork a run's config describes (no client registered yet)."""
        return cls(
            embed_dim=cfg.embed_dim,
            hidden_dim=cfg.hidden_dim,
            hidden_layers=cfg.hidden_layers,
            chunk_size=cfg.chunk_size,
            embed_init_std=cfg.embed_init_std,
            head_type=cfg.head_type,
            head_rank=cfg.head_rank,
        )

    # -- registry ------------------------------------------------------------------
    def add_client(
        self, name: str, num_params: int, generator: torch.Generator | None = None
    ) -> list[nn.Parameter]:
        """Register a client; return the parameters this created (for the optimizer).

        A new head is created only when no registered client has the same chunk
        count. Re-registering a known name with the same size is a no-op; with
        another size it is an error (the embedding would not fit).
        """
        if not name or "." in name:
            raise ValueError(f"invalid client name {name!r}: empty or contains '.'")
        if num_params < 1:
            raise ValueError(f"client {name!r}: num-params must be >= 1")
        if name in self.num_params:
            if self.num_params[name] != num_params:
                raise ValueError(
                    f"client {name!r} is registered with {self.num_params[name]} "
                    f"parameters but now reports {num_params}"
                )
            return []
        n = num_chunks(num_params, self.chunk_size)
        device = self.extractor[0].weight.device
        created: list[nn.Parameter] = []
        key = str(n)
        if key not in self.heads:
            head = make_head(
                self.head_type,
                n,
                self.hidden_dim,
                self.chunk_size,
                self.head_rank,
                generator,
            ).to(device)
            self.heads[key] = head
            created += list(head.parameters())
        emb = torch.empty(n, self.embed_dim)
        emb.normal_(0.0, self.embed_init_std, generator=generator)
        self.embeddings[name] = nn.Parameter(emb.to(device))
        self.num_params[name] = num_params
        created.append(self.embeddings[name])
        return created

    def chunks_of(self, name: str) -> int:
        return self.embeddings[name].shape[0]

    def head_of(self, name: str) -> str:
        """Key of the head that generates ``name`` (its chunk count, as a string)."""
        return str(self.chunks_of(name))

    # -- generation ----------------------------------------------------------------
    def forward(self, name: str) -> torch.Tensor:
        """``theta`` of client ``name``: a 1-D tensor of length ``K``."""
        emb = self.embeddings[name]
        chunks = self.heads[str(emb.shape[0])](self.extractor(emb))
        return chunks.reshape(-1)[: self.num_params[name]]

    def accumulate_vjp(self, name: str, delta: torch.Tensor) -> None:
        """Add ``(d theta_name / d phi)^T delta`` to the ``.grad`` of the parameters.

        Equivalent to ``self(name).backward(delta)``: the head's part is computed
        by the head's :meth:`ChunkHead.accumulate_grad`, the extractor's and embedding's
        by autograd from the head's feature gradient. Positions past ``K`` (the
        truncated tail of the last chunk) get a zero output gradient.
        """
        emb = self.embeddings[name]
        n = emb.shape[0]
        grad_out = torch.zeros(n * self.chunk_size, device=delta.device)
        grad_out[: delta.shape[0]] = delta
        features = self.extractor(emb)
        head = self.heads[str(n)]
        grad_features = head.accumulate_grad(
            grad_out.view(n, self.chunk_size), features.detach()
        )
        if features.requires_grad:
            features.backward(grad_features)

    def _shape(self) -> list:
        layers = sum(isinstance(m, nn.Linear) for m in self.extractor)
        head = self.head_type
        if head == "low-rank":
            head = f"low-rank (head-rank {self.head_rank})"
        return [self.embed_dim, self.hidden_dim, layers, self.chunk_size, head]


def _redraw_linear_(
    weight: torch.Tensor, bias: torch.Tensor, generator: torch.Generator
) -> None:
    """Overwrite ``weight`` ``(out, in)`` and ``bias`` with ``nn.Linear``'s default
    initialisation, weight then bias, drawn on the CPU from ``generator``."""
    w, b = torch.empty(weight.shape), torch.empty(bias.shape)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(w.shape[1])
    nn.init.uniform_(b, -bound, bound, generator=generator)
    weight.copy_(w)
    bias.copy_(b)


@torch.no_grad()
def reference_init_(hn: HyperNetwork, names: list[str], seed: int) -> None:
    """Re-draw ``hn``'s parameters in the authors' script's order (``hn-init``).

    The reference script (``MH-pFedHN.py`` of DangDang1895/MH-pFL) seeds PyTorch's
    CPU stream once with ``seed`` and then draws, in this order:

    1. every client model's default initialisation, in client order;
    2. every client's embedding ``v_i ~ N(0, s^2)`` of shape ``(n_i, d)``, in client
       order;
    3. the extractor's ``nn.Linear`` layers (weight, then bias), input side first;
    4. the heads, one per distinct chunk count in order of first appearance, and in
       each, positions ``j = 0 .. n-1``: ``nn.Linear(h, C)`` (weight, then bias).

    The server never sees the client models, so step 1 is replayed as ``K_i``
    uniform draws per client: exact for models that draw one number per parameter
    (CNN, VGG8), so for them the hypernetwork equals the script's initial one bit
    for bit (tested). BatchNorm parameters are constants and draw nothing, so with
    ResNet clients the later draws are shifted (same distribution, other values).
    ``names`` is the client order (partition-id order in a simulation). The draws
    come from a private generator: PyTorch's global stream is left untouched.
    """
    if hn.head_type != "per-position":
        raise ValueError(
            f"the reference initialisation needs per-position heads, not "
            f"{hn.head_type!r}"
        )
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        torch.empty(hn.num_params[name]).uniform_(generator=gen)
    for name in names:
        emb = torch.empty(hn.embeddings[name].shape).normal_(
            0.0, hn.embed_init_std, generator=gen
        )
        hn.embeddings[name].copy_(emb)
    for layer in hn.extractor:
        if isinstance(layer, nn.Linear):
            _redraw_linear_(layer.weight, layer.bias, gen)
    for key in dict.fromkeys(hn.head_of(name) for name in names):
        head = hn.heads[key]
        for j in range(head.weight.shape[0]):
            _redraw_linear_(head.weight[j], head.bias[j], gen)
