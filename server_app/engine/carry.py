"""Carried evaluation: a round's evaluation rides on the next round's messages."""

from __future__ import annotations

from typing import Any

from common.config import RunConfig


class CarriedEvaluation:
    """Decides when an evaluation is carried, and holds the round waiting for it.

    When every client trains in the next round, the model it receives there is
    exactly the model the evaluation would send (nothing changes the server
    state in between), so the client evaluates it before training and one
    message exchange per round is saved. The numbers are the same.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        #: The record of the round whose evaluation is due with the next round.
        self.waiting: dict[str, Any] | None = None

    def carries(self, server_round: int, ordered: bool, num_clients: int) -> bool:
        """Whether round ``server_round``'s evaluation rides on the next round.

        In an ordered round (sequential updates) the evaluation messages are
        generated from the round-start state, so they all go out with the first
        train messages: only when all ``num_clients`` fit in ``max-in-flight``.
        Otherwise the evaluation is its own windowed exchange.
        """
        cfg, window = self.cfg, self.cfg.max_in_flight
        fits = window == 0 or num_clients <= window
        return (
            server_round < cfg.num_server_rounds
            and cfg.fraction_train >= 1.0
            and (fits or not ordered)
        )

    def take(self) -> dict[str, Any] | None:
        """The waiting record (``None`` if none), no longer waiting."""
        waiting, self.waiting = self.waiting, None
        return waiting
