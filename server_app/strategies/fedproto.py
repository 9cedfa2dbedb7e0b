"""FedProto (Tan et al., "FedProto: Federated Prototype Learning across
Heterogeneous Clients", AAAI 2022): clients share class prototypes only.

Every client keeps its own model ``h_i(f_i(x))`` (``f_i`` = ``model.features``,
``D`` wide; ``h_i`` = ``model.head``). Given the global prototypes ``p_c`` it
minimises, per mini-batch of ``B``,

    CE(h_i(f_i(x)), y) + lambda * (1 / (B D)) sum_{j: p_{y_j} exists}
        ||f_i(x_j) - p_{y_j}||^2

(``lambda`` = ``reg-lambda``; HtFLlib's ``MSELoss`` over the batch, samples
whose class has no global prototype adding zero), then uploads its prototypes
``proto_{i,c} = mean_{j: y_j = c} f_i(x_j)`` over its train split. The server
sets, for every class held by at least one uploading client,

    p_c = (1 / |S_c|) sum_{i in S_c} proto_{i,c}      (S_c: clients holding c)

(each holding client counts once, unweighted) and forgets classes nobody
uploaded this round. Evaluation: a test example is predicted as the class of
the nearest global prototype (squared Euclidean distance of ``f_i(x)``); before
the first aggregation, by the client's own head.

Wire: down ``protos`` ``[C, D]`` float32 and ``proto-counts`` ``[C]`` (0/1
present mask), nothing in round 1; up ``protos`` ``[C, D]`` and
``proto-counts`` ``[C]`` (the client's examples per class, 0 = absent).
``D`` = 64 for the paper's five models.

Follows HtFLlib's ``serverproto.py`` / ``clientproto.py`` (``lamda`` = 1.0,
unweighted per-class mean), except:

- local training uses this app's shared settings (``client-lr``,
  ``batch-size``, ``local-epochs``, momentum, weight decay, gradient clipping:
  the loop of :mod:`client_app.training`), not HtFLlib's SGD lr 0.01 and batch
  10, so every strategy is compared under the same local optimisation;
- the uploaded prototypes are computed after training, in eval mode, over the
  whole train split (as HtFLlib's FedTGP and FedGH clients do); HtFLlib's
  FedProto client averages the features of the training batches as they were
  seen, in train mode, while the model changed;
- before the first aggregation (no global prototypes) a client predicts with
  its own head; HtFLlib counts that evaluation as 0 correct;
- the evaluation loss is the cross-entropy of the negative squared distances
  (HtFLlib reports none); classes without a global prototype get distance
  ``1e9`` instead of ``inf`` so it stays finite.
"""

from __future__ import annotations

from . import register_strategy
from .prototypes import ClientPrototypes, PrototypeStrategy


@register_strategy("fedproto")
class FedProto(PrototypeStrategy):
    """Global prototypes as per-class means of the clients' prototypes."""

    def update(self, server_round: int, uploads: list[ClientPrototypes]) -> None:
        self.global_protos, self.present = self.mean_prototypes(uploads)
