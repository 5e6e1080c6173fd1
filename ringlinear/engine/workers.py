"""The engine over several ranks (`EngineConfig.tensor_parallel_size`), on torch.distributed: NCCL between GPUs,
gloo on the CPU. Rank 0 is the engine's own process: it schedules, samples and owns the requests. The engine
spawns ranks 1..N-1 itself (no torchrun), one per GPU; each loads only its slice of the checkpoint
(`ringlinear.loading.sharded`) and then mirrors rank 0's `ModelRunner`: every runner call of rank 0
(plan, allocate, set_max_model_len, capture, execute) is first broadcast as a command on a gloo control group, as
small int64 CPU tensors, then run by every rank. A step is described by its token ids, lengths, start positions,
state slots, sampling and prompt-logprob rows, the block-table entries written since the last step, and the cache's
device copies made since then outside a forward (`HybridCache.recorded`: state slots zeroed for new sequences, copied
for forks (n > 1) and into and out of prefix-cache snapshots, KV blocks copied on write and into and out of
snapshots); each worker replays the copies in order, then the step, on its own cache (same block and slot numbers,
its own heads). The forwards' all-reduces and the logits' gather run on the default group, inside the model.

A worker that exits (error, OOM, killed) is seen at once by a watchdog thread of rank 0 (the process sentinels):
the engine is then dead, `step` raises `EngineDeadError` with the worker's error, and a step blocked on the dead rank's
collective is released (NCCL: the group is aborted; gloo: the closed connection fails it). Workers leave when rank 0
goes away (a parent watchdog), so nothing waits for ever.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import multiprocessing
import multiprocessing.connection
import os
import struct
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from ringlinear.engine.runner import ModelRunner

# an idle server's workers wait on the control group for the next step: no timeout that an idle hour would hit
CONTROL_TIMEOUT = datetime.timedelta(days=365)
HEADER = 8  # command, payload length, up to 6 arguments
STEP, PLAN, ALLOCATE, SET_LEN, CAPTURE, STOP = range(1, 7)
_NAMES = {STEP: "step", PLAN: "plan", ALLOCATE: "allocate", SET_LEN: "set_max_model_len", CAPTURE: "capture",
          STOP: "stop"}
_ACTIVE: list = []  # the Workers of this process not yet shut down (one default process group per process)
_COPIES = ("zero", "states", "blocks")  # HybridCache.recorded kinds, by their code on the wire


class EngineDeadError(RuntimeError):
    """A tensor-parallel rank died or failed mid-command: the ranks are no longer in step and the engine cannot
    continue (a server ends on it: `fatal`)."""

    fatal = True


# ---- what runs where ---------------------------------------------------------------------------------------------
def needs_inference_loader(config) -> bool:
    """Whether the engine loads through `load_for_inference`: several ranks, FP8 asked for, or an FP8 checkpoint."""
    from ringlinear.config import RingLinearConfig
    from ringlinear.loading.fp8 import fp8_checkpoint

    if config.tensor_parallel_size > 1 or config.quantization or config.load_format == "dummy":
        return True
    return bool(config.model) and os.path.isdir(config.model) and fp8_checkpoint(RingLinearConfig.load(config.model))


def backend_of(config, device: torch.device) -> str:
    backend = config.distributed_backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        config.fail("distributed_backend", "nccl runs between GPUs; on the CPU use gloo")
    return backend


def rank_devices(config, device: torch.device, backend: str) -> list[torch.device]:
    """The device of each rank: cuda:(i + r) from rank 0's cuda:i under NCCL (one GPU each); under gloo on CUDA the
    ranks share the visible GPUs in turn; the CPU for all on the CPU."""
    n = config.tensor_parallel_size
    if device.type != "cuda":
        return [device] * n
    base, count = device.index or 0, torch.cuda.device_count()
    if backend == "nccl":
        if base + n > count:
            config.fail("tensor_parallel_size", f"needs {n} GPUs from cuda:{base}, this machine shows {count} (NCCL "
                                                "takes one GPU per rank)")
        return [torch.device("cuda", base + r) for r in range(n)]
    return [torch.device("cuda", (base + r) % count) for r in range(n)]


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- the control channel -----------------------------------------------------------------------------------------
def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", b))[0]


class ControlChannel:
    """Commands from rank 0 to all ranks on a gloo group of CPU tensors: a header [command, payload length,
    arguments...] and an int64 payload; `agree` takes the minimum of a value over the ranks."""

    def __init__(self, group):
        self.group = group

    def send(self, cmd: int, args=(), payload: list[int] | None = None) -> None:
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[0], header[1] = cmd, len(payload or ())
        header[2 : 2 + len(args)] = torch.tensor(list(args), dtype=torch.int64)
        dist.broadcast(header, 0, group=self.group)
        if payload:
            dist.broadcast(torch.tensor(payload, dtype=torch.int64), 0, group=self.group)

    def recv(self) -> tuple[int, list[int], list[int]]:
        header = torch.empty(HEADER, dtype=torch.int64)
        dist.broadcast(header, 0, group=self.group)
        cmd, n, *args = header.tolist()
        payload = torch.empty(n, dtype=torch.int64)
        if n:
            dist.broadcast(payload, 0, group=self.group)
        return cmd, args, payload.tolist()

    def agree(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return t.tolist()


class _Window:
    """A worker's view of a sequence's token ids: only this step's, at their positions."""

    def __init__(self, start: int, ids: list[int]):
        self.start, self.ids = start, ids

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.ids[key.start - self.start : key.stop - self.start]
        return self.ids[key - self.start]


@dataclasses.dataclass
class _MirroredSequence:
    """What a runner reads of a sequence, rebuilt on a worker from the step's description."""

    slot: int
    num_computed: int
    token_ids: _Window


# ---- the runner every rank runs -----------------------------------------------------------------------------------
class TensorParallelRunner(ModelRunner):
    """`ModelRunner` of one rank; on rank 0 each call is first sent to the workers (`serve` runs them there).
    Cache sizes are agreed (the smallest block and prefix-snapshot counts of any rank); so is whether decode runs under
    CUDA graphs. Rank 0's cache records its device copies (`HybridCache.recorded`) for the workers to replay."""

    def __init__(self, model, device, kv_dtype, channel: ControlChannel, rank: int, backend: str,
                 ranks_on_device: int = 1, workers: Workers | None = None):
        super().__init__(model, device, kv_dtype, cache_config=model.local_config)
        self.channel, self.rank, self.backend = channel, rank, backend
        self.ranks_on_device, self.workers = ranks_on_device, workers
        self._layout = None

    # -- cache sizes
    def cache_budget(self, max_num_seqs, max_num_batched_tokens, gpu_memory_utilization, cpu_cache_bytes) -> int:
        # ranks sharing a GPU (gloo) share its memory
        return super().cache_budget(max_num_seqs, max_num_batched_tokens,
                                    gpu_memory_utilization / self.ranks_on_device, cpu_cache_bytes)

    def plan(self, max_num_seqs, max_num_batched_tokens, block_size, gpu_memory_utilization, cpu_cache_bytes,
             prefix_state_interval=None):
        args = (max_num_seqs, max_num_batched_tokens, block_size, gpu_memory_utilization, cpu_cache_bytes,
                prefix_state_interval)
        with self._lockstep(PLAN, (*args[:3], _float_bits(gpu_memory_utilization), cpu_cache_bytes,
                                   prefix_state_interval or 0)):
            error, sizes = None, [-1, -1]
            try:
                layout = super().plan(*args)
                sizes = [layout.num_blocks, layout.num_snapshots]
            except Exception as e:  # every rank must reach the agreement, or the others wait for ever
                error = e
            blocks, snapshots = self.channel.agree(sizes)
            if blocks < 0:
                raise error or RuntimeError("another tensor-parallel rank could not plan its cache (its error is "
                                            "above)")
            # the smallest of each fits every rank's budget; snapshot i is slot num_slots + i and block
            # num_blocks + i on every rank
            self._layout = dataclasses.replace(layout, num_blocks=blocks, num_snapshots=snapshots)
            return self._layout

    def allocate(self, layout=None):
        with self._lockstep(ALLOCATE):
            cache = super().allocate(layout or self._layout)
            if self.rank == 0:
                cache.recorded = []
            return cache

    def set_max_model_len(self, max_model_len: int) -> None:
        with self._lockstep(SET_LEN, (max_model_len,)):
            super().set_max_model_len(max_model_len)

    def capture(self, max_batch: int, verbose: bool = True, verify_length: int = 0) -> None:
        if verify_length:  # the engine refuses speculative decoding under tensor parallel before it gets here
            raise NotImplementedError("not yet: verify graphs under tensor parallel")
        with self._lockstep(CAPTURE, (max_batch, int(verbose))):
            if self.backend == "gloo":  # gloo's collectives copy through the host: nothing a CUDA graph can hold
                if verbose and self.rank == 0:
                    print("[ringlinear engine] CUDA graphs off: the gloo backend's collectives cannot be captured; "
                          "decode runs eagerly", flush=True)
                return
            super().capture(max_batch, verbose and self.rank == 0)
            if not self.channel.agree([int(self.graphs is not None)])[0] and self.graphs is not None:
                self.graphs = None
                if self.rank == 0:
                    print("[ringlinear engine] CUDA graphs off: another rank could not capture its decode graphs",
                          flush=True)

    # -- steps
    def execute(self, batch, sampling_rows, token_rows=None):
        if self.rank != 0:
            return super().execute(batch, sampling_rows, token_rows)
        args, payload = self._describe(batch, sampling_rows, token_rows or [])
        with self._lockstep(STEP, args, payload):
            return super().execute(batch, sampling_rows, token_rows)

    def _describe(self, batch, sampling_rows, token_rows) -> tuple[tuple[int, ...], list[int]]:
        """The step as (args, payload); takes the cache's recorded copies and reads its unflushed table entries
        (the forward flushes them)."""
        cache = self.cache
        ids, lens, starts, slots = [], [], [], []
        for seq, n in batch:
            c = seq.num_computed
            ids += seq.token_ids[c : c + n]
            lens.append(n)
            starts.append(c)
            slots.append(seq.slot)
        updates = [x for entry in cache._pending for x in entry]  # (slot, column, block)
        copies = []
        for kind, src, dst in cache.recorded:
            copies += [_COPIES.index(kind), len(src), *src, *dst]
        cache.recorded = []
        payload = ids + lens + starts + slots + list(sampling_rows) + list(token_rows) + updates + copies
        return (len(batch), len(sampling_rows), len(token_rows), len(updates) // 3, len(copies)), payload

    def _step(self, args: list[int], payload: list[int]) -> None:
        N, R, K, U, C = args[:5]
        T = len(payload) - 3 * N - R - K - 3 * U - C
        ids, rest = payload[:T], payload[T:]
        lens, starts, slots = rest[:N], rest[N : 2 * N], rest[2 * N : 3 * N]
        rows, rest = rest[3 * N : 3 * N + R], rest[3 * N + R :]
        token_rows, upd, copies = rest[:K], rest[K : K + 3 * U], rest[K + 3 * U :]
        cache = self.cache
        i = 0
        while i < len(copies):  # in rank 0's order: a snapshot taken from a slot before the slot is zeroed again
            kind, n = _COPIES[copies[i]], copies[i + 1]
            src = copies[i + 2 : i + 2 + n]
            if kind == "zero":
                cache.zero_states(src)
                i += 2 + n
                continue
            dst = copies[i + 2 + n : i + 2 + 2 * n]
            (cache.copy_states if kind == "states" else cache.copy_blocks)(src, dst)
            i += 2 + 2 * n
        if upd:
            u = torch.tensor(upd, dtype=torch.int64).view(-1, 3).to(cache.device)
            cache.tables[u[:, 0], u[:, 1]] = u[:, 2].to(cache.tables.dtype)
        batch, off = [], 0
        for n, c, s in zip(lens, starts, slots):
            batch.append((_MirroredSequence(s, c, _Window(c, ids[off : off + n])), n))
            off += n
        self.execute(batch, rows, token_rows or None)

    @contextlib.contextmanager
    def _lockstep(self, cmd: int, args=(), payload=None):
        """On rank 0: send the command, then run the block; an error while a worker is dead is that death. On a
        worker: just the block (the command came in `serve`)."""
        w = self.workers
        if self.rank != 0 or w is None:
            yield
            return
        w.check()
        w.in_step = True
        try:
            self.channel.send(cmd, args, payload)
            yield
        except Exception as e:
            if w.failure is None:  # a collective can fail on a dead rank before the watchdog has seen it exit
                w.await_failure(2.0)
            if w.failure is None:  # rank 0 failed after the workers took the command: they cannot be resynchronised
                w.abandon(f"rank 0 failed in the middle of a {_NAMES[cmd]} command ({type(e).__name__}: {e})")
                raise
            raise w.failure from e
        finally:
            w.in_step = False

    def serve(self) -> None:
        """A worker's loop: run rank 0's commands until STOP."""
        while True:
            cmd, args, payload = self.channel.recv()
            if cmd == STOP:
                return
            if cmd == STEP:
                self._step(args, payload)
            elif cmd == PLAN:
                self.plan(args[0], args[1], args[2], _bits_float(args[3]), args[4], args[5] or None)
            elif cmd == ALLOCATE:
                self.allocate()
            elif cmd == SET_LEN:
                self.set_max_model_len(args[0])
            elif cmd == CAPTURE:
                self.capture(args[0], bool(args[1]))
            else:
                raise RuntimeError(f"tensor-parallel worker: unknown command {cmd}")


# ---- rank 0: the worker processes --------------------------------------------------------------------------------
class Workers:
    """Rank 0's side: starts the worker processes and the process groups, loads rank 0's slice (`load`, handed to
    `load_pretrained`), makes its runner (`runner`), watches the workers, and stops them (`shutdown`)."""

    def __init__(self, config, device: torch.device):
        from ringlinear.config import PRESETS, RingLinearConfig, preset
        from ringlinear.distributed.tensor_parallel import check_tensor_parallel
        from ringlinear.ops.backend import forced_backend

        n = config.tensor_parallel_size
        if _ACTIVE or dist.is_initialized():
            config.fail("tensor_parallel_size", "this process already has a torch.distributed default group (another "
                                                "tensor-parallel engine not shut down, or torchrun): the engine starts "
                                                "its own; call shutdown() on the other engine first")
        self.config, self.n = config, n
        self.backend = backend_of(config, device)
        self.devices = rank_devices(config, device, self.backend)
        # what would end every rank's load: refused here, before any process starts
        dummy = config.load_format == "dummy"
        if not (config.model and (os.path.isdir(config.model) or dummy and config.model in PRESETS)):
            config.fail("model", "tensor_parallel_size > 1 reads each rank's slices of a checkpoint directory "
                                 "(safetensors); write one with `ringlinear init` (or load_format dummy: a preset)")
        check_tensor_parallel(preset(config.model) if config.model in PRESETS else RingLinearConfig.load(config.model),
                              n)
        self.failure: EngineDeadError | None = None
        self.in_step = False
        self._stopping = self._closed = False
        self._messages: dict[int, list] = {r: [] for r in range(1, n)}
        self._cv = threading.Condition()
        store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, wait_for_workers=False)
        ctx = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // n)
        self.procs, self._conns = {}, {}
        for r in range(1, n):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=worker_main, name=f"ringlinear-tp-rank{r}", daemon=True,
                            args=(r, n, store.port, config, self.backend, str(self.devices[r]),
                                  self.devices.count(self.devices[r]), send, threads, forced_backend()))
            p.start()
            send.close()
            self.procs[r], self._conns[r] = p, recv
        _ACTIVE.append(self)
        self._watchdog = threading.Thread(target=self._watch, name="ringlinear-tp-watchdog", daemon=True)
        self._watchdog.start()
        try:
            self._wait_for("started")
            dist.init_process_group(self.backend, store=store, rank=0, world_size=n,
                                    device_id=self.devices[0] if self.backend == "nccl" else None)
            self.control = ControlChannel(dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT))
        except BaseException:
            self.shutdown()
            raise
        self._store = store

    # -- loading
    def load(self, source: str, device=None, dtype=None, progress: bool = False):
        """Rank 0's slice of checkpoint `source` (the workers load theirs meanwhile); prints the ranks' weight bytes
        and peak host memory when `verbose`."""
        from ringlinear.distributed.tensor_parallel import ShardGroup
        from ringlinear.loading.sharded import load_for_inference, peak_host_memory

        try:
            model = load_for_inference(source, self.devices[0], dtype, ShardGroup(0, self.n),
                                       self.config.quantization, progress, dummy=self.config.load_format == "dummy")
            ready = self._wait_for("ready")
        except BaseException as e:
            self.abandon(f"rank 0 could not load its slice ({type(e).__name__}: {e})")
            raise
        if self.config.verbose:
            weights = [weight_bytes(model)] + [m[2] for m in ready]
            host = [peak_host_memory()] + [m[1] for m in ready]
            gib = lambda xs: ", ".join(f"{x / 2**30:.2f}" for x in xs)  # noqa: E731
            print(f"[ringlinear engine] tensor parallel over {self.n} ranks ({self.backend}: "
                  f"{', '.join(map(str, self.devices))}): weights per rank {gib(weights)} GiB"
                  f"{' (fp8)' if any(p.dtype == torch.float8_e4m3fn for p in model.parameters()) else ''}; "
                  f"peak host memory per rank {gib(host)} GiB",
                  flush=True)
        return model

    def runner(self, model, device, kv_dtype) -> TensorParallelRunner:
        return TensorParallelRunner(model, device, kv_dtype, self.control, 0, self.backend,
                                    self.devices.count(self.devices[0]), workers=self)

    # -- health
    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def await_failure(self, timeout: float) -> None:
        """Wait up to `timeout` s for the watchdog to report a worker's death."""
        with self._cv:
            self._cv.wait_for(lambda: self.failure is not None, timeout)

    def _wait_for(self, kind: str) -> list:
        with self._cv:
            while True:
                self.check()
                got = [next((m for m in self._messages[r] if m[0] == kind), None) for r in range(1, self.n)]
                if all(m is not None for m in got):
                    return got
                self._cv.wait(1.0)

    def _watch(self) -> None:
        live = {**{c: r for r, c in self._conns.items()}, **{p.sentinel: r for r, p in self.procs.items()}}
        while live:
            ready = multiprocessing.connection.wait(list(live))
            for w in sorted(ready, key=lambda w: isinstance(w, int)):  # messages before deaths
                r = live.pop(w)
                if isinstance(w, int):
                    self._drain(r)
                    if not self._stopping:
                        self._fail(r)
                    continue
                try:
                    msg = w.recv()
                except (EOFError, OSError):
                    continue
                live[w] = r
                with self._cv:
                    self._messages[r].append(msg)
                    self._cv.notify_all()

    def _drain(self, r: int) -> None:
        conn = self._conns[r]
        try:
            while conn.poll():
                with self._cv:
                    self._messages[r].append(conn.recv())
        except (EOFError, OSError):
            pass

    def _fail(self, r: int) -> None:
        p = self.procs[r]
        p.join(1)
        errors = [m[1] for m in self._messages[r] if m[0] == "error"]
        detail = f":\n{errors[-1].rstrip()}" if errors else " (its output is above)"
        with self._cv:
            self.failure = EngineDeadError(f"tensor-parallel worker rank {r} (pid {p.pid}) exited with code {p.exitcode}"
                                      f"{detail}\nThe engine cannot continue; start it again.")
            self._cv.notify_all()
        if self.backend == "nccl":  # release a step waiting on the dead rank's collective
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception:  # noqa: BLE001 - best effort; the timeout below still ends the wait
                pass
        deadline = time.monotonic() + 60
        while self.in_step and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.in_step:  # a step is still stuck on the dead rank: end the process rather than hang
            print(f"[ringlinear engine] {self.failure}\n[ringlinear engine] a step is still waiting on the dead rank "
                  "after 60 s: exiting", file=sys.stderr, flush=True)
            os._exit(70)

    # -- the end
    def abandon(self, why: str) -> None:
        """Rank 0 failed where the workers cannot follow: mark the engine dead and stop them."""
        with self._cv:
            if self.failure is None:
                self.failure = EngineDeadError(f"{why}; the tensor-parallel workers were stopped. The engine cannot "
                                               "continue; start it again.")
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the workers (STOP, then terminate what is left) and leave the process groups; idempotent."""
        if self._closed:
            return
        self._closed = self._stopping = True
        if self.failure is None and getattr(self, "control", None) is not None:
            try:
                self.control.send(STOP)
            except Exception:  # noqa: BLE001 - a worker already gone: terminated below
                pass
        for p in self.procs.values():
            p.join(30 if self.failure is None else 0.1)
            if p.is_alive():
                p.terminate()
                p.join(5)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a group broken by a dead rank
                pass
        if self in _ACTIVE:
            _ACTIVE.remove(self)


@atexit.register
def _shutdown_all() -> None:
    for w in list(_ACTIVE):
        w.shutdown()


def inference_loader(config, device: torch.device):
    """(model_loader for `load_pretrained`, Workers or None) for an engine that loads through `load_for_inference`:
    with several ranks the workers start here and the loader reads rank 0's slice."""
    from ringlinear.loading.fp8 import require_fp8_device
    from ringlinear.loading.sharded import load_for_inference

    if config.quantization:
        require_fp8_device(device)
    if config.tensor_parallel_size > 1:
        workers = Workers(config, device)
        return workers.load, workers

    def load(source, device=None, dtype=None, progress=False):
        from ringlinear.loading.sharded import peak_host_memory

        model = load_for_inference(source, device, dtype, None, config.quantization, progress,
                                   dummy=config.load_format == "dummy")
        if config.verbose:
            fp8 = any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
            print(f"[ringlinear engine] weights {weight_bytes(model) / 2**30:.2f} GiB{' (fp8)' if fp8 else ''}; peak "
                  f"host memory {peak_host_memory() / 2**30:.2f} GiB", flush=True)
        return model

    return load, None


# ---- ranks 1..N-1 ------------------------------------------------------------------------------------------------
def _watch_parent() -> None:
    """Leave when rank 0's process is gone (its collectives would never come)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="ringlinear-tp-parent", daemon=True).start()


def worker_main(rank: int, n: int, port: int, config, backend: str, device_name: str, ranks_on_device: int, conn,
                threads: int, backend_override: str | None) -> None:
    """A worker process: join the groups, load this rank's slice, report, then serve rank 0's commands."""
    from ringlinear.device import compute_dtype, parse_dtype
    from ringlinear.distributed.tensor_parallel import ShardGroup
    from ringlinear.loading.sharded import load_for_inference, peak_host_memory

    try:
        _watch_parent()
        if backend_override:
            os.environ["RINGLINEAR_BACKEND"] = backend_override  # the op backend rank 0 runs with
        torch.set_num_threads(threads)
        device = torch.device(device_name)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = dist.TCPStore("127.0.0.1", port, n, is_master=False)
        conn.send(("started",))
        dist.init_process_group(backend, store=store, rank=rank, world_size=n,
                                device_id=device if backend == "nccl" else None)
        channel = ControlChannel(dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT))
        model = load_for_inference(config.model, device, compute_dtype(device, config.dtype), ShardGroup(rank, n),
                                   config.quantization, dummy=config.load_format == "dummy")
        kv_dtype = parse_dtype(config.kv_cache_dtype) if config.kv_cache_dtype else next(model.parameters()).dtype
        runner = TensorParallelRunner(model, device, kv_dtype, channel, rank, backend, ranks_on_device)
        conn.send(("ready", peak_host_memory(), weight_bytes(model)))
        runner.serve()
    except BaseException:  # noqa: BLE001 - reported to rank 0, then this process ends
        text = traceback.format_exc()
        print(f"[ringlinear tp rank {rank}] {text}", file=sys.stderr, flush=True)
        try:
            conn.send(("error", text))
        finally:
            os._exit(1)
    dist.destroy_process_group()
