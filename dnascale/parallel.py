"""Distributed start-up, megatron-core parallel state, the DeepSpeed `mpu` adapter, and RNG bookkeeping.

Everything that needs to know "which rank am I, which groups do I belong to, which random stream do I draw from"
asks this module. It is the only place that calls `torch.distributed.init_process_group` and
`megatron.core.parallel_state.initialize_model_parallel`.

Random streams (the megatron convention, kept so megatron layers behave as they do on GPU clusters):
- the *default* torch generator is seeded identically on every rank of a tensor-parallel group (`seed + 100 *
  pp_rank`), so dropout on replicated activations (residual stream, embeddings) stays identical across TP ranks;
- the tracker's `model-parallel-rng` stream differs per TP rank; it is used (via `model_parallel_rng()`) for
  randomness inside the head-split region, e.g. attention-probability dropout, where each rank holds other heads.

Megatron's tracker (`tensor_parallel.get_cuda_rng_tracker()`) only knows CUDA generators: on a CPU-only machine
`model_parallel_cuda_manual_seed` fails with "Torch not compiled with CUDA enabled". On CPU we install
`CpuRNGStatesTracker` in its place, a subclass with the same API over the CPU generator, so `fork()` works for
our layers and for megatron's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu_state
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import random as mp_random

from dnascale.errors import ConfigError

log = logging.getLogger(__name__)

# Offsets between the streams, as in megatron's `model_parallel_cuda_manual_seed`, so that a CPU run and a GPU
# run seeded alike derive their tracker streams from the same numbers.
_TP_SEED_OFFSET = 2718
_EXPERT_SEED_OFFSET = 1024
_PP_SEED_STRIDE = 100

# Environment variables init_distributed() filled in for a single-process run; destroy() removes them again.
_ENV_WE_SET: list[str] = []
_SINGLE_WORLD_MARK = "DNASCALE_SINGLE_PROCESS_WORLD"  # "<pid>:<port>" of the process that made itself a world of one


@dataclass(frozen=True)
class ParallelState:
    """Where this process sits in the (data x pipeline x tensor) grid."""

    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------------------------------- start-up


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fill_single_process_env() -> None:
    """Make a plain `python script.py` look like a launcher started a world of one.

    A TCPStore on a free local port (env://) rather than a HashStore: DeepSpeed re-reads RANK/WORLD_SIZE/MASTER_*
    from the environment in `deepspeed.initialize` and tries MPI discovery when they are missing.
    """
    defaults = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    for key, value in defaults.items():
        if key not in os.environ:
            os.environ[key] = value
            _ENV_WE_SET.append(key)
    if "MASTER_PORT" in _ENV_WE_SET:
        os.environ[_SINGLE_WORLD_MARK] = f"{os.getpid()}:{os.environ['MASTER_PORT']}"
        _ENV_WE_SET.append(_SINGLE_WORLD_MARK)


def _drop_inherited_single_process_env() -> None:
    """A child process (a test, a tool that launches training) inherits the world-of-one variables its parent set
    for itself; read as a launch, they would make the child rendezvous on the parent's port (EADDRINUSE). A real
    launcher started by that parent sets its own MASTER_PORT, which is how the two are told apart."""
    mark = os.environ.get(_SINGLE_WORLD_MARK, "")
    pid, _, port = mark.partition(":")
    if mark and pid != str(os.getpid()) and os.environ.get("MASTER_PORT") == port:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", _SINGLE_WORLD_MARK):
            os.environ.pop(key, None)


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def _validate_grid(world_size: int, tp: int, pp: int) -> None:
    for name, size in (("tp", tp), ("pp", pp)):
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"{name}={size!r}: must be a positive integer")
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}; "
            f"choose tp and pp whose product divides the number of processes"
        )


def init_distributed(tp: int = 1, pp: int = 1, backend: str | None = None, seed: int = 0) -> ParallelState:
    """Start torch.distributed (if not yet started), build megatron's groups and seed every random stream.

    Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as set by `deepspeed` or `torchrun`; with
    none of them set, runs as a world of one. Backend defaults to nccl when CUDA is available, gloo otherwise.
    Calling it again with other tp/pp rebuilds megatron's groups (the process group is kept).
    """
    if not dist.is_initialized():
        _drop_inherited_single_process_env()
    launched = "RANK" in os.environ or "WORLD_SIZE" in os.environ
    if dist.is_initialized():
        world_size = dist.get_world_size()
    elif launched:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"distributed launch is missing environment variables {missing}")
        world_size = _env_int("WORLD_SIZE")
    else:
        world_size = 1
    _validate_grid(world_size, tp, pp)  # before anything is started, so a bad grid leaves no state behind
    if not dist.is_initialized() and not launched:
        _fill_single_process_env()

    use_cuda = torch.cuda.is_available()
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")

    if not dist.is_initialized():
        backend = backend or ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(minutes=30))
    # deepspeed.comm keeps its own handle on the process group; without it, zero.Init and DeepSpeedConfig quietly
    # assume a world of one (and then reject the batch arithmetic).
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)

    if mpu_state.model_parallel_is_initialized():
        same = (
            mpu_state.get_tensor_model_parallel_world_size() == tp
            and mpu_state.get_pipeline_model_parallel_world_size() == pp
        )
        if not same:
            mpu_state.destroy_model_parallel()
    if not mpu_state.model_parallel_is_initialized():
        mpu_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)

    seed_everything(seed)
    return current_state(device)


def current_state(device: torch.device | None = None) -> ParallelState:
    """The ParallelState of an already initialized process (see init_distributed)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return ParallelState(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tp_size=mpu_state.get_tensor_model_parallel_world_size(),
        pp_size=mpu_state.get_pipeline_model_parallel_world_size(),
        dp_size=mpu_state.get_data_parallel_world_size(),
        tp_rank=mpu_state.get_tensor_model_parallel_rank(),
        pp_rank=mpu_state.get_pipeline_model_parallel_rank(),
        dp_rank=mpu_state.get_data_parallel_rank(),
        backend=dist.get_backend(),
        device=device,
    )


def destroy() -> None:
    """Tear down megatron's groups, the process group and the RNG tracker (tests start several worlds)."""
    if mpu_state.model_parallel_is_initialized():
        mpu_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    mp_random.initialize_rng_tracker(force_reset=True)
    while _ENV_WE_SET:
        os.environ.pop(_ENV_WE_SET.pop(), None)


# ---------------------------------------------------------------------------------------------------- DeepSpeed


class DeepSpeedMPU:
    """The `mpu=` object DeepSpeed expects, answering from megatron.core.parallel_state.

    DeepSpeed's "model parallel" means tensor parallel: it names checkpoint files `mp_rank_XX` by it and
    all-reduces gradient norms over it, counting a parameter once unless it is marked `tensor_model_parallel`.
    Pipeline parallelism goes through DeepSpeed's own PipelineModule grid, not through this adapter.
    We deliberately do not define `initialize_sequence_parallel` / `get_sequence_parallel_*`: DeepSpeed switches
    to Ulysses sequence-parallel behaviour when they exist.
    """

    # Deprecated Megatron names that DeepSpeed still calls.
    def get_model_parallel_world_size(self) -> int:
        return mpu_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self) -> int:
        return mpu_state.get_tensor_model_parallel_rank()

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return mpu_state.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return mpu_state.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return mpu_state.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return mpu_state.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return mpu_state.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return mpu_state.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return mpu_state.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return mpu_state.get_pipeline_model_parallel_group()

    # DeepSpeed's pipeline-engine names for the same thing.
    def get_pipe_parallel_world_size(self) -> int:
        return mpu_state.get_pipeline_model_parallel_world_size()

    def get_pipe_parallel_rank(self) -> int:
        return mpu_state.get_pipeline_model_parallel_rank()

    def get_pipe_parallel_group(self) -> dist.ProcessGroup:
        return mpu_state.get_pipeline_model_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return mpu_state.get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return mpu_state.get_data_parallel_rank()

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return mpu_state.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(mpu_state.get_data_parallel_group())


# ---------------------------------------------------------------------------------------------------- RNG


class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
    """Megatron's named-RNG-stream tracker over the CPU generator, for machines without CUDA.

    Same contract as the CUDA tracker: `add(name, seed)` registers a stream, `fork(name)` swaps it into the
    (here: CPU) default generator for the duration of the block and saves where it got to. States are replaced,
    never mutated in place, so a shallow copy from `get_states()` is a snapshot (activation checkpointing relies
    on that).
    """

    def __init__(self) -> None:
        super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=False)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"rng seed {seed} already used by another stream")
        if name in self.states_:
            raise ValueError(f"rng stream {name!r} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise ValueError(f"rng stream {name!r} was never added (call seed_everything first)")
        outer_state = torch.get_rng_state()
        outer_name = self._current_state_name
        if outer_name != "default-rng":
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name


def _install_cpu_tracker() -> CpuRNGStatesTracker:
    # megatron offers no hook to choose the tracker class; get_cuda_rng_tracker() returns this module global.
    tracker = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return tracker


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch (CPU and CUDA) and megatron's tracker streams, on CPU and on GPU alike."""
    initialized = mpu_state.model_parallel_is_initialized()
    tp_rank = mpu_state.get_tensor_model_parallel_rank() if initialized else 0
    pp_rank = mpu_state.get_pipeline_model_parallel_rank() if initialized else 0
    base = seed + _PP_SEED_STRIDE * pp_rank
    random.seed(base)
    np.random.seed(base % 2**32)
    torch.manual_seed(base)  # also seeds every CUDA device
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(
            base, tp_rank=tp_rank, ep_rank=0, etp_rank=0, force_reset_rng=True
        )
        return
    tracker = _install_cpu_tracker()
    tracker.add(mp_random.get_data_parallel_rng_tracker_name(), base)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, base + _TP_SEED_OFFSET + tp_rank)
    tracker.add(mp_random.get_expert_parallel_rng_tracker_name(), base + _EXPERT_SEED_OFFSET)


def model_parallel_rng() -> contextlib.AbstractContextManager:
    """Context in which random ops draw from this TP rank's own stream (for the head-split region)."""
    return tensor_parallel.get_cuda_rng_tracker().fork()


def rng_state() -> dict[str, Any]:
    """Every random stream, for an exact resume: python, numpy, torch CPU, CUDA (if any) and tracker streams."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    return {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": {name: state.clone() for name, state in tracker.get_states().items()},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured. Device streams are restored only on the same device type."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    here = "cuda" if torch.cuda.is_available() else "cpu"
    if state["device"] != here:
        # A CUDA generator state (Philox) cannot drive the CPU generator or vice versa; keep the fresh seeds.
        log.warning("RNG state was saved on %s, now running on %s: device RNG streams not restored",
                    state["device"], here)
        return
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
    if here == "cpu" and not isinstance(tensor_parallel.get_cuda_rng_tracker(), CpuRNGStatesTracker):
        _install_cpu_tracker()
    tensor_parallel.get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})


def zero3_init(ds_config: dict) -> contextlib.AbstractContextManager:
    """`deepspeed.zero.Init` for building a model already partitioned (ZeRO-3), partitioned over data parallel.

    zero.Init partitions over the *world* group unless told otherwise, and broadcasts every new parameter from
    rank 0 of that group: with TP > 1 that overwrites each rank's tensor-parallel shard with rank 0's (`mpu=`
    alone does not prevent it). Passing the data-parallel group keeps the shards.
    """
    import deepspeed

    return deepspeed.zero.Init(
        config_dict_or_path=ds_config, data_parallel_group=mpu_state.get_data_parallel_group(), mpu=DeepSpeedMPU()
    )
