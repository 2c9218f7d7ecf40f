"""Running the apps: on Flower's simulation engine (Ray backend), or one round in this process.

* :func:`simulate`: ``flwr.simulation.run_simulation`` with the Ray backend, K virtual SuperNodes
  (2-20 here), one CPU per ClientApp and torch at one thread in every actor; returns the
  :class:`~otfuse.flower.apps.FederatedRun` the ServerApp produced.
* :func:`client_replies`: every client's ``train`` reply to one round's message, made by calling
  the same ClientApp in this process (a client that raises gives an error reply, as the engine
  does). The one-shot experiment hands the same replies to several strategies'
  ``aggregate_train``, so that they fuse the very same client models.

>>> run = simulate(FederatedSettings(rounds=2, partition="iid"), num_clients=3)
>>> run.accuracy  # round -> test accuracy of the global model (%)
"""

from __future__ import annotations

import os
import time

from flwr.app import (
    DEFAULT_TTL,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)
from flwr.common.constant import ErrorCode

from otfuse.errors import OtfuseError
from otfuse.flower.apps import FederatedRun, make_client_app, make_server_app
from otfuse.flower.settings import FederatedSettings
from otfuse.flower.strategy import COUNTS_KEY

__all__ = [
    "NODE_ID_BASE",
    "FederatedRun",
    "SimulationError",
    "backend_config",
    "client_replies",
    "simulate",
    "train_message",
]

NODE_ID_BASE = 1000  # in-process node ids: NODE_ID_BASE + partition id


class SimulationError(OtfuseError):
    """A simulation ended without a result, or was asked for an impossible size."""


def backend_config(num_cpus: int = 2, client_cpus: float = 1.0) -> dict:
    """Flower's Ray backend settings: ``num_cpus`` for Ray, ``client_cpus`` per ClientApp (so at
    most ``num_cpus / client_cpus`` clients train at once), no GPU."""
    return {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus, "num_gpus": 0},
    }


def simulate(
    settings: FederatedSettings,
    num_clients: int,
    *,
    num_cpus: int = 2,
    client_cpus: float = 1.0,
    verbose: bool = False,
) -> FederatedRun:
    """Run the apps with ``settings`` on Flower's simulation engine (Ray) with ``num_clients``
    virtual SuperNodes; returns the server's :class:`FederatedRun`."""
    from flwr.simulation import run_simulation

    if not 1 <= num_clients <= 1000:
        raise SimulationError(f"num_clients must be between 1 and 1000, not {num_clients}")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the Ray workers
    runs: list[FederatedRun] = []
    run_simulation(
        server_app=make_server_app(settings, runs.append),
        client_app=make_client_app(settings),
        num_supernodes=num_clients,
        backend_config=backend_config(num_cpus, client_cpus),
        verbose_logging=verbose,
    )
    if not runs:
        raise SimulationError("the simulation ended without a result; see Flower's log above")
    return runs[0]


def train_message(
    arrays: ArrayRecord, node_id: int, server_round: int = 1, ask_counts: bool = False
) -> Message:
    """The message a strategy sends a client for a round of training (``ask_counts``: asking for
    the examples of each class it trains on, as :class:`~otfuse.flower.OTFusion` does with
    ``targets="coverage"``)."""
    config = {"server-round": server_round, **({COUNTS_KEY: True} if ask_counts else {})}
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    metadata = Metadata(
        run_id=0, message_id=f"train-{server_round}-{node_id}", src_node_id=0, dst_node_id=node_id,
        reply_to_message_id="", group_id=str(server_round), created_at=time.time(),
        ttl=DEFAULT_TTL, message_type=MessageType.TRAIN,
    )  # fmt: skip
    return Message(content=content, metadata=metadata)


def client_replies(
    settings: FederatedSettings,
    num_clients: int,
    arrays: ArrayRecord,
    server_round: int = 1,
    ask_counts: bool = False,
) -> list[Message]:
    """Every client's reply to a ``train`` message carrying ``arrays`` (:func:`train_message`),
    computed in this process (node id of client k: :data:`NODE_ID_BASE` + k)."""
    app = make_client_app(settings)
    replies = []
    for client in range(num_clients):
        node_id = NODE_ID_BASE + client
        context = Context(
            run_id=0, node_id=node_id, state=RecordDict(), run_config={},
            node_config={"partition-id": client, "num-partitions": num_clients},
        )  # fmt: skip
        message = train_message(arrays, node_id, server_round, ask_counts)
        try:
            replies.append(app(message, context))
        except Exception as exc:  # the engine turns a raising ClientApp into an error reply
            reason = f"{type(exc)}:<'{exc}'>"  # the engine's format
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
            replies.append(Message(error, reply_to=message))
    return replies
