"""SCAFFOLD on Flower: the control variates kept by the server, the clients stateless.

The simulation (`traineval.modes.federated.Controls`) keeps the server's control `c` and
every client's `c_i` in the server optimizer's state; on Flower the server does the same:
each round it sends a node, beside the global weights `x`, its correction `c - c_i`
(`ArrayRecord` "correction", one array per trainable parameter); the client trains with it
(`train_client`, `ClientRound.correction`) and replies with its weights `y_i`, its identity (its
`partition-id`) and its number of local steps `K`. From those the server computes what the
client's control becomes (option II of Karimireddy et al., 2020), `c_i + (x - y_i) / (K lr)
- c`, and moves `c` by the mean change over all N clients: the same arithmetic as the
simulation, so both reach the same weights. Nothing lives on the nodes between rounds, and
the server's checkpoint carries every control, so a resumed run continues exactly.

Controls start at zero, so a node the server has not heard from yet trains with `c`. A
SuperNode that restarts gets a new node id: until its first reply the server does not know
which client it is, so it trains with `c - 0` for that round, and its control continues from
what it trained with (logged once).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, RecordDict

__all__ = ["CLIENT_KEY", "CORRECTION_KEY", "STEPS_KEY", "ServerControls", "correction_of"]

CORRECTION_KEY = "correction"  # the train message's record: c - c_i per trainable parameter
CLIENT_KEY = "scaffold-client"  # the reply's metric: the client's identity (partition-id)
STEPS_KEY = "scaffold-steps"  # the reply's metric: its local optimizer steps K
logger = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


def correction_of(message: Message, names: Sequence[str]) -> list[torch.Tensor] | None:
    """The correction a train message carries (None when the run is not SCAFFOLD's), in
    the order of `names`, the model's trainable parameters."""
    if CORRECTION_KEY not in message.content.array_records:
        return None
    arrays = message.content.array_records[CORRECTION_KEY].to_torch_state_dict()
    return [arrays[name] for name in names]


class ServerControls:
    """The server's `c` and each client's `c_i` (by identity), over the parameters `names`."""

    def __init__(self, names: Sequence[str], clients: int) -> None:
        self.names, self.clients = list(names), clients
        self.control: State = {}
        self.client_controls: dict[int, State] = {}
        self.identities: dict[int, int] = {}  # node id -> client identity (from its replies)
        self._sent: State = {}  # this round's global weights x
        self._lr = 0.0

    def configure(
        self, messages: Iterable[Message], arrays: ArrayRecord, lr: float
    ) -> list[Message]:
        """The round's train messages, each with its node's correction added."""
        weights = arrays.to_torch_state_dict()
        self._sent = {name: weights[name].float() for name in self.names}
        self._lr = lr
        if not self.control:
            self.control = {name: torch.zeros_like(t) for name, t in self._sent.items()}
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            own = self.client_controls.get(self.identities.get(node, -1))
            correction = {
                name: self.control[name] - own[name] if own else self.control[name].clone()
                for name in self.names
            }
            content = RecordDict({**message.content, CORRECTION_KEY: ArrayRecord(correction)})
            out.append(
                Message(
                    content=content,
                    message_type=message.metadata.message_type,
                    dst_node_id=node,
                )
            )
        return out

    def update(self, replies: Sequence[Message]) -> None:
        """The clients' new controls from their replies, then the server's."""
        changes: dict[int, State] = {}
        for reply in replies:
            if not reply.has_error():
                client, change = self._change(reply)
                changes[client] = change
        for client, change in changes.items():
            old = self.client_controls.get(client)
            self.client_controls[client] = {
                name: (old[name] + change[name]) if old else change[name] for name in self.names
            }
        for name in self.names:
            total = sum((changes[k][name] for k in sorted(changes)), torch.zeros(()))
            self.control[name] = self.control[name] + total / self.clients

    def _change(self, reply: Message) -> tuple[int, State]:
        """A replying client's identity and the change of its control, `c_i+ - c_i`."""
        metrics = next(iter(reply.content.metric_records.values()))
        client, steps = int(metrics[CLIENT_KEY]), int(metrics[STEPS_KEY])  # type: ignore[arg-type]
        node = reply.metadata.src_node_id
        used = self._used_control(node, client)
        old = self.client_controls.get(client)
        trained = reply.content.array_records["arrays"].to_torch_state_dict()
        change: State = {}
        for name in self.names:
            # (x - y_i) / (K lr) - c, as the simulation computes it
            term = (self._sent[name] - trained[name].float()) / (steps * self._lr)
            term = term - self.control[name]
            if used is not old:  # it trained with a control other than its own
                term = term + (used[name] if used else 0) - (old[name] if old else 0)
            change[name] = term
        self.identities[node] = client
        return client, change

    def _used_control(self, node: int, client: int) -> State | None:
        """The `c_i` the client trained with this round (None: zeros)."""
        known = self.identities.get(node)
        if known is None and client in self.client_controls:
            logger.warning(
                "SCAFFOLD: client %d answered from a new node id %d (a restarted SuperNode?): "
                "it trained this round with its control at zero, which it continues from",
                client,
                node,
            )
        return self.client_controls.get(client) if known == client else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "control": self.control,
            "client_controls": {str(k): v for k, v in self.client_controls.items()},
            "identities": {str(k): v for k, v in self.identities.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.control = dict(state["control"])
        self.client_controls = {int(k): dict(v) for k, v in state["client_controls"].items()}
        self.identities = {int(k): int(v) for k, v in state["identities"].items()}


def strip(metrics: Any) -> Any:
    """The aggregated train metrics without the controls' bookkeeping keys."""
    if metrics is not None:
        for key in (CLIENT_KEY, STEPS_KEY):
            if key in metrics:
                del metrics[key]
    return metrics
