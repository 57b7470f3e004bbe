"""The ClientApp Flower starts at a deployed site: it hands each message to the warm worker.

Flower's SuperNode starts one `flwr-clientapp` process per message, which would import torch,
Opacus and the networks and decode the site's images again every time (seconds of every round).
This ClientApp imports none of that: it sends the message, as Flower's own protobuf, to the
site's long-lived worker (client.worker) on its local socket and returns the worker's reply to
Flower, which carries it to the aggregator as before. The worker runs the full ClientApp
(client.app): run policy, privacy ledger, outbound guard and audit trail. App approval happened
before this code was installed (client.approval).

- `medfed site` names the worker's socket in the SuperNode's environment (`MEDFED_SITE_WORKER`).
  Without it (`flwr run .` on a local simulation, a SuperNode started by hand) the ClientApp runs
  in this process, as it always did.
- A worker running another app version is replaced by one started from this app's folder.
- The model arrays arrive, and leave, packed in one Array (common.packing: a deployed round's
  requests to the SuperLink are per object); the worker sees Flower's own records.
- A worker that dies mid-message fails this site's message with its kind only, as any site
  failure (client.failures); `medfed site` starts a new worker for the next message.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from client import worker_link as link
from client.failures import SiteFailure, failure_text
from common.fingerprint import FINGERPRINT
from common.packing import pack, unpack

log = logging.getLogger("medfed.client")

app = ClientApp()


def _raised(answer: dict[str, object]) -> Exception:
    """The worker's exception, raised here under its own name (the aggregator reads the name)."""
    name, module = str(answer.get("name", "RuntimeError")), str(answer.get("module", "builtins"))
    kind = type(name, (RuntimeError,), {"__module__": module, "__qualname__": name})
    return kind(str(answer.get("text", "")))


def _ready_worker(socket: Path, project: Path, code: str) -> None:
    """Wait until the site's worker runs this app's code, replacing one of another version."""
    answer = link.hello(socket)
    if answer is not None and answer.get("code") == code:
        return
    if answer is not None:
        log.info("site worker runs app %s; replacing it with this app (%s)",
                 str(answer.get("code"))[:12], code[:12])
        link.want(socket.parent.parent, project, code)
        try:
            link.request(socket, {"op": "stop"}, timeout=10)
        except (OSError, link.WorkerGone):
            pass  # gone already: the supervisor starts the wanted one
    link.wait_for_worker(socket, code)


def forward(msg: Message, context: Context) -> Message:
    """`msg` run by the site's worker (or here, when the site has none); the reply.

    The model arrays travel packed between the aggregator and this process (common.packing):
    the ClientApp gets them, and its reply leaves, in Flower's own record form.
    """
    return pack(_run(unpack(msg), context))


def _run(msg: Message, context: Context) -> Message:
    socket = os.environ.get(link.SOCKET_ENV)
    if not socket:
        from client.app import app as in_process

        return in_process(msg, context)
    from common.flower_compat import wire

    path = Path(socket)
    site = str(context.node_config.get("site-name", "")) or "this site"
    project = link.app_folder()
    try:
        _ready_worker(path, project, link.code_identity(project))
        answer, payloads = link.request(
            path, {"op": "run", "task": {"task_id": TaskIdentity.task_id}},
            [wire.message_bytes(msg), wire.context_bytes(context)],
        )
    except (OSError, link.WorkerGone, link.WorkerUnavailable) as exc:
        kind = msg.metadata.message_type  # train, evaluate or query.<name>
        log.error("site %s: the site worker did not answer %s (%s: %s)", site, kind,
                  type(exc).__name__, exc)
        raise SiteFailure(failure_text(site, kind, "SiteWorkerStopped")) from None
    if answer.get("status") != "ok" or len(payloads) != 2:
        raise _raised(answer)
    reply = wire.message_from(payloads[0])
    context.state = wire.context_from(payloads[1]).state  # SecAgg+ keeps its stage state there
    if reply.has_error():
        return Message(reply.error, reply_to=msg)
    return Message(reply.content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """A training round (and SecAgg+'s stages)."""
    return forward(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """A federated or cross-site evaluation."""
    return forward(msg, context)


@app.query(FINGERPRINT)
def fingerprint(msg: Message, context: Context) -> Message:
    """The data fingerprint a segmentation run plans from."""
    return forward(msg, context)
