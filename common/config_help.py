"""What every run-config and node-config key means: the one place users read
them from (``python -m tools.config_reference`` writes docs/configuration.md from
these and the defaults of :class:`common.config.RunConfig`)."""

from __future__ import annotations

#: Run-config key -> meaning (Markdown), in the order of the reference table.
RUN_CONFIG_HELP: dict[str, str] = {
    "strategy": "algorithm; see [Baselines](method.md#baselines)",
    "num-server-rounds": (
        "federated training rounds (the paper uses 500; 0 with `hypernet-from` "
        "fits only novel clients)"
    ),
    "fraction-train": "fraction of clients sampled per round, in (0, 1]; seeded",
    "eval-every": "evaluate every N rounds (and always after the last)",
    "min-clients": "wait for this many connected nodes before the handshake",
    "round-timeout": (
        "seconds to wait for one message's reply, counted from when it is sent"
    ),
    "max-in-flight": (
        "messages of one exchange sent but not yet answered, at most; the next "
        "goes out when a reply comes (0 = all at once). Bounds what waits in "
        "the SuperLink: at 1000 clients, all-at-once evaluation held 1000 "
        "models there. Raise it for deployments with more devices than this "
        "that should all work at once"
    ),
    "seed": "drives partitioning, initialisation, sampling and update order",
    "device": "`auto` (CUDA when available), `cpu` or `cuda`; server and clients",
    "dataset": (
        "`cifar10`, `cifar100`, `tiny-imagenet`, `emnist` (the split of "
        "`emnist-split`), `mnist`, `fashion-mnist` or `imagefolder`"
    ),
    "emnist-split": (
        "EMNIST split: `byclass` (62 classes), `bymerge` or `balanced` (47), "
        "`letters` (26, labelled 0..25), `digits` or `mnist` (10); `emnist` "
        "only"
    ),
    "data-dir": (
        "where datasets are looked for ([Data and "
        "datasets](guides/data-and-datasets.md))"
    ),
    "download": "download a missing dataset when there is a network",
    "partition": "`pathological` (k classes per client) or `dirichlet`",
    "classes-per-client": (
        "k of the pathological partition (paper: 2 / 10 / 20 / 6 for CIFAR-10 / "
        "CIFAR-100 / Tiny / EMNIST)"
    ),
    "dirichlet-alpha": (
        "alpha of the Dirichlet partition (paper: 0.1 CIFAR-10, 0.01 otherwise)"
    ),
    "dirichlet-min-size": (
        "Dirichlet draws are repeated until every client has this many samples"
    ),
    "models": "comma list of client architectures, assigned in contiguous blocks",
    "local-epochs": "local epochs per round",
    "batch-size": "local mini-batch size",
    "client-lr": "local SGD learning rate",
    "client-momentum": "local SGD momentum",
    "client-weight-decay": "local SGD weight decay",
    "client-grad-clip": "local gradient norm clip",
    "bn-eval": (
        "BatchNorm statistics a client evaluates with: `stored` (the paper: "
        "those kept from its own last training), `recalibrate` (recomputed for "
        "the evaluated weights by one forward pass over the train split, then "
        "the stored ones put back) or `both` (`accuracy` with the stored ones, "
        "`accuracy_recalibrated` with recomputed ones). Changes the reported "
        "accuracy only, never training. See [The "
        "method](method.md#what-stays-on-the-client); `python "
        "scripts/bn_recalibration.py RUN_DIR` measures it on a finished run"
    ),
    "client-threads": (
        "intra-op threads torch uses for each client message; 0 keeps the "
        "process's own (all cores of a SuperNode; 1 per simulated client, as "
        "Ray sets it for `client-resources-num-cpus = 1`). More threads than "
        "cores per running client oversubscribes them: on 2 cores, 2 threads "
        "per client made 5-model rounds 11% slower. Float results depend on the "
        "thread count, so runs with different values differ in the last bits "
        "and then diverge. See [Benchmarks](BENCHMARKS.md#round-speed-5-models)"
    ),
    "client-precision": (
        "arithmetic of local training: `fp32` (the paper) or `bf16` (mixed "
        "precision: each mini-batch's forward pass and loss under "
        "`torch.autocast` in bfloat16; weights, gradients, the optimizer, the "
        "updates sent and evaluation stay float32). Changes results. Fast only "
        "where the hardware has bfloat16 units (CPUs with AMX or AVX512-BF16, "
        "recent GPUs): a 5-model round took 0.61x the `fp32` one there, while "
        "without them a step is emulated and several times slower (the clients "
        "log a warning). See "
        "[Benchmarks](BENCHMARKS.md#mixed-precision-client-precision--bf16)"
    ),
    "hn-lr": "hypernetwork Adam learning rate",
    "hn-grad-clip": "hypernetwork gradient norm clip",
    "hn-update": (
        "`sequential`: one Adam step per reply in seeded random order; `mean`: "
        "one step on the example-weighted mean"
    ),
    "hn-window": (
        "`sequential` only: clients in flight at once; client k gets a model "
        "that includes the updates of all clients before it but the last "
        "`hn-window` - 1 (1 = the reference algorithm, 0 = everyone from the "
        "round-start state)"
    ),
    "hn-order": (
        "`sequential` only: `random` (a seeded permutation of the round's "
        "clients) or `by-size` (the same, regrouped so that the clients in "
        "flight together have the same size: fewer cores idle beside a larger "
        "model; unchanged when all clients have one size or `hn-window` = 1)"
    ),
    "embed-dim": "columns of each client's embedding matrix",
    "embed-init-std": "std of the embedding initialisation",
    "hidden-dim": "width of the hypernetwork's feature extractor",
    "hidden-layers": "linear layers (each + ReLU) of the feature extractor",
    "chunk-size": "values generated per embedding row",
    "head-type": (
        "hypernetwork heads: `per-position` (the paper: one map per chunk "
        "position), `shared` (one map per head plus a per-position bias, 63x "
        "fewer parameters on the 5-model setting) or `low-rank` (per-position "
        "maps of rank `head-rank`); see "
        "[Benchmarks](BENCHMARKS.md#compact-heads)"
    ),
    "head-rank": "`low-rank` heads: the rank r of each position's map",
    "hn-init": (
        "initial hypernetwork: `streams` (the extractor from the global stream "
        "seeded by `seed`, heads and embeddings from a stream derived from it) "
        "or `reference` (one stream in the authors' script's order of draws: "
        "for CNN-only clients the initial hypernetwork equals the authors' "
        "script's with the same `--seed`, bit for bit; per-position heads of "
        "`mh-pfedhn`/`mh-pfedhngd` only)"
    ),
    "transfer": (
        "`mh-pfedhn`, `mh-pfedhngd`: encoding of theta and delta on the wire "
        "(`common/transfer.py`): `fp32`; `fp16` (both directions in half "
        "precision, half the bytes; finite values beyond +-65504 are clipped; "
        "the server keeps float32); `topk` (theta float32 down, up only the "
        "`topk-fraction` largest-magnitude delta entries as int32 indices + "
        "float32 values, about 2 x `topk-fraction` of the bytes; the server "
        "rebuilds the dense delta with zeros elsewhere). Other strategies "
        "accept only `fp32`; `python -m bench.comm` prints the bytes per model"
    ),
    "topk-fraction": (
        '`transfer = "topk"`: fraction f in (0, 1] of the delta entries sent, k '
        "= ceil(f K)"
    ),
    "train-clients": (
        "only the first M clients (by partition id) train; the others are novel "
        "(0: everyone trains)"
    ),
    "novel-rounds": (
        "after training, rounds that fit the novel clients' fresh embeddings "
        "(extractor and trained heads frozen)"
    ),
    "novel-lr": "Adam learning rate of the novel-client phase",
    "hypernet-from": (
        "a results directory (or its `hypernet.pt`) whose trained hypernetwork "
        "this run starts from, e.g. with `num-server-rounds=0` to fit only "
        "novel clients"
    ),
    "global-model": (
        "`mh-pfedhngd`: architecture of the global teacher model; `fml` and "
        "`fedkd`: the shared model"
    ),
    "gd-alpha": (
        "`mh-pfedhngd`: weight of the distillation term, in [0, 1] (paper tuned "
        "0.01-0.2)"
    ),
    "gd-temperature": (
        "`mh-pfedhngd`: distillation temperature T > 0 (paper tuned 10-110)"
    ),
    "reg-lambda": (
        "`fedproto`, `fd`, `fedtgp`: weight of the prototype / logit "
        "regulariser (HtFLlib's `lamda`)"
    ),
    "fml-alpha": (
        "`fml`: weight in [0, 1] of the cross-entropy in the personal model's "
        "loss; the KL towards the shared model gets 1 - it (0.5: the FML paper; "
        "HtFLlib's default 1.0 switches the mutual term off)"
    ),
    "fml-beta": "`fml`: the same for the shared model's loss",
    "fedkd-energy-start": (
        "`fedkd`: SVD energy kept when compressing the shared student in round 1"
    ),
    "fedkd-energy-end": "`fedkd`: energy kept in the last round (linear in between)",
    "server-lr": "`fedgh`, `fedtgp`: learning rate of the server-side training",
    "server-epochs": "`fedgh`, `fedtgp`: server-side epochs per round",
    "tgp-margin": "`fedtgp`: upper bound of the adaptive margin",
    "pfedhn-lr": "`pfedhn`: hypernetwork SGD learning rate (momentum 0.9)",
    "pfedhn-weight-decay": "`pfedhn`: hypernetwork weight decay",
    "pfedhn-embed-dim": (
        "`pfedhn`: client embedding size; 0 = `1 + clients // 4` as in pFedHN"
    ),
    "pfedhn-hidden-dim": (
        "`pfedhn`: hypernetwork MLP width (`hidden-layers` sets its depth)"
    ),
    "results-dir": "parent of the run's results folder (`make run` uses `./results`)",
    "run-name": "results folder name; empty: `<timestamp>-<strategy>`",
    "checkpoint-every": (
        "write the complete server state to `<run dir>/checkpoint.pt` every N "
        "training rounds and after the last (0 = never); atomic, the previous "
        "one stays until the new one is complete"
    ),
    "checkpoint-optimizer": (
        "keep the hypernetwork optimizer's state (Adam's moments, twice the "
        "hypernetwork's size) in checkpoints; `false` makes them a third of the "
        "size, and a resumed run restarts Adam from zero moments, so it no "
        "longer equals an uninterrupted one"
    ),
    "resume-from": (
        "a run directory or checkpoint file: continue that run in its directory "
        "from the round after the checkpoint"
    ),
    "client-state-dir": (
        "a folder where every client writes its state (personal model, BatchNorm "
        "statistics) after each training round, so a run resumed with "
        "`resume-from` continues it (`make compare` sets it per run); node config "
        "`state-dir` takes precedence; empty: kept in memory only"
    ),
    "max-delta-norm": (
        "reject a client update whose L2 norm exceeds this (0 = no limit)"
    ),
    "min-train-clients": (
        "a round's update is applied only when at least this many train replies "
        "are usable; otherwise the round is skipped with a warning"
    ),
}

#: Node-config keys (``flower-supernode --node-config``) -> meaning.
NODE_CONFIG_HELP: dict[str, str] = {
    "`partition-id`, `num-partitions`": "which share of the dataset this client takes",
    "`client-name`": "the client's stable identity; default `client-<partition-id>`",
    "`model`": "this client's architecture; overrides the `models` block rule",
    "`data-dir`": "this client's data folder; overrides run-config `data-dir`",
    "`state-dir`": (
        "where the client keeps its state on disk across SuperNode restarts and "
        "resumed runs"
    ),
    "`novel`": (
        "`true`: the client joins only after training "
        "([Clients that join later](guides/novel-clients.md))"
    ),
}
