"""What the debug tools feed a graph: the model's own test images, or random inputs for a
graph that carries no stn-deploy metadata.

Real images by default because an STN's faults depend on the content: theta is regressed from
the image, so random noise exercises a localization net far from where it was trained. A
foreign graph has no recorded dataset or normalisation, so it gets seeded random inputs of its
own input shapes, and the caller says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stn_deploy.errors import StnDeployError, error_line

if TYPE_CHECKING:
    import onnx

    from stn_deploy.config import ModelConfig

DEFAULT_SAMPLES = 256
BATCH = 32
RANDOM_SEED = 0


@dataclass
class GraphInput:
    name: str
    shape: list[int | None]  # None: a dynamic dimension
    dtype: np.dtype[Any]


@dataclass
class DebugInputs:
    """Uint8 NCHW images (``images``) for a graph with metadata, or random ``arrays`` per
    input name for one without; ``note`` says which, in one line."""

    note: str
    config: "ModelConfig | None" = None
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    arrays: dict[str, np.ndarray] | None = None

    @property
    def count(self) -> int:
        if self.images is not None:
            return len(self.images)
        assert self.arrays is not None
        return len(next(iter(self.arrays.values())))

    def batches(self, proto: "onnx.ModelProto", size: int = BATCH
                ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """(feeds for ``proto``, rows that are real) in batches of ``size``; a static batch
        dimension wins, its last batch padded by repeating the last row."""
        inputs = graph_inputs(proto)
        static = inputs[0].shape[0] if inputs and inputs[0].shape else None
        step = static or size
        for start in range(0, self.count, step):
            n = min(step, self.count - start)
            rows = np.arange(start, start + step).clip(max=self.count - 1) if static else \
                np.arange(start, start + n)
            yield self.feed(proto, inputs, rows), n

    def feed(self, proto: "onnx.ModelProto", inputs: list[GraphInput],
             rows: np.ndarray) -> dict[str, np.ndarray]:
        if self.arrays is not None:
            missing = [i.name for i in inputs if i.name not in self.arrays]
            if missing:
                raise StnDeployError(f"the graphs' inputs differ: {missing[0]} is not an input "
                                     "of the other graph")
            return {i.name: self.arrays[i.name][rows] for i in inputs}
        assert self.images is not None and self.config is not None
        if len(inputs) != 1:
            raise StnDeployError(f"the graph takes {len(inputs)} inputs; an stn-deploy model "
                                 "takes one image batch")
        chunk = self.images[rows]
        if inputs[0].dtype == np.uint8:  # preprocessing embedded: uint8 NHWC
            return {inputs[0].name: np.ascontiguousarray(chunk.transpose(0, 2, 3, 1))}
        from stn_deploy.harness import normalize_np

        return {inputs[0].name: normalize_np(chunk, self.config).astype(inputs[0].dtype)}


def graph_inputs(proto: "onnx.ModelProto") -> list[GraphInput]:
    """The real inputs (initializers listed as inputs by old exporters are left out)."""
    import onnx

    inits = {i.name for i in proto.graph.initializer}
    out = []
    for v in proto.graph.input:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        out.append(GraphInput(v.name, dims, dtype))
    return out


def load_model(path: str | os.PathLike[str]) -> "onnx.ModelProto":
    """The whole graph (external data included), or one line saying it is not ONNX."""
    import onnx

    if not os.path.isfile(path):
        raise StnDeployError(f"{path} does not exist")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf decode errors share no base class
        raise StnDeployError(f"{path} is not a readable ONNX file ({error_line(e)})") from None


def model_config(proto: "onnx.ModelProto") -> "ModelConfig | None":
    """The ModelConfig an stn-deploy export carries, None for any other graph."""
    from stn_deploy.artifacts import CONFIG_KEY, metadata
    from stn_deploy.config import ModelConfig

    text = metadata(proto).get(CONFIG_KEY)
    return ModelConfig.from_json(text) if text else None


def load_inputs(proto: "onnx.ModelProto", samples: int | None, data_dir: str | None,
                name: str = "the model") -> DebugInputs:
    """``samples`` test images of the model's own dataset (None: the whole split), or seeded
    random inputs when ``proto`` has no stn-deploy metadata."""
    config = model_config(proto)
    if config is None:
        if data_dir is not None:
            raise StnDeployError(f"--data-dir needs an stn-deploy model: {name} records no "
                                 "dataset or normalisation")
        return random_inputs(proto, samples or DEFAULT_SAMPLES, name)
    from stn_deploy.export.verify import verification_data

    data, note = verification_data(config, "test", data_dir, samples or 0)
    labels = data.labels.numpy()
    if len(labels) and int(labels.max()) >= config.num_classes:
        labels = None  # another dataset's labels: parity only
    return DebugInputs(f"{len(data)} images of the {note}", config=config,
                       images=data.images.numpy(), labels=labels)


def random_inputs(proto: "onnx.ModelProto", samples: int, name: str) -> DebugInputs:
    rng = np.random.default_rng(RANDOM_SEED)
    arrays: dict[str, np.ndarray] = {}
    for inp in graph_inputs(proto):
        if any(d is None for d in inp.shape[1:]):
            raise StnDeployError(f"{name} has no stn-deploy metadata and its input {inp.name} "
                                 f"has a dynamic non-batch dimension {inp.shape}: no shape to "
                                 "draw random inputs of")
        shape = (samples, *inp.shape[1:])
        if np.issubdtype(inp.dtype, np.floating):
            arrays[inp.name] = rng.standard_normal(shape).astype(inp.dtype)
        elif inp.dtype == np.uint8:
            arrays[inp.name] = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            raise StnDeployError(f"{name}: cannot draw random inputs of type {inp.dtype} for "
                                 f"{inp.name}")
    shapes = ", ".join(f"{k} {list(v.shape[1:])}" for k, v in arrays.items())
    return DebugInputs(f"{name} has no stn-deploy metadata: {samples} seeded random inputs of "
                       f"its input shape ({shapes}), no dataset, no accuracy",
                       arrays=arrays)
