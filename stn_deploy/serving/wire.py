"""What loadtest sends and reads: KServe v2 inference requests encoded once, sent over a
persistent connection, and only the logits read back.

Why not tritonclient on the request path: on a small machine the load generator shares the
CPUs with the server, and every microsecond the client spends per request is taken from the
server it measures. tritonclient builds each request from numpy (InferInput,
set_data_from_numpy), sends it through geventhttpclient's greenlets (or the gRPC stub's
protobuf objects) and decodes every output; on a 2-core machine that cost about 0.4 ms of
CPU per binary or gRPC request and 1.7 ms per JSON request. Here each image's bytes (JSON
text or raw tensor) are encoded once, a request is those bytes joined behind a header built
once per level, HTTP goes over a plain keep-alive socket per client thread and gRPC through
a bare channel method that sends and returns bytes; a response is read only as far as the
top-1 class needs.

Every request asks for the ``logits`` output only, in each protocol. Errors are raised as
tritonclient raises them (``[status] message``), so :func:`stn_deploy.serving.loadtest.classify`
reads both alike; socket timeouts are ``TimeoutError`` and a closed or refused connection a
``ConnectionError``.
"""

from __future__ import annotations

import json
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from stn_deploy.errors import StnDeployError

# Triton datatypes loadtest may meet, as numpy dtypes (binary tensors are little-endian).
NUMPY_DTYPES = {"UINT8": "<u1", "INT8": "<i1", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
                "INT32": "<i4", "INT64": "<i8", "BF16": None}
RECV_BYTES = 1 << 16
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_GRPC_MESSAGE = 2**31 - 1  # as tritonclient: no size limit of gRPC's own


class ServerError(Exception):
    """An answer that is an error: tritonclient's InferenceServerException text."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"[{status}] {message}")


Headers = dict[str, str]


class Connection(Protocol):
    def infer(self, request: bytes) -> tuple[Headers, bytes]: ...

    def close(self) -> None: ...


@dataclass
class Served:
    """What the server's metadata says and the images to send: the request's constant parts."""

    url: str  # http://host:port or grpc://host:port
    model_name: str
    input_name: str
    input_datatype: str  # Triton's, e.g. UINT8
    logits_datatype: str
    inputs: np.ndarray  # the images, already as the model takes them
    batch: int
    timeout_s: float

    def images(self, start: int) -> np.ndarray:
        """``batch`` images from ``start`` on, wrapping round the end."""
        stop = start + self.batch
        if stop <= len(self.inputs):
            return self.inputs[start:stop]
        return self.inputs[np.arange(start, stop) % len(self.inputs)]

    def top1(self, raw: bytes | memoryview) -> np.ndarray:
        """The top-1 class of each image from the logits' raw bytes."""
        dtype = NUMPY_DTYPES.get(self.logits_datatype)
        if dtype is None:
            raise ServerError("client", f"logits of type {self.logits_datatype} are not read")
        return np.frombuffer(raw, dtype=dtype).reshape(self.batch, -1).argmax(axis=1)


def address(url: str) -> tuple[str, int, str]:
    """(host, port, the Host header) of an http:// or grpc:// URL (HTTP's port is 80 unless
    given, as for any HTTP client)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (80 if parts.scheme == "http" else None)
    if parts.hostname is None or port is None:
        raise StnDeployError(f"{url} names no host and port")
    return parts.hostname, port, parts.netloc


class JsonWire:
    """HTTP, tensors as JSON numbers: each image's numbers are written once (as tritonclient
    writes them: Python's repr of each value, which reads back exactly), a request is the
    images' texts joined inside the JSON, and the answer is parsed as JSON."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.pieces = [json.dumps(x.ravel().tolist(), separators=(",", ":"))[1:-1].encode()
                       for x in served.inputs]
        shape = [served.batch, *served.inputs.shape[1:]]
        self.open = (f'{{"inputs":[{{"name":{json.dumps(served.input_name)},"shape":'
                     f'{json.dumps(shape)},"datatype":"{served.input_datatype}","data":['
                     ).encode()
        self.tail = b']}],"outputs":[{"name":"logits","parameters":{"binary_data":false}}]}'
        netloc = address(served.url)[2]
        self.head = (f"POST /v2/models/{served.model_name}/infer HTTP/1.1\r\nHost: {netloc}\r\n"
                     "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n").encode()

    def request(self, start: int) -> bytes:
        n = len(self.pieces)
        data = b",".join(self.pieces[(start + j) % n] for j in range(self.served.batch))
        body = self.open + data + self.tail
        return self.head % len(body) + body

    def top1(self, headers: Headers, body: bytes) -> np.ndarray:
        return json_top1(body, self.served.batch)

    def connect(self) -> Connection:
        return HttpConnection(self.served.url, self.served.timeout_s)


def json_top1(body: bytes, batch: int) -> np.ndarray:
    """The top-1 class of each image from a JSON inference response."""
    outputs = json.loads(body).get("outputs", [])
    logits = next((o for o in outputs if o.get("name") == "logits"), None)
    if logits is None or "data" not in logits:
        raise ServerError("client", "the answer carries no logits")
    return np.asarray(logits["data"], dtype=np.float64).reshape(batch, -1).argmax(axis=1)


class BinaryWire:
    """HTTP with Triton's binary tensor extension: a JSON header built once per level, the
    images' raw bytes behind it, and the logits read raw from behind the answer's header."""

    def __init__(self, served: Served) -> None:
        self.served = served
        shape = [served.batch, *served.inputs.shape[1:]]
        size = served.batch * served.inputs[0].nbytes
        header = json.dumps({"inputs": [{"name": served.input_name, "shape": shape,
                                         "datatype": served.input_datatype,
                                         "parameters": {"binary_data_size": size}}],
                             "outputs": [{"name": "logits",
                                          "parameters": {"binary_data": True}}]},
                            separators=(",", ":")).encode()
        netloc = address(served.url)[2]
        self.prefix = (f"POST /v2/models/{served.model_name}/infer HTTP/1.1\r\nHost: {netloc}\r\n"
                       "Content-Type: application/octet-stream\r\n"
                       f"Inference-Header-Content-Length: {len(header)}\r\n"
                       f"Content-Length: {len(header) + size}\r\n\r\n").encode() + header

    def request(self, start: int) -> bytes:
        return self.prefix + self.served.images(start).tobytes()

    def top1(self, headers: Headers, body: bytes) -> np.ndarray:
        """Only the logits were asked for, so everything behind the JSON header is them."""
        size = headers.get("inference-header-content-length")
        if size is None:  # the server answered in JSON after all
            return json_top1(body, self.served.batch)
        return self.served.top1(memoryview(body)[int(size):])

    def connect(self) -> Connection:
        return HttpConnection(self.served.url, self.served.timeout_s)


class GrpcWire:
    """gRPC: the ModelInferRequest without its tensor serialised once per level, each
    request that plus the images' raw_input_contents field (protobuf merges concatenated
    messages), through a channel method that sends and returns bytes."""

    def __init__(self, served: Served) -> None:
        from tritonclient.grpc import service_pb2 as pb

        self.served = served
        self.pb = pb
        self.prefix = pb.ModelInferRequest(
            model_name=served.model_name,
            inputs=[pb.ModelInferRequest.InferInputTensor(
                name=served.input_name, datatype=served.input_datatype,
                shape=[served.batch, *served.inputs.shape[1:]])],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")],
        ).SerializeToString()

    def request(self, start: int) -> bytes:
        raw = self.served.images(start).tobytes()
        return self.prefix + self.pb.ModelInferRequest(raw_input_contents=[raw]) \
            .SerializeToString()

    def top1(self, headers: Headers, body: bytes) -> np.ndarray:
        answer = self.pb.ModelInferResponse.FromString(body)
        names = [o.name for o in answer.outputs]
        if "logits" not in names or len(answer.raw_output_contents) != len(names):
            raise ServerError("client", "the answer carries no raw logits")
        return self.served.top1(answer.raw_output_contents[names.index("logits")])

    def connect(self) -> Connection:
        return GrpcConnection(self.served.url, self.served.timeout_s)


Wire = JsonWire | BinaryWire | GrpcWire
WIRES: dict[str, Any] = {"json": JsonWire, "binary": BinaryWire, "grpc": GrpcWire}


class HttpConnection:
    """HTTP/1.1 over one keep-alive socket, opened on first use and again after a failure.

    A request on a reused socket that the server closed while idle (nothing of the answer
    read) is sent once more on a new one, as any HTTP client does; the socket's timeout is
    the request's."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.host, self.port, _ = address(url)
        self.timeout_s = timeout_s
        self.sock: socket.socket | None = None

    def infer(self, request: bytes) -> tuple[Headers, bytes]:
        reused = self.sock is not None
        try:
            return self._exchange(request)
        except _ClosedIdle:
            if not reused:
                raise
            return self._exchange(request)

    def _exchange(self, request: bytes) -> tuple[Headers, bytes]:
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), self.timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            try:
                self.sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                raise _ClosedIdle() from None
            status, headers, body = self._answer(self.sock)
        except BaseException:
            self.close()  # its state is unknown: a late answer must not be read as the next
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        if status != 200:
            raise ServerError(str(status), _error_text(body))
        return headers, body

    @staticmethod
    def _answer(sock: socket.socket) -> tuple[int, Headers, bytes]:
        """Status, headers (lower-case names) and body of one answer with a Content-Length."""
        buf = b""
        while (end := buf.find(b"\r\n\r\n")) < 0:
            try:
                chunk = sock.recv(RECV_BYTES)
            except ConnectionResetError:
                if buf:
                    raise
                raise _ClosedIdle() from None
            if not chunk:
                if buf:
                    raise ConnectionResetError("the server closed the connection mid-answer")
                raise _ClosedIdle()
            buf += chunk
        lines = buf[:end].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:])}
        if "content-length" not in headers:
            raise ServerError("client", "the answer has no Content-Length")
        need = end + 4 + int(headers["content-length"])
        while len(buf) < need:
            chunk = sock.recv(max(RECV_BYTES, need - len(buf)))
            if not chunk:
                raise ConnectionResetError("the server closed the connection mid-answer")
            buf += chunk
        return int(lines[0].split(" ", 2)[1]), headers, buf[end + 4:need]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _ClosedIdle(ConnectionResetError):
    """The server closed the socket before any of the answer arrived."""

    def __init__(self) -> None:
        super().__init__("the server closed the connection")


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace").strip() or "empty answer"


class GrpcConnection:
    """One gRPC channel (channels to one address share their connection, as tritonclient's
    do) and its ModelInfer method, bytes in and bytes out."""

    def __init__(self, url: str, timeout_s: float) -> None:
        import grpc

        netloc = address(url)[2]
        self.grpc = grpc
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(netloc, options=[
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE)])
        self.call = self.channel.unary_unary(GRPC_INFER)

    def infer(self, request: bytes) -> tuple[Headers, bytes]:
        try:
            return {}, self.call(request, timeout=self.timeout_s)
        except self.grpc.RpcError as e:
            raise ServerError(str(e.code()), str(e.details())) from None

    def close(self) -> None:
        self.channel.close()


__all__ = ["BinaryWire", "GrpcWire", "JsonWire", "Served", "ServerError", "WIRES"]
