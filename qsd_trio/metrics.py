"""``--metrics``: an HTTP endpoint serving OpenMetrics/Prometheus text at /metrics.

``--metrics addr.type=inet,addr.host=127.0.0.1,addr.port=9100`` (or
``addr.type=unix,addr.path=P``) starts it; without the option nothing here
beyond parsing runs, and prometheus_client and h11 are not imported.

Every scrape reads the daemon's state as it is (no metric is updated on the
I/O path):

* per node, from ``BlockNode.stats`` (the counters x-query-node-stats
  shows; query-blockstats keeps QEMU's zeros for nodes):
  ``qsd_node_operations_total``, ``qsd_node_bytes_total`` and
  ``qsd_node_errors_total``, labelled ``node`` and ``op`` (read, write,
  flush, discard), and ``qsd_node_latency_seconds``, a histogram per node
  and operation (request timing is turned on when the endpoint starts:
  nodes/latency.py);
* per export: ``qsd_export_clients``, ``qsd_export_bytes_total`` (the
  bytes of its clients' read and write requests), and from the task registry
  (qsd_trio/tasks.py) ``qsd_export_requests_in_flight``;
* per job: ``qsd_job_progress_bytes``, ``qsd_job_total_bytes``,
  ``qsd_job_speed_bytes`` (the limit, 0 for none) and ``qsd_job_state``;
* the process: prometheus_client's process collector (``process_*``: RSS,
  CPU seconds, open fds) and ``qsd_tasks`` (trio tasks running).

HTTP is h11 over trio streams, one task per connection, keep-alive as the
client asks; the exposition format is prometheus_client's, chosen from the
request's Accept header (OpenMetrics when asked for, else the text format).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import trio

from . import sockets, tasks
from .nodes import latency
from .qapi import keyval, schema
from .qapi.errors import GenericError

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from prometheus_client.registry import CollectorRegistry

    from .daemon import Daemon

log = logging.getLogger(__name__)

# BlockNode.stats keys per operation: (operations, bytes or None, errors)
_NODE_OPS = {
    "read": ("rd_operations", "rd_bytes", "failed_rd_operations"),
    "write": ("wr_operations", "wr_bytes", "failed_wr_operations"),
    "flush": ("flush_operations", None, "failed_flush_operations"),
    "discard": ("unmap_operations", "unmap_bytes", "failed_unmap_operations"),
}
_MAX_REQUEST = 64 * 1024  # bytes of request head we accept
# the latency buckets' upper bounds as Prometheus writes them (seconds)
_BOUNDS = [f"{ns / 1e9:g}" for ns in latency.BOUNDS_NS]


def parse_option(value: str) -> dict[str, Any]:
    """``--metrics`` text -> the listening address (SocketAddress, flat)."""
    opts = keyval.parse(value, None)
    unknown = set(opts) - {"addr"}
    if unknown:
        raise GenericError(f"Parameter '{sorted(unknown)[0]}' is unexpected")
    if "addr" not in opts:
        raise GenericError("Parameter 'addr' is missing")
    return sockets.addr_dict(schema.parse_keyval("SocketAddress", opts["addr"], "addr"))


def opt_metrics(value: str) -> Callable[[Daemon], Any]:
    """The command-line action for ``--metrics``."""
    addr = parse_option(value)

    async def action(daemon: Daemon) -> None:
        await daemon.monitor_nursery.start(MetricsServer(daemon, addr).run)
    return action


class DaemonCollector:
    """A prometheus_client collector reading the daemon at each scrape."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        # function-level: prometheus_client is loaded only with --metrics
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        ops = CounterMetricFamily("qsd_node_operations", "Completed requests per node",
                                  labels=["node", "op"])
        nbytes = CounterMetricFamily("qsd_node_bytes", "Bytes per node and operation",
                                     labels=["node", "op"])
        errors = CounterMetricFamily("qsd_node_errors", "Failed requests per node",
                                     labels=["node", "op"])
        for name, node in self.daemon.graph.nodes.items():
            stats = node.stats
            for op, (n_key, b_key, e_key) in _NODE_OPS.items():
                ops.add_metric([name, op], stats[n_key])
                errors.add_metric([name, op], stats[e_key])
                if b_key is not None:
                    nbytes.add_metric([name, op], stats[b_key])
        yield from (ops, nbytes, errors)

        hist = HistogramMetricFamily("qsd_node_latency_seconds",
                                     "Time from a request's start to its completion",
                                     labels=["node", "op"])
        for name, node in self.daemon.graph.nodes.items():
            if node.latency is None:
                continue
            for op, lat in node.latency.items():
                buckets, cum = [], 0
                for bound, count in zip(_BOUNDS, lat.counts, strict=False):
                    cum += count
                    buckets.append((bound, cum))
                buckets.append(("+Inf", cum + lat.counts[-1]))
                hist.add_metric([name, op], buckets, lat.total_ns / 1e9)
        yield hist

        tree = tasks.tree()
        in_flight: dict[str, int] = {}
        count = 0
        for node_info in _walk(tree):
            count += node_info["kind"] != "nursery"
            if node_info["kind"] == "client-connection" and "export-id" in node_info:
                eid = node_info["export-id"]
                in_flight[eid] = in_flight.get(eid, 0) + node_info.get("in-flight", 0)
        clients = GaugeMetricFamily("qsd_export_clients", "Clients connected to an export",
                                    labels=["export", "type", "node"])
        flight = GaugeMetricFamily("qsd_export_requests_in_flight",
                                   "Requests of an export's clients being served",
                                   labels=["export", "type", "node"])
        moved = CounterMetricFamily("qsd_export_bytes",
                                    "Bytes of the read and write requests of an export's clients",
                                    labels=["export", "type", "op"])
        for eid, export in self.daemon.exports.items():
            labels = [eid, export.type, export.node.node_name]
            clients.add_metric(labels, export.connected_clients())
            flight.add_metric(labels, in_flight.get(eid, 0))
            moved.add_metric([eid, export.type, "read"], export.read_bytes)
            moved.add_metric([eid, export.type, "write"], export.written_bytes)
        yield from (clients, flight, moved)

        progress = GaugeMetricFamily("qsd_job_progress_bytes", "Work done by a job",
                                     labels=["job", "type"])
        total = GaugeMetricFamily("qsd_job_total_bytes", "Work a job has to do",
                                  labels=["job", "type"])
        speed = GaugeMetricFamily("qsd_job_speed_bytes",
                                  "A job's speed limit in bytes per second (0: none)",
                                  labels=["job", "type"])
        state = GaugeMetricFamily("qsd_job_state", "1 for the state a job is in",
                                  labels=["job", "type", "state"])
        for jid, job in self.daemon.jobs.items():
            labels = [jid, job.job_type]
            progress.add_metric(labels, job.progress_current)
            total.add_metric(labels, job.progress_total)
            speed.add_metric(labels, job.speed)
            state.add_metric([*labels, str(job.status)], 1)
        yield from (progress, total, speed, state)

        yield GaugeMetricFamily("qsd_tasks", "trio tasks running", value=count)


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node["children"]:
        yield from _walk(child)


def make_registry(daemon: Daemon) -> CollectorRegistry:
    # function-level: prometheus_client is loaded only with --metrics
    from prometheus_client import ProcessCollector
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    registry.register(DaemonCollector(daemon))
    return registry


class MetricsServer:
    """The /metrics listener and its connections."""

    def __init__(self, daemon: Daemon, addr: dict[str, Any]):
        self.daemon = daemon
        self.addr = addr
        self.registry = make_registry(daemon)
        self.scrapes = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listeners = await sockets.open_listeners(self.addr)
        latency.enable(self.daemon.graph.nodes.values())
        with tasks.serving("metrics", "metrics endpoint", moved=lambda: self.scrapes):
            task_status.started()
            await trio.serve_listeners(self.serve, listeners)

    async def serve(self, stream: trio.abc.Stream) -> None:
        """One HTTP connection: answer requests until the client closes."""
        # function-level: h11 is loaded only with --metrics
        import h11

        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        try:
            async with stream:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(bytes(await stream.receive_some(_MAX_REQUEST)))
                    elif isinstance(event, h11.Request):
                        await self._respond(stream, conn, event)
                    elif isinstance(event, h11.EndOfMessage):
                        if conn.our_state is h11.MUST_CLOSE:
                            return
                        conn.start_next_cycle()
                    elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                        return
        except h11.RemoteProtocolError as e:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with trio.move_on_after(5):
                    await self._send(stream, conn, e.error_status_hint, b"bad request\n",
                                     "text/plain")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _respond(self, stream: trio.abc.Stream, conn: Any, req: Any) -> None:
        # function-level: prometheus_client is loaded only with --metrics
        from prometheus_client.exposition import choose_encoder

        target = bytes(req.target).split(b"?", 1)[0]
        if req.method not in (b"GET", b"HEAD"):
            await self._send(stream, conn, 405, b"only GET and HEAD\n", "text/plain")
        elif target != b"/metrics":
            await self._send(stream, conn, 404, b"see /metrics\n", "text/plain")
        else:
            accept = ""
            for name, value in req.headers:
                if name == b"accept":
                    accept = value.decode("latin-1")
            encoder, content_type = choose_encoder(accept)
            body = encoder(self.registry)
            self.scrapes += 1
            await self._send(stream, conn, 200, b"" if req.method == b"HEAD" else body,
                             content_type, length=len(body))

    async def _send(self, stream: trio.abc.Stream, conn: Any, status: int, body: bytes,
                    content_type: str, length: int | None = None) -> None:
        # function-level: h11 is loaded only with --metrics
        import h11

        headers = [("Content-Type", content_type),
                   ("Content-Length", str(len(body) if length is None else length))]
        data = conn.send(h11.Response(status_code=status, headers=headers))
        if body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
