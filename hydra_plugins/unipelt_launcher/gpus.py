"""`hydra/launcher=gpus`: run a sweep's jobs in parallel with exactly one GPU each.

Every job runs in a fresh process (multiprocessing 'spawn') whose CUDA_VISIBLE_DEVICES names one GPU taken from a
queue of free GPUs; the GPU goes back to the queue only when that process has exited. So two jobs never share a
GPU (a reused worker process, as joblib's pool does, would keep its first CUDA context; `job.num % n_gpus` hands
one GPU to two jobs whenever jobs finish out of order), and a job that crashes or leaks memory cannot harm the
next one. A job that fails is returned as failed; the others run on.
"""

# No `from __future__ import annotations`: Hydra loads plugin modules without registering them in sys.modules,
# where dataclasses would look string annotations up.
import logging
import multiprocessing
import os
import queue
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, open_dict

from hydra.core.config_store import ConfigStore
from hydra.core.utils import (JobReturn, JobRuntime, JobStatus, configure_log, filter_overrides, run_job,
                              setup_globals)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction

log = logging.getLogger(__name__)


@dataclass
class GpuLauncherConf:
    _target_: str = "hydra_plugins.unipelt_launcher.gpus.GpuLauncher"
    # Device ids to hand out, one per job at a time; None: every GPU visible (CUDA_VISIBLE_DEVICES or all).
    gpus: Optional[List[str]] = None
    # Refuse to start (and fail a job) when CUDA sees no GPU; false hands the ids out as plain slots on a machine
    # without GPUs (to try a sweep's scheduling on a CPU machine).
    require_gpu: bool = True


ConfigStore.instance().store(group="hydra/launcher", name="gpus", node=GpuLauncherConf, provider="unipelt")


def visible_gpus(gpus: Optional[Sequence[Any]], require_gpu: bool = True) -> list[str]:
    import torch

    count = torch.cuda.device_count()
    if gpus:
        # named devices on a machine without any: every job would run on the CPU in silence
        if count == 0 and require_gpu:
            raise RuntimeError(f"hydra/launcher=gpus: hydra.launcher.gpus={list(gpus)} but no GPU is visible here "
                               "(torch.cuda.device_count() is 0); use the default launcher")
        return [str(g) for g in gpus]
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [g.strip() for g in listed.split(",") if g.strip()]
    if count == 0:
        raise RuntimeError("hydra/launcher=gpus: no GPU is visible; name devices with hydra.launcher.gpus=[0,1] "
                           "or use the default launcher")
    return [str(i) for i in range(count)]


def _run_in_child(gpu: str, job_name: str, hydra_context: HydraContext, task_function: TaskFunction,
                  config: DictConfig, conn: Any, require_gpu: bool = True) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before anything in this fresh process touches CUDA
    if require_gpu:  # the job must see its GPU: a wrong id would leave it on the CPU in silence (device=auto)
        os.environ["UNIPELT_REQUIRE_GPU"] = gpu
    # A fresh process: Hydra's resolvers and job name are set again here (the parent's resolvers are closures,
    # which plain pickling cannot send); the app's own registrations ran when the task function was imported.
    setup_globals()
    JobRuntime.instance().set("name", job_name)
    try:
        ret = run_job(hydra_context=hydra_context, task_function=task_function, config=config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        value = ret._return_value
        if ret.status == JobStatus.FAILED:
            value = f"{type(value).__name__}: {value}"
        payload = {"status": ret.status.name, "value": value, "working_dir": ret.working_dir,
                   "task_name": ret.task_name}
    except BaseException as exc:  # the job machinery itself failed: report it, never hang the parent
        payload = {"status": "FAILED", "value": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
                   "working_dir": None, "task_name": None}
    try:
        conn.send(payload)
    except Exception:  # an unpicklable return value: keep the status
        conn.send({**payload, "value": repr(payload["value"])})
    conn.close()


class JobFailed(RuntimeError):
    """A job run by the gpus launcher failed; the message is the job's own error."""


class GpuLauncher(Launcher):
    def __init__(self, gpus: Optional[Sequence[Any]] = None, require_gpu: bool = True) -> None:
        super().__init__()
        self.gpus = list(gpus) if gpus else None
        self.require_gpu = require_gpu
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        gpus = visible_gpus(self.gpus, self.require_gpu)
        log.info(f"Launching {len(job_overrides)} jobs on GPUs {', '.join(gpus)}, one GPU per job")
        configs = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            configs.append(sweep_config)
        free: "queue.Queue[str]" = queue.Queue()
        for gpu in gpus:
            free.put(gpu)
        context = multiprocessing.get_context("spawn")
        job_name = JobRuntime.instance().get("name")

        def run_one(index: int) -> JobReturn:
            gpu = free.get()  # blocks until a GPU is free: the queue is the lock
            try:
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_run_in_child, name=f"job{index}-gpu{gpu}",
                                          args=(gpu, job_name, self.hydra_context, self.task_function,
                                                configs[index], send, self.require_gpu))
                process.start()
                send.close()
                try:
                    payload = receive.recv()
                except EOFError:  # the process died without a word (killed, segfault, OOM)
                    payload = None
                process.join()
            finally:
                free.put(gpu)
            ret = JobReturn(overrides=list(job_overrides[index]), cfg=configs[index])
            if payload is None:
                ret.status = JobStatus.FAILED
                ret.return_value = JobFailed(f"job {index} on GPU {gpu} exited with code {process.exitcode}")
            else:
                ret.status = JobStatus[payload["status"]]
                ret.working_dir, ret.task_name = payload["working_dir"], payload["task_name"]
                failed = ret.status == JobStatus.FAILED
                ret.return_value = JobFailed(payload["value"]) if failed else payload["value"]
            return ret

        with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
            runs = list(pool.map(run_one, range(len(configs))))
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs
