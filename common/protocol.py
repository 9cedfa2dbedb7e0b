"""What crosses the wire: record keys shared by the ServerApp and the ClientApp.

Every message's ``config`` carries :data:`RUN_KEY` and :data:`RESUMED_AT`.

Handshake (QUERY)
    server -> client: ``config`` ConfigRecord (nothing else).
    client -> server: ``info`` ConfigRecord with :data:`CLIENT_NAME`, and ``metrics``
    MetricRecord with :data:`NUM_PARAMS`, :data:`NUM_TRAIN`, :data:`NUM_TEST`, and
    the dataset's :data:`NUM_CLASSES` and :data:`IN_CHANNELS` (public facts of the
    task, which a server-side model such as MH-pFedHNGD's global model needs).
    Nothing about layer names, shapes or the model family is sent.
Train
    server -> client: ``arrays`` ArrayRecord with :data:`THETA` (flat float32), and
    ``config`` with :data:`ROUND` and, when the client is to evaluate the received
    model before training it, :data:`EVALUATE_FIRST`. No hyperparameters are sent:
    every client reads them (learning rate, epochs, batch size, ...) from the run
    config, which Flower gives every node.
    client -> server: ``arrays`` with :data:`DELTA` (``theta_sent - theta_trained``),
    ``info`` with the client name, ``metrics`` with :data:`NUM_EXAMPLES`,
    :data:`LOSS` and :data:`SECONDS` (wall-clock of the training loop), and
    :data:`CPU_SECONDS` (its CPU time) and :data:`MESSAGE_CPU_SECONDS` (the CPU
    time of handling the whole message); when the config sets
    :data:`EVALUATE_FIRST`, also ``eval-metrics``: the evaluation below of the
    received model.
Evaluate
    server -> client: ``arrays`` with :data:`THETA`, ``config`` with :data:`ROUND`.
    client -> server: ``info`` and ``metrics`` with :data:`NUM_EXAMPLES`,
    :data:`CORRECT` and :data:`LOSS` (mean over the client's test examples), and
    :data:`SECONDS` and :data:`CPU_SECONDS` of the evaluation loop, and
    :data:`MESSAGE_CPU_SECONDS`; with run-config ``bn-eval = "both"`` and a model
    with BatchNorm also :data:`CORRECT_RECALIBRATED`.

:data:`CPU_SECONDS`, :data:`MESSAGE_CPU_SECONDS`, and :data:`SECONDS` of an
evaluation, are optional: the server only adds them up per round
(``client_*_seconds_sum`` in ``metrics.jsonl``).

Transfer modes (run-config ``transfer``; MH-pFedHN and MH-pFedHNGD, whose
:data:`GLOBAL_THETA` / :data:`GLOBAL_DELTA` travel the same way)
    ``fp32``: as above. ``fp16``: :data:`THETA` and :data:`DELTA` are float16.
    ``topk``: :data:`THETA` float32 down; up, instead of :data:`DELTA`, the
    ``ceil(topk-fraction * K)`` entries of largest magnitude as
    :data:`DELTA_INDICES` (int32, strictly increasing, in ``[0, K)``) and
    :data:`DELTA_VALUES` (float32, same length); :func:`sparse_keys` names them for
    any base key. :mod:`common.transfer` encodes and decodes all three.

Baselines carry other arrays in the same ``arrays`` record (each strategy
module's docstring says which): a shared model or head as a flat vector
(:data:`THETA` / :data:`DELTA`, :data:`HEAD`, :data:`SHARED`), class prototypes
(:data:`PROTOS` with :data:`PROTO_COUNTS`) or per-class logits (:data:`LOGITS`).
"""

import re

# Record names inside a message's RecordDict
ARRAYS = "arrays"
CONFIG = "config"
INFO = "info"
METRICS = "metrics"

# Arrays
THETA = "theta"
DELTA = "delta"
#: MH-pFedHNGD: the round-start global model down, its trained delta up.
GLOBAL_THETA = "global-theta"
GLOBAL_DELTA = "global-delta"
#: ``transfer = "topk"``: a sparse update as indices + values (see
#: :func:`sparse_keys`), e.g. ``delta-indices`` / ``delta-values``.
INDICES_SUFFIX = "-indices"
VALUES_SUFFIX = "-values"
#: Baselines: a flat classifier head (lg-fedavg, fedgh).
HEAD = "head"
#: Baselines: a flat shared model (fml, fedkd) down, and as trained up.
SHARED = "shared"
#: Baselines: ``[classes, features]`` class means of penultimate features
#: (fedproto, fedgh, fedtgp) and ``[classes]`` examples behind each row (0 = the
#: class is absent; its row is meaningless).
PROTOS = "protos"
PROTO_COUNTS = "proto-counts"
#: FedDistill: ``[classes, classes]`` per-class mean logits.
LOGITS = "logits"

# Info / config
CLIENT_NAME = "client-name"
ROUND = "round"
#: Train config flag: evaluate the received model before training it and put the
#: result in the reply's :data:`EVAL_METRICS` record (saves an exchange per round).
EVALUATE_FIRST = "evaluate-first"
EVAL_METRICS = "eval-metrics"
#: Every message's config: the run's key, kept across ``resume-from``, and the
#: checkpoint round the run resumed after (0: not resumed). A client restores
#: state saved on disk only for its own run, as of that round
#: (:mod:`client_app.persist`).
RUN_KEY = "run-key"
RESUMED_AT = "resumed-at"

# Metrics
NUM_PARAMS = "num-params"
NUM_TRAIN = "num-train"
NUM_TEST = "num-test"
NUM_CLASSES = "num-classes"
#: Handshake: 1 when the client joins only after training (``train-clients``).
NOVEL = "novel"
IN_CHANNELS = "in-channels"
GLOBAL_LOSS = "global-loss"
NUM_EXAMPLES = "num-examples"
LOSS = "loss"
CORRECT = "correct"
#: Correct test predictions with BatchNorm statistics recomputed for the evaluated
#: weights (``bn-eval = "both"``; :data:`CORRECT` then uses the stored ones).
CORRECT_RECALIBRATED = "correct-recalibrated"
SECONDS = "seconds"
#: CPU time (``time.process_time``) of the client's training or evaluation loops.
CPU_SECONDS = "cpu-seconds"
#: CPU time of the ClientApp's whole handling of a TRAIN or EVALUATE message:
#: building the client (kept state, data, model), the loops, and the strategy's
#: work outside them (prototype passes, SVD compression, persisting state).
MESSAGE_CPU_SECONDS = "message-cpu-seconds"


def sparse_keys(key: str) -> tuple[str, str]:
    """Names of the indices and values arrays of a sparse update of ``key``."""
    return key + INDICES_SUFFIX, key + VALUES_SUFFIX


DELTA_INDICES, DELTA_VALUES = sparse_keys(DELTA)
GLOBAL_DELTA_INDICES, GLOBAL_DELTA_VALUES = sparse_keys(GLOBAL_DELTA)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,127}$")


def check_client_name(name: str) -> str:
    """Return ``name`` if it is a valid client name, else raise ``ValueError``.

    Names key all server state and become parameter names, so they are restricted
    to 1-128 letters, digits, ``-`` and ``_``.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"invalid client name {name!r}: use 1-128 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name
