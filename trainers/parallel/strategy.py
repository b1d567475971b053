"""The Lightning strategy: pipeline x tensor x data parallel training on torch.distributed.

    Trainer(strategy=PipelineStrategy(partition=[["retrieval", "blocks.0"], ["blocks.1", "head"]],
                                      pipeline_parallel_size=2, num_microbatches=4))

The LightningModule must hold the model as `.model`, with the unit chain `units()` (and
`colocation_groups()`) of `rag_mm.model.RAGModel`, best built on the meta device (as
`RAGModule` does). At setup the strategy builds the ("dp", "pp", "tp") mesh and calls
`trainers.parallel.parallelize.parallelize` once: this rank keeps only its pipeline units
(the others become `RemoteUnit` placeholders, never allocated, so parameters, optimizer
state and state dicts hold this rank's share under the model's own names), applies tensor
parallelism (with `sequence_parallel`, also over the sequence dim inside every block),
activation checkpointing, optional `torch.compile` and FSDP2, materialises and initialises
its units (the pretrained text tower only where the retrieval unit is), and builds the
schedule for the loaders' batch size. This class is the Lightning glue around it.

A pipeline schedule runs forward and backward together, so the strategy owns the training
step: `training_step` runs torch's schedule over the micro-batches, logs `train/loss`, `train/generator_loss`, `train/retriever_loss` (the same numbers on
every rank), and parks the new gradients until Lightning's `backward` (which runs after
Lightning's `zero_grad`) adds them to whatever Lightning kept (gradient accumulation).
Gradient clipping by norm uses the norm over all stages and shards. During the module's
retriever warm-up (`in_retriever_warmup()`) the step is its contrastive-only loss on the
stage-0 ranks instead, through the retrieval unit's `forward` (so FSDP2 gathers and reduces
it under dp > 1; in-batch negatives per replica, as in the joint step). A batch smaller than the pipeline's fixed size (a
last, partial batch) is padded with neutral copies of its rows weighted 0. Validation and
test steps run the pipeline forward only and log `val/...` / `test/...` losses, and the module's
generation metrics (its `answer_counts`: exact match, recall@k) from greedy answers decoded
through the pipeline (`trainers.parallel.answer`). The module's own step methods are not
called.

Checkpoints are torch.distributed.checkpoint folders (ModelParallelStrategy's saving) under
the model's own parameter names, with per-parameter optimizer entries, so one saved under
one layout resumes under another.

Data parallelism is FSDP2: with dp > 1 every local unit is `fully_shard`-ed over the dp
axis (parameters, gradients and optimizer state sharded; gradients averaged by the
reduce-scatter), and each stage is the FSDP root of its units; under a bf16 precision its
attention and MLP layers are FSDP2 groups of their own with a bf16 `MixedPrecisionPolicy`
(fp32 gradient reduction), the rest stays fp32 as under autocast (`parallelize.py`).

Not yet: prediction.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions
from torch.distributed.tensor import DTensor

from trainers.data import ROW_VALID
from trainers.parallel.answer import pipeline_generate
from trainers.parallel.checkpointing import ActivationCheckpointing, check_checkpoint_schedule
from trainers.parallel.mesh import ParallelConfigError, ParallelDims
from trainers.parallel.parallelize import (
    ParallelConfig,
    RemoteUnit,
    check_compile,
    check_parallelize,
    parallelize,
)
from trainers.parallel.pipeline import Pipeline, PipelineConfig, check_schedule, stage_ranks
from trainers.parallel.tensor import tensor_parallel_plan

LOSS_NAMES = ("generator_loss", "retriever_loss")  # the columns of the head's (B, 2) losses
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True, cpu_offload=True)


class PipelineStrategy(ModelParallelStrategy):
    """Pipeline (torch.distributed.pipelining) x tensor (DTensor) x data (FSDP2) parallelism.

    Args:
        partition: unit names per pipeline stage, in chain order, or "auto": the
            partitioner's plan (`trainers.parallel.auto`), made at setup for this replica's
            loader batch size, FSDP2's sharding over dp, `partition_device` and the
            schedule as torch runs it (its order and stage placement, 2 stages a rank
            where it takes several).
        partition_device: for "auto", the GPU to cost for, a name of
            `trainers.partition.hardware.GPUS`, or "measured" (this machine timed, the
            slowest rank's rates); None: the named spec of the device this process runs on.
        pipeline_parallel_size, tensor_parallel_size: ranks per pipeline / per layer.
        data_parallel_size: replicas; None takes the rest of the world size.
        num_microbatches: micro-batches per step; must divide the per-replica batch.
        schedule: one of `trainers.parallel.pipeline.SCHEDULES` (`gpipe`, `1f1b`,
            `interleaved_1f1b`, `looped_bfs`, `interleaved_zero_bubble`, `zbv_zero_bubble`,
            `dualpipev`).
        sequence_parallel: with tensor_parallel_size > 1, also shard every transformer
            block's norms and residual stream on the sequence dim (`trainers.parallel.
            tensor`); each block's sequence length must divide by tensor_parallel_size.
        activation_checkpointing: "off", "every" (block), n (every n-th block) or unit
            names (`trainers.parallel.checkpointing`), applied to this rank's units after
            tensor parallelism and before FSDP2. None: the LightningModule's own
            `activation_checkpointing` hyperparameter (if given, the two must agree).
            Refused under the zero-bubble / DualPipeV schedules.
        compile: `torch.compile` every decoder block of this rank (refused at setup where
            no compiler works).
        split_tied_weights: allow tied units (e.g. `retrieval` and `head` with tied
            embeddings) on different stages: each keeps a copy, their gradients are summed
            every step (FSDP2 shards over dp shard for shard) and counted once in gradient
            norms. Refused if tensor parallelism shards the tied weight.
        process_group_backend: default NCCL on GPUs, gloo on CPU.
    """

    def __init__(self, *, partition: list[list[str]] | str = "auto",
                 pipeline_parallel_size: int = 1,
                 tensor_parallel_size: int = 1, data_parallel_size: int | None = None,
                 num_microbatches: int = 1, schedule: str = "1f1b",
                 sequence_parallel: bool = False, split_tied_weights: bool = False,
                 activation_checkpointing: str | int | list[str] | None = None,
                 compile: bool = False, process_group_backend: str | None = None,
                 partition_device: str | None = None,
                 timeout: timedelta | None = default_pg_timeout) -> None:
        super().__init__(data_parallel_size=1, tensor_parallel_size=1,
                         save_distributed_checkpoint=True,
                         process_group_backend=process_group_backend, timeout=timeout)
        if isinstance(partition, str) and partition != "auto":
            raise ParallelConfigError(
                f"partition={partition!r}: use 'auto' or a list of unit-name lists per stage")
        stages = None if partition == "auto" else [list(s) for s in partition]
        self.pipeline_config = PipelineConfig(stages=stages,
                                              schedule=schedule, num_microbatches=num_microbatches,
                                              split_tied_weights=split_tied_weights)
        self._sizes = {"pipeline_parallel_size": pipeline_parallel_size,
                       "tensor_parallel_size": tensor_parallel_size,
                       "data_parallel_size": data_parallel_size}
        self.sequence_parallel = sequence_parallel
        self.compile = compile
        self.partition_device = partition_device
        check_checkpoint_schedule(activation_checkpointing, schedule)
        self.activation_checkpointing = activation_checkpointing
        self.dims: ParallelDims | None = None
        self.pipeline: Pipeline | None = None
        self._ties: list = []
        self._parked: list[tuple[nn.Parameter, torch.Tensor]] = []

    # -- processes and mesh ----------------------------------------------------------------------
    def setup_environment(self) -> None:
        ParallelStrategy.setup_environment(self)
        self._setup_distributed()
        self.dims = ParallelDims(world_size=self.world_size, **self._sizes)
        if self.pipeline_config.stages is not None:
            check_schedule(self.pipeline_config, self.dims.pp)
        if self.compile:
            check_compile(self.root_device.type)
        self._device_mesh = self.dims.build_mesh(self.root_device.type)
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        dp_mesh = self.device_mesh["dp"]
        return {"num_replicas": dp_mesh.size(), "rank": dp_mesh.get_local_rank()}

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.device_mesh["pp"].get_group()

    @property
    def pp_rank(self) -> int:
        return self.device_mesh["pp"].get_local_rank()

    def retrieval_group(self) -> dist.ProcessGroup | None:
        """The ranks that search a sharded index together (`RAGModule(shard_index=True)`):
        stage 0 (the retrieval unit) of every dp replica; None on the other stages."""
        return self.device_mesh["dp"].get_group() if self.pp_rank == 0 else None

    # -- model -----------------------------------------------------------------------------------
    def _chain_model(self) -> nn.Module:
        model = getattr(self.lightning_module, "model", None)
        if model is None or not hasattr(model, "units"):
            raise TypeError(
                f"{type(self).__name__} needs the LightningModule to hold the model as `.model` "
                f"with a `units()` chain (like rag_mm.model.RAGModel); "
                f"{type(self.lightning_module).__name__} has none"
            )
        return model

    def setup(self, trainer) -> None:
        """The Lightning glue around `parallelize`: the model the module built (on the meta
        device: `RAGModule.configure_model` leaves it there under this strategy) becomes
        this rank's share of the pipeline, once, before any batch; then optimizers and
        precision as Lightning sets them up."""
        self.accelerator.setup(trainer)
        model = self._chain_model()
        if self.pipeline_config.stages is None:
            self._plan_partition(model, trainer)
        config = self.parallel_config([name for name, _ in model.units()])
        self._ties = check_parallelize(model, self.dims, config)
        self._check_split_ties(model)
        example = self._example_batch(model, trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        with self.precision_plugin.forward_context():  # the stages' dtypes at run time
            self.pipeline = parallelize(model, self.dims, config, example,
                                        mesh=self.device_mesh, device=self.root_device)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm

    def _bf16(self) -> bool:
        """The run trains under a bf16 precision (bf16 FSDP2 groups for the matmul layers)."""
        return str(getattr(self.precision_plugin, "precision", "")).startswith("bf16")

    def parallel_config(self, chain: list[str]) -> ParallelConfig:
        """This strategy's settings as `parallelize` takes them (bf16 parameters in FSDP2's
        compute under a bf16 precision)."""
        bf16 = self._bf16()
        return ParallelConfig(pipeline=self.pipeline_config,
                              sequence_parallel=self.sequence_parallel,
                              activation_checkpointing=self._checkpointing_setting(chain),
                              compile=self.compile,
                              param_dtype=torch.bfloat16 if bf16 else None)

    def _example_batch(self, model: nn.Module, trainer) -> dict[str, torch.Tensor]:
        """A synthetic per-replica batch of the size the data loaders give (every shape
        else is fixed by the model config): the pipeline's stage shapes are set from it."""
        from rag_mm.model import synthetic_batch

        size = self._loader_batch_size(trainer)
        if size < 1:
            raise ParallelConfigError(
                f"{type(self).__name__} builds its pipeline at setup for the loaders' batch "
                f"size, and no data loader of this run gives one; pass loaders with a "
                f"batch_size (or batches of tensors)")
        backend = getattr(getattr(model, "retrieval", None), "backend", None)
        return synthetic_batch(model.config, size, num_docs=len(backend) if backend else None)

    def _plan_partition(self, model: nn.Module, trainer) -> None:
        """`partition="auto"`: the partitioner's split of the model's chain, for the batch
        one replica trains with (the loaders are not built yet at setup, so the
        datamodule's `batch_size` says it; None: costed per sample), sharded over dp."""
        from trainers.parallel.auto import auto_partition

        if not hasattr(model, "config"):
            raise TypeError(f"partition='auto' needs a rag_mm model (with .config); give "
                            f"{type(self).__name__} explicit stages instead")
        config = self.pipeline_config
        chain = [name for name, _ in model.units()]
        batch_size = self._loader_batch_size(trainer) or getattr(trainer.datamodule, "batch_size",
                                                                 None)
        stages = auto_partition(model.config, pp_size=self.dims.pp, schedule=config.schedule,
                                num_microbatches=config.num_microbatches,
                                batch_size=batch_size if isinstance(batch_size, int) else None,
                                dp_size=self.dims.dp, device=self.partition_device,
                                bf16=self._bf16(),
                                activation_checkpointing=ActivationCheckpointing.parse(
                                    self._checkpointing_setting(chain)).planner_blocks(chain))
        self.pipeline_config = replace(config, stages=stages)
        check_schedule(self.pipeline_config, self.dims.pp)

    def _checkpointing_setting(self, chain: list[str]):
        """The run's activation checkpointing: the strategy's, else the module's (which
        `RAGModule` applied when it built the model); checked against the chain and the
        schedule before any work."""
        own = self.activation_checkpointing
        module = getattr(self.lightning_module, "hparams", {}).get("activation_checkpointing")
        if own is not None and module is not None and \
                ActivationCheckpointing.parse(own) != ActivationCheckpointing.parse(module):
            raise ParallelConfigError(
                f"activation_checkpointing={own!r} in {type(self).__name__} but "
                f"{module!r} in the LightningModule; give it in one place (or the same in both)")
        setting = own if own is not None else module
        ActivationCheckpointing.parse(setting).unit_names(chain)
        check_checkpoint_schedule(setting, self.pipeline_config.schedule)
        return setting

    def _check_split_ties(self, model: nn.Module) -> None:
        """Copies of a tied weight on different stages are summed as whole tensors (or as
        FSDP2 shards over dp, cut alike on every copy). Refuse a tensor-parallel plan that
        would shard a copy (e.g. a vocab-parallel LM head): its pieces would not line up."""
        if self.dims.tp == 1:
            return
        stage_of = {n: i for i, names in enumerate(self.pipeline_config.stages) for n in names}
        planned = set(tensor_parallel_plan(model, sequence_parallel=self.sequence_parallel))
        for tie in self._ties:
            if len({stage_of[name] for name in tie.holders}) == 1:
                continue
            for path in tie.paths.values():
                if path.rsplit(".", 1)[0] in planned:
                    raise ParallelConfigError(
                        f"split_tied_weights: {path} (tied across {tie.holders}) would be "
                        f"sharded by tensor parallelism, and sharded copies cannot be summed "
                        f"piece for piece; keep the tied units in one stage"
                    )

    def _stage_owners(self) -> list[int]:
        config = self.pipeline_config
        return stage_ranks(config.num_stages, self.dims.pp, config.schedule)

    def _loader_batch_size(self, trainer) -> int:
        """The largest per-replica batch the loaders of this run give: their `batch_size`,
        or for pre-batched loaders (`batch_size=None`) the rows of their first batch (0 if
        none says)."""
        loops = {TrainerFn.FITTING: [trainer.fit_loop, trainer.fit_loop.epoch_loop.val_loop],
                 TrainerFn.VALIDATING: [trainer.validate_loop],
                 TrainerFn.TESTING: [trainer.test_loop]}.get(trainer.state.fn, [])
        sizes = [0]
        for loop in loops:
            source = loop._data_source
            if not source.is_defined():
                continue
            loaders = source.dataloader()
            if isinstance(loaders, dict):
                loaders = list(loaders.values())
            for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
                sizes.append(_batch_size(loader))
        return max(sizes)

    def _padded(self, tensors: dict[str, torch.Tensor],
                rows: int | None = None) -> tuple[dict, torch.Tensor, int]:
        """`tensors` padded to the pipeline's batch size, each row's weight in the step's
        loss (the mean over the real rows of every replica: FSDP2 averages over dp, so a
        real row weighs dp / rows of all replicas; padding 0), and the rows of all replicas.
        `rows`: how many leading rows are real (default: all)."""
        pipeline = self.pipeline
        rows = len(_rows(tensors)) if rows is None else rows
        total = self._sum_over_dp(torch.tensor([float(rows)], device=self.root_device))
        weights = torch.zeros(pipeline.batch_size)
        weights[:rows] = self.dims.dp / total.item()
        return pad_rows(tensors, pipeline.batch_size), weights, int(total.item())

    def _sum_over_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dims.dp > 1:
            dist.all_reduce(tensor, group=self.device_mesh["dp"].get_group())
        return tensor

    # -- the training step -----------------------------------------------------------------------
    def training_step(self, batch, batch_idx=None, *args, **kwargs) -> torch.Tensor:
        tensors = _tensors(batch)
        if _in_retriever_warmup(self.lightning_module):
            return self._retriever_warmup_step(tensors)
        padded, weights, total = self._padded(tensors)
        earlier = self._take_grads()  # Lightning zeroes (or accumulates) these after this step
        with self.precision_plugin.train_step_context():
            losses = self.pipeline.step(padded, weights)
        self._parked = self._take_grads()
        for param, grad in earlier:
            param.grad = grad
        return self._log_losses(losses, len(_rows(tensors)), total, "train")

    def _retriever_warmup_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The module's retriever warm-up: the query encoder's contrastive loss alone, no
        generator, forward and backward on the ranks that hold the retrieval unit (stage 0);
        the other ranks' parameters get no gradient (as in one process, AdamW skips them).
        Logs `train/retriever_warmup_loss` on every rank.

        The loss runs through the retrieval unit's `forward` (`RAGModel.retriever_losses`),
        so under FSDP2 (dp > 1) its hooks gather the parameters and reduce-scatter the
        gradients as in a joint step (the other units' groups, not run, reduce nothing).
        In-batch negatives are each replica's rows (as in the joint step, within a
        micro-batch); the loss is the sum over every replica's rows over the gold rows of
        all replicas (a replica's weight dp / total, FSDP2 averaging over dp): one process
        accumulating the replicas' batches in one step. dp = 1: `RAGModel.retriever_loss`."""
        earlier = self._take_grads()
        counts = torch.tensor([float((batch["gold_keys"] >= 0).sum()), float(len(_rows(batch)))],
                              device=self.root_device)
        counts = self._sum_over_dp(counts)  # every rank holds its replica's batch
        total = counts[:1].clamp(min=1)  # gold rows of all replicas
        sums = torch.zeros(1, device=self.root_device)
        if self.pp_rank == self._stage_owners()[0]:
            with self.precision_plugin.train_step_context():
                losses = self._chain_model().retriever_losses(batch)
            (losses.sum() * (self.dims.dp / total[0])).backward()
            sums[0] = losses.detach().float().sum()
        self._parked = self._take_grads()
        for param, grad in earlier:
            param.grad = grad
        src = dist.get_global_rank(self.pp_group, self._stage_owners()[0])
        dist.broadcast(sums, src=src, group=self.pp_group)
        loss = (self._sum_over_dp(sums) / total)[0]
        self.lightning_module.log("train/retriever_warmup_loss", loss, prog_bar=True,
                                  batch_size=int(counts[1].item()))
        return loss

    def validation_step(self, batch, batch_idx=None, *args, **kwargs) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx=None, *args, **kwargs) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def _eval_step(self, batch, prefix: str) -> torch.Tensor:
        """The losses through the pipeline, forward only, and the module's generation
        metrics (`answer_counts`: exact match, recall@k) from greedy answers decoded through
        the pipeline (the module's own evaluation step is not run)."""
        with torch.inference_mode(False):  # Lightning evaluates under inference mode
            tensors, rows = _valid_prefix({k: v.clone() for k, v in _tensors(batch).items()})
            # a partial last batch, or a replica's share filler: only the valid rows count
            padded, _, total = self._padded(tensors, rows)
            with self.precision_plugin.val_step_context():
                losses = self.pipeline.evaluate(padded)
                answers = self._answer_metrics(tensors, rows)  # decoding takes any batch size
            loss = self._log_losses(losses, rows, total, prefix)
            if answers:
                self.lightning_module.log_dict(
                    {f"{prefix}/{name}": value for name, value in answers.items()},
                    prog_bar=prefix != "test", batch_size=total)
            return loss

    def _answer_metrics(self, batch: dict[str, torch.Tensor],
                        rows: int) -> dict[str, torch.Tensor]:
        """The module's `answer_counts` of the answers decoded through the pipeline for the
        first `rows` (valid) rows, summed over dp, as rates: what `answer_metrics` gives for
        the global batch in one process."""
        from trainers.module import rates

        module = self.lightning_module
        if not hasattr(module, "answer_counts"):
            return {}
        dp_group = self.device_mesh["dp"].get_group() if self.dims.dp > 1 else None
        tokens, keys = pipeline_generate(self._chain_model(), self.pipeline, batch,
                                         dp_group=dp_group)
        counts = module.answer_counts({k: v[:rows] for k, v in batch.items()}, tokens[:rows],
                                      keys[:rows])
        if dp_group is not None:
            names = sorted(counts)
            summed = torch.stack([counts[name] for name in names]).to(self.root_device)
            dist.all_reduce(summed, group=dp_group)
            counts = dict(zip(names, summed.cpu(), strict=True))
        return rates(counts)

    def _log_losses(self, losses: torch.Tensor | None, rows: int, total: int,
                    prefix: str) -> torch.Tensor:
        """Log the mean losses over the real rows of all replicas (`total`, the weight
        Lightning gives this batch in the epoch's mean); `rows`: this replica's."""
        means = self._share_losses(losses, rows)
        metrics = {f"{prefix}/loss": means.sum()}
        metrics.update({f"{prefix}/{n}": means[i] for i, n in enumerate(LOSS_NAMES)})
        self.lightning_module.log_dict(metrics, prog_bar=prefix != "test", batch_size=total)
        return means.sum()

    def backward(self, closure_loss: torch.Tensor, optimizer, *args, **kwargs) -> torch.Tensor:
        """The schedule already ran backward in `training_step`: hand its gradients back
        (adding to any being accumulated), with the usual hooks around it."""
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        for param, grad in self._parked:
            param.grad = grad if param.grad is None else param.grad + grad
        self._parked = []
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    def _local_params(self) -> list[nn.Parameter]:
        return [p for p in self.lightning_module.parameters() if p.grad is not None]

    def _take_grads(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        taken = [(p, p.grad) for p in self._local_params()]
        for p, _ in taken:
            p.grad = None
        return taken

    def _share_losses(self, losses: torch.Tensor | None, rows: int) -> torch.Tensor:
        """(2,) losses from the last stage, on every rank: the mean over the first `rows`
        (real) rows of every replica."""
        last = self._stage_owners()[-1]
        sums = torch.zeros(len(LOSS_NAMES) + 1, device=self.root_device)  # losses, rows
        if losses is not None:
            sums[:-1] = losses[:rows].float().sum(0)
            sums[-1] = rows
        dist.broadcast(sums, src=dist.get_global_rank(self.pp_group, last), group=self.pp_group)
        sums = self._sum_over_dp(sums)
        return sums[:-1] / sums[-1]

    # -- gradient norms --------------------------------------------------------------------------
    def grad_norm(self, parameters) -> torch.Tensor:
        """The 2-norm of all gradients of the model, over every stage and shard (a tied
        weight split across stages counted once)."""
        if self.pipeline is not None:
            parameters = self.pipeline.norm_parameters(list(parameters))
        return total_grad_norm(parameters, self.pp_group, self.root_device)

    def _clip_grad_by_norm(self, optimizer, clip_val: float) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        norm = self.grad_norm(params)
        scale = min(1.0, float(clip_val) / (norm.item() + 1e-6))
        if scale < 1.0:
            for p in params:
                p.grad.mul_(scale)

    # -- checkpoints -----------------------------------------------------------------------------
    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Resume from a distributed checkpoint folder saved under any (pp, tp, dp) layout:
        each rank reads the entries of the parameters it holds (DTensor shards resliced).
        A one-process Lightning checkpoint file resumes too (`single_device`)."""
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if path.is_file():  # e.g. scripts/pretrain.py's last.ckpt (a link to a step file)
            from lightning.fabric.utilities.cloud_io import _load

            from trainers.parallel.single_device import load_single_device_checkpoint

            checkpoint = _load(path, map_location="cpu", weights_only=weights_only)
            return load_single_device_checkpoint(self.model, self.optimizers, checkpoint, path,
                                                 strict=self.lightning_module.strict_loading)
        if not (path / _METADATA_FILENAME).is_file():
            raise ValueError(
                f"{path} is not a distributed checkpoint folder (no {_METADATA_FILENAME}); "
                f"{type(self).__name__} resumes from the folders it (or ModelParallelStrategy) saves"
            )
        state = {"state_dict": get_model_state_dict(self.model)}
        load(state, checkpoint_id=path)
        self.model.load_state_dict(state["state_dict"], strict=self.lightning_module.strict_loading)
        saved = set(FileSystemReader(path).read_metadata().state_dict_metadata)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            # every parameter's entries, with torch's zero state on this fresh optimizer
            wanted = get_optimizer_state_dict(self.model, optimizer, options=_FLAT)
            state = {key: {k: v for k, v in wanted.items() if f"{key}.{k}" in saved}}
            load(state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, options=_FLAT,
                                     optim_state_dict={**wanted, **state[key]})
            _drop_unsaved_state(self.model, optimizer, wanted.keys() - state[key].keys())
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """Optimizer state keyed by parameter name ("state.<name>.exp_avg",
        "param_groups.<name>.lr"), so pipeline ranks never write the same entry and any
        layout can read it back."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
        untouched = not optimizer.state
        state = get_optimizer_state_dict(self.model, optimizer, options=_FLAT)
        if untouched:
            # torch fills an empty optimizer's state with a zero-lr step (step=1, zero
            # moments) to have something to save: undone here and left out of the save, or
            # a rank that has not stepped yet (a stage idle in the retriever warm-up) would
            # take its first real AdamW step with step=2 bias correction, saved or resumed.
            # Parameters without state are saved without entries, as in one process.
            optimizer.state.clear()
            state = {k: v for k, v in state.items() if not k.startswith("state.")}
        return state

    def predict_step(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} does not run prediction; load the "
                           f"checkpoint into a single-device model to generate")


def _drop_unsaved_state(model: nn.Module, optimizer, missing_keys) -> None:
    """Forget the optimizer state of the parameters the checkpoint has no "state.<name>.*"
    entries for (they had none when it was saved: AdamW had not stepped them yet)."""
    unsaved = {k[len("state."):].rsplit(".", 1)[0] for k in missing_keys if k.startswith("state.")}
    for name, param in model.named_parameters():
        if name in unsaved:
            optimizer.state.pop(param, None)


def _batch_size(loader) -> int:
    """A loader's `batch_size`, or the rows of its first batch if it has none (0: unknown)."""
    size = getattr(loader, "batch_size", None)
    if isinstance(size, int):
        return size
    try:
        first = next(iter(loader))
    except (StopIteration, TypeError):
        return 0
    tensors = _tensors(first) if isinstance(first, dict) else {}
    return len(_rows(tensors)) if tensors else 0


def _tensors(batch: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _valid_prefix(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """`batch` without its `row_valid` marks, and how many leading rows are valid: the
    rows a replica's evaluation share was filled with (`trainers.data.EvalShardSampler`)
    come last. Fillers stay in a batch of no valid row (every replica runs the step); in a
    batch that has some, they are dropped (the strategy pads with hidden copies)."""
    if ROW_VALID not in batch:
        return batch, len(_rows(batch))
    valid = batch.pop(ROW_VALID).bool().cpu()
    rows = int(valid.sum())
    if not valid[:rows].all():
        raise ValueError(f"{ROW_VALID} must mark a prefix of the batch's rows valid, got "
                         f"{valid.int().tolist()}")
    return ({k: v[:rows] for k, v in batch.items()} if rows else batch), rows


def _rows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch[min(batch)]  # any tensor: all have the batch dim first


def pad_rows(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """`batch` grown to `size` rows with copies of its own rows (so every value stays one
    the model has seen), the copies' `gold_keys` set to -1: a row without a gold document
    is hidden from the other rows' in-batch negatives and has no contrastive loss
    (`rag_mm.retriever.contrastive_loss`), and every other loss is per row; the caller
    gives the copies weight 0."""
    rows = len(_rows(batch))
    if rows >= size:  # a larger batch is refused by the pipeline, by name
        return batch
    index = torch.arange(size) % rows
    padded = {k: v[index.to(v.device)] for k, v in batch.items()}
    if "gold_keys" in padded:
        padded["gold_keys"][rows:] = -1
    return padded


def _in_retriever_warmup(module) -> bool:
    """Whether the module's training step now trains the query encoder alone."""
    return bool(getattr(module, "in_retriever_warmup", lambda: False)())


def total_grad_norm(parameters, pp_group: dist.ProcessGroup | None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """2-norm of the gradients of `parameters` (this rank's), whole over tensor-parallel
    shards (DTensor) and summed over the pipeline ranks of `pp_group`."""
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for p in parameters:
        if p.grad is None:
            continue
        norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares = squares + norm.double().to(device) ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(squares, group=pp_group)
    return squares.sqrt().float()


__all__ = ["ParallelConfigError", "PipelineStrategy", "RemoteUnit", "total_grad_norm"]
