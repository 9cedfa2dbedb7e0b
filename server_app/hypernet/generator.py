"""What a strategy needs of a hypernetwork, whatever its architecture: generate a
client's ``theta``, accumulate a vector-Jacobian product, save and load."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


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
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a damaged file
            raise ValueError(
                f"hypernet-from {path} cannot be read ({type(err).__name__}): it is "
                "truncated or not a hypernet.pt of this app"
            ) from None
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
