"""The rank harness: run a tensor-parallel artifact's rank graphs, one process per rank (or a
pipeline-parallel artifact's stages, one process per stage: llm2trt.backends.onnxruntime.stages).

Each rank's graph runs in ONNX Runtime between its `DistCollective` nodes (ONNX Runtime has no
such op): the nodes up to a collective are one segment, a session of its own; the collective is
done by torch.distributed (gloo on CPUs, NCCL on GPUs) and its result feeds the next segment.
Every rank runs the same decoding loop on its own graph and cache; after the logits' all-gather
every rank holds the same logits and picks the same tokens, and rank 0's result comes back.

On the GPU the tensors stay on the device: segment outputs are bound to CUDA memory (IO binding),
torch sees them without a copy (`__cuda_array_interface__`) for NCCL, and the next segment reads
torch's tensors by address. Only the main output (the logits) comes back to the host.
"""

from __future__ import annotations

import logging
import os
import queue as queue_module
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from llm2trt.backends.onnxruntime.segments import SegmentedGraph, segment_model, value_info
from llm2trt.core.dtypes import DType
from llm2trt.core.errors import BackendError, InputError, Llm2TrtError, first_line
from llm2trt.core.log import plural
from llm2trt.core.manifest import GraphSpec, Manifest
from llm2trt.core.numerics import ort_session
from llm2trt.core.tp import Mapping
from llm2trt.passes.tensor_parallel import collective_kind, is_collective

if TYPE_CHECKING:
    from llm2trt.backends.decoder import DecoderSession
    from llm2trt.core.lora import AdapterBatch

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
# A rank that has not answered in this long is stuck (a peer died inside a collective).
RANK_TIMEOUT_S = float(os.environ.get("LLM2TRT_RANK_TIMEOUT", "600"))


class Collectives:
    """What a rank graph's collectives call: torch.distributed on this rank's device (NCCL), or
    through host memory where the backend is gloo (CPUs, or more ranks than GPUs)."""

    def __init__(self, tp: int, device: str, backend: str) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist, self.tp, self.device, self.backend = torch, dist, tp, device, backend

    def __call__(self, kind: str, x: Any) -> Any:
        """x: a torch tensor on this rank's device; the result likewise."""
        if self.backend == "gloo" and x.device.type == "cuda":
            return self._collect(kind, x.cpu()).to(x.device)
        return self._collect(kind, x)

    def _collect(self, kind: str, x: Any) -> Any:
        if self.tp == 1:
            return x
        if kind == "all_reduce":
            self.dist.all_reduce(x)
            return x
        if kind == "all_gather":
            parts = [self.torch.empty_like(x) for _ in range(self.tp)]
            self.dist.all_gather(parts, x.contiguous())
            return self.torch.cat(parts, dim=0)
        raise BackendError(f"the rank harness does not do the {kind} collective")


@dataclass
class _Segment:
    """Nodes between two collectives (or the graph's ends), then the collective, if any."""

    nodes: list[onnx.NodeProto]
    inputs: list[str]
    outputs: list[str]
    initializers: list[str]
    collective: tuple[str, str, str] | None  # (kind, input, output)
    session: Any = None


class RankExecutor:
    """One rank graph as an `Executor` (feeds by name -> outputs by name), collectives included.
    `stream`: each segment's session is made for a run and dropped after it, so the rank holds one
    segment's weights at a time (the checks); else every session is made once and kept (generation)."""

    def __init__(
        self,
        path: Path,
        graph: GraphSpec,
        comm: Collectives,
        providers: list[Any],
        threads: int | None,
        stream: bool = False,
    ) -> None:
        self.path, self.graph, self.comm, self.providers, self.threads = path, graph, comm, providers, threads
        self.stream = stream
        self.proto = onnx.load(str(path), load_external_data=False)
        self.cut = SegmentedGraph(self.proto, path.parent, providers)
        self.outputs = self.cut.graph_outputs
        self.segments = self._cut()
        self.cuda = any((p if isinstance(p, str) else p[0]) == CUDA for p in providers)
        self.device_id = int(comm.device.split(":")[1]) if self.cuda else 0
        # Sessions now, not in the first step (which would then time their making): typed from
        # the graph's I/O and the types shape inference recorded; an untyped input waits for a value.
        graph = self.proto.graph
        self.types = {
            v.name: v
            for v in (*graph.input, *graph.value_info, *graph.output)
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")
        }
        for segment in self.segments:
            if not stream and segment.nodes and all(name in self.types for name in segment.inputs):
                segment.session = self._session(segment, {})
            if segment.collective is not None:  # its output: the input's type and rank
                _kind, x, out = segment.collective
                if x in self.types and out not in self.types:
                    self.types[out] = _dynamic(self.types[x], out)

    def _cut(self) -> list[_Segment]:
        """A segment ends before each collective, and one more at the graph's end."""
        nodes = self.cut.nodes
        segments, start = [], 0
        for end in [i for i, n in enumerate(nodes) if is_collective(n)] + [len(nodes)]:
            inputs, outputs, initializers = self.cut.frontier(start, end - 1)
            collective = None
            if end < len(nodes):
                node = nodes[end]
                collective = (collective_kind(node), node.input[0], node.output[0])
            segments.append(_Segment(nodes[start:end], inputs, outputs, initializers, collective))
            start = end + 1
        return segments

    def _session(self, segment: _Segment, values: dict[str, Any]) -> Any:
        typed = [
            _dynamic(self.types[name]) if name in self.types else value_info(name, _typed(values[name]))
            for name in segment.inputs
        ]
        inits = [self.cut.initializers[name] for name in segment.initializers]
        model = segment_model(self.proto, segment.nodes, typed, segment.outputs, inits)
        return ort_session(
            model.SerializeToString(),
            self.providers,
            what=f"{self.path} ({plural(len(segment.nodes), 'node')})",
            weights_folder=self.path.parent,
            threads=self.threads,
            arena=not self.stream,
            prepack=not self.stream,  # a streamed session runs once
        )

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = dict(feeds)
        for segment in self.segments:
            if segment.nodes:
                if segment.session is None:
                    segment.session = self._session(segment, values)
                values.update(self._run(segment, values))
                if self.stream:
                    segment.session = None  # its weights go with it
            if segment.collective is not None:
                kind, x, out = segment.collective
                values[out] = self._collective(kind, values[x])
        result = {name: values[name] for name in self.outputs}
        main = self.graph.main_output
        result[main] = self._host(result[main])
        return result

    # -- CPU: numpy in and out; GPU: device memory bound by address ------------------------------

    def _run(self, segment: _Segment, values: dict[str, Any]) -> dict[str, Any]:
        try:
            if not self.cuda:
                feeds = {name: self._host(values[name]) for name in segment.inputs}
                return dict(zip(segment.outputs, segment.session.run(segment.outputs, feeds), strict=True))
            self.comm.torch.cuda.current_stream().synchronize()  # torch's copies and NCCL done
            binding = segment.session.io_binding()
            for name in segment.inputs:
                tensor = self._device(values[name])
                values[name] = tensor  # keep it alive (and on the device) for later segments
                if tensor.numel() == 0:  # an empty cache has no device address to bind
                    binding.bind_cpu_input(name, tensor.cpu().numpy())
                    continue
                binding.bind_input(
                    name,
                    "cuda",
                    self.device_id,
                    DType.parse(tensor.dtype).numpy,
                    tuple(tensor.shape),
                    tensor.data_ptr(),
                )
            for name in segment.outputs:
                binding.bind_output(name, "cuda", self.device_id)
            segment.session.run_with_iobinding(binding)
            return dict(zip(segment.outputs, binding.get_outputs(), strict=True))
        except Llm2TrtError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"ONNX Runtime failed on a segment of {self.path}: {first_line(exc)}") from None

    def _collective(self, kind: str, value: Any) -> Any:
        torch = self.comm.torch
        if self.cuda:
            return self.comm(kind, self._device(value))
        result = self.comm(kind, torch.from_numpy(np.array(value, copy=True)))
        return result.numpy()

    def _device(self, value: Any) -> Any:
        """A torch tensor on this rank's GPU (an ONNX Runtime output is viewed, not copied)."""
        torch = self.comm.torch
        if isinstance(value, torch.Tensor):
            return value.to(self.comm.device) if value.device.type != "cuda" else value
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value)).to(self.comm.device)
        view = _CudaArray(value)
        tensor = torch.as_tensor(view, device=self.comm.device)
        tensor._llm2trt_owner = value  # ONNX Runtime's memory lives as long as the view
        return tensor

    def _host(self, value: Any) -> np.ndarray:
        torch = self.comm.torch
        if isinstance(value, np.ndarray):
            return value
        if not isinstance(value, torch.Tensor):
            value = self._device(value)
        return np.asarray(value.detach().cpu().numpy())


def _dynamic(info: onnx.ValueInfoProto, name: str | None = None) -> onnx.ValueInfoProto:
    """The tensor's type with every dim left dynamic (shape inference's dims are one size's)."""
    tensor = info.type.tensor_type
    return onnx.helper.make_tensor_value_info(name or info.name, tensor.elem_type, [None] * len(tensor.shape.dim))


def _typed(value: Any) -> np.ndarray:
    """A stand-in with the value's dtype and rank (for typing a segment's inputs)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "data_type"):  # an ONNX Runtime OrtValue
        return np.empty((0,) * len(value.shape()), dtype=DType.parse(_ort_type(value.data_type())).numpy)
    return np.empty((0,) * value.dim(), dtype=DType.parse(value.dtype).numpy)  # a torch tensor


def _ort_type(name: str) -> str:
    # ONNX Runtime names a type "tensor(<onnx name>)"; torch and numpy name it bare.
    return name.removeprefix("tensor(").removesuffix(")")


class _CudaArray:
    """An ONNX Runtime device output described for torch.as_tensor (no copy)."""

    def __init__(self, value: Any) -> None:
        dtype = DType.parse(_ort_type(value.data_type())).numpy
        self.__cuda_array_interface__ = {
            "shape": tuple(value.shape()),
            "typestr": np.dtype(dtype).str,
            "data": (value.data_ptr(), False),
            "version": 3,
        }


# -- processes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankContext:
    """What a task running in one rank's process gets."""

    artifact: Path  # the rank's directory
    manifest: Manifest  # the rank's own manifest
    mapping: Mapping
    providers: list[Any]
    comm: Collectives
    threads: int | None

    def executor(self, graph: GraphSpec, stream: bool = False) -> RankExecutor:
        path = self.manifest.onnx_path(self.artifact, graph.name)
        return RankExecutor(path, graph, self.comm, self.providers, self.threads, stream)

    def session(
        self,
        graph: GraphSpec,
        capacity: int,
        pad_id: int = 0,
        adapters: AdapterBatch | None = None,
        *,
        stream: bool = False,
    ) -> DecoderSession:
        """A decoder session over this rank's graph, its cache holding the rank's heads (or, for a
        pipeline stage, its layers: the session then computes the whole model with the others);
        `adapters` fill its LoRA slots with the rank's cut of each; `stream`: one segment's weights
        held at a time (`RankExecutor`)."""
        from llm2trt.backends.decoder import open_session

        stages = self.manifest.pipeline_parallel
        if stages is not None:
            from llm2trt.backends.onnxruntime.stages import stage_session

            if adapters is not None:
                raise InputError("LoRA adapters on pipeline stages are not built yet; use --tp or one graph")
            return stage_session(graph, self.executor(graph, stream), stages, self.comm, capacity, pad_id)
        return open_session(graph, self.executor(graph, stream), capacity=capacity, pad_id=pad_id, adapters=adapters)


RankTask = Callable[[RankContext], Any]


def rank_dirs(artifact: Path, manifest: Manifest) -> list[Path]:
    """The directories of a split artifact's processes: its ranks, or its pipeline stages."""
    if manifest.pipeline_parallel is not None and manifest.pipeline_parallel.stages:
        return [artifact / d for d in manifest.pipeline_parallel.stages]
    tp = manifest.tensor_parallel
    if tp is None:
        raise InputError(
            f"{artifact} is not a tensor- or pipeline-parallel artifact (made by `optimize --tp N` or `--pp N`)"
        )
    return [artifact / d for d in tp.ranks]


def run_ranks(artifact: Path, task: RankTask, providers: list[str] | None = None) -> Any:
    """Run `task` in one process per rank of `artifact`; rank 0's result (a rank's error is raised
    here, and the other ranks are stopped)."""
    import multiprocessing

    manifest = Manifest.read(artifact)
    dirs = rank_dirs(artifact, manifest)
    for d in dirs:
        Manifest.read(d)  # a missing or broken rank is an error here, not a hang in a collective
    context = multiprocessing.get_context("spawn")
    results: Any = context.Queue()
    port = _free_port()
    procs = [
        context.Process(target=_rank_main, args=(d, r, len(dirs), port, providers or [], task, results), daemon=True)
        for r, d in enumerate(dirs)
    ]
    for p in procs:
        p.start()
    try:
        return _await_rank0(procs, results)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)


def _await_rank0(procs: list[Any], results: Any) -> Any:
    deadline = time.monotonic() + RANK_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            rank, ok, value = results.get(timeout=0.5)
        except queue_module.Empty:
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                raise BackendError(f"rank {dead[0]} died (exit code {procs[dead[0]].exitcode})") from None
            continue
        if not ok:
            raise (InputError if value[0] == "input" else BackendError)(f"rank {rank}: {value[1]}")
        if rank == 0:
            return value
    raise BackendError(f"the ranks did not finish within {RANK_TIMEOUT_S:.0f} s")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(
    artifact: Path, rank: int, tp: int, port: int, providers: list[str], task: RankTask, results: Any
) -> None:
    import torch
    import torch.distributed as dist

    from llm2trt.core.memory import return_freed_buffers

    return_freed_buffers()  # a spawned rank starts with glibc's defaults: segments' weights would stay in its heap
    names = [p if isinstance(p, str) else p[0] for p in providers]
    cuda = CUDA in names and torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    # NCCL needs a GPU per rank; with fewer, ranks share GPUs and collectives go through the host.
    backend = "nccl" if cuda and gpus >= tp else "gloo"
    gpu = rank % gpus if gpus else 0
    device = f"cuda:{gpu}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(gpu)
        providers = [(CUDA, {"device_id": gpu}) if n == CUDA else n for n in names]  # type: ignore[misc]
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=tp,
            timeout=timedelta(seconds=RANK_TIMEOUT_S),
        )
        threads = None if cuda else max(1, (os.cpu_count() or 1) // tp)
        manifest = Manifest.read(artifact)
        comm = Collectives(tp, device, backend)
        value = task(RankContext(artifact, manifest, Mapping(tp, rank), providers, comm, threads))
        results.put((rank, True, value if rank == 0 else None))
    except InputError as exc:
        results.put((rank, False, ("input", str(exc))))
    except Exception as exc:  # any failure is reported, so the parent stops the other ranks
        results.put((rank, False, ("backend", first_line(exc))))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
