"""The MH-pFedHN hypernetwork: per-client embeddings, shared extractor, chunk heads.

Client ``i`` with ``K_i`` trainable parameters is generated in ``n_i = ceil(K_i/C)``
chunks of ``C`` values. It owns an embedding matrix ``v_i`` of shape ``(n_i, d)``,
initialised from ``N(0, s^2)`` (``s = 0.002`` in the paper). Every row goes through
the shared extractor ``f`` (``hidden_layers`` linear layers of width ``h``, each
followed by a ReLU) and then through the *position map* of its row in a head::

    theta_i = concat_j ( W[j] f(v_i[j]) + b[j] )[:K_i],   W[j]: (C, h), b[j]: (C,)

A head holds the ``n`` position maps for one chunk count ``n``; clients with the
same chunk count share it (heads are keyed by chunk count, never by arrival order).
The ``n`` maps are stored as one ``(n, C, h)`` tensor and applied as one batched
matrix product, which equals ``n`` separate ``nn.Linear(h, C)`` modules (tested).
Per-position maps are initialised like ``nn.Linear``: ``U(-1/sqrt(h), 1/sqrt(h))``.

Compact heads (``head-type``; not in the paper). The per-position head costs
``n C (h + 1)`` parameters, about 129 times the client model it generates, which
makes the paper's five models a 250 M parameter hypernetwork. Two alternatives
generate the same chunk layout from far fewer parameters:

``shared``
    One map for all positions: ``chunk_j = W f_j + b[j]`` with ``W: (C, h)``
    shared by the head and ``b[j]: (C,)`` per position. ``b`` is a learned
    *position embedding* in chunk space (it tells the positions apart, together
    with the client's own embedding rows ``v_i[j]``) and equals a base model that
    every client of the architecture shares. ``C h + n C`` parameters.
``low-rank``
    Per-position maps of rank ``r`` (``head-rank``) sharing their input
    projection: ``chunk_j = A[j] (B f_j) + b[j]`` with ``A[j]: (C, r)`` and
    ``B: (r, h)``. ``n C (r + 1) + r h`` parameters. ``A`` is initialised from
    ``U(-sqrt(3/r), sqrt(3/r))`` and ``B`` like ``nn.Linear(h, r)``, so the
    entries of ``A[j] B`` have the variance of a per-position map's.

Only the hypernetwork's state lives here; how replies update it is
:mod:`server_app.strategies.mh_pfedhn`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal, get_args

import torch
from torch import nn

from common.models import num_chunks

if TYPE_CHECKING:
    from common.config import RunConfig

HeadType = Literal["per-position", "shared", "low-rank"]
HEAD_TYPES: tuple[str, ...] = get_args(HeadType)


def check_head_type(head_type: str) -> None:
    """Raise ``ValueError`` naming the allowed types if ``head_type`` is unknown."""
    if head_type not in HEAD_TYPES:
        raise ValueError(
            f"unknown head type {head_type!r}; allowed: {', '.join(HEAD_TYPES)}"
        )


class ChunkHead(nn.Module):
    """Maps the extractor's ``(n, h)`` features of a client to its ``(n, C)`` chunks.

    Subclasses implement :meth:`forward`; :meth:`accumulate_grad` is the VJP of it
    (autograd by default).
    """

    def accumulate_grad(
        self, grad_out: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        """Add the VJP with ``grad_out`` to the parameters' ``.grad`` (those that
        require it); return the gradient w.r.t. ``features``."""
        with torch.enable_grad():
            features = features.detach().requires_grad_(True)
            self(features).backward(grad_out)
        return features.grad


def _uniform(shape: tuple[int, ...], bound: float, generator) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound, generator=generator))


class PositionHeads(ChunkHead):
    """``n`` independent linear maps ``R^h -> R^C``, one per chunk position.

    ``forward(F)[j] = weight[j] @ F[j] + bias[j]`` for ``F`` of shape ``(n, h)``,
    computed with one ``baddbmm`` instead of a loop over ``n`` modules.
    """

    def __init__(
        self,
        num_positions: int,
        hidden_dim: int,
        chunk_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(hidden_dim)
        shape = (num_positions, chunk_size, hidden_dim)
        self.weight = _uniform(shape, bound, generator)
        self.bias = _uniform((num_positions, chunk_size), bound, generator)
        self._grad_buffer: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map ``(n, h)`` features to ``(n, C)`` chunks, row ``j`` through map ``j``."""
        out = torch.baddbmm(self.bias.unsqueeze(2), self.weight, features.unsqueeze(2))
        return out.squeeze(2)

    @torch.no_grad()
    def accumulate_grad(
        self, grad_out: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        """Add this head's VJP to ``.grad``; return the gradient w.r.t. features.

        For ``out[j] = W[j] f[j] + b[j]`` and output gradient ``g`` (``(n, C)``)::

            dW[j] = g[j] f[j]^T,   db[j] = g[j],   df[j] = W[j]^T g[j]

        This equals autograd of :meth:`forward` (tested) but writes ``dW`` into a
        buffer kept between steps: autograd would allocate a fresh ``(n, C, h)``
        tensor per reply, and on the CPU those page faults cost more than the
        arithmetic. ``.grad`` is set only while a step uses this head, so Adam
        still skips heads that no reply touched.
        """
        if not self.weight.requires_grad:  # a frozen head (novel-client phase)
            return torch.bmm(grad_out.unsqueeze(1), self.weight).squeeze(1)
        outer = (grad_out.unsqueeze(2), features.unsqueeze(1))
        if self.weight.grad is None:
            if (
                self._grad_buffer is None
                or self._grad_buffer.device != self.weight.device
            ):
                self._grad_buffer = torch.empty_like(self.weight)
            self.weight.grad = torch.mul(*outer, out=self._grad_buffer)
            self.bias.grad = grad_out.clone()
        else:
            self.weight.grad.addcmul_(*outer)
            self.bias.grad.add_(grad_out)
        return torch.bmm(grad_out.unsqueeze(1), self.weight).squeeze(1)


class SharedHead(ChunkHead):
    """``head-type = "shared"``: ``chunk_j = W f_j + b[j]`` (one ``W`` per head)."""

    def __init__(
        self,
        num_positions: int,
        hidden_dim: int,
        chunk_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(hidden_dim)
        self.weight = _uniform((chunk_size, hidden_dim), bound, generator)
        self.bias = _uniform((num_positions, chunk_size), bound, generator)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, features, self.weight.t())


class LowRankHeads(ChunkHead):
    """``head-type = "low-rank"``: ``chunk_j = A[j] (B f_j) + b[j]``, rank ``r``."""

    def __init__(
        self,
        num_positions: int,
        hidden_dim: int,
        chunk_size: int,
        rank: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.project = _uniform(
            (rank, hidden_dim), 1 / math.sqrt(hidden_dim), generator
        )
        self.weight = _uniform(
            (num_positions, chunk_size, rank), math.sqrt(3 / rank), generator
        )
        bound = 1.0 / math.sqrt(hidden_dim)
        self.bias = _uniform((num_positions, chunk_size), bound, generator)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        low = features @ self.project.t()  # (n, r)
        out = torch.baddbmm(self.bias.unsqueeze(2), self.weight, low.unsqueeze(2))
        return out.squeeze(2)


def make_head(
    head_type: HeadType,
    num_positions: int,
    hidden_dim: int,
    chunk_size: int,
    rank: int = 8,
    generator: torch.Generator | None = None,
) -> ChunkHead:
    """The head of ``head_type`` for ``num_positions`` chunks (module docstring)."""
    check_head_type(head_type)
    if head_type == "per-position":
        return PositionHeads(num_positions, hidden_dim, chunk_size, generator)
    if head_type == "shared":
        return SharedHead(num_positions, hidden_dim, chunk_size, generator)
    return LowRankHeads(num_positions, hidden_dim, chunk_size, rank, generator)


def head_parameter_count(
    head_type: HeadType,
    num_positions: int,
    hidden_dim: int,
    chunk_size: int,
    rank: int = 8,
) -> int:
    """Parameters of one head, without building it (module docstring's formulas)."""
    check_head_type(head_type)
    n, h, c = num_positions, hidden_dim, chunk_size
    if head_type == "per-position":
        return n * c * (h + 1)
    if head_type == "shared":
        return c * h + n * c
    return n * c * (rank + 1) + rank * h


class ClientGenerator(nn.Module):
    """What a strategy needs of a hypernetwork, whatever its architecture.

    Subclasses hold ``extractor`` (shared layers), ``heads`` (an
    ``nn.ModuleDict`` keyed by integer strings), ``embeddings`` (an
    ``nn.ParameterDict`` by client name) and ``num_params`` (client name ->
    ``K``), and implement :meth:`add_client`, :meth:`forward`, :meth:`head_of`,
    :meth:`chunks_of` and :meth:`_shape` (the hyperparameters a saved file must
    match, named by :attr:`shape_names`).
    """

    #: The run-config keys behind :meth:`_shape`, for error messages.
    shape_names: ClassVar[str] = ""

    def head_of(self, name: str) -> str:
        raise NotImplementedError

    def chunks_of(self, name: str) -> int:
        raise NotImplementedError

    def _shape(self) -> list:
        raise NotImplementedError

    def accumulate_vjp(self, name: str, delta: torch.Tensor) -> None:
        """Add ``(d theta_name / d phi)^T delta`` to the ``.grad`` of the parameters."""
        self(name).backward(delta)

    @torch.no_grad()
    def generate(self, name: str) -> torch.Tensor:
        """``theta`` without autograd, as float32 on the CPU (ready to send)."""
        return self(name).detach().to("cpu", torch.float32)

    # -- persistence ----------------------------------------------------------------
    def save(self, path) -> None:
        """Write the parameters and the client sizes (``hypernet-from`` reads it)."""
        torch.save(
            {
                "state": self.state_dict(),
                "num_params": dict(self.num_params),
                "shape": self._shape(),
            },
            path,
        )

    def load_trained(self, path, skip: set[str] = frozenset()) -> set[str]:
        """Copy the extractor, the heads and the embeddings of known names.

        Entries the file lacks (new chunk counts, new clients) and the embeddings
        named in ``skip`` keep their fresh initialisation. Returns the keys of the
        heads that were loaded.
        """
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["shape"] != self._shape():
            raise ValueError(
                f"hypernet-from {path}: saved with {self.shape_names} = "
                f"{saved['shape']}; this run uses {self._shape()}"
            )
        own = self.state_dict()
        heads = set()
        with torch.no_grad():
            for key, value in saved["state"].items():
                group, _, rest = key.partition(".")
                if key not in own or own[key].shape != value.shape:
                    continue
                if group == "embeddings" and rest in skip:
                    continue
                own[key].copy_(value)
                if group == "heads":
                    heads.add(rest.split(".")[0])
        return heads


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
